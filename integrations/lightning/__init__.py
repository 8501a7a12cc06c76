"""Lightning adapter for the Emo optimizers: return one from ``configure_optimizers`` and add
``EmoCallback()`` to the trainer's callbacks; the callback feeds the loss every step."""

from emo_core.extras import require_extra

require_extra("emo_lightning", "lightning", "lightning")

from .callback import EmoCallback  # noqa: E402
from .checkpoint_io import CrashSafeCheckpointIO  # noqa: E402
from .lr_monitor import EmoLearningRateMonitor  # noqa: E402

__all__ = ["CrashSafeCheckpointIO", "EmoCallback", "EmoLearningRateMonitor"]
