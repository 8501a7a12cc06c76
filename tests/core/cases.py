"""Test data shared by the core tests: optimizers, implementations, models, loss traces."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from emo_core import EmoAiry, EmoCats, EmoSens

OPTIMIZERS = {"emosens": EmoSens, "emoairy": EmoAiry, "emocats": EmoCats}
NAMES = tuple(OPTIMIZERS)
IMPLS = {
    "emosens": ({"foreach": False}, {"foreach": True}, {"fused": True}, {"compile_update": True}),
    "emoairy": ({"foreach": False}, {"foreach": True}, {"compile_update": True}),
    "emocats": ({"foreach": False}, {"foreach": True}, {"compile_update": True}),
}
ALL_IMPLS = [(name, impl) for name in NAMES for impl in IMPLS[name]]


def impl_id(case: tuple[str, dict]) -> str:
    name, impl = case
    return f"{name}-" + ("-".join(f"{k}={v}" for k, v in impl.items()) or "default")


def scripted_losses(steps: int) -> list[float]:
    """Falls, spikes, goes negative and keeps falling: exercises every sensor branch."""
    losses = []
    for t in range(steps):
        value = 2.0 * math.exp(-t / 15) - 0.5 + 0.05 * math.sin(t)
        if t in (12, 30):
            value += 10.0  # spikes
        losses.append(value)
    return losses


def small_model(seed: int = 0) -> nn.Module:
    """A few tensors of different ranks: matrix, vector, conv kernel, scalar."""
    torch.manual_seed(seed)
    return nn.ModuleDict(
        {
            "lin": nn.Linear(6, 5),
            "conv": nn.Conv1d(2, 3, 3),
            "out": nn.Linear(5, 1, bias=False),
        }
    ).train()


def set_random_grads(params: list[torch.Tensor], step: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale


def assert_same(a, b) -> None:
    """Bitwise equality of nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert (
            torch.equal(a, b)
            or (a.isnan() == b.isnan()).all()
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b or re.fullmatch("nan", str(a)) and str(b) == "nan"


def train_scripted(model: nn.Module, opt, steps: range) -> None:
    """Steps ``steps`` of random gradients and a positive version of :func:`scripted_losses`
    (the same at a given step index, so a resumed run continues the same sequence)."""
    params = list(model.parameters())
    losses = scripted_losses(steps.stop)
    for step in steps:
        set_random_grads(params, step)
        opt.step(loss=abs(losses[step]) + 0.1)


def assert_bad_step_is_a_no_op(model: nn.Module, opt, bad: str, step: int) -> dict:
    """A step with a nan loss (``bad="nan_loss"``) or a nan/inf gradient (``"nan_grad"``,
    ``"inf_grad"``) changes nothing but the skipped-step count and the step counter.
    Returns the optimizer-wide state after it."""
    params = list(model.parameters())
    set_random_grads(params, step)
    if bad.endswith("grad"):
        params[0].grad[0, 0] = float(bad[:3])
    return assert_step_is_skipped(model, opt, float("nan") if bad == "nan_loss" else 0.3)


def assert_step_is_skipped(model: nn.Module, opt, loss: float) -> dict:
    """``opt.step(loss=loss)`` with the gradients as they are changes nothing but the
    skipped-step count and the step counter. Returns the optimizer-wide state after it."""
    before_params = copy.deepcopy(model.state_dict())
    before = copy.deepcopy(opt.state_dict())
    opt.step(loss=loss)
    assert_same(model.state_dict(), before_params)
    after = opt.state_dict()
    emo_after, emo_before = (sd["param_groups"][0]["emo_state"] for sd in (after, before))
    assert emo_after["emo_pulse"]["skipped"] == 1
    emo_after["emo_pulse"]["skipped"] = emo_before["emo_pulse"]["skipped"]
    emo_after["emo_meta"] = emo_before["emo_meta"]
    assert_same(after, before)
    return emo_after


LOSS_SENSOR_KEYS = ("ema_short", "ema_medium", "ema_long", "scalar", "trust", "noise", "d", "H")
"""The loss-sensor values of ``telemetry()``: the same whenever the same losses are sensed."""
SENSOR_KEYS = (*LOSS_SENSOR_KEYS, "pulse")
"""With ``pulse="v37"`` the pulse is a function of the losses alone and matches too; the
distance controller's (its LR) depends on the parameters and gradients as well."""


def reference_sensor(losses: list[float], **kwargs) -> dict[str, float]:
    """The sensor of a fresh Emo optimizer (``EmoSens(..., **kwargs)``) fed exactly
    ``losses``, one per step."""
    p = nn.Parameter(torch.zeros(1))
    ref = EmoSens([p], **kwargs)
    for loss in losses:
        p.grad = torch.zeros(1)
        ref.step(loss=loss)
    return ref.telemetry()


def assert_sensed_as_fed(opt, losses: list[float], *, rtol: float, atol: float) -> None:
    """``opt`` sensed exactly ``losses``: its sensor equals one fed them explicitly (its
    pulse too where that is a function of the losses alone, ``pulse="v37"``)."""
    like = {"pulse": opt.pulse, "min_lr": opt.min_lr, "max_lr": opt.max_lr}
    got, want = opt.telemetry(), reference_sensor(losses, **like)
    assert got["sensed_steps"] == len(losses)
    for key in SENSOR_KEYS if opt.pulse == "v37" else LOSS_SENSOR_KEYS:
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=atol), key


def fresh_compile_cache(impl: dict) -> None:
    """Reset dynamo before a host-read count of a ``compile_update=True`` step: once an
    earlier test in this process compiled the update at other float hyperparameters, dynamo
    retraces them as dynamic, and that one retrace reads them on the host (a compile-time
    cost, not a per-step one)."""
    if impl.get("compile_update"):
        torch._dynamo.reset()
