"""Loss reduction across ranks so every replica computes the same learning rate (SPEC §1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["local_shard", "mean_loss_over_ranks", "refusals_elsewhere", "world_size"]


def world_size(process_group: object | None = None) -> int:
    """Size of ``process_group`` (default WORLD); 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def mean_loss_over_ranks(
    loss: Tensor | None,
    grads_finite: Tensor | None,
    like: Tensor,
    process_group: object | None,
    sample: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """The mean loss over the ranks that have one, whether any rank has one, and the
    cross-rank sum of the pulse controller's gradient ``sample`` (None: none), all in one
    collective.

    Every rank runs the same collective whatever it was fed: one all-reduce of the pair
    ``[loss·has_loss, has_loss]`` (``loss`` None counts as ``has_loss = 0``), so a rank that
    steps without a loss contributes nothing instead of desynchronising the others. A rank
    whose gradients are not finite (``grads_finite`` False) puts nan into the sum, so every
    rank skips the step together. If no rank had a loss the mean is 0/1 = 0 and the second
    value is False: no information. ``like`` gives the sensor's dtype and device. No host sync.
    """
    has_loss = torch.ones((), dtype=like.dtype, device=like.device)
    if loss is None:
        loss, has_loss = torch.zeros_like(has_loss), torch.zeros_like(has_loss)
    if grads_finite is not None:
        loss = torch.where(grads_finite.to(loss.device), loss, float("nan"))
    parts = [loss.reshape(1), has_loss.reshape(1)]
    if sample is not None:
        parts += [part.to(loss.dtype) for part in sample]
    packed = torch.cat(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
    total, count = packed[0], packed[1]
    if sample is not None:
        x, g = sample
        summed_x, summed_g = packed[2:].split([x.numel(), g.numel()])
        sample = (summed_x.to(x.dtype), summed_g.to(g.dtype))
    return total / torch.clamp(count, min=1.0), count > 0, sample


def local_shard(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (FSDP2 parameters, grads, state); other tensors as is."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def refusals_elsewhere(refused: bool, like: Tensor, process_group: object | None) -> int:
    """How many other ranks of ``process_group`` refused what this rank did or did not
    (``refused``): one all-reduce of a flag on ``like``'s device. For decisions each rank
    takes on its own part of a sharded whole (loading FSDP2 state: each rank checks its
    shards), so that every rank takes the same one."""
    flag = torch.full((1,), float(refused), dtype=torch.float32, device=like.device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=process_group)
    return round(float(flag)) - int(refused)
