"""``EmoLearningRateMonitor``: Lightning's ``LearningRateMonitor``, showing the LR an Emo
optimizer applied instead of ``group["lr"]``.

For an Emo optimizer ``group["lr"]`` is the user's multiplier (1.0 by default; schedulers
scale it) and the applied rate lives in ``group["emo_lr"]``. This subclass reports
``group["emo_lr"]`` under the monitor's usual keys (``lr-EmoSens``, ``lr-EmoSens/pg2``, ...),
at the monitor's usual cadence; groups of other optimizers are reported as before. The
monitor runs at the start of a batch, so the value is the LR of the last optimizer step.
``EmoCallback(show_applied_lr=True)`` (the default) turns an attached plain
``LearningRateMonitor`` into this one.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor
from torch import Tensor
from typing_extensions import override

__all__ = ["EmoLearningRateMonitor"]


class EmoLearningRateMonitor(LearningRateMonitor):
    """``LearningRateMonitor`` that logs an Emo group's applied LR (``group["emo_lr"]``).

    Same arguments and keys as ``LearningRateMonitor``. Reading ``emo_lr`` syncs with the
    device; the monitor does it only on logging steps.
    """

    @override
    def _extract_lr(self, param_group: dict[str, Any], name: str) -> dict[str, Any]:
        applied = param_group.get("emo_lr")
        if not isinstance(applied, Tensor):
            return super()._extract_lr(param_group, name)
        lr = float(applied)
        self.lrs[name].append(lr)
        return {name: lr}
