"""Teacher-student regression with label noise: an MLP learns a fixed random tanh network.

Inputs are fresh Gaussian draws every step (an endless dataset), targets the teacher's output
plus noise of std 0.1, so the training loss has a noise floor and the last steps are spent
inside it: the regime where a step size that is too large, or one annealed too early, shows.
Metric: MSE against the noiseless teacher on 2048 held-out inputs (lower is better).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task, Workload

__all__ = ["REGRESSION"]

DIM, TEACHER_WIDTH, WIDTH = 32, 64, 256
BATCH = 64
LABEL_NOISE = 0.1
TEACHER_SEED, VAL_SEED = 1234, 99


class RegressionTask(Task):
    """One fixed teacher for every run; the run seed sets the student and the data order."""

    def __init__(self, seed: int, device: torch.device) -> None:
        teacher = torch.Generator().manual_seed(TEACHER_SEED)
        self.w1 = (torch.randn(DIM, TEACHER_WIDTH, generator=teacher) / DIM**0.5).to(device)
        self.w2 = (torch.randn(TEACHER_WIDTH, 1, generator=teacher) * 3 / 8).to(device)
        torch.manual_seed(seed)
        self.model = nn.Sequential(
            nn.Linear(DIM, WIDTH),
            nn.GELU(),
            nn.Linear(WIDTH, WIDTH),
            nn.GELU(),
            nn.Linear(WIDTH, 1),
        ).to(device)
        self.gen = torch.Generator().manual_seed(seed)
        x_val = torch.randn(2048, DIM, generator=torch.Generator().manual_seed(VAL_SEED))
        self.x_val = x_val.to(device)
        self.y_val = self._teacher(self.x_val)

    def _teacher(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1) @ self.w2

    def train_loss(self) -> Tensor:
        x = torch.randn(BATCH, DIM, generator=self.gen)
        noise = LABEL_NOISE * torch.randn(BATCH, 1, generator=self.gen)
        x, noise = x.to(self.x_val.device), noise.to(self.x_val.device)
        return F.mse_loss(self.model(x), self._teacher(x) + noise)

    @torch.no_grad()
    def evaluate(self) -> float:
        return float(F.mse_loss(self.model(self.x_val), self.y_val))


REGRESSION = Workload(
    name="regression",
    title="Teacher-student regression with label noise (MLP 32-256-256-1, GELU)",
    metric="val MSE to the noiseless teacher",
    higher_is_better=False,
    steps=1500,
    quick_steps=150,
    batch=BATCH,
    build=RegressionTask,
)
