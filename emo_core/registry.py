"""Name -> optimizer class, for adapters and class-path users."""

from __future__ import annotations

from torch.optim import Optimizer

from .emoairy import EmoAiry
from .emocats import EmoCats
from .emosens import EmoSens

__all__ = ["OPTIMIZERS", "get_optimizer"]

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "emosens": EmoSens,
    "emoairy": EmoAiry,
    "emocats": EmoCats,
}


def get_optimizer(name: str) -> type[Optimizer]:
    """The Emo optimizer class for ``name`` (case-insensitive), e.g. ``"emosens"``."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        valid = ", ".join(sorted(OPTIMIZERS))
        raise ValueError(f"Invalid optimizer name: {name!r}; choose one of: {valid}")
    return OPTIMIZERS[key]
