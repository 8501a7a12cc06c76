"""emo_diffusers.flow_matching against diffusers' own training utilities and scheduler."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.training_utils import (  # noqa: E402
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from emo_diffusers.flow_matching import (  # noqa: E402
    WEIGHTING_SCHEMES,
    add_noise,
    euler_step,
    flow_matching_loss,
    loss_weighting,
    sample_density,
    sigmas_from_density,
    velocity_target,
)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_density_matches_diffusers(scheme: str) -> None:
    kwargs = {"logit_mean": 0.3, "logit_std": 1.2, "mode_scale": 1.29}
    ours = sample_density(scheme, 64, generator=torch.Generator().manual_seed(1), **kwargs)
    # diffusers treats any scheme other than logit_normal/mode as uniform ("none").
    theirs = compute_density_for_timestep_sampling(
        scheme if scheme != "uniform" else "none",
        64,
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )
    assert torch.equal(ours, theirs)
    assert ours.min() >= 0 and ours.max() <= 1


def test_sigmas_index_the_scheduler_schedule() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0])
    sigmas, timesteps = sigmas_from_density(u, scheduler.sigmas, 1000)
    indices = (u * 1000).long().clamp(max=999)  # what diffusers' SD3 script indexes
    torch.testing.assert_close(timesteps, scheduler.timesteps[indices])
    assert torch.equal(sigmas, scheduler.sigmas[indices])
    assert sigmas[0] == 1.0  # u = 0 is pure noise


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_loss_weighting_matches_diffusers(scheme: str) -> None:
    sigmas = torch.linspace(0.05, 1.0, 11)
    torch.testing.assert_close(
        loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas).float()
    )


def test_path_endpoints_and_velocity() -> None:
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(add_noise(x0, noise, torch.ones(3)), noise)
    # The target is the path's derivative in sigma, per sample.
    sigma, h = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64), 1e-6
    x0, noise = x0.double(), noise.double()
    slope = (add_noise(x0, noise, sigma + h) - add_noise(x0, noise, sigma - h)) / (2 * h)
    torch.testing.assert_close(slope, velocity_target(x0, noise))


def test_loss_is_weighted_per_sample_mean() -> None:
    prediction, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2.0  # per-sample MSE: 1 and 4
    loss = flow_matching_loss(prediction.bfloat16(), target, torch.tensor([1.0, 0.5]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((1.0 * 1 + 0.5 * 4) / 2)


def test_euler_step_matches_scheduler_step() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    sample, velocity = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[1]
    expected = scheduler.step(velocity, t, sample, return_dict=False)[0]
    ours = euler_step(sample, velocity, scheduler.sigmas[1], scheduler.sigmas[2])
    torch.testing.assert_close(ours, expected)


def test_unknown_scheme_is_an_error() -> None:
    with pytest.raises(ValueError, match="weighting_scheme.*logit_normal"):
        sample_density("gaussian", 4)
    with pytest.raises(ValueError, match="weighting_scheme"):
        loss_weighting("gaussian", torch.ones(2))
