"""A small reference Lion (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms"), because ``torch.optim`` has none (checked on torch 2.13).

``c = β1·m + (1−β1)·g``; ``p ← p·(1 − lr·wd) − lr·sign(c)``; ``m ← β2·m + (1−β2)·g``.
Multi-tensor (``torch._foreach_*``) so that the speed comparison is fair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Lion"]


class Lion(torch.optim.Optimizer):
    """Lion with decoupled weight decay; 4 bytes of state per parameter.

    Args:
        params: parameters or param groups.
        lr: learning rate, typically 3-10x smaller than AdamW's (default: 1e-4).
        betas: interpolation and momentum decay (default: (0.9, 0.99)).
        weight_decay: decoupled weight decay (default: 0.0).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (expected 0 <= beta < 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            moms = [self.state[p]["exp_avg"] for p in params]
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
            direction = torch._foreach_lerp(moms, grads, 1.0 - beta1)
            torch._foreach_sign_(direction)
            torch._foreach_add_(params, direction, alpha=-lr)
            torch._foreach_lerp_(moms, grads, 1.0 - beta2)
        return loss
