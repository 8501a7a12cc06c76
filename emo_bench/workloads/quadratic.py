"""Noisy ill-conditioned quadratic.

``f(x) = ½·(x − x*)ᵀ A (x − x*)`` in 64 dimensions, ``A = Q·diag(λ)·Qᵀ`` with a random
rotation ``Q`` and eigenvalues log-spaced from 1 to 1e-3 (condition number 1000), so no
diagonal preconditioner can undo it. Each step sees ``½·(x − x* − ξ)ᵀ A (x − x* − ξ)`` with
fresh ``ξ ~ N(0, 0.25·I)``: the loss and gradient are noisy, as in minibatch training.
Metric: the exact excess objective ``f(x) − f(x*)`` at the end (lower is better).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Task, Workload

__all__ = ["QUADRATIC"]

DIM = 64
CONDITION = 1e3
NOISE = 0.5


class QuadraticTask(Task):
    def __init__(self, seed: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))
        eig = torch.logspace(0.0, -torch.log10(torch.tensor(CONDITION)).item(), DIM)
        self.a = ((q * eig) @ q.T).to(device)
        self.target = torch.randn(DIM, generator=gen).to(device)
        self.model = nn.Module()
        self.model.x = nn.Parameter(torch.zeros(DIM, device=device))
        self.gen = gen

    def _objective(self, delta: Tensor) -> Tensor:
        return 0.5 * delta @ (self.a @ delta)

    def train_loss(self) -> Tensor:
        xi = NOISE * torch.randn(DIM, generator=self.gen).to(self.target.device)
        return self._objective(self.model.x - self.target - xi)

    @torch.no_grad()
    def evaluate(self) -> float:
        return float(self._objective(self.model.x - self.target))


QUADRATIC = Workload(
    name="quadratic",
    title="Noisy ill-conditioned quadratic (dim 64, condition 1e3, rotated)",
    metric="excess objective f - f*",
    higher_is_better=False,
    steps=2000,
    quick_steps=500,
    batch=1,
    build=QuadraticTask,
    log_scale=True,
)
