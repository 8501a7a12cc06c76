"""The loss sensor (SPEC §2): test vectors, seed table, behaviour on scripted traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emo_core import EmoSens
from emo_core.pulse import trust_from_scalar
from tests.core.cases import NAMES, OPTIMIZERS, scripted_losses

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "spec_vectors.json"
KEYS = {
    "es": "ema_short",
    "em": "ema_medium",
    "el": "ema_long",
    "sigma": "scalar",
    "trust": "trust",
    "noise": "noise",
    "d": "d",
    "H": "H",
    "pulse": "pulse",
}


def _trace_names() -> list[str]:
    if not VECTORS.exists():
        return []
    return list(json.loads(VECTORS.read_text())["traces"])


def _feed(losses: list[float], n_tensors: int = 1, opt_cls=EmoSens, **kwargs) -> list[float]:
    """Effective LR after each loss, with zero gradients on ``n_tensors`` parameters."""
    params = [torch.zeros(3, requires_grad=True) for _ in range(n_tensors)]
    opt = opt_cls(params, **kwargs)
    lrs = []
    for loss in losses:
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step(loss=loss)
        lrs.append(opt.get_effective_lr()[0])
    return lrs


@pytest.mark.skipif(not VECTORS.exists(), reason="shared/spec_vectors.json is not beside the repo")
@pytest.mark.parametrize("trace", _trace_names() or ["none"])
def test_spec_vectors(trace: str) -> None:
    data = json.loads(VECTORS.read_text())["traces"][trace]
    p = torch.zeros(4, requires_grad=True)
    opt = EmoSens([p], pulse="v37")  # the vectors pin SPEC §2's pulse
    for loss, expected in zip(data["loss"], data["expected"]):
        p.grad = torch.zeros_like(p)
        opt.step(loss=loss)
        got = opt.telemetry()
        assert got["sensed_steps"] == expected["t"]
        for key, ours in KEYS.items():
            assert got[ours] == pytest.approx(expected[key], rel=1e-6, abs=1e-15), (
                key,
                expected["t"],
            )
        assert opt.should_stop == expected["stop"], expected["t"]


@pytest.mark.parametrize(
    ("sigma", "trust"),
    [(0.26, 0.74), (0.30, 0.70), (0.35, 0.65), (0.40, 0.60), (0.45, 0.55), (0.49, 0.51)],
)
def test_seed_table_scalar_to_trust(sigma: float, trust: float) -> None:
    for sign in (1.0, -1.0):
        got = trust_from_scalar(torch.tensor(sign * sigma, dtype=torch.float64))
        assert float(got) == pytest.approx(sign * trust, abs=1e-12)
    assert float(trust_from_scalar(torch.tensor(0.0))) == 1.0  # sign(0) = +1


def test_flat_loss_runs_at_max_lr() -> None:
    lrs = _feed([0.7] * 60, pulse="v37")
    assert lrs[-1] == pytest.approx(1e-3)


def test_steady_fall_runs_below_max_lr_and_above_min_lr() -> None:
    lrs = _feed([2.0 * 0.99**t for t in range(200)], pulse="v37")
    assert 1e-5 < lrs[-1] < 1e-3
    assert min(lrs[50:]) > 1e-5


def test_spike_brakes_then_recovers() -> None:
    """A spike cuts the raw pulse by more than 10x; it recovers once the loss settles.

    With the default ``max_lr`` the pulse of a calm stretch sits far above the cap, so the
    brake is visible only through a wide clamp (README: "What the pulse does").
    """
    gen = torch.Generator().manual_seed(0)
    calm = (1.0 + 0.02 * (2 * torch.rand(200, generator=gen) - 1)).tolist()
    spiked = calm[:100] + [5.0] + calm[101:]
    lrs = _feed(spiked, pulse="v37", max_lr=10.0)
    assert lrs[99] > 1.0
    assert lrs[100] < lrs[99] / 10
    assert lrs[130] > lrs[100] * 10


def test_rising_loss_runs_slower_than_falling_and_flat() -> None:
    flat = _feed([1.0] * 60, pulse="v37")
    falling = _feed([0.97**t for t in range(60)], pulse="v37")
    rising = _feed([1.03**t for t in range(60)], pulse="v37")
    assert flat[-1] == pytest.approx(1e-3)
    assert falling[-1] < flat[-1]
    assert rising[-1] < falling[-1] / 5
    assert rising[-1] >= 1e-6  # never below min_lr


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_loss_scale_does_not_change_the_lr_trajectory(scale: float) -> None:
    losses = scripted_losses(80)
    positive = [abs(x) + 0.1 for x in losses]
    reference = _feed(positive)
    scaled = _feed([scale * x for x in positive])
    assert scaled == pytest.approx(reference, rel=1e-6)


def test_negative_decreasing_loss_reads_as_improvement() -> None:
    p = torch.zeros(2, requires_grad=True)
    neg, pos = EmoSens([p]), EmoSens([p])
    for t in range(30):
        p.grad = torch.zeros_like(p)
        neg.step(loss=-1.0 - 0.05 * t)
        pos.step(loss=3.0 - 0.05 * t)
        assert (neg.telemetry()["scalar"] > 0) == (pos.telemetry()["scalar"] > 0)
    assert neg.telemetry()["scalar"] > 0
    assert neg.telemetry()["trust"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_statistics_advance_once_per_step_not_per_tensor(name: str) -> None:
    losses = scripted_losses(40)
    one = _feed(losses, n_tensors=1, opt_cls=OPTIMIZERS[name])
    fifty = _feed(losses, n_tensors=50, opt_cls=OPTIMIZERS[name])
    assert fifty == one


def test_statistics_do_not_depend_on_param_groups() -> None:
    losses = scripted_losses(30)
    params = [torch.zeros(2, requires_grad=True) for _ in range(4)]
    grouped = EmoSens([{"params": params[:2]}, {"params": params[2:]}])
    single = EmoSens([torch.zeros(2, requires_grad=True)])
    for loss in losses:
        for p in params + single.param_groups[0]["params"]:
            p.grad = torch.zeros_like(p)
        grouped.step(loss=loss)
        single.step(loss=loss)
    assert grouped.telemetry() == single.telemetry()


def test_stop_signal_waits_for_the_long_horizon_and_is_sticky() -> None:
    p = torch.zeros(2, requires_grad=True)
    opt = EmoSens([p])
    for t in range(150):
        p.grad = torch.zeros_like(p)
        opt.step(loss=1.0)
        assert opt.should_stop == (t + 1 >= 100)
    opt.reset_stop()
    assert not opt.should_stop
    for t in range(32):  # a fresh window of calm steps is needed before it rises again
        p.grad = torch.zeros_like(p)
        opt.step(loss=1.0)
        assert opt.should_stop == (t == 31)


def test_stop_signal_stays_down_while_the_loss_moves() -> None:
    lrs_opt = EmoSens([torch.zeros(1, requires_grad=True)])
    for t in range(300):
        lrs_opt.param_groups[0]["params"][0].grad = torch.zeros(1)
        lrs_opt.step(loss=2.0 * 0.98**t)
    assert not lrs_opt.should_stop
