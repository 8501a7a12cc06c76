"""EmoAiry: Adafactor-type update at the emoPulse learning rate (SPEC §4).

Tensors with two or more dims keep factored second moments (Shazeer & Stern 2018): a row
statistic ``R`` (``[n0, 1, ...]``) and a column statistic ``C`` (``[1, *shape[1:]]``), with
``v̂ = R·C / mean(R)``; smaller tensors keep a full ``v``. Bias correction uses the
parameter's own step count ``k``; the update ``u = g / (√v̂ + eps)`` is clipped by RMS and
applied as ``p ← p·(1 − wd·lr) − lr·u``. Matrices cost about 0 bytes of state per parameter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import DEFAULT_PULSE, Bucket, EmoOptimizer, common_options, compiled
from ._emoairy_blocked import BLOCK, TINY, blocked_emoairy
from ._validation import check_range
from .averaging import bias_correction, foreach_bias_correction

__all__ = ["EmoAiry", "emoairy"]


class EmoAiry(EmoOptimizer):
    """Adafactor-type Emo optimizer: the lightest in memory.

    Takes :class:`~emo_core.EmoSens`'s arguments with ``beta2`` and ``clip_threshold``
    instead of ``betas`` (there is no first moment). Leave ``lr=1.0``.

    Args:
        params: parameters or param groups.
        lr: multiplier on the automatic LR (default: 1.0).
        beta2: decay of the (factored) second moment (default: 0.995).
        eps: added to √v̂ (default: 1e-8).
        clip_threshold: the update's RMS is clipped to this (default: 1.0).
        weight_decay: decoupled weight decay, scaled by the effective LR (default: 0.01).
        **kwargs: the keyword-only arguments of :class:`~emo_core.EmoSens` (``pulse``,
            ``use_shadow``, ``min_lr``, ``max_lr``, ``sync_loss``, ``process_group``, ``state_dtype``,
            ``stochastic_rounding``, ``foreach``, ``compile_update``, ``writer``,
            ``log_every``, ``maximize``, ``capture_loss``).
    """

    direction_power = 0.5  # g/√v̂: unit RMS, not unit size per coordinate
    # No first moment and a bias-corrected v: no stale, coherent early steps for the
    # distance controller's growth limit to guard against (distance.md, step 5).
    growth_limit = math.inf

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        beta2: float = 0.995,
        eps: float = 1e-8,
        clip_threshold: float = 1.0,
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
    ) -> None:
        super().__init__(
            params,
            {"beta2": beta2, "eps": eps, "clip_threshold": clip_threshold},
            **common_options(locals()),
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        group["beta2"] = check_range("beta2", group["beta2"], 0.0, 1.0, high_inclusive=False)
        group["eps"] = check_range("eps", group["eps"], 0.0, low_inclusive=False)
        group["clip_threshold"] = check_range(
            "clip_threshold", group["clip_threshold"], 0.0, low_inclusive=False
        )

    def _init_state(self, p: Tensor, state: dict[str, Any], dtype: torch.dtype) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if p.dim() >= 2:
            state["row_var"] = p.new_zeros(dict(_state_shapes(p.shape))["row_var"], dtype=dtype)
            state["col_var"] = _column_statistic(p, dtype)
        else:
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=dtype, memory_format=torch.preserve_format
            )

    def _check_state_shapes(
        self, params: list[Tensor], states: list[dict[str, Any]], real: bool
    ) -> None:
        """Factored state must still fit its parameter (``p.data`` replaced by a tensor of
        another shape): refused by name before the step changes anything."""
        shapes = [(torch.view_as_real(p) if real else p).shape for p in params]
        wanted = [_state_shapes(shape) for shape in shapes]
        if all(
            key in state and state[key].shape == want
            for state, expected in zip(states, wanted)
            for key, want in expected
        ):
            return  # (this runs every step on every tensor)
        for index, (shape, state, expected) in enumerate(zip(shapes, states, wanted)):
            for key, want in expected:
                got = state.get(key)
                if got is None or got.shape != want:
                    raise RuntimeError(
                        f"EmoAiry: state[{key!r}] of shape "
                        f"{None if got is None else tuple(got.shape)} does not fit its parameter "
                        f"of shape {tuple(shape)} (tensor {index} of its bucket; expected "
                        f"{want}); a parameter replaced by one of another shape needs a new "
                        "optimizer, or its state removed: del optimizer.state[p]"
                    )

    def _update(self, bucket: Bucket) -> None:
        group = bucket.group
        emoairy(
            bucket,
            beta2=group["beta2"],
            eps=group["eps"],
            clip_threshold=group["clip_threshold"],
            weight_decay=group["weight_decay"],
        )


@functools.lru_cache(maxsize=1024)
def _state_shapes(shape: torch.Size) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(key, shape)`` of the state of a parameter of ``shape``: a matrix (or higher) keeps
    factored row and column statistics, a vector or scalar a full ``v``."""
    if len(shape) >= 2:
        return (("row_var", (shape[0],) + (1,) * (len(shape) - 1)), ("col_var", (1, *shape[1:])))
    return (("exp_avg_sq", tuple(shape)),)


