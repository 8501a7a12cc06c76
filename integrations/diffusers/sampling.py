"""Class-conditional Euler sampling of the flow ODE, and a PNG grid of the results.

Sampling runs diffusers' ``FlowMatchEulerDiscreteScheduler`` (the scheduler the SD3 and
Flux pipelines use) from pure noise at sigma = 1 down to sigma = 0, with the model's
velocity prediction at each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import PixelCodec
from .models import FlowModel

__all__ = ["sample_images", "save_grid"]


@torch.no_grad()
def sample_images(
    model: FlowModel,
    scheduler_config: dict[str, Any],
    labels: Tensor,
    latent_size: int,
    *,
    num_inference_steps: int = 20,
    seed: int = 0,
    codec: PixelCodec | None = None,
) -> Tensor:
    """Images in [-1, 1] (fp32, ``[B, C, R, R]``), one per label, by Euler flow sampling."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    codec = codec or PixelCodec()
    device = labels.device
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (labels.shape[0], model.latent_channels, latent_size, latent_size)
    latents = torch.randn(shape, generator=generator, device=device)
    was_training = model.training
    model.eval()
    try:
        for t in scheduler.timesteps:
            velocity = model(latents, t.expand(labels.shape[0]), labels).float()
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    finally:
        model.train(was_training)
    return codec.decode(latents.float()).clamp(-1.0, 1.0)


def save_grid(images: Tensor, path: str | Path, columns: int, scale: int = 4) -> Path:
    """Write ``images`` (``[N, C, R, R]`` in [-1, 1]) as a grid PNG, ``columns`` per row."""
    from PIL import Image

    n, c, r, _ = images.shape
    rows = -(-n // columns)
    pad = 1
    grid = torch.ones(c, rows * (r + pad) + pad, columns * (r + pad) + pad)
    for i, image in enumerate(images.float().cpu()):
        y, x = divmod(i, columns)
        top, left = pad + y * (r + pad), pad + x * (r + pad)
        grid[:, top : top + r, left : left + r] = (image + 1.0) / 2.0
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[..., 0] if c == 1 else pixels)  # uint8: L or RGB
    picture = picture.resize(
        (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, optimize=True)
    return path
