"""A distance sample of more than ``SAMPLE_READS`` tensors is read every ``period`` calls
(emo_core/distance.md, "Reading a sample of many tensors"): the scale it finds is that of
reading every call, and every contract of the step holds between reads as on them."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from emo_core import distance
from emo_core.distance import SAMPLE_READS, SAMPLE_TENSORS, plan_sample
from tests.core.cases import (
    NAMES,
    OPTIMIZERS,
    assert_bad_step_is_a_no_op,
    assert_same,
    set_random_grads,
    small_model,
    train_scripted,
)
from tests.core.test_no_sync import count_host_reads

BLOCKS = 70
"""Linear layers of :func:`many_tensors`: 140 tensors, read every 3rd call."""


def many_tensors(seed: int = 0, blocks: int = BLOCKS, width: int = 4) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))


def _period(params: list[torch.Tensor]) -> int:
    return plan_sample([{"params": params}], torch.device("cpu"), 1).period


def _distance_state(opt) -> dict:
    return opt.state_dict()["param_groups"][0]["emo_state"]["emo_distance"]


def test_the_read_period_follows_the_number_of_sampled_tensors() -> None:
    assert _period(list(small_model().parameters())) == 1
    assert _period(list(many_tensors(blocks=SAMPLE_READS // 2).parameters())) == 1
    assert _period(list(many_tensors().parameters())) == math.ceil(2 * BLOCKS / SAMPLE_READS)
    # beyond SAMPLE_TENSORS the sample itself is capped, and with it the period
    capped = list(many_tensors(blocks=SAMPLE_TENSORS).parameters())
    assert _period(capped) == SAMPLE_TENSORS // SAMPLE_READS


@pytest.mark.parametrize("name", NAMES)
def test_the_sample_is_read_every_period_calls(name: str) -> None:
    model = many_tensors()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params)
    period = _period(params)
    assert period == 3
    read_at, last = [], None
    for step in range(4 * period):
        set_random_grads(params, step)
        opt.step(loss=1.0 / (step + 1))
        sample = _distance_state(opt)["x_prev"].clone()  # the parameters at the last read
        if last is None or not torch.equal(sample, last):
            read_at.append(step)
        last = sample
    assert read_at == list(range(0, 4 * period, period))


def _least_squares(name: str, steps: int, **kw) -> tuple[list[float], list[float]]:
    """Each of the 140 tensors fitted to its own target, gradients consistent: the scale
    grows every step. Returns (d, loss) per step."""
    model = many_tensors()
    targets = [torch.full_like(p, 0.5) for p in model.parameters()]
    opt = OPTIMIZERS[name](model.parameters(), **kw)
    ds, losses = [], []
    for _ in range(steps):
        loss = sum(((p - t) ** 2).sum() for p, t in zip(model.parameters(), targets))
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        ds.append(float(opt.emo_state["emo_distance"]["d"][0]))
        losses.append(float(loss.detach()))
    return ds, losses


@pytest.mark.parametrize("name", NAMES)
def test_the_scale_grows_between_reads_as_on_them(name: str, monkeypatch) -> None:
    """``d`` grows towards the last read's estimate on every call, so its warm-up from D0
    is not held back by the period: after 40 steps it is within 2x of reading every call.
    (EmoAiry has no growth limit: its ``d`` reaches the estimate on the read itself.)"""
    ds, _ = _least_squares(name, 40)
    if name != "emoairy":
        between = [ds[t] > ds[t - 1] for t in range(1, 40) if t % 3]
        assert sum(between) >= len(between) // 2, "the scale stood still between reads"
    monkeypatch.setattr(distance, "SAMPLE_READS", 10**6)  # read on every call
    every, _ = _least_squares(name, 40)
    assert 0.5 < ds[-1] / every[-1] < 2.0, (ds[-1], every[-1])


class _Residual(nn.Module):
    """A residual tanh MLP of 70 blocks (144 tensors), a noisy regression target."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, 16)
        self.blocks = many_tensors(seed, BLOCKS, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + 0.2 * torch.tanh(block(h))
        return self.out(h)


def _batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 8, generator=gen)
    y = torch.sin(2 * x[:, :1]) * x[:, 1:2] + 0.5 * x[:, 2:3] ** 2
    return x, y + 0.3 * torch.randn(n, 1, generator=gen)