def _column_statistic(p: Tensor, dtype: torch.dtype) -> Tensor:
    """Zeros of shape ``(1, *p.shape[1:])``. For a DTensor (FSDP2) replicated on its mesh,
    as the column mean of a row-sharded gradient is: ``new_zeros`` keeps ``p``'s row
    sharding when ``p`` has one row, and the update's in-place add then fails on every rank
    (a ``Linear(d, 1)`` head under FSDP2)."""
    shape = (1,) + tuple(p.shape[1:])
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return p.new_zeros(shape, dtype=dtype)
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import zeros as mesh_zeros

    return mesh_zeros(shape, dtype=dtype, device_mesh=mesh, placements=[Replicate()] * mesh.ndim)


def _placed_like(update: Tensor, p: Tensor) -> Tensor:
    """``update`` with ``p``'s placements (FSDP2): on a parameter with fewer rows than ranks
    the factored ``v̂`` can come out replicated, and an in-place step of a row-sharded
    parameter by a replicated update fails. Plain tensors are returned as they are."""
    placements = getattr(p, "placements", None)
    if placements is None or update.placements == placements:
        return update
    return update.redistribute(p.device_mesh, placements)


def emoairy(
    bucket: Bucket, *, beta2: float, eps: float, clip_threshold: float, weight_decay: float
) -> None:
    """Functional EmoAiry update of one bucket, dispatching to the chosen kernel.

    ``foreach`` takes the blocked kernel for plain CPU tensors and the multi-tensor one on
    accelerators and for DTensors (FSDP2), whose ops must stay whole-tensor.
    """
    if bucket.impl == "compiled":
        # Three graphs: at their boundaries inductor keeps the small factors of v̂ and the
        # step sizes in memory, rather than recompute them inside its loops for every element.
        factors = compiled(_fusable_statistics)(bucket, beta2=beta2)
        step_sizes = compiled(_fusable_step_sizes)(bucket, factors, eps=eps, clip=clip_threshold)
        compiled(_fusable_update)(bucket, factors, step_sizes, eps=eps, weight_decay=weight_decay)
        return
    if bucket.impl == "foreach" and bucket.is_plain_cpu():
        rest = blocked_emoairy(
            bucket, beta2=beta2, eps=eps, clip=clip_threshold, weight_decay=weight_decay
        )
        if rest is not None:  # vectors, scalars, empty tensors
            _foreach_emoairy(
                rest, beta2=beta2, eps=eps, clip=clip_threshold, weight_decay=weight_decay
            )
        return
    kernel = {"foreach": _foreach_emoairy, "single": _single_tensor_emoairy}[bucket.impl]
    kernel(bucket, beta2=beta2, eps=eps, clip=clip_threshold, weight_decay=weight_decay)


