"""Low precision (SPEC §5): fp32 state for bf16 params, stochastic rounding, resume."""

from __future__ import annotations

import io

import pytest
import torch

from emo_core.precision import copy_stochastic_
from tests.core.cases import NAMES, OPTIMIZERS, scripted_losses, set_random_grads

FIXED_LR = {"min_lr": 5e-4, "max_lr": 5e-4}  # pin the pulse: these tests are about rounding
# The plain update: under averaging the fp32 average x carries the steps that rounding
# throws away, so round-to-nearest no longer stalls completely.
PLAIN = {"emosens": {"average": False}, "emoairy": {}, "emocats": {"average": False}}


def _pull_towards(name: str, dtype: torch.dtype, steps: int, **kwargs) -> torch.Tensor:
    """Minimise 0.5 * ||p - 0.5||² from p = 1. Each update (at most ~3 * 5e-4) is below
    bf16's half-spacing just below 1.0 (2**-9): round-to-nearest throws every update away."""
    p = torch.ones(2048, dtype=dtype, requires_grad=True)
    opt = OPTIMIZERS[name]([p], weight_decay=0.0, **FIXED_LR, **PLAIN[name], **kwargs)
    for _ in range(steps):
        p.grad = (p.detach().float() - 0.5).to(dtype)
        opt.step(loss=1.0)
    return p.detach().float()


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_rounding_keeps_learning_where_bf16_stalls(name: str) -> None:
    steps = 200
    fp32 = _pull_towards(name, torch.float32, steps).mean()
    nearest = _pull_towards(name, torch.bfloat16, steps, stochastic_rounding=False).mean()
    stochastic = _pull_towards(name, torch.bfloat16, steps).mean()  # default for bf16
    assert fp32 < 0.95  # the fp32 run moved
    assert nearest == 1.0  # every update rounded away
    assert float((stochastic - fp32).abs() / (1.0 - fp32)) < 0.02  # within 2% of the move


def test_copy_stochastic_is_unbiased_and_exact_on_representable_values() -> None:
    gen = torch.Generator().manual_seed(0)
    source = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way to the next bf16
    target = torch.empty_like(source, dtype=torch.bfloat16)
    copy_stochastic_(target, source, gen)
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert float(target.float().mean()) == pytest.approx(1.0 + 2**-9, rel=1e-4)
    exact = torch.tensor([1.0, -2.5, 0.0, float("inf")])
    out = torch.empty(4, dtype=torch.bfloat16)
    copy_stochastic_(out, exact, gen)
    assert torch.equal(out.float(), exact)


@pytest.mark.parametrize("value", [1.0 + 2**-12, -0.3, 3e-5, 1e-8, -1e-8])
def test_copy_stochastic_into_fp16_is_unbiased(value: float) -> None:
    """fp16 has its own exponent (and subnormals below 6e-5): the value is one of its two
    fp16 neighbours, and their mean is the value."""
    gen = torch.Generator().manual_seed(0)
    source = torch.full((400_000,), value)
    target = copy_stochastic_(torch.empty_like(source, dtype=torch.float16), source, gen)
    below, above = sorted(target.float().unique().tolist())
    assert below < value < above
    assert torch.nextafter(torch.tensor(below).half(), torch.tensor(above).half()) == above
    spread = (above - below) / len(source) ** 0.5
    assert abs(float(target.double().mean()) - value) < 5 * spread


def test_copy_stochastic_into_fp16_keeps_representable_and_non_finite_values() -> None:
    exact = torch.tensor([1.0, -2.5, 0.0, -0.0, 65504.0, float("inf"), -float("inf")])
    out = copy_stochastic_(torch.empty(7, dtype=torch.float16), exact, torch.Generator())
    assert torch.equal(out.float(), exact)
    assert torch.signbit(out[3])
    nan = copy_stochastic_(
        torch.empty(1, dtype=torch.float16), torch.tensor([float("nan")]), torch.Generator()
    )
    assert nan.isnan().all()


