"""Rectified-flow (flow matching) generation of 8x8 digits.

``x_t = (1 − t)·x0 + t·x1`` with noise ``x0 ~ N(0, I)`` and a digit ``x1`` (pixels in
[-1, 1]); an MLP predicts the velocity ``x1 − x0`` from ``(x_t, t)``. Metric: validation
flow-matching MSE on held-out digits with fixed noise and times (the training objective on
unseen data; lower is better).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task, Workload
from .digits import load_digits_split

__all__ = ["FLOW"]

BATCH = 128
HIDDEN = 256
TIME_FEATURES = 16
VAL_REPEATS = 4


def time_features(t: Tensor) -> Tensor:
    """Sinusoidal features of ``t`` in [0, 1], shape ``[n, TIME_FEATURES]``."""
    freqs = torch.exp(torch.linspace(0.0, math.log(100.0), TIME_FEATURES // 2, device=t.device))
    angles = t[:, None] * freqs[None, :] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class VelocityMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64 + TIME_FEATURES, HIDDEN),
            nn.SiLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.SiLU(),
            nn.Linear(HIDDEN, 64),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, time_features(t)], dim=1))


class FlowTask(Task):
    def __init__(self, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self.model = VelocityMLP().to(device)
        x_train, _, x_val, _ = load_digits_split()
        self.x_train = (2.0 * x_train - 1.0).to(device)
        self.gen = torch.Generator().manual_seed(seed)
        fixed = torch.Generator().manual_seed(1234)  # same validation noise for every run
        x1 = (2.0 * x_val - 1.0).repeat(VAL_REPEATS, 1)
        self.val = tuple(
            v.to(device)
            for v in (
                x1,
                torch.randn(x1.shape, generator=fixed),
                torch.rand(len(x1), generator=fixed),
            )
        )

    def _loss(self, x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        xt = (1.0 - t[:, None]) * x0 + t[:, None] * x1  # zt = (1 - t) * noise + t * data
        return F.mse_loss(self.model(xt, t), x1 - x0)

    def train_loss(self) -> Tensor:
        idx = torch.randint(len(self.x_train), (BATCH,), generator=self.gen)
        x1 = self.x_train[idx.to(self.x_train.device)]
        x0 = torch.randn(x1.shape, generator=self.gen).to(x1.device)
        t = torch.rand(BATCH, generator=self.gen).to(x1.device)
        return self._loss(x1, x0, t)

    @torch.no_grad()
    def evaluate(self) -> float:
        return float(self._loss(*self.val))


FLOW = Workload(
    name="flow",
    title="Rectified flow on 8x8 digits (MLP 80-256-256-64)",
    metric="val flow-matching MSE",
    higher_is_better=False,
    steps=1000,
    quick_steps=250,
    batch=BATCH,
    build=FlowTask,
)
