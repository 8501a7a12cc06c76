"""Deep MLP autoencoder on 8x8 digits through a 4-unit bottleneck.

64-128-32-4-32-128-64 with tanh activations and a sigmoid output, trained on reconstruction
MSE. A narrow, deep, saturating network: the loss falls fast at first and then creeps down a
long plateau, where a controller that reads the loss trend tends to shrink the step exactly
when a larger one is needed. Metric: validation reconstruction MSE.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task, Workload
from .digits import load_digits_split

__all__ = ["AUTOENCODER"]

BATCH = 64
WIDTHS = (64, 128, 32, 4, 32, 128, 64)


def autoencoder() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(nn.Linear(a, b))
        layers.append(nn.Sigmoid() if i == len(WIDTHS) - 2 else nn.Tanh())
    return nn.Sequential(*layers)


class AutoencoderTask(Task):
    def __init__(self, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self.model = autoencoder().to(device)
        x_train, _, x_val, _ = load_digits_split()
        self.x_train, self.x_val = x_train.to(device), x_val.to(device)
        self.gen = torch.Generator().manual_seed(seed)

    def train_loss(self) -> Tensor:
        idx = torch.randint(len(self.x_train), (BATCH,), generator=self.gen)
        x = self.x_train[idx.to(self.x_train.device)]
        return F.mse_loss(self.model(x), x)

    @torch.no_grad()
    def evaluate(self) -> float:
        return float(F.mse_loss(self.model(self.x_val), self.x_val))


AUTOENCODER = Workload(
    name="autoencoder",
    title="Deep MLP autoencoder on 8x8 digits (64-128-32-4-32-128-64, tanh)",
    metric="val reconstruction MSE",
    higher_is_better=False,
    steps=1000,
    quick_steps=150,
    batch=BATCH,
    build=AutoencoderTask,
    log_scale=True,
)
