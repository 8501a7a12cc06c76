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
    """Write fp32 ``source`` into bf16 or fp16 ``target``, rounding stochastically.

    The rounded value equals ``source`` in expectation: updates far smaller than the target's
    spacing still move the parameter on average instead of being rounded away. Values the
    target represents exactly, and non-finite ones, are written as they are.
    """
    if target.dtype not in LOW_PRECISION or source.dtype != torch.float32:
        raise TypeError(
            "stochastic rounding writes fp32 into bf16 or fp16, got "
            f"{source.dtype} -> {target.dtype}"
        )
    # FSDP2: round this rank's shard (source is target.to(float32): same placements).
    local_target, local_source = local_shard(target), local_shard(source)
    if target.dtype == torch.bfloat16:
        local_target.copy_(_bf16_stochastic(local_source, generator))
    else:
        local_target.copy_(_fp16_stochastic(local_source, generator))
    return target


def _bf16_stochastic(source: Tensor, generator: torch.Generator) -> Tensor:
    """bf16 is fp32's upper half: add uniform random bits below the 16-bit cut, truncate."""
    bits = source.view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator
    )
    rounded = (bits + noise).bitwise_and_(-65536)  # clear the low 16 bits
    # Keep non-finite values as they are (the add could carry into the exponent).
    rounded = torch.where(torch.isfinite(source), rounded, bits)
    return rounded.view(torch.float32)


def _fp16_stochastic(source: Tensor, generator: torch.Generator) -> Tensor:
    """fp16 has its own exponent: take the nearest fp16 ``r`` and its neighbour ``o`` on the
    other side of ``source`` (one step of the fp16 bit pattern away), and pick ``o`` with
    probability ``|source − r| / |o − r|``."""
    nearest = source.to(torch.float16)
    low = nearest.float()
    rest = source - low  # exact: both are fp32 and close
    bits = nearest.view(torch.int16)
    away = (rest > 0) == (low > 0)  # the neighbour farther from zero, else nearer
    step = torch.where(away, bits + 1, bits - 1)
    # from ±0 the neighbour is the smallest subnormal of rest's sign
    smallest = torch.where(rest > 0, 1, -32767).to(torch.int16)  # (-32767: 0x8001)
    step = torch.where(low == 0, smallest, step)
    other = step.view(torch.float16).float()
    chance = rest.abs() / (other - low).abs()  # 0 where rest = 0; inf neighbour: 0
    draw = torch.rand(source.shape, device=source.device, generator=generator)
    rounded = torch.where(draw < chance, other, low)
    return torch.where(torch.isfinite(source) & (rest != 0), rounded, low)