@pytest.mark.parametrize("name", NAMES)
def test_fp16_params_learn_from_steps_below_their_spacing(name: str) -> None:
    """fp16 writes are rounded stochastically too: pulse="distance" starts at 1e-6, far
    below fp16's spacing near 1 (2**-10); round-to-nearest threw every step away, so the
    parameters never left their start and the controller never saw progress."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(32, 16, generator=gen)
    w = torch.ones(32, 16, dtype=torch.float16, requires_grad=True)
    opt = OPTIMIZERS[name]([w], pulse="distance")
    for _ in range(150):
        loss = ((w.float() - target) ** 2).mean()
        w.grad = None
        loss.backward()
        opt.step(loss=loss.detach())
    assert opt.get_effective_lr()[0] > 1e3 * 1e-6
    assert ((w.float() - target) ** 2).mean() < 0.5 * ((1.0 - target) ** 2).mean()


def test_each_bucket_rounds_with_its_own_noise() -> None:
    """Two param groups of equal bf16 tensors and gradients draw different rounding noise
    (each bucket reseeded the generator with the same seed, so they rounded alike), while a
    one-group run keeps the seed it had (so bf16 trajectories of one group do not change)."""
    a = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
    b = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
    opt = OPTIMIZERS["emosens"]([{"params": [a]}, {"params": [b]}], **FIXED_LR)
    single = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
    alone = OPTIMIZERS["emosens"]([single], **FIXED_LR)
    for _ in range(3):
        for p in (a, b, single):
            p.grad = torch.full_like(p, 0.3)
        opt.step(loss=1.0)
        alone.step(loss=1.0)
    assert not torch.equal(a, b)
    assert torch.equal(a, single)  # the first bucket's stream is the seed it always had


@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_keep_fp32_state_also_after_load(name: str) -> None:
    p = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = OPTIMIZERS[name]([p])
    p.grad = torch.randn_like(p)
    opt.step(loss=1.0)
    floating = {k: v.dtype for k, v in opt.state[p].items() if k != "step"}
    assert set(floating.values()) == {torch.float32}, floating
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = OPTIMIZERS[name]([p])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert {k: v.dtype for k, v in fresh.state[p].items() if k != "step"} == floating
    assert p.dtype == torch.bfloat16


@pytest.mark.parametrize("compile_update", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", NAMES)
def test_bf16_state_dtype_stores_bf16_and_still_learns(name: str, compile_update: bool) -> None:
    p = torch.ones(4096, requires_grad=True)
    opt = OPTIMIZERS[name](
        [p],
        state_dtype=torch.bfloat16,
        weight_decay=0.0,
        compile_update=compile_update,
        **FIXED_LR,
    )
    for _ in range(50):
        p.grad = p.detach() - 0.5
        opt.step(loss=1.0)
    assert {v.dtype for k, v in opt.state[p].items() if k != "step"} == {torch.bfloat16}
    assert float(p.detach().mean()) < 0.99


@pytest.mark.parametrize("name", NAMES)
def test_bf16_stochastic_rounding_resume_is_reproducible(name: str) -> None:
    def fresh() -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(16, 8, generator=gen).bfloat16().requires_grad_() for _ in range(2)]
        return params, OPTIMIZERS[name](params, use_shadow=True)

    def train(params, opt, steps: range) -> None:
        losses = scripted_losses(steps.stop)
        for step in steps:
            set_random_grads(params, step)
            opt.step(loss=losses[step])

    ref_params, ref_opt = fresh()
    train(ref_params, ref_opt, range(20))
    params, opt = fresh()
    opt.emo_state["emo_meta"]["seed"] = ref_opt.emo_state["emo_meta"]["seed"]  # same seed
    train(params, opt, range(10))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params, resumed_opt = fresh()
    with torch.no_grad():
        for p, value in zip(resumed_params, saved["params"]):
            p.copy_(value)
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed_params, resumed_opt, range(10, 20))
    for a, b in zip(resumed_params, ref_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_fp64_params_with_a_narrower_state_dtype_keep_fp64(name: str, state_dtype) -> None:
    """The update of fp64 parameters is computed in fp64 whatever ``state_dtype`` stores:
    computed in fp32 and copied back, every step rounded the whole parameter to fp32, so a
    skipped step and an ``lr = 0`` group changed it too."""
    start = 1.0 + 1e-12  # not representable in fp32
    frozen = torch.full((4, 3), start, dtype=torch.float64, requires_grad=True)
    trained = torch.full((4, 3), start, dtype=torch.float64, requires_grad=True)
    groups = [{"params": [frozen], "lr": 0.0}, {"params": [trained]}]
    opt = OPTIMIZERS[name](groups, state_dtype=state_dtype)
    for p in (frozen, trained):
        p.grad = torch.ones_like(p)
    opt.step(loss=float("nan"))  # skipped: nothing may change
    assert torch.equal(trained.detach(), torch.full_like(trained, start))
    opt.step(loss=1.0)
    assert torch.equal(frozen.detach(), torch.full_like(frozen, start))
    moved = trained.detach()
    assert not torch.equal(moved, moved.float().double())  # still fp64 values
    assert all(v.dtype in (state_dtype, torch.float32) for v in opt.state[trained].values())


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_a_gradient_of_another_dtype_than_its_parameter_is_cast(name: str, grad_dtype) -> None:
    """``p.grad_dtype = None`` lets a gradient differ from its parameter's dtype: the step
    is the one of the cast gradient (the fused and blocked kernels raised halfway through
    the step, after the loss sensor had advanced), and the overflow rule is the compute
    dtype's (a fp64 gradient of 1e30 would square to inf in fp32)."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, 5, generator=gen)
    grads = [torch.randn(6, 5, generator=gen).to(grad_dtype) for _ in range(3)]
    ours = torch.nn.Parameter(start.clone())
    ours.grad_dtype = None
    cast = torch.nn.Parameter(start.clone())
    opt, reference = OPTIMIZERS[name]([ours]), OPTIMIZERS[name]([cast])
    for step, g in enumerate(grads):
        ours.grad, cast.grad = g.clone(), g.float()
        opt.step(loss=1.0 + step)
        reference.step(loss=1.0 + step)
    assert torch.equal(ours.detach(), cast.detach())
    if grad_dtype == torch.float64:
        before = ours.detach().clone()
        ours.grad = torch.full((6, 5), 1e30, dtype=torch.float64)
        opt.step(loss=1.0)
        assert torch.equal(ours.detach(), before)
        assert opt.telemetry()["skipped_steps"] == 1.0
