"""``EmoSens(average=True)``: Schedule-Free iterate averaging on the distance controller
(emo_core/averaging.md). The math against an explicit three-sequence reference, the
train/eval switch, and every contract of the step (no syncs, bitwise skips, exact resume)."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import pytest
import torch

from emo_core import EmoAiry, EmoCats, EmoSens
from emo_core.averaging import fold_due
from tests.core.cases import (
    assert_bad_step_is_a_no_op,
    assert_same,
    scripted_losses,
    set_random_grads,
    small_model,
    train_scripted,
)
from tests.core.test_no_sync import count_host_reads

AVERAGE = {"pulse": "distance", "average": True}
KERNELS = ({"foreach": False}, {"foreach": True}, {"fused": True}, {"compile_update": True})


def assert_schedule_free(
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    beta: float,
    direction: Callable[[int, torch.Tensor, torch.Tensor, int], torch.Tensor],
    steps: int = 25,
) -> None:
    """``steps`` scripted steps of ``opt`` against the textbook form that stores all three
    sequences: ``z ← z − lr·u`` with ``u = direction(i, g, y_i, step)`` at the training
    point (the rule's own moments kept by the caller); ``x`` the lr_max²-weighted average
    of ``z``, brought up to date on the steps that fold (``fold_due``: every step for the
    first 63) and by eval(); ``y = β·x + (1 − β)·z``. The parameters hold ``y`` while
    training and ``x`` after eval()."""
    z = [p.detach().double().clone() for p in params]
    x = [t.clone() for t in z]
    lr_max = weight_sum = 0.0
    pending = 1.0
    rtol = 1e-5 if steps <= 25 else 1e-4  # (fp32 against fp64, rounding accumulates)
    for step, loss in enumerate(scripted_losses(steps)):
        set_random_grads(params, step)
        grads = [p.grad.double() for p in params]
        ys = [p.detach().double().clone() for p in params]
        opt.step(loss=abs(loss) + 0.1)
        lr = opt.get_effective_lr()[0]
        lr_max = max(lr_max, lr)
        weight_sum += lr_max**2
        pending *= 1 - lr_max**2 / weight_sum
        fold = fold_due(step + 1)
        for i, g in enumerate(grads):
            z[i] = z[i] - lr * direction(i, g, ys[i], step)
            if fold:
                x[i] = pending * x[i] + (1 - pending) * z[i]
            y = (1 - beta) * z[i] + beta * x[i]
            torch.testing.assert_close(params[i].double(), y, rtol=rtol, atol=1e-7)
        pending = 1.0 if fold else pending
    opt.eval()
    for p, x_i, z_i in zip(params, x, z):
        want = pending * x_i + (1 - pending) * z_i
        torch.testing.assert_close(p.double(), want, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("steps", [25, 150])
@pytest.mark.parametrize("impl", [{"foreach": False}, {"fused": True}], ids=str)
def test_the_update_is_schedule_free_adam_at_the_pulse(impl: dict, steps: int) -> None:
    """z steps by the normalised gradient (Adam's bias-corrected v̂) plus weight decay at
    the training point y, against the three-sequence form (:func:`assert_schedule_free`),
    β = betas[0]; 150 steps fold every 2nd and then 4th step."""
    params = list(small_model().parameters())
    beta, beta2, eps, wd = 0.9, 0.995, 1e-8, 0.01
    opt = EmoSens(params, weight_decay=wd, **impl, **AVERAGE)
    v = [torch.zeros_like(p, dtype=torch.float64) for p in params]

    def adam(i: int, g: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        v[i] = beta2 * v[i] + (1 - beta2) * g * g
        v_hat = v[i] / (1 - beta2 ** (step + 1))
        return g / (v_hat.sqrt() + eps) + wd * y

    assert_schedule_free(opt, params, beta, adam, steps)


# Each averaged optimizer's kernels against its per-tensor loop (EmoCats has no fused one).
SAME_STEP_CASES = [(EmoSens, impl) for impl in KERNELS[1:]] + [
    (EmoCats, impl) for impl in ({"foreach": True}, {"compile_update": True})
]


@pytest.mark.parametrize(
    ("cls", "impl"),
    SAME_STEP_CASES,
    ids=[f"{cls.__name__}-{next(iter(impl))}" for cls, impl in SAME_STEP_CASES],
)
def test_every_kernel_computes_the_same_step(cls: type, impl: dict) -> None:
    ref_model, model = small_model(), small_model()
    ref = cls(ref_model.parameters(), foreach=False, **AVERAGE)
    opt = cls(model.parameters(), **impl, **AVERAGE)
    train_scripted(ref_model, ref, range(12))
    train_scripted(model, opt, range(12))
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _big_model() -> torch.nn.Module:
    """A tensor of >= CPU_BLOCK elements (blocked CPU kernel) beside small ones."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(400, 400), torch.nn.Linear(400, 3))


@pytest.mark.parametrize("cls", [EmoSens, EmoCats])
@pytest.mark.parametrize("bad", [None, "inf_grad"])
def test_the_blocked_cpu_kernel_matches_the_loop_and_skips_bitwise(
    cls: type, bad: str | None
) -> None:
    ref_model, model = _big_model(), _big_model()
    ref = cls(ref_model.parameters(), foreach=False, **AVERAGE)
    opt = cls(model.parameters(), foreach=True, **AVERAGE)  # blocked for the 400x400 weight
    train_scripted(ref_model, ref, range(8))
    train_scripted(model, opt, range(8))
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if bad:
        params = list(model.parameters())
        set_random_grads(params, 8)
        params[0].grad[3, 7] = float("inf")
        before, before_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        opt.step(loss=0.5)
        assert_same(model.state_dict(), before)
        assert_same(opt.state_dict()["state"], before_opt["state"])


def test_the_average_beats_the_training_point_on_a_noisy_problem() -> None:
    """What averaging is for: on noisy least squares the evaluated average is closer to the
    solution than the iterate the gradients were taken at."""
    gen = torch.Generator().manual_seed(0)
    true_w = torch.randn(8, 16, generator=gen)
    w = torch.zeros(8, 16, requires_grad=True)
    opt = EmoSens([w], **AVERAGE)
    for _ in range(400):
        x = torch.randn(16, 16, generator=gen)
        y = x @ true_w.T + 0.5 * torch.randn(16, 8, generator=gen)
        loss = ((x @ w.T - y) ** 2).mean()
        w.grad = None
        loss.backward()
        opt.step(loss=loss.detach())
    at_y = (w.detach() - true_w).norm()
    opt.eval()
    at_x = (w.detach() - true_w).norm()
    assert at_x < 0.7 * at_y
    opt.train()
    torch.testing.assert_close((w.detach() - true_w).norm(), at_y, rtol=1e-5, atol=1e-6)


def test_eval_and_train_switch_once_and_step_refuses_eval_mode() -> None:
    model = small_model()
    opt = EmoSens(model.parameters(), **AVERAGE)
    train_scripted(model, opt, range(10))
    training = copy.deepcopy(model.state_dict())
    opt.eval()
    averaged = copy.deepcopy(model.state_dict())
    opt.eval()  # already evaluating: nothing moves
    assert_same(model.state_dict(), averaged)
    assert any(not torch.equal(averaged[k], training[k]) for k in training)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        opt.step(loss=1.0)
    assert_same(model.state_dict(), averaged)
    assert_same(opt.state_dict(), before)
    opt.train()
    opt.train()
    for key, value in training.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    train_scripted(model, opt, range(10, 12))


@pytest.mark.parametrize("cls", [EmoSens, EmoAiry, EmoCats])
def test_train_and_eval_are_no_ops_without_averaging(cls) -> None:
    model = small_model()
    opt = cls(
        model.parameters(), pulse="distance", **({} if cls is EmoAiry else {"average": False})
    )
    train_scripted(model, opt, range(5))
    before = copy.deepcopy(model.state_dict())
    opt.eval()
    assert_same(model.state_dict(), before)
    train_scripted(model, opt, range(5, 7))  # no eval-mode refusal either
    opt.train()


def test_step_makes_no_host_reads() -> None:
    params = list(small_model().parameters())
    opt = EmoSens(params, **AVERAGE)
    for step, loss in enumerate(scripted_losses(5)):
        set_random_grads(params, step)
        with count_host_reads() as counts:
            opt.step(loss=torch.tensor(loss))
        assert sum(counts.values()) == 0, dict(counts)


@pytest.mark.parametrize(
    "impl", KERNELS[:3], ids=lambda k: f"{next(iter(k))}={next(iter(k.values()))}"
)
@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_a_skipped_step_is_a_bitwise_no_op(impl: dict, bad: str) -> None:
    model = small_model()
    params = list(model.parameters())
    opt = EmoSens(params, **impl, **AVERAGE)
    train_scripted(model, opt, range(4))
    assert "emo_average" in assert_bad_step_is_a_no_op(model, opt, bad, step=4)


@pytest.mark.parametrize("impl", KERNELS, ids=lambda k: next(iter(k)))
def test_a_skipped_first_step_changes_no_parameter_and_counts_no_step(impl: dict) -> None:
    """The bias correction of a step counts the valid steps; before the first one there is
    none to correct (1 − β2⁰ = 0), and a skipped first step must still leave every
    parameter bitwise as it was (not 0·inf = nan)."""
    model = small_model()
    params = list(model.parameters())
    opt = EmoSens(params, **impl, **AVERAGE)
    before = copy.deepcopy(model.state_dict())
    set_random_grads(params, 0)
    opt.step(loss=float("nan"))
    assert_same(model.state_dict(), before)
    assert opt.emo_state["emo_average"]["steps"] == 0
    train_scripted(model, opt, range(1, 4))
    assert opt.emo_state["emo_average"]["steps"] == 3
    assert all(torch.isfinite(p).all() for p in params)


def test_a_state_saved_before_the_step_count_resumes_with_the_steps_taken() -> None:
    """An averaged state written by the first version of this mode (no ``steps`` entry)
    loads, and its count is the optimizer's step count (not 0, which would shrink the next
    steps ~14x as if v had just started)."""
    model = small_model()
    opt = EmoSens(model.parameters(), **AVERAGE)
    train_scripted(model, opt, range(6))
    saved = opt.state_dict()
    del saved["param_groups"][0]["emo_state"]["emo_average"]["steps"]
    fresh = EmoSens(small_model().parameters(), **AVERAGE)
    fresh.load_state_dict(saved)
    assert fresh.emo_state["emo_average"]["steps"] == 6


@pytest.mark.parametrize("save_in", ["train", "eval"])
def test_resume_is_bitwise_exact(save_in: str) -> None:
    """Saved while training, or in eval mode (model at the average, as one saves for
    inference): the resumed run continues bitwise like the uninterrupted one."""
    ref_model = small_model()
    ref = EmoSens(ref_model.parameters(), **AVERAGE)
    train_scripted(ref_model, ref, range(15))
    if save_in == "eval":
        ref.eval()
        ref.train()
    train_scripted(ref_model, ref, range(15, 30))
    model = small_model()
    opt = EmoSens(model.parameters(), **AVERAGE)
    train_scripted(model, opt, range(15))
    if save_in == "eval":
        opt.eval()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model = small_model(seed=5)
    fresh_model.load_state_dict(saved["model"])
    fresh = EmoSens(fresh_model.parameters(), **AVERAGE)
    fresh.load_state_dict(saved["opt"])
    if save_in == "eval":
        with pytest.raises(RuntimeError, match="eval mode"):
            fresh.step(loss=1.0)
        fresh.train()
    train_scripted(fresh_model, fresh, range(15, 30))
    assert_same(fresh_model.state_dict(), ref_model.state_dict())
    assert_same(fresh.emo_state, ref.emo_state)


def test_state_is_x_and_v_eight_bytes_per_parameter() -> None:
    model = small_model()
    opt = EmoSens(model.parameters(), **AVERAGE)
    train_scripted(model, opt, range(2))
    for p in model.parameters():
        assert sorted(opt.state[p]) == ["exp_avg_sq", "x"]
        assert all(t.dtype == torch.float32 and t.shape == p.shape for t in opt.state[p].values())


def test_a_state_dict_of_the_other_mode_is_refused_and_changes_nothing() -> None:
    plain_model, model = small_model(), small_model()
    plain = EmoSens(plain_model.parameters(), pulse="distance", average=False)
    train_scripted(plain_model, plain, range(3))
    opt = EmoSens(model.parameters(), **AVERAGE)
    train_scripted(model, opt, range(3))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"Invalid state_dict: .*lacks \['x'\].*with average=True"):
        opt.load_state_dict(plain.state_dict())
    assert_same(opt.state_dict(), before)
    with pytest.raises(
        ValueError, match=r"Invalid state_dict: .*; a state saved with average=True needs"
    ):
        plain.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_multiplying_the_loss_by_a_constant_keeps_the_trajectory(scale: float) -> None:
    def run(factor: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        opt = EmoSens(model.parameters(), **AVERAGE)
        gen = torch.Generator().manual_seed(1)
        for _ in range(60):
            x = torch.randn(32, 8, generator=gen)
            loss = factor * ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
        opt.eval()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(1.0), run(scale)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_parameters_train_and_switch() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(16, 16, generator=gen)
    w = torch.zeros(16, 16, dtype=torch.bfloat16, requires_grad=True)
    opt = EmoSens([w], **AVERAGE)
    for _ in range(200):
        loss = ((w.float() - target) ** 2).mean()
        w.grad = None
        loss.backward()
        opt.step(loss=loss.detach())
    assert opt.state[w]["x"].dtype == torch.float32
    opt.eval()
    assert w.dtype == torch.bfloat16
    assert ((w.float() - target) ** 2).mean() < 0.1 * (target**2).mean()


@pytest.mark.parametrize("impl", KERNELS[:3], ids=str)
@pytest.mark.parametrize("cls", [EmoSens, EmoCats])
def test_lr_zero_freezes_a_group_bitwise(cls, impl: dict) -> None:
    """A group whose lr is set to 0 mid-run keeps its parameters bitwise, as without
    averaging (the averaging step ``y ← lerp(y, z, c)`` had kept pulling them toward z)."""
    model = small_model()
    body, head = list(model["lin"].parameters()), list(model["out"].parameters())
    if cls is EmoCats and impl.get("fused"):
        impl = {}  # (EmoCats has no fused kernel)
    opt = cls([{"params": body}, {"params": head}], **AVERAGE, **impl)
    params = body + head
    for step in range(30):
        if step == 15:
            opt.param_groups[0]["lr"] = 0.0
            frozen = [p.detach().clone() for p in body]
            head_before = head[0].detach().clone()
        set_random_grads(params, step)
        opt.step(loss=1.0 / (step + 1))
    assert_same(frozen, [p.detach() for p in body])
    assert not torch.equal(head[0], head_before)  # the other group trains on


@pytest.mark.parametrize("cls", [EmoSens, EmoCats])
def test_a_low_state_dtype_does_not_round_fp32_parameters_on_eval_and_train(cls) -> None:
    """x kept in bf16 (``state_dtype``) beside fp32 parameters: eval() mixes in fp32 and
    train() gives the training point back bitwise (an earlier switch cast the parameter
    down to bf16: every eval() quantised the model, and a round trip moved it by ~1e-4).
    Run past the steps that fold every step, so eval() has mixes to spend: the parameters
    then hold the average a fold would make, ``x + C/(1 − β)·(y − x)``, and the state
    does not move (evaluating does not change the training run)."""
    model = small_model()
    params = list(model.parameters())
    opt = cls(params, state_dtype=torch.bfloat16, **AVERAGE)
    train_scripted(model, opt, range(71))  # (71 is not a fold step: every 2nd there)
    pending = opt.emo_state["emo_average"]["pending"]
    assert pending < 1
    y = [p.detach().clone() for p in params]
    before = [copy.deepcopy(opt.state[p]) for p in params]
    beta = opt._interpolation(opt.param_groups[0])
    opt.eval()
    for p, y0 in zip(params, y):
        x = opt.state[p]["x"].float()
        want = x + (1 - pending) / (1 - beta) * (y0 - x)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7)
        assert not torch.equal(p.detach(), x)
    opt.train()
    assert_same([p.detach() for p in params], y)
    assert_same([opt.state[p] for p in params], before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pulse": "v37", "average": True}, r"average=True with pulse='v37'.*pulse='distance'"),
        ({**AVERAGE, "use_shadow": True}, r"use_shadow=True with average=True"),
        ({**AVERAGE, "betas": (0.0, 0.995)}, r"betas\[0\]=0 with average=True"),
        ({"pulse": "distance", "average": "maybe"}, r"average"),
    ],
)
def test_bad_options_raise_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmoSens(small_model().parameters(), **kwargs)