def _single_tensor_emoairy(
    bucket: Bucket, *, beta2: float, eps: float, clip: float, weight_decay: float
) -> None:
    lr = bucket.step_lr()
    keep2 = bucket.decay(beta2)
    increment = bucket.valid.to(torch.float32)
    shrink = 1.0 - lr * weight_decay
    # One multi-tensor add, not an add_ per tensor: in a torch.compile'd training step whose
    # first call creates the state, inductor merged the identical per-tensor zeros + 1 into
    # one buffer, so every parameter's "step" was one tensor, advanced once per parameter.
    steps = bucket.states["step"]
    torch._foreach_add_(steps, [increment] * len(steps))
    for index, (p, g) in enumerate(zip(bucket.params, bucket.masked_grads())):
        state = {k: v[index] for k, v in bucket.states.items() if v[index] is not None}
        square = g * g
        if "row_var" in state:
            row, col = state["row_var"], state["col_var"]
            row.mul_(keep2).add_(square.mean(dim=_col_dims(g), keepdim=True), alpha=1 - beta2)
            col.mul_(keep2).add_(square.mean(dim=0, keepdim=True), alpha=1 - beta2)
            # (divided first, as the other kernels: row * col overflows fp32 for gradients
            # of ~1e11, and v̂ = inf zeroed the update)
            v_hat = row / row.mean().clamp(min=TINY) * col
        else:
            v_hat = state["exp_avg_sq"].mul_(keep2).add_(square, alpha=1 - beta2).clone()
        correction = bias_correction(state["step"], beta2)
        v_hat.div_(correction.to(v_hat.dtype))
        update = g / (v_hat.sqrt_() + eps)
        rms = update.square().mean().sqrt()
        update.div_(torch.clamp(rms / clip, min=1.0))
        p.mul_(shrink)
        p.sub_(_placed_like(update * lr, p))


def _fusable_statistics(bucket: Bucket, *, beta2: float) -> list[tuple[Tensor, Tensor | None]]:
    """First part of the rule arranged for inductor (``compile_update=True``): the moments.

    Returns per tensor the factors of ``√(v̂ / (1 - β2^k))``: ``(√R', √C)`` of a matrix
    (``√R' = √(R / (mean(R)·(1 - β2^k)))``) and ``(√v', None)`` of a smaller tensor. The means
    of g² of a large matrix are gemvs, as inductor's reduction over the outer dim is ~3x
    slower. On a skipped step the statistics keep their values (the means may be nan).
    """
    valid = bucket.valid
    increment = valid.to(torch.float32)
    factors: list[tuple[Tensor, Tensor | None]] = []
    for index, g in enumerate(bucket.grads):
        state = {k: v[index] for k, v in bucket.states.items() if v[index] is not None}
        state["step"].add_(increment)
        correction = bias_correction(state["step"], beta2)
        if "row_var" in state:
            row, col = state["row_var"], state["col_var"]
            n0 = g.shape[0]
            square = g.reshape(n0, -1).square()
            if g.numel() < BLOCK:  # a gemv costs more than its overhead saves
                row_mean = square.mean(dim=1, keepdim=True)
                col_mean = square.mean(dim=0, keepdim=True)
            else:
                m = square.shape[1]
                row_mean = torch.mm(square, g.new_full((m, 1), 1.0 / m))
                col_mean = torch.mm(g.new_full((1, n0), 1.0 / n0), square)
            row_var = torch.where(valid, row.view(n0, 1).lerp(row_mean, 1 - beta2), row.view(n0, 1))
            col_var = torch.where(valid, col.view(1, -1).lerp(col_mean, 1 - beta2), col.view(1, -1))
            row.copy_(row_var.view_as(row))
            col.copy_(col_var.view_as(col))
            scale = row_var.mean().clamp(min=TINY) * correction
            factors.append(((row_var / scale).sqrt(), col_var.sqrt()))
        else:
            moment = state["exp_avg_sq"]
            moment.copy_(torch.where(valid, moment.lerp(g * g, 1 - beta2), moment))
            factors.append(((moment / correction).sqrt(), None))
    return factors


def _fusable_step_sizes(
    bucket: Bucket, factors: list[tuple[Tensor, Tensor | None]], *, eps: float, clip: float
) -> list[Tensor]:
    """Second part: per tensor ``lr / max(1, rms(u) / clip)`` for ``u = g / (√R'·√C + eps)``
    (0 on a skipped step); one loop over g each."""
    valid = bucket.valid
    lr = bucket.step_lr()
    step_sizes = []
    for g, factor in zip(bucket.grads, factors):
        rms = _fusable_direction(g, factor, eps).square().mean().sqrt()
        step_sizes.append(torch.where(valid, lr / torch.clamp(rms / clip, min=1.0), 0.0))
    return step_sizes


def _fusable_update(
    bucket: Bucket,
    factors: list[tuple[Tensor, Tensor | None]],
    step_sizes: list[Tensor],
    *,
    eps: float,
    weight_decay: float,
) -> None:
    """Last part: ``p ← p·(1 - wd·lr) - step_size·u``, one loop over g and p each, which
    recomputes u rather than reading it; on a skipped step u is masked (nan/inf included)."""
    valid = bucket.valid
    shrink = 1.0 - bucket.step_lr() * weight_decay
    for p, g, factor, step_size in zip(bucket.params, bucket.grads, factors, step_sizes):
        update = torch.where(valid, _fusable_direction(g, factor, eps), 0.0)
        p.mul_(shrink)
        p.sub_(update.reshape(p.shape) * step_size)


