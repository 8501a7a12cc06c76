"""The optimizers under test, each as one fixed configuration (no per-workload tuning).

A :class:`Contender` builds its optimizer and knows the three things a training loop must do
differently for it: Emo optimizers take the loss in ``step(loss=...)``, the Schedule-Free
optimizers and ``EmoSens(average=True)`` need ``train()``/``eval()`` switching, and each
reports its effective learning rate its own way (Emo: ``get_effective_lr()``; Prodigy and Prodigy + Schedule-Free: ``d·lr``;
Schedule-Free AdamW: ``scheduled_lr``).

The Emo rows come from :data:`EMO_VARIANTS`, ``(class, extra constructor kwargs)`` pairs. A
variant with ``pulse=...`` is kept only when the class's constructor accepts ``pulse``
(checked with :func:`inspect.signature`), so the same harness reports the faithful v3.7
pulse next to the default controller wherever both exist; likewise ``average``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
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
    "EMO_VARIANTS",
    "Contender",
    "adamw",
    "emo_contenders",
    "from_factory",
    "quality_contenders",
]

ADAMW_SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
"""The AdamW learning-rate sweep (weight decay 0.01); "tuned AdamW" is the best per workload."""
ADAMW_DEFAULT_LR = 1e-3

EMO_VARIANTS: tuple[tuple[type[EmoOptimizer], dict[str, Any]], ...] = (
    *((cls, {}) for cls in (EmoSens, EmoAiry, EmoCats)),
    *((cls, {"pulse": "v37"}) for cls in (EmoSens, EmoAiry, EmoCats)),
    *((cls, {"pulse": "distance", "average": False}) for cls in (EmoSens, EmoAiry, EmoCats)),
    (EmoSens, {"weight_decay": 0.01}),  # averaged, with the decay of the unaveraged default
)
"""Emo rows: ``(class, extra kwargs)`` on top of ``lr=1.0``: each class at its defaults
(``pulse="distance"``, averaged for EmoSens and EmoCats), upstream's v3.7 pulse, the
distance controller without averaging (EmoSens, EmoCats; EmoAiry's default already is), and
averaged EmoSens with weight decay 0.01; kwargs the class does not accept drop the row (see
:func:`emo_contenders`)."""


@dataclass(frozen=True)
class Contender:
    """One optimizer configuration.

    Attributes:
        name: row label, e.g. ``"AdamW lr=0.001"``.
        family: ``"emo"``, ``"adamw"``, ``"prodigy"``, ``"prodigy-sf"``, ``"schedulefree"``,
            ``"lion"`` or any label for a custom optimizer.
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

    @staticmethod
    def _switches(opt: torch.optim.Optimizer) -> bool:
        # Any optimizer with train()/eval() (Schedule-Free's, Prodigy + Schedule-Free's, Emo's:
        # they switch only with average=True), whatever its family: a bare factory given to
        # compare() is evaluated at the average too, not at the training point.
        return callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))

    def train_mode(self, opt: torch.optim.Optimizer) -> None:
        """Before training steps (Schedule-Free evaluates at a different point than it trains)."""
        if self._switches(opt):
            opt.train()

    def eval_mode(self, opt: torch.optim.Optimizer) -> None:
        """Before evaluating or saving."""
        if self._switches(opt):
            opt.eval()

    def effective_lr(self, opt: torch.optim.Optimizer) -> float:
        """The step size this optimizer currently applies (may sync: call at a cadence)."""
        group = opt.param_groups[0]
        if isinstance(opt, EmoOptimizer):
            return opt.get_effective_lr()[0]
        if self.family in ("prodigy", "prodigy-sf"):
            return float(group["d"]) * float(group["lr"])
        if self.family == "schedulefree":
            return float(group.get("scheduled_lr", group["lr"]))
        if "emo_lr" in group:
            return float(group["emo_lr"])
        return float(group["lr"])


def _accepts(cls: type, kwargs: dict[str, Any]) -> bool:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(k in params for k in kwargs)


def _emo_name(cls: type, kwargs: dict[str, Any]) -> str:
    return " ".join([cls.__name__, *(f"{k}={v}" for k, v in kwargs.items())])


def _emo(cls: type[EmoOptimizer], extra: dict[str, Any]) -> Contender:
    options = {"lr": 1.0, **extra}
    return Contender(
        _emo_name(cls, extra), "emo", lambda ps: cls(ps, **options), 1.0, dict(options)
    )


def emo_contenders(
    variants: Iterable[tuple[type[EmoOptimizer], dict[str, Any]]] = EMO_VARIANTS,
) -> list[Contender]:
    """One contender per variant whose class accepts its extra kwargs (others are skipped)."""
    return [_emo(cls, extra) for cls, extra in variants if _accepts(cls, extra)]


def adamw(lr: float) -> Contender:
    """torch AdamW at ``lr`` with its default weight decay 0.01."""
    return Contender(
        f"AdamW lr={lr:g}",
        "adamw",
        lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01),
        lr,
        {"lr": lr, "weight_decay": 0.01},
    )


def _prodigy() -> Contender:
    def build(ps: Iterable[Tensor]) -> torch.optim.Optimizer:
        from prodigyopt import Prodigy

        return Prodigy(ps, lr=1.0)

    return Contender("Prodigy", "prodigy", build, 1.0, {"lr": 1.0})


def _prodigy_sf() -> Contender:
    def build(ps: Iterable[Tensor]) -> torch.optim.Optimizer:
        from prodigyplus import ProdigyPlusScheduleFree

        with contextlib.redirect_stdout(io.StringIO()):  # it prints notes on construction
            return ProdigyPlusScheduleFree(ps, lr=1.0)

    return Contender("Prodigy + Schedule-Free", "prodigy-sf", build, 1.0, {"lr": 1.0})


def _schedulefree() -> Contender:
    def build(ps: Iterable[Tensor]) -> torch.optim.Optimizer:
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(ps)

    return Contender("Schedule-Free AdamW", "schedulefree", build, 0.0025, {})


def _lion(lr: float = 1e-4) -> Contender:
    return Contender(f"Lion lr={lr:g}", "lion", lambda ps: Lion(ps, lr=lr), lr, {"lr": lr})


def from_factory(
    factory: Callable[[Iterable[Tensor]], torch.optim.Optimizer],
    name: str = "custom",
    family: str = "custom",
) -> Contender:
    """Wrap any ``params -> optimizer`` callable (Emo optimizers get the loss in ``step``)."""
    return Contender(name, family, factory, float("nan"))


def quality_contenders(lion: bool = False) -> list[Contender]:
    """Every configuration the quality benchmark trains, Emo first (Lion only on request)."""
    return [
        *emo_contenders(),
        *(adamw(lr) for lr in ADAMW_SWEEP),
        _prodigy(),
        _prodigy_sf(),
        _schedulefree(),
        *([_lion()] if lion else []),
    ]
