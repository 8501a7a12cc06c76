"""Settling: the distance controller's loss-driven annealing factor.

A constant step size stops helping once the loss no longer falls faster than its own batch
noise: the iterate then wanders in a noise ball whose size is proportional to the step.
This module watches the loss for exactly that and shrinks a factor ``a`` (starting at 1,
never growing) while the loss is *not significantly falling*, so the step anneals when, and
only as fast as, the loss says the current one has stopped paying (a loss-driven cousin of
SASA's stationarity test and of reduce-on-plateau, with no patience to tune). The math is
in ``distance.md`` ("Settling"); all of it is 0-dim tensor math (no host reads).

The test is scale-free in time: it compares the loss averaged over the last quarter of
the run so far with its average over the last twentieth, so on a loss that keeps falling
like a power law (most training runs) it keeps saying "falling" however long the run.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SETTLE_KEYS", "init_settle_state", "settle_update"]

HORIZON_FRACTION = 0.25
"""The slow average covers the last quarter of the steps so far ..."""
HORIZON_MIN = 50.0
"""... and at least this many steps."""
FAST_RATIO = 5.0
"""The fast average's horizon is the slow one's divided by this."""
WARMUP = 100.0
"""No settling before this many sensed steps (the averages need a horizon first)."""
Z_FALLING = 2.0
"""The loss counts as falling while the slow-minus-fast gap exceeds this many standard
deviations that batch noise alone would give the gap."""
Z_STARTED = 4.0
"""Settling starts once the gap has exceeded this many standard deviations at least once
(latched in ``fell``): a loss that has not fallen yet is a plateau before anything was
learnt (a scale still near its warm start, a zero-initialised head), not a noise ball of a
step that has stopped paying. Stricter than :data:`Z_FALLING`, so that batch noise alone
does not set it (a 2-sigma excursion comes by chance within the first few hundred steps)."""
RATE = 0.5
"""While not falling, ``a`` shrinks by ``RATE/H_slow`` per step: at most e^-2 per doubling
of the step count (``a ∝ t^-2`` on a loss that never falls again)."""
SETTLE_KEYS = frozenset({"settle", "n", "l_fast", "l_slow", "l_var", "fell"})
"""The entries this module adds to the controller state (defaulted on older loads)."""


def init_settle_state(device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Fresh state: factor 1, nothing averaged yet."""

    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype, device=device)

    return {
        "settle": scalar(1.0),
        "n": scalar(0.0),
        "l_fast": scalar(0.0),
        "l_slow": scalar(0.0),
        "l_var": scalar(0.0),
        "fell": torch.zeros((), dtype=torch.bool, device=device),  # seen falling yet
    }


def _gap_std_factor(a_fast: Tensor, a_slow: Tensor) -> Tensor:
    """``std(l_slow − l_fast) / σ`` for i.i.d. losses of std σ and EMAs of rates
    ``a_fast``, ``a_slow`` (the two EMAs' variances minus twice their covariance)."""
    var_fast = a_fast / (2 - a_fast)
    var_slow = a_slow / (2 - a_slow)
    cov = a_fast * a_slow / (a_fast + a_slow - a_fast * a_slow)
    return torch.sqrt(torch.clamp(var_fast + var_slow - 2 * cov, min=0.0))


def settle_update(
    state: dict[str, Tensor], loss: Tensor, valid: Tensor, test: bool = True
) -> dict[str, Tensor]:
    """Advance the settling state by one step (unchanged where ``valid`` is False).

    ``loss`` is the sensed loss (a 0-dim tensor of the state's dtype; any sign and scale:
    the test is a ratio of loss differences). Returns the new entries; ``settle`` is the
    factor to multiply the step size by. ``test=False``: only the averages advance (``n``,
    ``l_fast``, ``l_slow``, ``l_var``, which the outlier brake reads); ``settle`` and
    ``fell`` keep their values (iterate averaging, which applies no factor: 50 of the 66
    small ops of a step are the test's).
    """
    n = state["n"] + 1
    slow_horizon = torch.clamp(n * HORIZON_FRACTION, min=HORIZON_MIN)
    # running means while n is small (tensor bounds via maximum: clamp would read them)
    a_slow = torch.maximum(1.0 / slow_horizon, 1.0 / n)
    a_fast = torch.clamp(torch.maximum(FAST_RATIO / slow_horizon, 1.0 / n), max=1.0)
    dev = loss - state["l_fast"]
    l_var = torch.lerp(state["l_var"], dev * dev, a_fast)
    l_var = torch.where(n == 1, torch.zeros_like(l_var), l_var)  # no deviation yet
    l_fast = torch.lerp(state["l_fast"], loss, a_fast)
    l_slow = torch.lerp(state["l_slow"], loss, a_slow)
    if not test:
        moved = {"n": n, "l_fast": l_fast, "l_slow": l_slow, "l_var": l_var}
        moved = {key: torch.where(valid, value, state[key]) for key, value in moved.items()}
        return {"settle": state["settle"], **moved, "fell": state["fell"]}

    noise = torch.sqrt(l_var) * _gap_std_factor(a_fast, a_slow)
    scale = torch.clamp(torch.maximum(noise, 1e-12 * l_slow.abs()), min=1e-300)
    gap = l_slow - l_fast
    falling = gap > Z_FALLING * scale
    # (a factor below 1 was annealed by a state saved before the latch existed: it had fallen)
    fell = state["fell"] | (state["settle"] < 1.0) | (gap > Z_STARTED * scale)
    settling = (n > WARMUP) & ~falling & fell
    factor = torch.where(settling, 1.0 - RATE / slow_horizon, torch.ones_like(n))
    new = {
        "settle": state["settle"] * factor,
        "n": n,
        "l_fast": l_fast,
        "l_slow": l_slow,
        "l_var": l_var,
        "fell": fell,
    }
    return {key: torch.where(valid, value, state[key]) for key, value in new.items()}
