"""Loss reduction across ranks so every replica computes the same learning rate (SPEC §1)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_loss_", "local_shard", "world_size"]


def world_size(process_group: object | None = None) -> int:
    """Size of ``process_group`` (default WORLD); 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def all_reduce_loss_(loss: Tensor, process_group: object | None = None) -> Tensor:
    """Replace ``loss`` in place by its mean over the process group and return it.

    One 0-dim collective and no host sync; a no-op in a single process. A non-finite loss
    on any rank makes the mean non-finite everywhere, so all ranks skip the step together.
    """
    size = world_size(process_group)
    if size > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=process_group)
        loss.div_(size)
    return loss


def local_shard(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (FSDP2 parameters, grads, state); other tensors as is."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()
