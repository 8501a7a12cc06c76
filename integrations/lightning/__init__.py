"""Lightning adapter for the Emo optimizers: return one from ``configure_optimizers`` and add
``EmoCallback()`` to the trainer's callbacks; the callback feeds the loss every step."""

from .callback import EmoCallback
from .checkpoint_io import CrashSafeCheckpointIO
from .lr_monitor import EmoLearningRateMonitor

__all__ = ["CrashSafeCheckpointIO", "EmoCallback", "EmoLearningRateMonitor"]