def _residual_fit(name: str, seed: int, steps: int = 150) -> tuple[float, float]:
    """(largest d, validation MSE at the evaluated point) after ``steps`` steps."""
    model = _Residual(seed)
    opt = OPTIMIZERS[name](model.parameters())
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        x, y = _batch(64, gen)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    opt.eval()
    with torch.no_grad():
        x, y = _batch(1024, torch.Generator().manual_seed(7))
        return float(opt.emo_state["emo_distance"]["d"].max()), float(((model(x) - y) ** 2).mean())


@pytest.mark.parametrize("name", NAMES)
def test_reading_every_third_call_trains_as_well_as_reading_every_call(
    name: str, monkeypatch
) -> None:
    """On a noisy problem of 144 tensors, over 2 seeds: the scale found within 1.5x and the
    validation loss within 25% (geometric means) of reading the sample on every call."""
    periodic = [_residual_fit(name, seed) for seed in range(2)]
    monkeypatch.setattr(distance, "SAMPLE_READS", 10**6)
    every = [_residual_fit(name, seed) for seed in range(2)]

    def geomean_ratio(i: int) -> float:
        return math.exp(sum(math.log(a[i] / b[i]) for a, b in zip(periodic, every)) / 2)

    assert 1 / 1.5 < geomean_ratio(0) < 1.5, (periodic, every)
    assert geomean_ratio(1) < 1.25, (periodic, every)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["nan_loss", "nan_grad"])
@pytest.mark.parametrize("calls", [3, 4], ids=["on-a-read", "between-reads"])
def test_a_skipped_step_is_a_bitwise_no_op(name: str, bad: str, calls: int) -> None:
    model = many_tensors()
    opt = OPTIMIZERS[name](model.parameters())
    train_scripted(model, opt, range(calls))  # the next call is the 4th (a read) or the 5th
    assert "emo_distance" in assert_bad_step_is_a_no_op(model, opt, bad, step=calls)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("halfway", [9, 10, 11])
def test_resume_is_bitwise_exact_at_every_phase_of_the_reads(name: str, halfway: int) -> None:
    ref_model = many_tensors()
    ref = OPTIMIZERS[name](ref_model.parameters())
    train_scripted(ref_model, ref, range(20))
    model = many_tensors()
    opt = OPTIMIZERS[name](model.parameters())
    train_scripted(model, opt, range(halfway))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model = many_tensors(seed=5)
    fresh_model.load_state_dict(saved["model"])
    fresh = OPTIMIZERS[name](fresh_model.parameters())
    fresh.load_state_dict(saved["opt"])
    train_scripted(fresh_model, fresh, range(halfway, 20))
    assert_same(fresh_model.state_dict(), ref_model.state_dict())
    assert_same(fresh.emo_state["emo_distance"], ref.emo_state["emo_distance"])


@pytest.mark.parametrize("name", NAMES)
def test_step_makes_no_host_reads_on_or_between_reads(name: str) -> None:
    params = list(many_tensors().parameters())
    opt = OPTIMIZERS[name](params)
    for step in range(7):
        set_random_grads(params, step)
        with count_host_reads() as counts:
            opt.step(loss=torch.tensor(1.0 / (step + 1)))
        assert sum(counts.values()) == 0, (step, dict(counts))


def test_a_state_saved_before_the_estimate_was_kept_loads_and_grows_from_the_next_read() -> None:
    """A controller state without ``d_hat`` (saved before reads had a period) loads with
    ``d_hat = 0``: ``d`` holds until the next read, which refreshes the estimate."""
    model = many_tensors()
    targets = [torch.full_like(p, 0.5) for p in model.parameters()]

    def step(opt) -> None:
        loss = sum(((p - t) ** 2).sum() for p, t in zip(model.parameters(), targets))
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())

    opt = OPTIMIZERS["emosens"](model.parameters())
    for _ in range(8):  # calls 1..8: reads at 1, 4, 7; the 9th is between reads
        step(opt)
    saved = copy.deepcopy(opt.state_dict())
    del saved["param_groups"][0]["emo_state"]["emo_distance"]["d_hat"]
    fresh = OPTIMIZERS["emosens"](model.parameters())
    fresh.load_state_dict(saved)
    state = fresh.emo_state["emo_distance"]
    assert float(state["d_hat"][0]) == 0.0
    d = state["d"].clone()
    step(fresh)  # between reads: nothing to grow towards
    assert torch.equal(fresh.emo_state["emo_distance"]["d"], d)
    step(fresh)  # the 10th call reads: a fresh estimate, and d grows again
    assert float(fresh.emo_state["emo_distance"]["d_hat"][0]) > float(d[0])
    step(fresh)
    assert float(fresh.emo_state["emo_distance"]["d"][0]) > float(d[0])
