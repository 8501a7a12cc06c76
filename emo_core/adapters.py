"""What every framework adapter needs from an Emo optimizer, in one place.

Adapters (Lightning, transformers, diffusers scripts) wrap optimizers in their own classes
(``LightningOptimizer``, ``AcceleratedOptimizer``); ``unwrap`` finds the Emo optimizer
inside, and ``log_metrics`` gives the floats they log, at their own logging cadence (it
reads device values, so it syncs: call it when you log, not every step).
"""

from __future__ import annotations

from typing import Any

from ._base import EmoOptimizer
from .metrics import metric_values

__all__ = ["log_metrics", "unwrap"]

_WRAPPER_ATTRS = ("optimizer", "_optimizer", "opt")


def unwrap(optimizer: Any) -> EmoOptimizer | None:
    """The Emo optimizer inside ``optimizer`` (following ``.optimizer`` wrappers), or None."""
    seen = set()
    current = optimizer
    while current is not None and id(current) not in seen:
        if isinstance(current, EmoOptimizer):
            return current
        seen.add(id(current))
        current = next(
            (getattr(current, a) for a in _WRAPPER_ATTRS if getattr(current, a, None) is not None),
            None,
        )
    return None


def log_metrics(optimizer: Any, prefix: str = "emo/") -> dict[str, float]:
    """``{prefix}lr`` (one key per group beyond the first), scalar, trust, skipped_steps."""
    emo = unwrap(optimizer)
    return {} if emo is None else metric_values(emo, prefix)