def _fusable_direction(g: Tensor, factor: tuple[Tensor, Tensor | None], eps: float) -> Tensor:
    """``u = g / (√R'·√C + eps)`` of a matrix (as ``[n0, m]``), ``g / (√v' + eps)`` else."""
    root, root_col = factor
    if root_col is None:
        return g / (root + eps)
    return g.reshape(root.shape[0], -1) / (root * root_col + eps)


def _foreach_emoairy(
    bucket: Bucket, *, beta2: float, eps: float, clip: float, weight_decay: float
) -> None:
    """The same rule with multi-tensor ops, arranged to touch full-size tensors few times.

    Bias correction and mean(R) are folded into R, and √v̂ = √R'·√C, so the denominator is
    built in one pass
    (``addcmul(eps, √R', √C)``); the RMS clip and the LR form one scale per tensor.
    """
    lr = bucket.step_lr()
    keep2 = bucket.decay(beta2)
    grads = bucket.masked_grads()
    states = bucket.states
    steps = states["step"]
    # A list of 0-dim tensors, not one: torch.compile reads the scalar-tensor overload on
    # the host (a graph break).
    torch._foreach_add_(steps, [bucket.valid.to(torch.float32)] * len(steps))
    corrections = foreach_bias_correction(steps, beta2)
    factored = [i for i, row in enumerate(states.get("row_var", [])) if row is not None]
    full = [i for i, v in enumerate(states.get("exp_avg_sq", [])) if v is not None]
    denoms: list[Tensor | None] = [None] * len(grads)
    if factored:
        rows = [states["row_var"][i] for i in factored]
        cols = [states["col_var"][i] for i in factored]
        squares = torch._foreach_mul([grads[i] for i in factored], [grads[i] for i in factored])
        row_means = [sq.mean(dim=_col_dims(sq), keepdim=True) for sq in squares]
        col_means = [sq.mean(dim=0, keepdim=True) for sq in squares]
        del squares
        for stat, mean in ((rows, row_means), (cols, col_means)):
            torch._foreach_mul_(stat, keep2)
            torch._foreach_add_(stat, mean, alpha=1 - beta2)
        # mean(R) via the 1-norm (R >= 0), one multi-tensor reduction for all rows.
        # Out of place: a DTensor (FSDP2) norm is a pending partial sum that in-place ops reject.
        row_avg = torch._foreach_mul(torch._foreach_norm(rows, 1), [1.0 / r.numel() for r in rows])
        torch._foreach_clamp_min_(row_avg, TINY)
        torch._foreach_mul_(row_avg, [corrections[i] for i in factored])
        root_rows = torch._foreach_div(rows, row_avg)
        torch._foreach_sqrt_(root_rows)
        root_cols = torch._foreach_sqrt(cols)
        eps_t = torch.full((), eps, dtype=bucket.lr.dtype, device=bucket.lr.device)
        for i, root_row, root_col in zip(factored, root_rows, root_cols):
            denoms[i] = torch.addcmul(eps_t, root_row, root_col)
    if full:
        moments = [states["exp_avg_sq"][i] for i in full]
        torch._foreach_mul_(moments, keep2)
        torch._foreach_addcmul_(
            moments, [grads[i] for i in full], [grads[i] for i in full], value=1 - beta2
        )
        roots = torch._foreach_div(moments, [corrections[i] for i in full])
        torch._foreach_sqrt_(roots)
        torch._foreach_add_(roots, eps)
        for i, value in zip(full, roots):
            denoms[i] = value
    updates = torch._foreach_div(grads, denoms)
    # RMS clip, rms = ||u||_2 / sqrt(n): scale u by lr / max(1, rms / clip).
    scales = torch._foreach_mul(
        torch._foreach_norm(updates, 2), [1.0 / (clip * u.numel() ** 0.5) for u in updates]
    )
    torch._foreach_clamp_min_(scales, 1.0)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, lr)
    torch._foreach_mul_(updates, scales)
    torch._foreach_mul_(bucket.params, 1.0 - lr * weight_decay)
    torch._foreach_sub_(bucket.params, [_placed_like(u, p) for u, p in zip(updates, bucket.params)])


def _col_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))
