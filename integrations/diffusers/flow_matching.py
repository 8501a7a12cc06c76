"""Rectified-flow (flow-matching) training math, as pure tensor functions.

The same recipe as diffusers' SD3/Flux training scripts (Esser et al. 2024, "Scaling
Rectified Flow Transformers", arXiv:2403.03206):

1. draw ``u`` in [0, 1) from a density over the schedule (``sample_density``);
2. map it to a training sigma of the scheduler's (shifted) schedule (``sigmas_from_density``);
3. interpolate ``z_t = (1 - sigma) * x0 + sigma * noise`` (``add_noise``);
4. regress the velocity ``noise - x0`` (``velocity_target``), optionally weighted per
   sample (``loss_weighting``), with ``flow_matching_loss``.

No module state, no framework objects: everything takes and returns tensors, so the
functions are easy to test against diffusers' ``training_utils`` (the tests do).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DENSITY_SCHEMES",
    "WEIGHTING_SCHEMES",
    "add_noise",
    "euler_step",
    "flow_matching_loss",
    "loss_weighting",
    "sample_density",
    "sigmas_from_density",
    "velocity_target",
]

# Schemes that change where timesteps are drawn, and schemes that weight the loss instead
# (then timesteps are drawn uniformly). Same names as diffusers' ``--weighting_scheme``.
DENSITY_SCHEMES = ("logit_normal", "mode", "uniform")
WEIGHTING_SCHEMES = (*DENSITY_SCHEMES, "sigma_sqrt", "cosmap")


def _check_scheme(scheme: str) -> None:
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(
            f"Invalid weighting_scheme: {scheme!r} (expected one of {', '.join(WEIGHTING_SCHEMES)})"
        )


def sample_density(
    scheme: str,
    batch_size: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Positions ``u`` in [0, 1) on the noise schedule, one per sample.

    ``logit_normal`` (the SD3 default) is ``sigmoid(N(logit_mean, logit_std))`` and favours
    the middle of the schedule; ``mode`` bends a uniform draw towards the middle by
    ``mode_scale``; every other scheme draws uniformly (their weighting acts on the loss).
    """
    _check_scheme(scheme)
    if scheme == "logit_normal":
        normal = torch.normal(
            mean=logit_mean, std=logit_std, size=(batch_size,), device=device, generator=generator
        )
        return torch.sigmoid(normal)
    u = torch.rand(size=(batch_size,), device=device, generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sigmas_from_density(
    u: Tensor, schedule_sigmas: Tensor, num_train_timesteps: int
) -> tuple[Tensor, Tensor]:
    """The training sigmas and model timesteps at positions ``u`` of the schedule.

    ``schedule_sigmas`` is the scheduler's training schedule (``scheduler.sigmas`` right after
    construction, already shifted, from 1 down to ~0). Index ``int(u * T)`` picks a step, as
    diffusers does; the model's timestep is ``sigma * T``.
    """
    indices = (u * num_train_timesteps).long().clamp_(0, schedule_sigmas.numel() - 1)
    sigmas = schedule_sigmas.to(u.device)[indices]
    return sigmas, sigmas * num_train_timesteps


def _expand_like(sigmas: Tensor, x: Tensor) -> Tensor:
    """``sigmas`` of shape [B] viewed as [B, 1, ..., 1] to broadcast over ``x``."""
    return sigmas.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """The noisy sample on the straight path: ``z_t = (1 - sigma) * x0 + sigma * noise``."""
    s = _expand_like(sigmas, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """What the model regresses: the path's velocity ``d z_t / d sigma = noise - x0``."""
    return noise - x0


def loss_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    """Per-sample loss weights: ``sigma**-2`` (``sigma_sqrt``), CosMap, otherwise ones."""
    _check_scheme(scheme)
    sigmas = sigmas.float()
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    return torch.ones_like(sigmas)


def flow_matching_loss(prediction: Tensor, target: Tensor, weighting: Tensor) -> Tensor:
    """Weighted MSE in fp32: mean over each sample's elements, then over the batch."""
    w = _expand_like(weighting.float(), prediction.float())
    per_sample = (w * (prediction.float() - target.float()) ** 2).reshape(prediction.shape[0], -1)
    return per_sample.mean(dim=1).mean()


def euler_step(sample: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Euler step of the flow ODE from ``sigma`` to ``sigma_next`` (sampling goes 1 -> 0)."""
    return sample + (sigma_next - sigma) * velocity
