"""``EmoTrainingArguments``: ``TrainingArguments`` whose ``optim`` also takes the Emo names.

``TrainingArguments.__post_init__`` converts ``optim`` to the ``OptimizerNames`` enum, and
``HfArgumentParser`` offers only the enum's values on the command line. This subclass
declares ``optim`` as a string with every native name plus ``emosens``/``emoairy``/
``emocats`` as choices, validates it, and hands the parent a native placeholder while it
runs, so the enum itself is never touched. ``learning_rate`` defaults to 1.0 for the Emo
optimizers (it multiplies emoPulse; the LR scheduler scales it per SPEC §3) and to
transformers' 5e-5 otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy
from transformers.training_args import OptimizerNames

from emo_core import OPTIMIZERS, get_optimizer
from emo_core.optim_args import as_flag_error

from .optim_args import FlagError, did_you_mean, parse_optim_args

__all__ = [
    "EMO_OPTIM_NAMES",
    "EmoArgumentsMixin",
    "EmoTrainingArguments",
    "canonical_optim_name",
    "emo_arguments",
    "emo_optim_name",
]


EMO_OPTIM_NAMES: tuple[str, ...] = tuple(sorted(OPTIMIZERS))
_NATIVE_OPTIM_NAMES: tuple[str, ...] = tuple(o.value for o in OptimizerNames)
_ALL_OPTIM_NAMES: tuple[str, ...] = EMO_OPTIM_NAMES + _NATIVE_OPTIM_NAMES
_DEFAULT_OPTIM: str = getattr(TrainingArguments, "default_optim", "adamw_torch")
_NATIVE_DEFAULT_LR: float = TrainingArguments.__dataclass_fields__["learning_rate"].default
_EMO_DEFAULT_LR = 1.0


def canonical_optim_name(name: str | OptimizerNames) -> str:
    """The lower-case optimizer name; otherwise a ``FlagError`` (a ``ValueError``, flag
    ``optim``) with the closest name ("did you mean") and every valid one."""
    text = name.value if isinstance(name, OptimizerNames) else name
    key = text.strip().lower() if isinstance(text, str) else text
    if key not in _ALL_OPTIM_NAMES:
        hint = did_you_mean(key, _ALL_OPTIM_NAMES) if isinstance(key, str) else ""
        raise FlagError(
            "optim",
            f"Invalid optim: {name!r}{hint}. Emo optimizers: {', '.join(EMO_OPTIM_NAMES)}; "
            f"transformers optimizers: {', '.join(_NATIVE_OPTIM_NAMES)}",
        )
    return key


def emo_optim_name(args: Any) -> str | None:
    """The Emo optimizer named by ``args.optim``, or None for a transformers optimizer."""
    optim = getattr(args, "optim", None)
    text = optim.value if isinstance(optim, OptimizerNames) else optim
    key = text.lower() if isinstance(text, str) else None
    return key if key in OPTIMIZERS else None


@dataclass
class EmoArgumentsMixin:
    """Mix into any ``TrainingArguments`` subclass so that ``optim`` takes the Emo names.

    ``class EmoSFTConfig(EmoArgumentsMixin, SFTConfig): pass`` (TRL), or
    ``emo_arguments(SFTConfig)``. A subclass is made a dataclass on creation, so its own
    fields and the mixin's (``optim`` choices, ``learning_rate`` default 1.0 for Emo names,
    ``emo_stop_on_signal``) reach ``__init__`` and ``HfArgumentParser`` without a decorator.
    See ``EmoTrainingArguments`` for the behaviour.
    """

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Initial learning rate. Default: 1.0 for emosens/emoairy/emocats (a multiplier "
            f"of the automatic emoPulse LR), {_NATIVE_DEFAULT_LR} for transformers optimizers."
        },
    )
    optim: str = field(
        default=_DEFAULT_OPTIM,
        metadata={
            # No argparse "choices": canonical_optim_name checks the name (any case) and
            # suggests the closest one, which argparse's "invalid choice" cannot.
            "help": "The optimizer: emosens, emoairy, emocats (loss-driven, no LR to tune) or "
            f"any transformers optimizer ({', '.join(_NATIVE_OPTIM_NAMES)}).",
        },
    )
    emo_stop_on_signal: bool = field(
        default=False,
        metadata={
            "help": "Stop training when the Emo optimizer signals that the loss has settled "
            "(checked every logging_steps)."
        },
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, TrainingArguments) and "__dataclass_fields__" not in cls.__dict__:
            dataclass(cls)  # in place; an explicit @dataclass afterwards redoes it harmlessly

    def __post_init__(self) -> None:
        name = canonical_optim_name(self.optim)
        emo = name in OPTIMIZERS
        self.learning_rate = self._resolve_learning_rate(self.learning_rate, name)
        if not emo:
            self.optim = name
            super().__post_init__()
            return
        self._check_emo_arguments(name)
        self.optim = _DEFAULT_OPTIM  # the parent converts optim to its enum
        try:
            super().__post_init__()
        finally:
            self.optim = name
        if self.emo_stop_on_signal and self.logging_strategy == IntervalStrategy.NO:
            raise FlagError(
                "emo_stop_on_signal",
                "Invalid emo_stop_on_signal=True with logging_strategy='no': the stop signal "
                "is read when logs are written (reading it syncs the device) and none are; "
                "set logging_strategy='steps' (the signal is checked every logging_steps) or "
                "emo_stop_on_signal=False",
            )

    def set_optimizer(
        self,
        name: str | OptimizerNames = "adamw_torch",
        learning_rate: float | None = None,
        **kwargs: Any,
    ) -> EmoArgumentsMixin:
        """Like ``TrainingArguments.set_optimizer``, also for Emo names (lr default 1.0)."""
        canonical = canonical_optim_name(name)
        emo = canonical in OPTIMIZERS
        learning_rate = self._resolve_learning_rate(learning_rate, canonical)
        placeholder = _DEFAULT_OPTIM if emo else canonical
        super().set_optimizer(name=placeholder, learning_rate=learning_rate, **kwargs)
        self.optim = canonical if emo else OptimizerNames(canonical)
        if emo:
            self._check_emo_arguments(canonical)
        return self

    @classmethod
    def _native_default_lr(cls) -> float:
        """The base class's own ``learning_rate`` default (TRL's SFTConfig: 2e-5)."""
        mro = cls.__mro__
        for klass in mro[mro.index(EmoArgumentsMixin) + 1 :]:
            declared = klass.__dict__.get("__dataclass_fields__", {}).get("learning_rate")
            if declared is not None and isinstance(declared.default, float):
                return declared.default
        return _NATIVE_DEFAULT_LR

    def _check_emo_arguments(self, name: str) -> None:
        """Fail now, not at the first step: build the optimizer once on a dummy parameter.

        An error about a value from ``optim_args`` is a ``FlagError`` for ``optim_args``.
        """
        optimizer_cls = get_optimizer(name)
        kwargs = parse_optim_args(self.optim_args, optimizer_cls)
        dummy = [torch.nn.Parameter(torch.zeros(1))]
        try:
            probe = optimizer_cls(
                dummy, lr=self.learning_rate, weight_decay=self.weight_decay, **kwargs
            )
        except ValueError as error:
            # lr and weight_decay come from these arguments' own fields: name the field
            renamed = as_flag_error(str(error), _OWN_FLAGS)
            if renamed is not None:
                raise FlagError(*renamed) from None
            if any(key in str(error) for key in kwargs):
                raise FlagError("optim_args", f"{error} (optim_args={self.optim_args!r})") from None
            raise
        probe.close()  # capture_loss=True: do not keep the backward patch for a probe

    @classmethod
    def _resolve_learning_rate(cls, learning_rate: float | None, name: str) -> float:
        if name not in OPTIMIZERS:
            return cls._native_default_lr() if learning_rate is None else learning_rate
        if learning_rate is None:
            # warnings.warn, not a log line: transformers' logging is not set up yet when the
            # arguments are built, so an INFO record would reach nobody.
            warnings.warn(
                f"optim={name}: learning_rate not set, using {_EMO_DEFAULT_LR}. emoPulse sets "
                "the learning rate from the loss; learning_rate and the LR scheduler multiply "
                "it (the logged learning_rate is the LR applied).",
                UserWarning,
                stacklevel=_caller_stacklevel(),  # the line that built the arguments
            )
            return _EMO_DEFAULT_LR
        # learning_rate < 0.1: the optimizer's own guard (emo_core.lr_guard) warns, once.
        return learning_rate


_OWN_FLAGS = {"lr": "learning_rate", "weight_decay": "weight_decay"}
"""Optimizer keywords these arguments fill from their own fields, and those fields."""

_LIBRARY_DIRS = tuple(
    str(Path(module.__file__).resolve().parent) + os.sep
    for module in (sys.modules[__package__], transformers)
)


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from the function that calls it, of the first frame
    outside emo_hf, transformers and dataclasses' generated ``__init__``: the user's line,
    however the arguments were built (directly, ``HfArgumentParser``, ``set_optimizer``,
    TRL's configs)."""
    frame, level = sys._getframe(2), 2  # (1: the warning's caller, this function's caller)
    while frame is not None:
        filename = frame.f_code.co_filename
        library = filename.startswith("<") or filename == dataclasses.__file__
        if not library and not str(Path(filename).resolve()).startswith(_LIBRARY_DIRS):
            return level
        frame, level = frame.f_back, level + 1
    return 1


