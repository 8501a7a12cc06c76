"""EmoAiry's update on plain CPU tensors, blocked for the cache (the default CPU path).

The rule is EmoAiry's (SPEC §4, see :mod:`emo_core.emoairy`); only the arrangement differs
from the multi-tensor kernel: each factored matrix is swept three times (statistics, RMS,
update) in blocks whose temporaries stay in a core's L2, column means are gemvs, and small
matrices of one shape are stacked so that op overhead is paid per stack, not per tensor.
Measured on 1 thread: 26M parameters in 4 matrices 137 -> ~68 ms per step; 400 LoRA-sized
matrices 47 -> ~18 ms (``emo-bench speed``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._base import CPU_BLOCK, Bucket
from .averaging import bias_correction

__all__ = ["BLOCK", "TINY", "blocked_emoairy"]

TINY = 1e-30  # guards mean(R) of an all-zero gradient: v̂ = 0 rather than 0/0
BLOCK = CPU_BLOCK  # elements per row block of a large matrix
# Elements per stack of small same-shape matrices: larger stacks spill from L2, smaller ones
# pay the per-op overhead more often (measured optimum for LoRA-sized tensors).
STACK = 1 << 18


def blocked_emoairy(
    bucket: Bucket, *, beta2: float, eps: float, clip: float, weight_decay: float
) -> Bucket | None:
    """The same rule on CPU, for factored tensors, in blocks of at most ``BLOCK`` elements.

    Each matrix is viewed as ``[n0, m]`` and swept three times (statistics, RMS, update); a
    large one in row blocks, so that the temporaries of a block stay in L2, and small ones of
    one shape stacked into blocks, so that the per-op overhead is paid per block rather than
    per tensor. Returns the tensors it leaves to the caller (vectors, scalars, empty ones), or
    None.
    """
    rows = bucket.states.get("row_var", [None] * len(bucket.params))
    blocked = [i for i, p in enumerate(bucket.params) if rows[i] is not None and p.numel()]
    if not blocked:
        return bucket
    _, rest_bucket = bucket.split(blocked)
    by_shape: dict[torch.Size, list[int]] = {}
    for i in blocked:
        by_shape.setdefault(bucket.params[i].shape, []).append(i)
    blocked = [i for indices in by_shape.values() for i in indices]
    steps = [bucket.states["step"][i] for i in blocked]
    torch._foreach_add_(steps, [bucket.valid.to(torch.float32)] * len(steps))
    corrections = bias_correction(torch.stack(steps), beta2)
    lr = bucket.step_lr()
    shared = _Shared(
        lr=lr,
        shrink=1.0 - lr * weight_decay,
        keep_bits=bucket.keep_bits(torch.int32),
        beta2=beta2,
        eps=eps,
        clip=clip,
    )
    start = 0
    for shape, indices in by_shape.items():
        per_batch = max(1, STACK // math.prod(shape))
        for first in range(0, len(indices), per_batch):
            part = bucket.subset(indices[first : first + per_batch])
            end = start + len(part.params)
            _update_factored(part, corrections[start:end], shared)
            start = end
    return rest_bucket


class _Shared(NamedTuple):
    """What the batches of one bucket share: 0-dim tensors and hyperparameters."""

    lr: Tensor  # the effective LR, 0 on a skipped step
    shrink: Tensor  # 1 - wd·lr
    keep_bits: Tensor  # int32 mask: u & keep_bits is u on a valid step and +0 else
    beta2: float
    eps: float
    clip: float


def _update_factored(bucket: Bucket, corrections: Tensor, shared: _Shared) -> None:
    """Update ``k`` same-shape matrices as one ``[k, n0, m]`` batch (steps already counted).

    ``corrections`` holds each matrix's ``1 - β2^k``.
    """
    params, states, beta2, eps = bucket.params, bucket.states, shared.beta2, shared.eps
    shape = params[0].shape
    k, n0 = len(params), shape[0]
    m = params[0].numel() // n0
    grads = _stacked(bucket.grads, (k, n0, m))
    # Row blocks for one large matrix (in place, so it must be contiguous); else one block.
    rows_per_block = n0
    if k == 1 and params[0].is_contiguous():
        rows_per_block = max(1, BLOCK // m)
    blocks = [slice(i, i + rows_per_block) for i in range(0, n0, rows_per_block)]
    scratch = grads.new_empty(k, min(rows_per_block, n0), m)

    # Pass 1: row and column means of g². Over row blocks the column means accumulate as a
    # gemv, much faster than a reduction over the outer dim.
    row_mean = grads.new_empty(k, n0, 1)
    if len(blocks) == 1:
        sq = torch.mul(grads, grads, out=scratch)
        # A gemv: unlike torch.mean, not slowed down by narrow rows (LoRA's [r_big, 8]).
        torch.mv(sq.view(-1, m), grads.new_full((m,), 1 / m), out=row_mean.view(-1))
        col_mean = sq.mean(dim=1, keepdim=True)
    else:
        col_mean = grads.new_zeros(1, m)
        weights = grads.new_full((1, rows_per_block), 1 / n0)
        for block in blocks:
            g = grads[0, block]
            sq = torch.mul(g, g, out=scratch[0, : g.shape[0]])
            torch.mean(sq, dim=1, keepdim=True, out=row_mean[0, block])
            col_mean.addmm_(weights[:, : g.shape[0]], sq)
    # R ← β2·R + (1 - β2)·mean(g²), likewise C; kept as they are on a skipped step (the
    # means may be nan).
    valid = bucket.valid
    row_old = _stacked(states["row_var"], (k, n0, 1))
    col_old = _stacked(states["col_var"], (k, 1, m))
    row_var = torch.where(valid, row_old.lerp(row_mean, 1 - beta2), row_old)
    col_var = torch.where(valid, col_old.lerp(col_mean.view(k, 1, m), 1 - beta2), col_old)
    rows, cols = states["row_var"], states["col_var"]
    torch._foreach_copy_(
        rows + cols,
        list(row_var.view(k, *rows[0].shape).unbind(0))
        + list(col_var.view(k, *cols[0].shape).unbind(0)),
    )
    # √(v̂ / (1 - β2^k)) = √(R / (mean(R)·(1 - β2^k)))·√C: bias correction and mean(R) go
    # into the row factor.
    row_scale = row_var.mean(dim=(1, 2), keepdim=True).clamp_(min=TINY)
    root_row = (row_var / row_scale.mul_(corrections.view(k, 1, 1))).sqrt_()
    root_col = col_var.sqrt()

    # Pass 2: the RMS of u = g / (√v̂ + eps) from the 2-norms of its blocks.
    norms = grads.new_empty(k, len(blocks))
    for j, block in enumerate(blocks):
        u = _unclipped(grads[:, block], root_row[:, block], root_col, eps, scratch)
        torch.linalg.vector_norm(u, dim=(1, 2), out=norms[:, j])
    ratio = torch.linalg.vector_norm(norms, dim=1).div_(shared.clip * math.sqrt(n0 * m))
    step_sizes = list(torch.where(valid, shared.lr / ratio.clamp_(min=1.0), 0.0).unbind(0))
    shrink = [shared.shrink] * k

    # Pass 3: p ← p·(1 - wd·lr) - step_size·u. On a skipped step u is zeroed bitwise (a bad
    # gradient's nan/inf included; ~7x faster than torch.where) and shrink is 1, so p - 0 = p.
    for block in blocks:
        if len(blocks) == 1:  # u of pass 2 is still in scratch
            targets, updates = params, list(u.view(k, *shape).unbind(0))
        else:
            u = _unclipped(grads[:, block], root_row[:, block], root_col, eps, scratch)
            targets, updates = [params[0].view(n0, m)[block]], [u[0]]
        u.view(torch.int32).bitwise_and_(shared.keep_bits)
        torch._foreach_mul_(targets, shrink)
        torch._foreach_addcmul_(targets, updates, step_sizes, value=-1.0)


def _unclipped(
    g: Tensor, root_row: Tensor, root_col: Tensor, eps: float, scratch: Tensor
) -> Tensor:
    """``g / (√R'·√C + eps)`` of one block, written into ``scratch``."""
    out = scratch[:, : g.shape[1]]
    torch.mul(root_row, root_col, out=out)
    out.add_(eps)
    return torch.div(g, out, out=out)


def _stacked(tensors: list[Tensor], shape: tuple[int, ...]) -> Tensor:
    """The tensors as one of ``shape``: a view of a single tensor where possible, else a copy."""
    if len(tensors) == 1:
        return tensors[0].reshape(shape)
    return torch.stack(tensors).view(shape)