def test_the_fused_kernel_leaves_gradients_as_they_were() -> None:
    """The fused kernel uses each gradient as its own first-moment buffer (``lerp(g, g, 1)``);
    the values users read after ``step()`` stay the same (a zero's sign aside: on CPU a
    ``-0.0`` comes back as ``+0.0``, ``test_contract.py`` checks the bits)."""
    model = small_model()
    params = list(model.parameters())
    opt = EmoSens(params, fused=True, **AVERAGE)
    for step in range(3):
        set_random_grads(params, step)
        before = [p.grad.clone() for p in params]
        opt.step(loss=1.0 - 0.1 * step)
        for p, grad in zip(params, before):
            assert torch.equal(p.grad, grad)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_a_differentiable_gradient_is_not_used_as_a_buffer() -> None:
    """With ``create_graph=True`` the gradient is part of a graph: the fused kernel, which
    writes into it, is not chosen (auto picks the multi-tensor kernel; fused=True refuses)."""
    params = list(small_model().parameters())
    loss = sum((p**2).sum() for p in params)
    loss.backward(create_graph=True)
    with pytest.raises(RuntimeError, match="fused=True"):
        EmoSens(params, fused=True, **AVERAGE).step(loss=loss.detach())
    auto = EmoSens(params, **AVERAGE)
    auto.step(loss=loss.detach())
    assert (
        auto._pick_impl(params, [auto.state[p] for p in params], torch.float32, aligned=True)
        == "foreach"
    )