class EmoTrainingArguments(EmoArgumentsMixin, TrainingArguments):
    """``TrainingArguments`` plus the Emo optimizers (``optim="emosens"`` etc.).

    Emo hyperparameters come from ``optim_args`` (``"use_shadow=True,betas=(0.9,0.99)"``),
    checked against the optimizer's signature; ``weight_decay`` and the decay/no-decay
    parameter groups work as for AdamW, and ``adam_*`` fields are ignored. Leave
    ``learning_rate`` unset: emoPulse picks the LR, and the scheduler
    (``lr_scheduler_type``, warmup) multiplies it. ``emo_stop_on_signal=True`` ends training
    when the optimizer's early-stop signal rises (checked every ``logging_steps``).
    """


_EMO_ARGUMENTS: dict[type, type] = {TrainingArguments: EmoTrainingArguments}


def emo_arguments(base: type[TrainingArguments]) -> type[TrainingArguments]:
    """``base`` (any ``TrainingArguments`` subclass, e.g. TRL's ``SFTConfig``) whose ``optim``
    also accepts ``emosens``/``emoairy``/``emocats``; one class per base, named ``Emo<base>``."""
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise TypeError(f"Invalid base: {base!r} (expected a TrainingArguments subclass)")
    if issubclass(base, EmoArgumentsMixin):
        return base
    made = _EMO_ARGUMENTS.get(base)
    if made is None:
        namespace = {
            "__module__": base.__module__,
            "__qualname__": f"Emo{base.__qualname__}",
            # Not an attribute of any module, so pickled (the Trainer saves training_args.bin)
            # as "emo_arguments(base) with this state".
            "__reduce__": lambda self: (_restore, (base, self.__dict__.copy())),
        }
        made = _EMO_ARGUMENTS[base] = type(
            f"Emo{base.__name__}", (EmoArgumentsMixin, base), namespace
        )
    return made


def _restore(base: type[TrainingArguments], state: dict[str, Any]) -> TrainingArguments:
    """Unpickle an ``emo_arguments(base)`` instance."""
    cls = emo_arguments(base)
    restored = cls.__new__(cls)
    restored.__dict__.update(state)
    return restored
