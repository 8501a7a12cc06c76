"""A step that is refused changes nothing (issue 12's "a bad step leaves parameters and
optimizer state as they were"): every check that can refuse it runs before the loss sensor,
the controller, the step count or an earlier group moves. Also what a user may change
between steps: hyperparameters in ``param_groups``, ``use_shadow``, ``lr = 0``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from emo_core import EmoAiry, EmoCats, EmoSens
from tests.core.cases import NAMES, OPTIMIZERS, assert_same, set_random_grads, train_scripted


def two_group_model() -> tuple[nn.Module, list[dict[str, Any]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    return model, groups


def not_averaged(name: str) -> dict[str, Any]:
    """Turns the default iterate averaging off, which excludes the shadow (EmoAiry has none)."""
    return {} if name == "emoairy" else {"average": False}


def assert_refused_and_unchanged(model: nn.Module, opt, error: type, match: str) -> None:
    """``opt.step(loss=...)`` raises ``error``; parameters and the whole optimizer state
    (sensor, controller, step count, every group's state) are bitwise as before."""
    before_params = copy.deepcopy(model.state_dict())
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.step(loss=0.5)
    assert_same(model.state_dict(), before_params)
    assert_same(opt.state_dict(), before)


CASES = {
    "emosens": {"pulse": "v37"},
    "emosens-distance": {"pulse": "distance"},
    "emosens-averaged": {"pulse": "distance", "average": True},
}


@pytest.mark.parametrize("kwargs", list(CASES.values()), ids=list(CASES))
def test_a_fused_step_refused_for_a_misaligned_gradient_changes_nothing(kwargs: dict) -> None:
    """Group 0 is fine; group 1's weight has a gradient in another memory layout, which
    ``fused=True`` refuses: before, group 0 and the sensor had already stepped."""
    model, groups = two_group_model()
    opt = EmoSens(groups, fused=True, **kwargs)
    train_scripted(model, opt, range(3))
    params = list(model.parameters())
    set_random_grads(params, 3)
    weight = model[2].weight
    weight.grad = weight.grad.t().contiguous().t()  # same values, transposed strides
    assert not weight.grad.is_contiguous()
    assert_refused_and_unchanged(model, opt, RuntimeError, "memory")
    # and the step, retried with a fixed gradient, is the step a fresh run takes
    reference_model, reference_groups = two_group_model()
    reference = EmoSens(reference_groups, fused=True, **kwargs)
    train_scripted(reference_model, reference, range(4))
    weight.grad = weight.grad.contiguous()
    train_scripted(model, opt, range(3, 4))
    assert_same(model.state_dict(), reference_model.state_dict())
    assert_same(opt.state_dict(), reference.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_replaced_by_one_of_another_shape_is_refused_by_name(name: str) -> None:
    model, groups = two_group_model()
    opt = OPTIMIZERS[name](groups)
    train_scripted(model, opt, range(3))
    model[2].weight.data = torch.zeros(3, 4)  # was (3, 5)
    set_random_grads(list(model.parameters()), 3)
    assert_refused_and_unchanged(model, opt, RuntimeError, r"state\[.*does not (match|fit)")
    del opt.state[model[2].weight]  # the documented way out: that parameter starts afresh
    opt.step(loss=0.5)
    assert opt.state[model[2].weight]


@pytest.mark.parametrize("average", [False, True], ids=["distance", "averaged"])
@pytest.mark.parametrize("name", NAMES)
def test_the_documented_way_out_also_works_under_the_distance_pulse(name, average) -> None:
    """The distance controller's sample plan views each tensor by its size: kept for the
    old (larger) weight, every later step failed (``setStorage ... out of bounds``)."""
    if average and name == "emoairy":
        pytest.skip("EmoAiry has no averaged mode")
    model, groups = two_group_model()
    opt = OPTIMIZERS[name](groups, pulse="distance", **({"average": True} if average else {}))
    train_scripted(model, opt, range(3))
    model[2].weight.data = torch.zeros(3, 2)  # was (3, 5)
    set_random_grads(list(model.parameters()), 3)
    with pytest.raises(RuntimeError, match=r"state\[.*does not (match|fit)"):
        opt.step(loss=0.5)
    del opt.state[model[2].weight]
    train_scripted(model, opt, range(3, 6))
    assert opt.state[model[2].weight]
    assert all(torch.isfinite(p).all() for p in model.parameters())


BAD_GROUP_VALUES = [
    (name, key, value, match)
    for name in NAMES
    for key, value, match in [
        ("weight_decay", float("nan"), "weight_decay"),
        ("weight_decay", -0.1, "weight_decay"),
        ("lr", None, "lr"),
        ("lr", -1.0, "lr"),
        ("use_shadow", "maybe", "use_shadow"),
    ]
] + [
    ("emosens", "betas", (0.9, 1.5), "betas"),
    ("emosens", "betas", "abc", "betas"),
    ("emosens", "eps", -1.0, "eps"),
    ("emosens", "eps", "x", "eps"),
    ("emocats", "betas", (0.9, 1.5), "betas"),
    ("emoairy", "beta2", 1.0, "beta2"),
    ("emoairy", "eps", 0.0, "eps"),
]


@pytest.mark.parametrize(("name", "key", "value", "match"), BAD_GROUP_VALUES)
def test_a_bad_value_written_into_param_groups_is_refused_before_the_step(
    name: str, key: str, value: Any, match: str
) -> None:
    """torch.optim checks nothing a user writes into ``param_groups`` between steps; a bad
    value used to reach a kernel (nan parameters, or a bare error after a partial step)."""
    model, groups = two_group_model()
    opt = OPTIMIZERS[name](groups)
    train_scripted(model, opt, range(3))
    opt.param_groups[1][key] = value
    set_random_grads(list(model.parameters()), 3)
    assert_refused_and_unchanged(model, opt, ValueError, f"Invalid {match}")


@pytest.mark.parametrize("name", NAMES)
def test_a_valid_edit_of_param_groups_is_used_and_normalised(name: str) -> None:
    model, groups = two_group_model()
    opt = OPTIMIZERS[name](groups)
    train_scripted(model, opt, range(2))
    opt.param_groups[1]["weight_decay"] = "0.05"  # e.g. read from a config file
    train_scripted(model, opt, range(2, 3))
    assert opt.param_groups[1]["weight_decay"] == 0.05


@pytest.mark.parametrize("name", NAMES)
def test_use_shadow_turned_on_between_steps_starts_its_shadow_there(name: str) -> None:
    model, groups = two_group_model()
    opt = OPTIMIZERS[name](groups, **not_averaged(name))
    train_scripted(model, opt, range(3))
    for group in opt.param_groups:
        group["use_shadow"] = True
    snapshot = {k: v.clone() for k, v in model.named_parameters()}
    set_random_grads(list(model.parameters()), 3)
    opt.step(loss=0.5)
    for name_, p in model.named_parameters():
        assert torch.isfinite(p).all()
        shadow = opt.state[p]["shadow"]  # started at the parameter, then followed it
        assert (shadow - snapshot[name_]).abs().max() <= (p - snapshot[name_]).abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_use_shadow_turned_off_between_steps_drops_its_shadow(name: str) -> None:
    """Turned off, the shadow stayed in the state: the state_dict then did not load (its
    group says use_shadow=False, its state holds a shadow), not even into the optimizer
    that wrote it, and turned on again the shadow pulled towards the old weights."""
    model, groups = two_group_model()
    opt = OPTIMIZERS[name](groups, use_shadow=True)
    train_scripted(model, opt, range(3))
    opt.param_groups[1]["use_shadow"] = False
    saved_before_the_step = copy.deepcopy(opt.state_dict())
    train_scripted(model, opt, range(3, 5))
    assert all("shadow" in opt.state[p] for p in model[0].parameters())
    assert not any("shadow" in opt.state[p] for p in model[2].parameters())
    for saved in (saved_before_the_step, copy.deepcopy(opt.state_dict())):
        opt.load_state_dict(saved)
        _, fresh_groups = two_group_model()
        OPTIMIZERS[name](fresh_groups, **not_averaged(name)).load_state_dict(saved)
        assert not any("shadow" in opt.state[p] for p in model[2].parameters())
    opt.param_groups[1]["use_shadow"] = True  # on again: a new shadow, at the weights now
    now = [p.detach().clone() for p in model[2].parameters()]
    set_random_grads(list(model.parameters()), 5)
    opt.step(loss=0.5)
    for before, p in zip(now, model[2].parameters()):
        shadow = opt.state[p]["shadow"]
        assert (shadow - before).abs().max() <= (p - before).abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_use_shadow_turned_on_while_a_parameter_has_no_gradient_resumes(name: str) -> None:
    """A parameter with state but no gradient since use_shadow was turned on has no shadow
    yet: its state_dict was refused ("lacks ['shadow']"); it loads, and the resumed run
    creates that shadow where the uninterrupted one does."""
    runs = []
    for resume in (False, True):
        model, groups = two_group_model()
        opt = OPTIMIZERS[name](groups, **not_averaged(name))
        train_scripted(model, opt, range(3))
        opt.param_groups[1]["use_shadow"] = True
        model[2].requires_grad_(False)  # no gradient for a while
        for p in model[2].parameters():
            p.grad = None
        set_random_grads(list(model[0].parameters()), 3)
        opt.step(loss=0.5)
        assert not any("shadow" in opt.state[p] for p in model[2].parameters())
        if resume:
            saved = copy.deepcopy(opt.state_dict())
            groups = [{"params": model[i].parameters()} for i in (0, 2)]
            opt = OPTIMIZERS[name](groups, **not_averaged(name))
            opt.load_state_dict(saved)
        model[2].requires_grad_(True)
        train_scripted(model, opt, range(4, 6))
        runs.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())))
    assert_same(runs[0][0], runs[1][0])
    assert_same(runs[0][1], runs[1][1])


