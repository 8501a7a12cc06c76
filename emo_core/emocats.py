"""EmoCats: Lion-type sign update at the emoPulse learning rate (SPEC §4).

``c = β1·m + (1−β1)·g``; ``p ← p·(1 − wd·lr) − lr·sign(c)``; ``m ← β2·m + (1−β2)·g``.
One moment, 4 bytes of state per parameter.

With ``average=True`` (Schedule-Free averaging, ``averaging.md``) the parameters hold the
interpolation ``y`` and the state the average ``x`` (+4 B/param). Between folds a step is
the rule above at the LR ``lr·(1 − β)``, ``β = interpolation`` (so the stepped ``z`` moves
by ``lr·(sign(c) + wd·y)``); the base class folds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ._base import (
    DEFAULT_PULSE,
    Bucket,
    EmoOptimizer,
    common_options,
    compiled,
    resolve_average,
)
from ._validation import check_betas, check_range

__all__ = ["AVERAGED_BETAS", "BETAS", "EmoCats", "emocats"]

BETAS = (0.9, 0.995)
"""Lion's sign blend and momentum decay."""
AVERAGED_BETAS = (0.9, 0.8)
"""The same under ``average=True``. The stepped ``z`` runs ahead of the parameters (they see
it with weight ``1 − interpolation``); a momentum of ~200 steps keeps the sign fixed while
``z`` overshoots (emo-bench quality, seed 0: 3/10 workloads within 2% with 0.995, 7/10 with
0.8 and ``interpolation=0.8``)."""


class EmoCats(EmoOptimizer):
    """Lion-type Emo optimizer: light (4 B/param; 8 with the default averaging) and accurate.

    Takes the same arguments as :class:`~emo_core.EmoSens` without ``eps`` (a sign update
    needs none) and without ``fused``. Leave ``lr=1.0``; the loss sets the learning rate. By
    default the parameters are averaged (``average``): call ``opt.eval()`` before evaluating
    or saving and ``opt.train()`` before training again.

    Args:
        params: parameters or param groups.
        lr: multiplier on the automatic LR (default: 1.0).
        betas: interpolation for the sign direction and the moment decay; None =
            (0.9, 0.995), or (0.9, 0.8) with ``average=True`` (default: None).
        weight_decay: decoupled weight decay, scaled by the effective LR (default: 0.01).
        average: Schedule-Free iterate averaging on top of ``pulse="distance"`` (required),
            as :class:`~emo_core.EmoSens`'s: call ``opt.eval()`` before evaluating or saving
            and ``opt.train()`` before training steps; +4 B/param for the average ``x``
            (``emo_core/averaging.md``). None = on with ``pulse="distance"`` unless
            ``use_shadow=True`` or a parameter is bf16/fp16 (default: None).
        interpolation: ``β`` of the training point ``y = β·x + (1 − β)·z`` under
            ``average=True`` (default: 0.8).
        **kwargs: the keyword-only arguments of :class:`~emo_core.EmoSens` (``pulse``,
            ``use_shadow``, ``min_lr``, ``max_lr``, ``sync_loss``, ``process_group``, ``state_dtype``,
            ``stochastic_rounding``, ``foreach``, ``compile_update``, ``writer``,
            ``log_every``, ``maximize``, ``capture_loss``).
    """

    direction_power = 1.0  # a sign update: unit size per coordinate

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] | None = None,
        weight_decay: float = 0.01,
        *,
        pulse: str = DEFAULT_PULSE,
        use_shadow: bool = False,
        min_lr: float | None = None,
        max_lr: float | None = None,
        sync_loss: bool = True,
        process_group: object | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool | None = None,
        foreach: bool | None = None,
        compile_update: bool = False,
        writer: Any | None = None,
        log_every: int = 1,
        maximize: bool = False,
        capture_loss: bool = False,
        average: bool | None = None,
        interpolation: float = 0.8,
    ) -> None:
        params, averaged = resolve_average(params, average, pulse, use_shadow)
        if betas is None:  # a short momentum under averaging: z moves, m must follow it
            betas = AVERAGED_BETAS if averaged else BETAS
        defaults = {"betas": betas, "interpolation": interpolation}
        super().__init__(params, defaults, **common_options(locals()), average=averaged)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        group["betas"] = check_betas("betas", group["betas"])
        group["interpolation"] = check_range(
            "interpolation",
            group["interpolation"],
            0.0,
            1.0,
            low_inclusive=False,
            high_inclusive=False,
        )

    def _interpolation(self, group: dict[str, Any]) -> float:
        return group["interpolation"]

    def _init_state(self, p: Tensor, state: dict[str, Any], dtype: torch.dtype) -> None:
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if self.average:  # the average starts at the parameter
            state["x"] = p.detach().to(dtype, memory_format=torch.preserve_format, copy=True)

    def _layout_keys(self) -> tuple[str, ...]:
        return ("exp_avg", "x") if self.average else ("exp_avg",)

    def _update(self, bucket: Bucket) -> None:
        beta1, beta2 = bucket.group["betas"]
        options = {"beta1": beta1, "beta2": beta2, "weight_decay": bucket.group["weight_decay"]}
        if bucket.mix is not None:  # (average=True) between folds y takes (1 − β) of z's step
            bucket = replace(bucket, lr=bucket.lr * (1.0 - bucket.group["interpolation"]))
        emocats(bucket, **options)


