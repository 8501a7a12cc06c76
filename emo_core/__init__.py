"""Loss-driven, learning-rate-free optimizers for PyTorch: EmoSens, EmoAiry, EmoCats.

Feed the training loss every step (``opt.step(loss=loss)``, ``opt.set_loss``/``add_loss`` or
a closure) and leave ``lr=1.0``: the learning rate (emoPulse) follows the loss. See SPEC.md.
"""

from ._base import EmoOptimizer
from .adapters import log_metrics, unwrap
from .emoairy import EmoAiry
from .emocats import EmoCats
from .emosens import EmoSens
from .registry import OPTIMIZERS, get_optimizer
from .schedule_free import EmoSensScheduleFree

__all__ = [
    "OPTIMIZERS",
    "EmoAiry",
    "EmoCats",
    "EmoOptimizer",
    "EmoSens",
    "EmoSensScheduleFree",
    "__version__",
    "get_optimizer",
    "log_metrics",
    "unwrap",
]
__version__ = "0.1.0"
