"""A recurrent classifier: does a random walk of 30 steps ever rise above 4?

A one-layer GRU (hidden 64) reads the walk's increments and a linear head classifies its
last state. Gated recurrences train differently from feed-forward nets (their useful step
size is often larger, and the gradient flows through time), so the workload checks that a
scale found on the other workloads' kinds carries over. Fresh sequences every step; metric:
cross-entropy on 1024 held-out sequences (lower is better).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task, Workload

__all__ = ["RNN"]

LENGTH, HIDDEN = 30, 64
BATCH = 64
THRESHOLD = 4.0
VAL_SEED = 7


def _walks(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(increments [n, LENGTH, 1], label [n])``: 1 where the running sum exceeds 4."""
    x = torch.randn(n, LENGTH, 1, generator=gen)
    return x, (x.cumsum(1).amax(1).squeeze(-1) > THRESHOLD).long()


class RecurrentClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(1, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gru(x)[0][:, -1])


class RnnTask(Task):
    def __init__(self, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self.model = RecurrentClassifier().to(device)
        self.gen = torch.Generator().manual_seed(seed)
        x_val, y_val = _walks(1024, torch.Generator().manual_seed(VAL_SEED))
        self.x_val, self.y_val = x_val.to(device), y_val.to(device)

    def train_loss(self) -> Tensor:
        x, y = _walks(BATCH, self.gen)
        return F.cross_entropy(self.model(x.to(self.x_val.device)), y.to(self.x_val.device))

    @torch.no_grad()
    def evaluate(self) -> float:
        return float(F.cross_entropy(self.model(self.x_val), self.y_val))


RNN = Workload(
    name="rnn",
    title="GRU sequence classifier (does a 30-step random walk pass 4? hidden 64)",
    metric="val cross-entropy",
    higher_is_better=False,
    steps=800,
    quick_steps=100,
    batch=BATCH,
    build=RnnTask,
)
