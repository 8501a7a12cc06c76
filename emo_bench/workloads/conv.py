"""Conv net with BatchNorm on 8x8 digits.

Two 3x3 conv layers (16 and 32 channels), each followed by BatchNorm and ReLU, a 2x2 max
pool, then a linear classifier: normalization layers make the loss nearly invariant to the
conv weights' scale, the regime where an automatic LR that reads the loss alone tends to
brake. Same fixed 80/20 split as the digits MLP. Metric: validation cross-entropy (in
eval mode, BatchNorm running statistics), which separates step sizes better than the
saturated accuracy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Workload
from .digits import BATCH, DigitsTask

__all__ = ["CONV"]


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


class ConvTask(DigitsTask):
    def build_model(self) -> nn.Module:
        return conv_net()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        try:
            return float(F.cross_entropy(self.model(self.x_val), self.y_val))
        finally:
            self.model.train()


CONV = Workload(
    name="conv",
    title="Conv net with BatchNorm on 8x8 digits (16-32 channels)",
    metric="val cross-entropy",
    higher_is_better=False,
    steps=300,
    quick_steps=60,
    batch=BATCH,
    build=ConvTask,
    log_scale=True,
)
