"""The loss sensor ("emotion") and emoPulse, SPEC §2.

Everything here is pure tensor math on 0-dim tensors: no ``.item()``, no Python branching on
values, so a step never waits for the device. The optimizers advance the sensor exactly once
per optimizer step, outside any per-group or per-tensor loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "HIST_LEN",
    "STOP_MIN_STEPS",
    "init_sensor_state",
    "emotion",
    "pulse_update",
    "sensor_dtype_for",
    "trust_from_scalar",
]

HIST_LEN = 32
"""Length of the ring buffer of emotion scalars used by the early-stop signal."""
STOP_MIN_STEPS = 100
"""The stop signal waits for the long EMA's horizon (SPEC §2.8)."""
STOP_MEAN_ABS = 0.05
STOP_VAR = 0.005


def sensor_dtype_for(device: torch.device) -> torch.dtype:
    """float64 where the device has it (the EMAs take differences of nearly equal numbers)."""
    return torch.float32 if device.type == "mps" else torch.float64


def init_sensor_state(device: torch.device, max_lr: float) -> dict[str, Tensor]:
    """Fresh sensor state: nothing sensed yet, pulse at ``max_lr`` until the first loss."""
    dtype = sensor_dtype_for(device)

    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype, device=device)

    return {
        "t": torch.zeros((), dtype=torch.int64, device=device),
        "ema_short": scalar(0.0),
        "ema_medium": scalar(0.0),
        "ema_long": scalar(0.0),
        "scalar": scalar(0.0),
        "trust": scalar(1.0),
        "noise": scalar(0.05),
        "d": scalar(0.01),
        "H": scalar(0.0),
        "hist": torch.zeros(HIST_LEN, dtype=dtype, device=device),
        "hist_count": torch.zeros((), dtype=torch.int64, device=device),
        "stop": torch.zeros((), dtype=torch.bool, device=device),
        "pulse": scalar(max_lr),
        "skipped": torch.zeros((), dtype=torch.int64, device=device),
    }


def emotion(reference: Tensor, short: Tensor, floor: float) -> Tensor:
    """``tanh((reference − short) / max(|reference|, floor))``: how far the short EMA sits
    below a slower one, relative to its size (SPEC §2.3's σ with ``floor = 1e-5``; the
    distance controller's brake uses the dtype's smallest normal)."""
    return torch.tanh((reference - short) / torch.clamp(reference.abs(), min=floor))


def trust_from_scalar(sigma: Tensor) -> Tensor:
    """Trust ``τ = sign(σ)·(1 − |σ|)`` with sign(0) = +1 (SPEC §2.4)."""
    magnitude = 1.0 - sigma.abs()
    return torch.where(sigma >= 0, magnitude, -magnitude)


def pulse_update(
    state: dict[str, Tensor],
    loss: Tensor,
    valid: Tensor,
    *,
    scope: float,
    min_lr: float,
    max_lr: float,
) -> dict[str, Tensor]:
    """Advance the sensor by one optimizer step and return the new state.

    Args:
        state: the current sensor state (see :func:`init_sensor_state`); not modified.
        loss: the step's loss, a 0-dim tensor of the sensor dtype on the sensor device.
        valid: 0-dim bool tensor; where False (non-finite loss or gradients) the returned
            state equals ``state`` except that ``skipped`` is incremented.
        scope: the constructor's ``lr`` (upstream "emoScope"), a linear factor on the pulse.
        min_lr: lower clamp of the pulse.
        max_lr: upper clamp of the pulse.
    """
    first = state["t"] == 0
    t = state["t"] + 1

    # 1-2: short/medium/long EMAs, started at the first loss.
    es = torch.where(first, loss, state["ema_short"])
    em = torch.where(first, loss, state["ema_medium"])
    el = torch.where(first, loss, state["ema_long"])
    es = 0.3 * loss + 0.7 * es
    em = 0.05 * loss + 0.95 * em
    el = 0.01 * loss + 0.99 * el

    # 3-4: emotion scalar (relative to |ema_long|, sign-correct for negative losses), trust.
    sigma = emotion(el, es, floor=1e-5)
    trust = trust_from_scalar(sigma)

    # 5-7: how much the loss moves vs. how much it can be trusted -> emoPulse.
    noise = 0.7 * state["noise"] + 0.3 * sigma.abs()
    d = 0.95 * state["d"] + 0.05 * trust.abs()
    q = (d / torch.clamp(noise, min=1e-8)) ** 2
    big_h = torch.where(first, q, torch.maximum(0.999 * state["H"], q))
    pulse = torch.clamp(5e-5 * scope * q * torch.sqrt(big_h), min=min_lr, max=max_lr)

    # 8: early-stop signal from the last HIST_LEN scalars, once the long EMA has a horizon.
    slot = torch.remainder(state["t"], HIST_LEN)
    positions = torch.arange(HIST_LEN, device=slot.device)
    hist = torch.where(positions == slot, sigma, state["hist"])
    hist_count = torch.clamp(state["hist_count"] + 1, max=HIST_LEN)
    calm = (hist.abs().mean() < STOP_MEAN_ABS) & (hist.var(unbiased=False) < STOP_VAR)
    ready = (hist_count >= HIST_LEN) & (t >= STOP_MIN_STEPS)
    stop = state["stop"] | (ready & calm)

    new = {
        "t": t,
        "ema_short": es,
        "ema_medium": em,
        "ema_long": el,
        "scalar": sigma,
        "trust": trust,
        "noise": noise,
        "d": d,
        "H": big_h,
        "hist": hist,
        "hist_count": hist_count,
        "stop": stop,
        "pulse": pulse,
    }
    out = {key: torch.where(valid, value, state[key]) for key, value in new.items()}
    out["skipped"] = state["skipped"] + (~valid).to(state["skipped"].dtype)
    return out
