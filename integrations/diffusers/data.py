"""Offline training images, a lossless "VAE", and a step-indexed batch order.

* ``load_images``: sklearn's handwritten digits (ship with scikit-learn; 1,797 8x8 images,
  labels 0-9) upsampled to the training resolution, or a folder of images
  (``--train_data_dir``; one class per sub-folder, or a single class).
* ``PixelCodec``: stands in for the VAE. ``pixel_unshuffle`` by 2 turns a ``C x R x R`` image
  into a ``4C x R/2 x R/2`` latent and ``pixel_shuffle`` turns it back, exactly, so the tiny
  transformer sees latent-shaped inputs without a VAE to download.
* ``BatchOrder``: which samples form micro-batch ``i``, computed from ``(seed, i)`` alone.
  A resumed run asks for batch ``i`` and gets what the uninterrupted run got, with no
  dataloader state to save or batches to skip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DIGIT_CLASSES",
    "IMAGE_SUFFIXES",
    "BatchOrder",
    "ImageSet",
    "PixelCodec",
    "class_names",
    "load_images",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIGIT_CLASSES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class ImageSet:
    """Images in [-1, 1] (``[N, C, R, R]``, fp32), integer labels ``[N]`` and class names."""

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class PixelCodec:
    """A lossless stand-in for a VAE: space-to-depth by ``factor`` (default 2)."""

    def __init__(self, factor: int = 2) -> None:
        if factor < 1:
            raise ValueError(f"Invalid factor: {factor} (expected an integer >= 1)")
        self.factor = factor

    def image_channels(self, latent_channels: int) -> int:
        """Image channels that encode to ``latent_channels`` (e.g. 4 latent -> 1 grey)."""
        per_pixel = self.factor**2
        if latent_channels % per_pixel:
            raise ValueError(
                f"Invalid latent channels: {latent_channels} is not a multiple of "
                f"factor**2 = {per_pixel}; use in_channels 4, 8, 12, ... for the transformer"
            )
        return latent_channels // per_pixel

    def encode(self, images: Tensor) -> Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, self.factor)


def load_images(
    resolution: int, channels: int, train_data_dir: str | Path | None = None
) -> ImageSet:
    """The training images at ``resolution`` with ``channels`` (1 grey or 3 RGB)."""
    if channels not in (1, 3):
        raise ValueError(
            f"Invalid image channels: {channels} (the transformer's latent channels / 4 must "
            "be 1 for grey or 3 for RGB images; use in_channels 4 or 12 for SD3, 16 or 48 for "
            "Flux, which packs 2x2 latent patches; real SD3/Flux checkpoints need a VAE, which this "
            "script does not use)"
        )
    if train_data_dir is None:
        return _digits(resolution, channels)
    return _folder(Path(train_data_dir), resolution, channels)


def _digits(resolution: int, channels: int) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear")
    images = (images * 2.0 - 1.0).clamp_(-1.0, 1.0).expand(-1, channels, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    return ImageSet(images, labels, DIGIT_CLASSES)


def _class_folders(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        raise ValueError(f"Invalid train_data_dir: {str(root)!r} is not a directory")
    # (hidden folders are no classes: .ipynb_checkpoints, .git, ...)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(p.name, p) for p in subdirs] if subdirs else [(root.name, root)]


def class_names(train_data_dir: str | Path | None = None) -> tuple[str, ...]:
    """The classes ``load_images`` will label: digits 0-9, or the folder's sub-folders."""
    if train_data_dir is None:
        return DIGIT_CLASSES
    return tuple(name for name, _ in _class_folders(Path(train_data_dir)))


def _folder(root: Path, resolution: int, channels: int) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    sources = _class_folders(root)
    mode = "L" if channels == 1 else "RGB"
    images, labels, skipped = [], [], 0
    for label, (_, folder) in enumerate(sources):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    if img.mode.startswith("I"):  # 16-bit grey: convert() clips at 255 (white)
                        img = img.point(lambda v: v / 257)
                    img = img.convert(mode).resize(
                        (resolution, resolution), Image.Resampling.BICUBIC
                    )
                    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                logger.warning("Skipping unreadable image %s: %s", path, err)
                skipped += 1
                continue
            images.append(data.reshape(resolution, resolution, channels).permute(2, 0, 1))
            labels.append(label)
    if not images:
        unreadable = f" ({skipped} unreadable, skipped)" if skipped else ""
        raise ValueError(
            f"Invalid train_data_dir: no readable images ({', '.join(IMAGE_SUFFIXES)}) in "
            f"{str(root)!r} or its sub-folders{unreadable}"
        )
    empty = [name for k, (name, _) in enumerate(sources) if k not in labels]
    if empty:  # a class with no images was trained on nothing but sampled and measured
        raise ValueError(
            f"Invalid train_data_dir: no readable images in the class folder(s) "
            f"{', '.join(empty)} of {str(root)!r} (each sub-folder is a class; remove them)"
        )
    stacked = torch.stack(images).float() / 127.5 - 1.0
    return ImageSet(stacked, torch.tensor(labels), tuple(name for name, _ in sources))


class BatchOrder:
    """Sample indices of micro-batch ``i``: epoch-wise shuffles drawn from ``(seed, epoch)``.

    Each epoch is a fresh permutation; the last incomplete batch of an epoch is dropped
    (``drop_last``). With several processes, process ``rank`` of ``world_size`` takes global
    batch ``i * world_size + rank``, so the processes see different samples.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if batch_size < 1 or batch_size > num_samples:
            raise ValueError(
                f"Invalid train_batch_size: {batch_size} (expected 1 <= train_batch_size <= "
                f"{num_samples}, the number of training images)"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = num_samples // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def indices(self, batch: int, *, rank: int = 0, world_size: int = 1) -> Tensor:
        position = batch * world_size + rank
        epoch, within = divmod(position, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        start = within * self.batch_size
        return self._perm[start : start + self.batch_size]