@pytest.mark.parametrize("name", NAMES)
def test_lr_zero_freezes_a_group_with_the_shadow_on(name: str) -> None:
    """The shadow's pull on a loss spike used to move a group frozen by ``lr = 0``."""
    model, groups = two_group_model()
    opt = OPTIMIZERS[name](groups, use_shadow=True)
    train_scripted(model, opt, range(20))
    opt.param_groups[1]["lr"] = 0.0
    frozen = [p.clone() for p in model[2].parameters()]
    params = list(model.parameters())
    for step, loss in enumerate([0.3, 30.0, 80.0, 200.0], start=20):  # |σ| grows large
        set_random_grads(params, step)
        opt.step(loss=loss)
    assert abs(opt.telemetry()["scalar"]) > 0.625  # the pull is on
    for before, p in zip(frozen, model[2].parameters()):
        assert torch.equal(before, p)


@pytest.mark.parametrize("optimizer", [EmoSens, EmoAiry, EmoCats])
def test_fp64_state_trains_bf16_parameters(optimizer: type) -> None:
    """``state_dtype=torch.float64`` with bf16 parameters: the fp64 result is rounded to fp32,
    then stochastically into bf16 (it raised a TypeError every step)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(16, 8).to(torch.bfloat16))
    # (min_lr: the distance controller starts at an LR of 1e-6, whose steps bf16 rounds away
    # (stochastically: for dozens of steps); the floor makes five of them visible)
    opt = optimizer([p], state_dtype=torch.float64, lr=1.0, min_lr=1e-3)
    start = p.detach().clone()
    for _ in range(5):
        p.grad = (p.detach().float() * 2).to(torch.bfloat16)
        opt.step(loss=float((p.detach().float() ** 2).sum()))
    assert p.dtype is torch.bfloat16 and not torch.equal(p, start)
    assert all(
        v.dtype is torch.float64 for v in opt.state[p].values() if v.is_floating_point() and v.dim()
    )


@pytest.mark.parametrize("beta2", [0.9999999, 0.99999999])
def test_bias_correction_is_accurate_for_a_beta2_close_to_one(beta2: float) -> None:
    """``1 − β2^k`` in fp32 rounded such a β2 to 1 (a correction of 0: nan parameters from a
    zero gradient entry, stalled matrices) or 9% off; now it matches double precision."""
    from emo_core.averaging import bias_correction

    steps = torch.tensor([1.0, 10.0, 1000.0])
    exact = [1.0 - beta2**k for k in (1, 10, 1000)]
    assert bias_correction(steps, beta2).tolist() == pytest.approx(exact, rel=1e-5)
    assert bias_correction(steps, 0.0).tolist() == [1.0, 1.0, 1.0]
    torch.manual_seed(0)
    for optimizer, kwargs in [
        (EmoAiry, {"beta2": beta2}),
        (EmoSens, {"betas": (0.9, beta2), "pulse": "distance", "average": True, "foreach": True}),
    ]:
        vector, matrix = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(6, 5))
        opt = optimizer([vector, matrix], **kwargs)
        for step in range(3):
            vector.grad = torch.tensor([0.0, 1.0, -1.0, 0.5])  # one entry without gradient
            matrix.grad = torch.randn(6, 5)
            opt.step(loss=1.0 / (step + 1))
        assert torch.isfinite(vector).all() and torch.isfinite(matrix).all(), optimizer


@pytest.mark.parametrize("optimizer", [EmoSens, EmoAiry])
def test_fp16_state_saturates_instead_of_overflowing(optimizer: type) -> None:
    """A gradient of 1e4 is far below the skip bound of fp32 math, but its square is above
    fp16's 65504: the stored state saturates, the parameters stay finite, and the optimizer's
    own checkpoint still loads (it was refused for holding inf)."""
    torch.manual_seed(0)
    matrix, vector = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))
    opt = optimizer([matrix, vector], state_dtype=torch.float16)
    for step in range(3):
        matrix.grad, vector.grad = torch.full((6, 5), 1e4), torch.full((5,), -1e4)
        opt.step(loss=1.0 / (step + 1))
    assert torch.isfinite(matrix).all() and torch.isfinite(vector).all()
    for state in opt.state.values():
        for value in state.values():
            if value.is_floating_point():
                assert torch.isfinite(value).all()
    assert opt.telemetry()["skipped_steps"] == 0
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("kwargs", list(CASES.values()), ids=list(CASES))
def test_a_step_refused_for_its_loss_creates_no_state_and_keeps_the_capture(kwargs) -> None:
    """``step(loss=per_sample_losses)`` (a loss not reduced) is refused before the lazy state
    is created and before the loss captured since the last step is taken: fixed and retried,
    the step is the one an optimizer that never saw the bad call takes."""
    model, groups = two_group_model()
    opt = EmoSens(groups, capture_loss=True, **kwargs)
    reference_model, reference_groups = two_group_model()
    reference = EmoSens(reference_groups, capture_loss=True, **kwargs)
    try:
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
        for m in (model, reference_model):
            m(x).pow(2).mean().backward()  # both capture this loss
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(ValueError, match="one-element"):
            opt.step(loss=model(x).pow(2).mean(dim=1))
        assert not opt.state
        assert_same(opt.state_dict(), before)
        opt.step()  # senses the captured loss
        reference.step()
        assert_same(model.state_dict(), reference_model.state_dict())
        assert_same(opt.state_dict(), reference.state_dict())
        assert opt.telemetry()["sensed_steps"] == 1.0
    finally:
        opt.close()
        reference.close()
