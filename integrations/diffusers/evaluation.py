"""Base vs base + LoRA on the new classes: generated samples, their accuracy, one labelled PNG.

``base_view`` switches a trained ``FlowModel`` back to its base for a moment (LoRA disabled,
the class conditioner's weights as loaded, before training), so both sets of samples come
from the same process, noise and prompts; only the adapter (and the learned class prompts)
differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .judge import Judge
from .models import FlowModel
from .sampling import sample_images

__all__ = ["base_view", "evaluate_samples", "save_comparison"]


@contextlib.contextmanager
def base_view(model: FlowModel, base_conditioner: dict[str, Tensor]) -> Iterator[FlowModel]:
    """``model`` with its LoRA disabled and the base's class prompts, restored on exit."""
    trained = {k: v.detach().clone() for k, v in model.conditioner.state_dict().items()}
    model.transformer.disable_adapters()
    model.conditioner.load_state_dict(base_conditioner)
    try:
        yield model
    finally:
        model.conditioner.load_state_dict(trained)
        model.transformer.enable_adapters()


def evaluate_samples(
    model: FlowModel,
    base_conditioner: dict[str, Tensor],
    classes: Sequence[int],
    scheduler_config: dict[str, Any],
    latent_size: int,
    *,
    samples_per_class: int,
    num_inference_steps: int,
    seed: int,
    judge: Judge | None = None,
    autocast=contextlib.nullcontext,
) -> dict[str, Any]:
    """Samples of ``classes`` from the base and from base + LoRA, and the judge's accuracy.

    Returns ``{"labels", "base", "lora"}`` (images ``[N, C, R, R]`` in [-1, 1], label-major
    rows: sample ``i`` of every class, then sample ``i + 1``) plus
    ``sample_accuracy_base``/``sample_accuracy_lora`` when a ``judge`` is given.
    """
    device = next(model.parameters()).device
    labels = torch.tensor(list(classes), device=device).repeat(samples_per_class)

    def draw() -> Tensor:
        with autocast():
            return sample_images(
                model,
                scheduler_config,
                labels,
                latent_size,
                num_inference_steps=num_inference_steps,
                seed=seed,
            ).cpu()

    lora = draw()
    with base_view(model, base_conditioner):
        base = draw()
    result: dict[str, Any] = {"labels": labels.cpu(), "base": base, "lora": lora}
    if judge is not None:
        result["sample_accuracy_base"] = judge.accuracy(base, labels)
        result["sample_accuracy_lora"] = judge.accuracy(lora, labels)
    return result


def save_comparison(
    base: Tensor,
    lora: Tensor,
    class_names: Sequence[str],
    path: str | Path,
    *,
    rows: int,
    titles: tuple[str, str] = ("base", "base + LoRA"),
    scale: int = 4,
) -> Path:
    """Two labelled grids side by side (one column per class, ``rows`` samples each)."""
    from PIL import Image, ImageDraw

    columns = len(class_names)
    panels = [_grid(images[: rows * columns], columns, scale) for images in (base, lora)]
    cell = panels[0].width // columns
    header, gap = 28, 12
    width = sum(p.width for p in panels) + gap
    canvas = Image.new("RGB", (width, panels[0].height + header), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, panel in zip(titles, panels):
        canvas.paste(panel.convert("RGB"), (x, header))
        draw.text((x + 2, 1), title, fill="black")
        for j, name in enumerate(class_names):
            draw.text((x + j * cell + cell // 2 - 3, 14), str(name), fill=(200, 0, 0))
        x += panel.width + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def _grid(images: Tensor, columns: int, scale: int):
    from PIL import Image

    n, c, r, _ = images.shape
    rows, pad = -(-n // columns), 1
    grid = torch.ones(c, rows * (r + pad) + pad, columns * (r + pad) + pad)
    for i, image in enumerate(images.float()):
        y, x = divmod(i, columns)
        top, left = pad + y * (r + pad), pad + x * (r + pad)
        grid[:, top : top + r, left : left + r] = (image + 1.0) / 2.0
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
