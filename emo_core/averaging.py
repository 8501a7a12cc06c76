"""Schedule-Free iterate averaging (``EmoSens(average=True)``), see ``averaging.md``.

Three sequences share one buffer: the optimizer steps ``z`` (kept in the state), the
average ``x`` is not stored, and the parameters hold the interpolation
``y = (1 − β)·z + β·x`` while training (gradients are taken there) and ``x`` while
evaluating. ``x`` is recovered exactly from ``y`` and ``z``, so switching costs no memory.
This module keeps the averaging weights (0-dim tensors, no host reads), the step of the
recursion that every averaged multi-tensor kernel shares, and the switches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "average_weight",
    "init_average_state",
    "inverse_bias_correction",
    "schedule_free_step_",
    "to_average_",
    "to_train_",
]


def init_average_state(device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """No weight yet, no step taken; parameters hold the training point ``y``."""
    zero = torch.zeros((), dtype=dtype, device=device)
    return {
        "lr_max": zero,
        "weight_sum": zero.clone(),
        "steps": zero.clone(),  # valid steps taken: the second moment's bias correction
        "eval_mode": torch.zeros((), dtype=torch.bool, device=device),
    }


def average_weight(
    state: dict[str, Tensor], lr: Tensor, valid: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """The new state and this step's mixing weight ``c`` in ``x ← (1 − c)·x + c·z``.

    Step ``t`` weighs ``w_t = (max_{s≤t} lr_s)²`` and ``c = w_t / Σ_{s≤t} w_s`` (Schedule-Free's
    ``weight_lr_power = 2``): steps taken while the LR is still being found count little.
    ``steps`` counts the valid steps (for the bias correction of ``v``). A skipped step
    (``valid`` False) leaves the state as it is and gives ``c = 0``.
    """
    lr = lr.to(state["lr_max"].dtype)
    lr_max = torch.where(valid, torch.maximum(state["lr_max"], lr), state["lr_max"])
    weight = torch.where(valid, lr_max * lr_max, torch.zeros_like(lr_max))
    total = state["weight_sum"] + weight
    mix = torch.where(total > 0, weight / torch.clamp(total, min=torch.finfo(total.dtype).tiny), 0)
    steps = state["steps"] + valid.to(state["steps"].dtype)
    return {**state, "lr_max": lr_max, "weight_sum": total, "steps": steps}, mix


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


def schedule_free_step_(
    params: list[Tensor],
    zs: list[Tensor],
    directions: list[Tensor],
    lr: Tensor,
    mix: Tensor,
    beta: float,
) -> None:
    """Step 3 of ``averaging.md`` for any direction ``u`` (Adam's, Lion's), in place:
    ``y ← lerp(y, z, c) + lr·(β·(1 − c) − 1)·u``, then ``z ← z − lr·u``. ``lr`` and ``mix``
    are 0-dim tensors (0 on a skipped step: every entry keeps its value)."""
    n = len(params)
    # (lists of 0-dim tensors: no host read of the LR or the weight)
    torch._foreach_lerp_(params, zs, [mix] * n)
    torch._foreach_addcmul_(params, directions, [lr * (beta * (1.0 - mix) - 1.0)] * n)
    torch._foreach_addcmul_(zs, directions, [lr] * n, value=-1.0)


def to_average_(params: list[Tensor], zs: list[Tensor], beta: float) -> None:
    """Parameters from ``y`` to the average ``x = (y − (1 − β)·z)/β``, in place."""
    _lerp_(params, zs, 1.0 - 1.0 / beta)


def to_train_(params: list[Tensor], zs: list[Tensor], beta: float) -> None:
    """Parameters from the average ``x`` back to ``y = β·x + (1 − β)·z``, in place."""
    _lerp_(params, zs, 1.0 - beta)


def _lerp_(params: list[Tensor], zs: list[Tensor], weight: float) -> None:
    for p, z in zip(params, zs):
        if p.dtype == z.dtype:
            p.lerp_(z, weight)
        else:  # half parameters and fp32 z, or the reverse (a low state_dtype): mix in the
            # wider of the two, round once into the parameter
            wide = torch.promote_types(p.dtype, z.dtype)
            p.copy_(torch.lerp(p.to(wide), z.to(wide), weight))
