"""Argument checks shared by the three optimizers.

Every check raises ``ValueError(f"Invalid <name>: <value> ...")`` naming the allowed range,
like ``torch.optim``. Strings are accepted where a number or bool is expected and parsed
with ``ast.literal_eval`` (class-path users such as kohya-ss sd-scripts pass strings);
``"False"`` is False, never ``bool("False")``.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "as_bool",
    "as_float_dtype",
    "as_float",
    "as_int",
    "check_betas",
    "check_range",
    "loss_to_tensor",
]


def _parse(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"Invalid {name}: {value!r} is not a Python literal") from None
    return value


def as_float(name: str, value: Any) -> float:
    """``value`` as a float (numbers, 0-dim tensors or numeric strings)."""
    value = _parse(name, value)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()  # construction time only, never inside step()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number)")
    return float(value)


def as_int(name: str, value: Any) -> int:
    """``value`` as an int (ints or integer strings)."""
    value = _parse(name, value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer)")
    return value


def as_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``value`` as a bool; strings ``"True"``/``"False"`` are parsed, not truth-tested."""
    value = _parse(name, value)
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"Invalid {name}: {value!r} (expected {allowed})")
    return value


def as_float_dtype(name: str, value: Any) -> torch.dtype | None:
    """None or a floating torch dtype; strings such as ``"bfloat16"`` or ``"torch.float32"``
    are accepted for command-line and class-path users."""
    if isinstance(value, str):
        value = getattr(torch, value.strip().removeprefix("torch."), value)
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    raise ValueError(
        f"Invalid {name}: {value!r} (expected None or a floating torch.dtype such as "
        "torch.float32 or torch.bfloat16, or its name)"
    )


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a float inside the interval, or a ValueError that states the interval."""
    number = as_float(name, value)
    too_low = low is not None and (number < low if low_inclusive else number <= low)
    too_high = high is not None and (number > high if high_inclusive else number >= high)
    if too_low or too_high or number != number:  # the last term catches nan
        left = "" if low is None else f"{low} {'<=' if low_inclusive else '<'} "
        right = "" if high is None else f" {'<=' if high_inclusive else '<'} {high}"
        raise ValueError(f"Invalid {name}: {value!r} (expected {left}{name}{right})")
    return number


def check_betas(name: str, value: Any) -> tuple[float, float]:
    """A pair of momentum coefficients, each in ``[0, 1)``."""
    value = _parse(name, value)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} (expected a pair like (0.9, 0.995))")
    return (
        check_range(f"{name}[0]", value[0], 0.0, 1.0, high_inclusive=False),
        check_range(f"{name}[1]", value[1], 0.0, 1.0, high_inclusive=False),
    )


def loss_to_tensor(loss: Any, source: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A loss value as a detached 0-dim tensor on the sensor device, without a host sync.

    Accepts Python numbers and one-element tensors on any device; ``source`` names where the
    value came from in the error message.
    """
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"Invalid loss from {source}: expected a scalar (one-element) tensor, got shape "
                f"{tuple(loss.shape)}; reduce it first, e.g. loss.mean()"
            )
        if loss.is_complex():
            raise TypeError(f"Invalid loss from {source}: complex tensors are not losses")
        return loss.detach().reshape(()).to(device=device, dtype=dtype, copy=True)
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.tensor(float(loss), dtype=dtype, device=device)
    raise TypeError(
        f"Invalid loss from {source}: expected a Python number or a one-element tensor, "
        f"got {type(loss).__name__}"
    )
