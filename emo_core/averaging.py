"""Schedule-Free iterate averaging (``EmoSens(average=True)``, EmoCats too), see ``averaging.md``.

Three sequences, two buffers: the parameters hold the interpolation
``y = (1 − β)·z + β·x`` while training (gradients are taken there), the state keeps the
average ``x`` as of its last *fold*, and the stepped sequence ``z = y + β/(1 − β)·(y − x)``
is never stored. Between folds ``x`` stands still, so a step moves ``y`` alone, by
``(1 − β)`` times ``z``'s step: one update of the parameters, as without averaging. Every
few steps (:func:`fold_due`) and before ``eval()``, a fold gives ``x`` the weight the steps
since the last fold earned and moves ``y`` with it (:func:`fold_average_`). This module keeps
the averaging weights (0-dim tensors, no host reads), the fold and its schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "AVERAGE_GROWTH",
    "FOLD_EVERY",
    "FOLD_RAMP",
    "average_weight",
    "fold_average_",
    "fold_due",
    "init_average_state",
    "inverse_bias_correction",
]

AVERAGE_GROWTH = 1.5
"""The most the distance controller's scale may grow per step under averaging (1.2 without:
``distance.md`` step 5). Averaging's ``v`` is bias-corrected, so its early steps are not
stale; but after a plateau (a zero-initialised head) layers whose gradient was ~0 step at
5-10x their RMS while ``v`` remembers the plateau, and an unlimited scale followed that
motion 3-6x per step into a 10-2000x loss spike (averaging.md, "Growth")."""
FOLD_EVERY = 16  # steps between folds, at most
FOLD_RAMP = 32  # ... and at most 1/FOLD_RAMP of the steps taken: every step at first


def init_average_state(device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """No weight yet, no step taken; parameters hold the training point ``y``."""
    zero = torch.zeros((), dtype=dtype, device=device)
    return {
        "lr_max": zero,
        "weight_sum": zero.clone(),
        "steps": zero.clone(),  # valid steps taken: the second moment's bias correction
        "pending": torch.ones((), dtype=dtype, device=device),  # Π(1 − c) since the last fold
        "eval_mode": torch.zeros((), dtype=torch.bool, device=device),
    }


def average_weight(
    state: dict[str, Tensor], lr: Tensor, valid: Tensor, fold: bool
) -> tuple[dict[str, Tensor], Tensor]:
    """The new state and this step's fold weight ``C`` in ``x ← (1 − C)·x + C·z``.

    Step ``t`` weighs ``w_t = (max_{s≤t} lr_s)²`` and mixes ``c = w_t / Σ_{s≤t} w_s`` into the
    average (Schedule-Free's ``weight_lr_power = 2``: steps taken while the LR is still being
    found count little). Mixes wait in ``pending = Π(1 − c)`` until a fold (``fold``, from
    :func:`fold_due`), which spends them all: ``C = 1 − pending``. ``steps`` counts the valid
    steps (for the bias correction of ``v``). A skipped step (``valid`` False) leaves the
    state as it is and gives ``C = 0``, on a fold step too (the fold waits for the next one).
    """
    lr = lr.to(state["lr_max"].dtype)
    lr_max = torch.where(valid, torch.maximum(state["lr_max"], lr), state["lr_max"])
    weight = torch.where(valid, lr_max * lr_max, torch.zeros_like(lr_max))
    total = state["weight_sum"] + weight
    mix = torch.where(total > 0, weight / torch.clamp(total, min=torch.finfo(total.dtype).tiny), 0)
    pending = state["pending"] * (1.0 - mix)  # (mix is 0 on a skipped step)
    if fold:
        spent = torch.where(valid, 1.0 - pending, 0.0)
        pending = torch.where(valid, torch.ones_like(pending), pending)
    else:
        spent = torch.zeros_like(pending)
    steps = state["steps"] + valid.to(state["steps"].dtype)
    new = {**state, "lr_max": lr_max, "weight_sum": total, "steps": steps, "pending": pending}
    return new, spent


def fold_due(calls: int) -> bool:
    """Whether step call ``calls`` (1, 2, …; skipped ones too) folds: every
    ``max(1, min(FOLD_EVERY, calls // FOLD_RAMP))`` calls. Early, when one step's weight is
    much of the average, every step folds; later the average lags ``z`` by at most
    ``1/FOLD_RAMP`` of the steps taken. A host count: the schedule reads no device value."""
    return calls % max(1, min(FOLD_EVERY, calls // FOLD_RAMP)) == 0


def fold_average_(params: list[Tensor], xs: list[Tensor], spent: Tensor, beta: float) -> None:
    """The fold, in place: ``x ← (1 − C)·x + C·z`` and ``y ← (1 − β)·z + β·x`` at the new
    ``x``, with ``z = y + β/(1 − β)·(y − x)`` unchanged (not stored). With ``b = C/(1 − β)``:
    ``y ← y + β·b·(y − x)``, then ``x ← x + b/(1 + β·b)·(y − x)`` at the new ``y``. Two
    lerps; ``C = 0`` (a skipped fold) leaves both bitwise."""
    if not params:
        return
    b = spent / (1.0 - beta)
    n = len(params)
    # (lists of 0-dim tensors: no host read of the weight)
    torch._foreach_lerp_(params, xs, [-beta * b] * n)
    torch._foreach_lerp_(xs, params, [b / (1.0 + beta * b)] * n)


def bias_correction(steps: Tensor, beta2: float) -> Tensor:
    """``1 − β2^k`` for ``k = max(steps, 1)``, in the steps' dtype, as ``−expm1(k·ln β2)``
    with ``ln β2`` in double: ``β2^k`` in fp32 rounds a ``β2`` within 6e-8 of 1 to 1.0 (a
    correction of 0, so nan or inf steps) and is 9% off at ``β2 = 0.9999999``."""
    return -torch.expm1(torch.clamp(steps, min=1.0) * _log(beta2))


def foreach_bias_correction(steps: list[Tensor], beta2: float) -> list[Tensor]:
    """:func:`bias_correction` of each tensor of ``steps`` (multi-tensor kernels)."""
    corrections = torch._foreach_mul(torch._foreach_clamp_min(steps, 1.0), _log(beta2))
    torch._foreach_expm1_(corrections)
    torch._foreach_neg_(corrections)
    return corrections


def _log(beta2: float) -> float:
    """``ln β2`` in double (``−inf`` for ``β2 = 0``: a correction of 1 from the first step)."""
    return math.log(beta2) if beta2 > 0 else -math.inf


def inverse_bias_correction(steps: Tensor, beta2: float) -> Tensor:
    """``1/√(1 − β2^k)`` for ``k = max(steps, 1)``: ``√v`` times this is Adam's ``√v̂``."""
    return torch.rsqrt(bias_correction(steps, beta2))
