"""A slow, literal reference of SPEC §2-4, for differential tests.

Written to be read next to the SPEC, not to be fast: the sensor in Python floats, every
update rule per tensor with the SPEC's own formulas. It shares no code with ``emo_core``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ReferenceSensor:
    """SPEC §2 in plain Python floats."""

    scope: float = 1.0
    min_lr: float = 1e-6
    max_lr: float = 1e-3
    t: int = 0
    ema_short: float = 0.0
    ema_medium: float = 0.0
    ema_long: float = 0.0
    sigma: float = 0.0
    trust: float = 1.0
    noise: float = 0.05
    d: float = 0.01
    H: float = 0.0
    hist: list[float] = field(default_factory=list)
    stop: bool = False
    pulse: float = 1e-3
    skipped: int = 0

    def __post_init__(self) -> None:
        self.pulse = self.max_lr

    def sense(self, loss: float) -> None:
        if not math.isfinite(loss):
            self.skipped += 1
            return
        self.t += 1
        if self.t == 1:
            self.ema_short = self.ema_medium = self.ema_long = loss
        self.ema_short = 0.3 * loss + 0.7 * self.ema_short
        self.ema_medium = 0.05 * loss + 0.95 * self.ema_medium
        self.ema_long = 0.01 * loss + 0.99 * self.ema_long
        self.sigma = math.tanh((self.ema_long - self.ema_short) / max(abs(self.ema_long), 1e-5))
        self.trust = (1.0 if self.sigma >= 0 else -1.0) * (1.0 - abs(self.sigma))
        self.noise = 0.7 * self.noise + 0.3 * abs(self.sigma)
        self.d = 0.95 * self.d + 0.05 * abs(self.trust)
        q = (self.d / max(self.noise, 1e-8)) ** 2
        self.H = q if self.t == 1 else max(0.999 * self.H, q)
        raw = 5e-5 * self.scope * q * math.sqrt(self.H)
        self.pulse = min(max(raw, self.min_lr), self.max_lr)
        self.hist = (self.hist + [self.sigma])[-32:]
        if len(self.hist) == 32 and self.t >= 100:
            mean_abs = sum(abs(s) for s in self.hist) / 32
            mean = sum(self.hist) / 32
            var = sum((s - mean) ** 2 for s in self.hist) / 32
            if mean_abs < 0.05 and var < 0.005:
                self.stop = True


class ReferenceOptimizer:
    """One of ``"emosens" | "emoairy" | "emocats"`` per SPEC §4, one tensor at a time.

    ``step(loss)`` must be called after gradients are in ``p.grad``. Parameters are fp32.
    """

    def __init__(
        self,
        kind: str,
        params: list[torch.Tensor],
        *,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.995),
        beta2: float = 0.995,
        eps: float = 1e-8,
        clip_threshold: float = 1.0,
        use_shadow: bool = False,
        group_lrs: list[float] | None = None,
    ) -> None:
        self.kind = kind
        self.params = params
        self.wd = weight_decay
        self.betas = betas
        self.beta2 = beta2
        self.eps = eps
        self.clip = clip_threshold
        self.use_shadow = use_shadow
        self.group_lrs = group_lrs or [1.0] * len(params)
        self.sensor = ReferenceSensor()
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]

    @torch.no_grad()
    def step(self, loss: float) -> None:
        grads_finite = all(
            bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None
        )
        if not grads_finite:
            loss = float("nan")
        self.sensor.sense(loss)
        if not math.isfinite(loss):
            return
        sigma, trust = self.sensor.sigma, self.sensor.trust
        for p, state, group_lr in zip(self.params, self.state, self.group_lrs):
            if p.grad is None:
                continue
            lr = self.sensor.pulse * group_lr  # group["lr"] / scope with scope = 1
            g = p.grad
            if self.use_shadow:
                if "shadow" not in state:
                    state["shadow"] = p.clone()
                r = 1.0 - abs(sigma) if abs(sigma) > 0.625 else 0.0
                if r > 0:
                    p.copy_((1.0 - r) * p + r * state["shadow"])
                else:
                    state["shadow"] += 0.1 * abs(trust) * (p - state["shadow"])
            p.mul_(1.0 - self.wd * lr)
            getattr(self, f"_{self.kind}")(p, g, state, lr)

    def _emosens(self, p: torch.Tensor, g: torch.Tensor, state: dict, lr: float) -> None:
        b1, b2 = self.betas
        m = state.setdefault("exp_avg", torch.zeros_like(p))
        v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
        m.copy_(b1 * m + (1 - b1) * g)
        v.copy_(b2 * v + (1 - b2) * g * g)
        p.sub_(lr * m / (v.sqrt() + self.eps))

    def _emocats(self, p: torch.Tensor, g: torch.Tensor, state: dict, lr: float) -> None:
        b1, b2 = self.betas
        m = state.setdefault("exp_avg", torch.zeros_like(p))
        c = b1 * m + (1 - b1) * g
        p.sub_(lr * torch.sign(c))
        m.copy_(b2 * m + (1 - b2) * g)

    def _emoairy(self, p: torch.Tensor, g: torch.Tensor, state: dict, lr: float) -> None:
        b2 = self.beta2
        state["step"] = state.get("step", 0) + 1
        g2 = g * g
        if p.dim() >= 2:
            rows = state.setdefault("row_var", torch.zeros((p.shape[0],) + (1,) * (p.dim() - 1)))
            cols = state.setdefault("col_var", torch.zeros((1,) + tuple(p.shape[1:])))
            rows.copy_(b2 * rows + (1 - b2) * g2.mean(dim=tuple(range(1, p.dim())), keepdim=True))
            cols.copy_(b2 * cols + (1 - b2) * g2.mean(dim=0, keepdim=True))
            v_hat = rows * cols / rows.mean()
        else:
            v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
            v.copy_(b2 * v + (1 - b2) * g2)
            v_hat = v.clone()
        v_hat = v_hat / (1 - b2 ** state["step"])
        u = g / (v_hat.sqrt() + self.eps)
        rms = u.pow(2).mean().sqrt()
        u = u / max(1.0, float(rms) / self.clip)
        p.sub_(lr * u)