@pytest.mark.parametrize("steps", [25, 150])
def test_emocats_averaged_is_schedule_free_lion_at_the_pulse(steps: int) -> None:
    """EmoCats(average=True): z steps by Lion's sign of the blended momentum (plus weight
    decay at the training point y), m follows the gradient, against the three-sequence
    form (:func:`assert_schedule_free`) with β = interpolation."""
    params = list(small_model().parameters())
    wd, beta = 0.01, 0.8
    opt = EmoCats(params, weight_decay=wd, foreach=False, **AVERAGE)
    beta1, beta2 = opt.param_groups[0]["betas"]
    assert (beta1, beta2) == (0.9, 0.8)
    m = [torch.zeros_like(p, dtype=torch.float64) for p in params]

    def lion(i: int, g: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        u = torch.sign(beta1 * m[i] + (1 - beta1) * g) + wd * y
        m[i] = beta2 * m[i] + (1 - beta2) * g
        return u

    assert_schedule_free(opt, params, beta, lion, steps)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_emocats_averaged_skipped_step_is_a_bitwise_no_op(foreach: bool, bad: str) -> None:
    model = small_model()
    opt = EmoCats(model.parameters(), foreach=foreach, **AVERAGE)
    train_scripted(model, opt, range(4))
    assert "emo_average" in assert_bad_step_is_a_no_op(model, opt, bad, step=4)


def test_emocats_averaged_resumes_bitwise_and_keeps_m_and_x() -> None:
    ref_model = small_model()
    ref = EmoCats(ref_model.parameters(), **AVERAGE)
    train_scripted(ref_model, ref, range(10))
    ref.eval()
    ref.train()
    train_scripted(ref_model, ref, range(10, 20))
    model = small_model()
    opt = EmoCats(model.parameters(), **AVERAGE)
    train_scripted(model, opt, range(10))
    opt.eval()
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    fresh_model = small_model(seed=5)
    fresh_model.load_state_dict(saved["model"])
    fresh = EmoCats(fresh_model.parameters(), **AVERAGE)
    fresh.load_state_dict(saved["opt"])
    assert set(fresh.state_dict()["state"][0]) == {"exp_avg", "x", "y"}  # y: while evaluating
    fresh.train()
    assert set(fresh.state_dict()["state"][0]) == {"exp_avg", "x"}  # 8 B/param
    train_scripted(fresh_model, fresh, range(10, 20))
    assert_same(fresh_model.state_dict(), ref_model.state_dict())


def test_emocats_interpolation_is_checked() -> None:
    with pytest.raises(ValueError, match=r"Invalid interpolation"):
        EmoCats(small_model().parameters(), interpolation=1.0, **AVERAGE)


@pytest.mark.parametrize("cycle_momentum", [True, False])
def test_a_scheduler_that_cycles_the_interpolation_weight_is_warned_about(cycle_momentum) -> None:
    """OneCycleLR rewrites betas[0] every step by default; under averaging that is β of
    ``y = β·x + (1 − β)·z``, so the average eval() recovers shifts: say so, once."""
    model = small_model()
    opt = EmoSens(model.parameters(), **AVERAGE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1.0, total_steps=20, cycle_momentum=cycle_momentum
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(10):
            set_random_grads(list(model.parameters()), step)
            opt.step(loss=1.0 / (step + 1))
            schedule.step()
    said = [w for w in caught if "interpolation weight" in str(w.message)]
    assert len(said) == (1 if cycle_momentum else 0)
    if said:
        assert "cycle_momentum=False" in str(said[0].message)


@pytest.mark.parametrize("optimizer", [EmoSens, EmoCats])
def test_adding_a_param_group_is_not_warned_about_as_a_changed_interpolation(optimizer) -> None:
    """Unfreezing a layer as a new group adds a β; none of the old ones changed."""
    model = small_model()
    params = list(model.parameters())
    opt = optimizer(params[:2], **AVERAGE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(6):
            if step == 3:
                opt.add_param_group({"params": params[2:]})
            set_random_grads(params, step)
            opt.step(loss=1.0 / (step + 1))
    assert not [w for w in caught if "interpolation weight" in str(w.message)]


# The lazy average (averaging.md, "Folds"): from call 64 on the average is brought up to
# date every 2nd, 3rd, ... 16th step, so these tests run past it.
FOLDING = [(EmoSens, {"fused": True}), (EmoSens, {"foreach": True}), (EmoCats, {})]
FOLDING_IDS = ["EmoSens-fused", "EmoSens-foreach", "EmoCats"]


@pytest.mark.parametrize(("cls", "impl"), FOLDING, ids=FOLDING_IDS)
@pytest.mark.parametrize("save_in", ["train", "eval"])
def test_resume_between_folds_is_bitwise_exact(cls: type, impl: dict, save_in: str) -> None:
    """Saved at a step that did not fold (mixes pending), in training or eval mode: the
    resumed run continues bitwise like the uninterrupted one, folds included."""
    assert not fold_due(71)
    ref_model = small_model()
    ref = cls(ref_model.parameters(), **impl, **AVERAGE)
    train_scripted(ref_model, ref, range(71))
    train_scripted(ref_model, ref, range(71, 100))
    model = small_model()
    opt = cls(model.parameters(), **impl, **AVERAGE)
    train_scripted(model, opt, range(71))
    assert opt.emo_state["emo_average"]["pending"] < 1
    if save_in == "eval":
        opt.eval()
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    fresh_model = small_model(seed=5)
    fresh_model.load_state_dict(saved["model"])
    fresh = cls(fresh_model.parameters(), **impl, **AVERAGE)
    fresh.load_state_dict(saved["opt"])
    fresh.train()
    train_scripted(fresh_model, fresh, range(71, 100))
    assert_same(fresh_model.state_dict(), ref_model.state_dict())
    assert_same(fresh.emo_state, ref.emo_state)


@pytest.mark.parametrize(("cls", "impl"), FOLDING, ids=FOLDING_IDS)
def test_evaluating_does_not_change_the_training_run(cls: type, impl: dict) -> None:
    """eval()/train() every 5 steps (as a validation loop does) leaves the trajectory
    bitwise as without them: eval() computes the average into the parameters from the
    state without moving it, and train() gives the training point back."""
    ref_model, model = small_model(), small_model()
    ref = cls(ref_model.parameters(), **impl, **AVERAGE)
    opt = cls(model.parameters(), **impl, **AVERAGE)
    train_scripted(ref_model, ref, range(100))
    for start in range(0, 100, 5):
        train_scripted(model, opt, range(start, start + 5))
        opt.eval()
        opt.train()
    assert_same(model.state_dict(), ref_model.state_dict())
    assert_same(opt.emo_state, ref.emo_state)


@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_a_skipped_step_on_a_fold_step_is_a_bitwise_no_op_and_the_fold_waits(bad: str) -> None:
    model = small_model()
    opt = EmoSens(model.parameters(), **AVERAGE)
    train_scripted(model, opt, range(71))
    assert fold_due(72)
    pending = opt.emo_state["emo_average"]["pending"].clone()
    assert "emo_average" in assert_bad_step_is_a_no_op(model, opt, bad, step=71)
    assert torch.equal(opt.emo_state["emo_average"]["pending"], pending)  # still to spend
    assert pending < 1


@pytest.mark.parametrize("cls", [EmoSens, EmoCats])
@pytest.mark.parametrize("save_in", ["train", "eval"])
def test_a_state_saved_by_emo_0_1_with_z_loads_and_trains_on(cls: type, save_in: str) -> None:
    """emo 0.1 kept the stepped sequence ``z`` (no ``x``, no ``pending``): such a state
    loads, ``x = (y − (1 − β)·z)/β`` (and in eval mode, where the model held ``x``, the
    training point ``y = β·x + (1 − β)·z``) is rebuilt from it at the next step or
    ``train()``, and the run continues as the one that saved it would."""
    model = small_model()
    opt = cls(model.parameters(), **AVERAGE)
    train_scripted(model, opt, range(20))  # (every step folds: pending is 1)
    beta = opt._interpolation(opt.param_groups[0])
    params = list(model.parameters())
    ys = [p.detach().clone() for p in params]
    xs = [opt.state[p]["x"].clone() for p in params]
    ref_model, ref = copy.deepcopy(model), copy.deepcopy(opt)
    old = copy.deepcopy(opt.state_dict())
    del old["param_groups"][0]["emo_state"]["emo_average"]["pending"]
    for index, (y, x) in enumerate(zip(ys, xs)):
        del old["state"][index]["x"]
        old["state"][index]["z"] = y + beta / (1 - beta) * (y - x)
    if save_in == "eval":  # emo 0.1's eval mode: the model held x
        for p, x in zip(params, xs):
            p.data.copy_(x)
        old["param_groups"][0]["emo_state"]["emo_average"]["eval_mode"] = torch.tensor(True)
    fresh = cls(params, **AVERAGE)
    fresh.load_state_dict(old)
    if save_in == "eval":
        fresh.train()
    else:  # (the upgrade runs as a step begins; a skipped one changes nothing else)
        set_random_grads(params, 20)
        fresh.step(loss=float("nan"))
    for p, y, x in zip(params, ys, xs):
        assert "z" not in fresh.state[p]
        torch.testing.assert_close(fresh.state[p]["x"], x, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(p.detach(), y, rtol=1e-5, atol=1e-8)
    train_scripted(model, fresh, range(20, 30))
    train_scripted(ref_model, ref, range(20, 30))
    # (not bitwise: the rebuilt x and y are off by rounding, which the distance estimate,
    # still small this early, amplifies to ~1e-6)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------- the defaults
def test_the_default_averages_fp32_parameters_with_no_weight_decay() -> None:
    """``average=None``: on with ``pulse="distance"`` (the default), off for ``pulse="v37"``,
    with ``use_shadow=True`` and for bf16/fp16 parameters (``averaging.md``, "Low
    precision"); ``weight_decay=None`` follows it (EmoSens: 0 averaged, 0.01 otherwise)."""
    fp32 = list(small_model().parameters())
    bf16 = list(small_model().to(torch.bfloat16).parameters())
    sens = EmoSens(fp32)
    assert sens.average and sens.param_groups[0]["weight_decay"] == 0.0
    assert EmoCats(fp32).average and EmoCats(fp32).param_groups[0]["weight_decay"] == 0.01
    for off in (
        EmoSens(fp32, pulse="v37"),
        EmoSens(fp32, use_shadow=True),
        EmoSens(bf16),
        EmoSens([{"params": iter(bf16)}]),  # (a group's generator is listed, not consumed)
        EmoCats(bf16),
        EmoSens(fp32, average=False),
    ):
        assert not off.average and off.param_groups[0]["weight_decay"] == 0.01
    assert EmoSens(bf16, average=True).average  # an explicit value wins
    grouped = EmoSens([{"params": iter(fp32)}])
    assert grouped.average and len(grouped.param_groups[0]["params"]) == len(fp32)
    assert EmoSens(p for p in fp32).average  # a generator is read once, not consumed twice
    for cls in (EmoSens, EmoCats):  # a lone tensor: torch's own refusal, not its rows
        with pytest.raises(TypeError, match="iterable of Tensors"):
            cls(fp32[0])
