"""The ``lr=1e-4`` guard: warn once when ``lr`` looks like a habit from AdamW.

For an Emo optimizer ``lr`` is a plain multiplier applied after everything: the applied
learning rate is ``emoPulse x lr``, with emoPulse (the automatic LR) between ``min_lr`` and
``max_lr``. Training scripts default to ``--learning_rate 1e-4``; passed to an Emo optimizer
that multiplies the automatic LR by 1e-4, so nothing is learned, silently. Below
``SMALL_LR`` the constructor (or ``add_param_group``) warns once per optimizer.

Why 0.1: deliberate scaling of emoPulse uses factors near 1 (0.5, 0.25); every common
AdamW/Adafactor/Lion default (1e-3 .. 1e-6) is at least 100x below 0.1, and at 0.1 the
largest applied LR is already a tenth of ``max_lr``. A group ``lr`` of exactly 0 (a frozen
group) and tensor ``lr`` values (not read on the host) are not warned about; LR schedulers
change ``group["lr"]`` later, outside this check.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

__all__ = ["SMALL_LR", "warn_if_small_lr"]

SMALL_LR = 0.1
_FLAG = "warned_small_lr"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_OPTIM_DIR = os.path.join("torch", "optim")
_ADAPTERS = ("emo_hf", "emo_lightning", "emo_diffusers")


def warn_if_small_lr(optimizer: Any, lr: Any) -> None:
    """Warn (once per optimizer) if ``lr`` is a number in ``(0, SMALL_LR)``."""
    flags = optimizer.__dict__.get("_flags")
    if flags is None or flags.get(_FLAG) or not isinstance(lr, (int, float)):
        return
    if not 0.0 < lr < SMALL_LR:
        return
    flags[_FLAG] = True
    name = type(optimizer).__name__
    low, high = optimizer.min_lr, optimizer.max_lr
    warnings.warn(
        f"{name}(lr={lr:g}): for Emo optimizers lr multiplies the automatic learning rate "
        f"(emoPulse, {low:g}..{high:g}), so the applied LR is emoPulse x {lr:g} = "
        f"{low * lr:.3g}..{high * lr:.3g} and training will barely move. Use lr=1.0 (the "
        "default; with transformers leave learning_rate unset, in training scripts pass "
        "--learning_rate 1.0); set min_lr/max_lr to bound the automatic LR instead.",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside the emo packages, torch.optim and generated
    code (a dataclass ``__init__``): the user's line, e.g. ``EmoTrainingArguments(...)``."""
    ours = [_PACKAGE_DIR] + [
        os.path.dirname(os.path.abspath(module.__file__))
        for module in map(sys.modules.get, _ADAPTERS)
        if module is not None and getattr(module, "__file__", None)
    ]
    frame = sys._getframe(1)  # warn_if_small_lr
    level = 1
    while frame is not None:
        raw = frame.f_code.co_filename
        filename = os.path.abspath(raw)
        internal = raw.startswith("<") or _TORCH_OPTIM_DIR in filename
        if not (internal or any(filename.startswith(d + os.sep) for d in ours)):
            return level
        frame = frame.f_back
        level += 1
    return level
