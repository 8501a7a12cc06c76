"""Digits MLP: classify sklearn's 8x8 handwritten digits (1797 images, ships offline).

A fixed 80/20 train/validation split (split seed 0, independent of the run seed); the run
seed sets the initialisation and the batch order. Metric: validation accuracy in percent.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task, Workload

__all__ = ["DIGITS", "DigitsTask", "load_digits_split"]

BATCH = 64


@functools.cache
def load_digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_val, y_val)``; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_val = len(x) // 5
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


class DigitsTask(Task):
    """Digits classification on the fixed split, batches of ``BATCH`` drawn by the run seed;
    subclasses choose the model (``build_model``) and the metric (``evaluate``)."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def __init__(self, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self.model = self.build_model().to(device)
        x_train, y_train, x_val, y_val = load_digits_split()
        self.x_train, self.y_train = x_train.to(device), y_train.to(device)
        self.x_val, self.y_val = x_val.to(device), y_val.to(device)
        self.gen = torch.Generator().manual_seed(seed)

    def train_loss(self) -> Tensor:
        idx = torch.randint(len(self.x_train), (BATCH,), generator=self.gen)
        idx = idx.to(self.x_train.device)
        return F.cross_entropy(self.model(self.x_train[idx]), self.y_train[idx])

    @torch.no_grad()
    def evaluate(self) -> float:
        pred = self.model(self.x_val).argmax(dim=1)
        return 100.0 * float((pred == self.y_val).float().mean())


DIGITS = Workload(
    name="digits",
    title="Digits MLP (sklearn digits, 64-128-128-10)",
    metric="val accuracy %",
    higher_is_better=True,
    steps=800,
    quick_steps=200,
    batch=BATCH,
    build=DigitsTask,
)
