"""The optimizers under test, each as one fixed configuration (no per-workload tuning).

A :class:`Contender` builds its optimizer and knows the three things a training loop must do
differently for it: Emo optimizers take the loss in ``step(loss=...)``, Schedule-Free AdamW
needs ``train()``/``eval()`` switching, and each reports its effective learning rate its own
way (Emo: the pulse; Prodigy: ``d·lr``; Schedule-Free: ``scheduled_lr``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from emo_core import EmoAiry, EmoCats, EmoOptimizer, EmoSens

from .lion import Lion

__all__ = [
    "ADAMW_DEFAULT_LR",
    "ADAMW_SWEEP",
    "Contender",
    "quality_contenders",
]

ADAMW_SWEEP = (1e-3, 3e-3, 1e-2, 3e-2)
"""The AdamW learning-rate sweep; "tuned AdamW" is the best of these per workload."""
ADAMW_DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class Contender:
    """One optimizer configuration.

    Attributes:
        name: row label, e.g. ``"AdamW lr=1e-3"``.
        family: ``"emo"``, ``"adamw"``, ``"prodigy"``, ``"schedulefree"`` or ``"lion"``.
        factory: ``params -> optimizer``.
        lr: the learning rate the user sets (for the table).
        options: constructor arguments, recorded in the JSON output.
    """

    name: str
    family: str
    factory: Callable[[Iterable[Tensor]], torch.optim.Optimizer]
    lr: float
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, params: Iterable[Tensor]) -> torch.optim.Optimizer:
        return self.factory(params)

    def step(self, opt: torch.optim.Optimizer, loss: Tensor) -> None:
        """One optimizer step after ``backward()``; Emo optimizers sense ``loss``."""
        if isinstance(opt, EmoOptimizer):
            opt.step(loss=loss.detach())
        else:
            opt.step()

    def train_mode(self, opt: torch.optim.Optimizer) -> None:
        """Before training steps (Schedule-Free evaluates at a different point than it trains)."""
        if hasattr(opt, "train") and self.family == "schedulefree":
            opt.train()

    def eval_mode(self, opt: torch.optim.Optimizer) -> None:
        """Before evaluating or saving."""
        if hasattr(opt, "eval") and self.family == "schedulefree":
            opt.eval()

    def effective_lr(self, opt: torch.optim.Optimizer) -> float:
        """The step size this optimizer currently applies (may sync: call at a cadence)."""
        group = opt.param_groups[0]
        if isinstance(opt, EmoOptimizer):
            return opt.get_effective_lr()[0]
        if self.family == "prodigy":
            return float(group["d"]) * float(group["lr"])
        if self.family == "schedulefree":
            return float(group.get("scheduled_lr", group["lr"]))
        return float(group["lr"])


def _emo(name: str, cls: type[EmoOptimizer]) -> Contender:
    return Contender(name, "emo", lambda ps: cls(ps, lr=1.0), 1.0, {"lr": 1.0})


def _adamw(lr: float) -> Contender:
    return Contender(
        f"AdamW lr={lr:g}", "adamw", lambda ps: torch.optim.AdamW(ps, lr=lr), lr, {"lr": lr}
    )


def _prodigy() -> Contender:
    def build(ps: Iterable[Tensor]) -> torch.optim.Optimizer:
        from prodigyopt import Prodigy

        return Prodigy(ps, lr=1.0)

    return Contender("Prodigy", "prodigy", build, 1.0, {"lr": 1.0})


def _schedulefree() -> Contender:
    def build(ps: Iterable[Tensor]) -> torch.optim.Optimizer:
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(ps)

    return Contender("Schedule-Free AdamW", "schedulefree", build, 0.0025, {})


def _lion(lr: float = 1e-4) -> Contender:
    return Contender(f"Lion lr={lr:g}", "lion", lambda ps: Lion(ps, lr=lr), lr, {"lr": lr})


def quality_contenders() -> list[Contender]:
    """Every configuration the quality benchmark trains, Emo first."""
    return [
        _emo("EmoSens", EmoSens),
        _emo("EmoAiry", EmoAiry),
        _emo("EmoCats", EmoCats),
        *(_adamw(lr) for lr in ADAMW_SWEEP),
        _prodigy(),
        _schedulefree(),
        _lion(),
    ]