def emocats(bucket: Bucket, *, beta1: float, beta2: float, weight_decay: float) -> None:
    """Functional EmoCats update of one bucket, dispatching to the chosen kernel."""
    if bucket.impl == "foreach" and bucket.is_plain_cpu():
        # Large contiguous CPU tensors in cache-sized blocks, the rest multi-tensor.
        blocked, rest = bucket.split_large()
        if blocked is not None:
            _blocked_emocats(blocked, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
            if rest is not None:
                _foreach_emocats(rest, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
            return
    kernel = {"foreach": _foreach_emocats, "single": _single_tensor_emocats}.get(bucket.impl)
    kernel = kernel or compiled(_single_tensor_emocats)
    kernel(bucket, beta1=beta1, beta2=beta2, weight_decay=weight_decay)


def _single_tensor_emocats(
    bucket: Bucket, *, beta1: float, beta2: float, weight_decay: float
) -> None:
    lr = bucket.step_lr()
    keep2 = bucket.decay(beta2)
    shrink = 1.0 - lr * weight_decay
    for p, g, m in zip(bucket.params, bucket.masked_grads(), bucket.states["exp_avg"]):
        direction = torch.lerp(m, g, 1.0 - beta1).sign_()
        p.mul_(shrink)
        p.sub_(direction * lr)
        m.mul_(keep2).add_(g, alpha=1.0 - beta2)


def _foreach_emocats(bucket: Bucket, *, beta1: float, beta2: float, weight_decay: float) -> None:
    lr = bucket.step_lr()
    grads = bucket.masked_grads()
    exp_avgs = bucket.states["exp_avg"]
    direction = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_sign_(direction)
    torch._foreach_mul_(bucket.params, 1.0 - lr * weight_decay)
    # p -= lr * sign(c) in one pass (a list of 0-dim tensors: no host read of lr).
    torch._foreach_addcmul_(bucket.params, direction, [lr] * len(direction), value=-1.0)
    torch._foreach_lerp_(exp_avgs, grads, bucket.blend(1.0 - beta2))


def _blocked_emocats(bucket: Bucket, *, beta1: float, beta2: float, weight_decay: float) -> None:
    """The rule on large contiguous CPU tensors, in blocks of ``CPU_BLOCK`` elements
    (:meth:`Bucket.cpu_blocks`): ~2x faster than the multi-tensor kernel's full-size
    temporaries, which cost DRAM traffic and page faults."""
    lr = bucket.step_lr()
    shrink = 1.0 - lr * weight_decay
    blend = (bucket.valid * (1.0 - beta2)).to(lr.dtype)
    for g, scratch, (p, m) in bucket.cpu_blocks(bucket.states["exp_avg"]):
        direction = torch.lerp(m, g, 1.0 - beta1, out=scratch).sign_()
        p.mul_(shrink)
        p.addcmul_(direction, lr, value=-1.0)
        m.lerp_(g, blend)
