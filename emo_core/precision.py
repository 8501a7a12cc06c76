"""Low-precision helpers: fp32 state policy and stochastic rounding (SPEC §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import local_shard

__all__ = ["LOW_PRECISION", "copy_stochastic_", "default_state_dtype"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


def default_state_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype optimizer state and update math use for a parameter of ``param_dtype``.

    ``None`` means fp32 for half-precision parameters and the parameter's own dtype otherwise.
    """
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


def copy_stochastic_(target: Tensor, source: Tensor, generator: torch.Generator) -> Tensor:
    """Write fp32 ``source`` into bf16 ``target``, rounding stochastically.

    Adds uniform random bits below bf16's 16-bit mantissa cut and truncates, so the rounded
    value equals ``source`` in expectation: updates far smaller than bf16's spacing still
    move the parameter on average instead of being rounded away.
    """
    if target.dtype != torch.bfloat16 or source.dtype != torch.float32:
        raise TypeError(
            f"stochastic rounding writes fp32 into bf16, got {source.dtype} -> {target.dtype}"
        )
    # FSDP2: round this rank's shard (source is target.to(float32): same placements).
    local_target, local_source = local_shard(target), local_shard(source)
    bits = local_source.view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator
    )
    rounded = (bits + noise).bitwise_and_(-65536)  # clear the low 16 bits
    # Keep non-finite values as they are (the add could carry into the exponent).
    rounded = torch.where(torch.isfinite(local_source), rounded, bits)
    local_target.copy_(rounded.view(torch.float32))
    return target
