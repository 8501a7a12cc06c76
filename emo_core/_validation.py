"""Argument checks shared by the three optimizers.

Every check raises ``ValueError(f"Invalid <name>: <value> ...")`` naming the allowed range,
like ``torch.optim``. Strings are accepted where a number or bool is expected and parsed
with ``ast.literal_eval`` (class-path users such as kohya-ss sd-scripts pass strings);
``"False"`` is False, never ``bool("False")``.
"""

from __future__ import annotations

import ast
import math
import numbers
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
    "check_lr",
    "check_range",
    "loss_to_tensor",
    "STATE_DTYPES",
]

STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
"""The dtypes optimizer state may be kept in (``state_dtype``); the math runs in fp32 or fp64."""


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
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()  # construction time only, never inside step()
    # numbers.Real covers numpy scalars (np.float32, np.int64) without importing numpy.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number)")
    return float(value)


def as_int(name: str, value: Any) -> int:
    """``value`` as an int (ints or integer strings)."""
    value = _parse(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer)")
    return int(value)


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
    if value is None or (isinstance(value, torch.dtype) and value in STATE_DTYPES):
        return value
    allowed = ", ".join(str(dtype) for dtype in STATE_DTYPES)
    raise ValueError(f"Invalid {name}: {value!r} (expected None or one of {allowed}, or its name)")


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a finite float inside the interval, or a ValueError stating the interval.

    nan and ±inf are always rejected: no hyperparameter of these optimizers means anything
    at infinity (``lr=inf`` or ``weight_decay=inf`` would write non-finite weights).
    """
    number = as_float(name, value)
    too_low = low is not None and (number < low if low_inclusive else number <= low)
    too_high = high is not None and (number > high if high_inclusive else number >= high)
    if too_low or too_high or not math.isfinite(number):
        left = "" if low is None else f"{low} {'<=' if low_inclusive else '<'} "
        right = "" if high is None else f" {'<=' if high_inclusive else '<'} {high}"
        raise ValueError(f"Invalid {name}: {value!r} (expected finite {left}{name}{right})")
    return number


def check_lr(name: str, value: Any) -> float | Tensor:
    """A group ``lr``: a finite number >= 0, or a one-element real tensor holding one.

    A tensor stays a tensor (schedulers and ``torch.compile`` users keep tensor lrs); its value
    is read once here, at construction or load time, never inside ``step()``.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"Invalid {name}: a tensor of shape {tuple(value.shape)} and dtype {value.dtype} "
                f"(expected a real one-element tensor or a number, finite {name} >= 0)"
            )
        check_range(name, value.detach(), 0.0)
        return value
    return check_range(name, value, 0.0)


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

    Accepts Python numbers, numpy scalars and one-element arrays (duck-typed through
    ``__array__``/``item``: this package does not import numpy) and one-element tensors on any
    device; ``source`` names where the value came from in the error message.
    """
    if not isinstance(loss, (Tensor, str, bytes)) and hasattr(loss, "__array__"):
        size = getattr(loss, "size", 1)
        if size != 1 or not callable(getattr(loss, "item", None)):
            raise ValueError(
                f"Invalid loss from {source}: expected a scalar (one-element) array, got shape "
                f"{tuple(getattr(loss, 'shape', ()))}; reduce it first, e.g. loss.mean()"
            )
        loss = loss.item()  # a host value: no device sync
        if isinstance(loss, complex):
            raise TypeError(f"Invalid loss from {source}: complex values are not losses")
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"Invalid loss from {source}: expected a scalar (one-element) tensor, got shape "
                f"{tuple(loss.shape)}; reduce it first, e.g. loss.mean()"
            )
        if loss.is_complex():
            raise TypeError(f"Invalid loss from {source}: complex tensors are not losses")
        return loss.detach().reshape(()).to(device=device, dtype=dtype, copy=True)
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return torch.tensor(float(loss), dtype=dtype, device=device)
    raise TypeError(
        f"Invalid loss from {source}: expected a Python number or a one-element tensor, "
        f"got {type(loss).__name__}"
    )
