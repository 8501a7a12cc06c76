"""A small image classifier that labels generated samples: LoRA's effect, measured.

``load_or_train_judge`` trains a two-layer CNN on the training images of every class (80 %;
the other 20 % give its held-out accuracy) once, and caches it in
``<cache_dir>/judge-<key>.safetensors`` keyed by a hash of the data and its settings.
``sample_accuracy`` is then the fraction of generated images it labels as the class they
were prompted with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pretraining import data_fingerprint

__all__ = ["Judge", "JudgeCNN", "load_or_train_judge"]

_FORMAT = 1
_STEPS = 600
_BATCH = 64


class JudgeCNN(nn.Module):
    """conv-relu-pool twice, then a linear layer: ~99 % on sklearn digits' held-out images."""

    def __init__(self, channels: int, resolution: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        side = resolution // 4
        self.head = nn.Linear(32 * side * side, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(images)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


@dataclass
class Judge:
    """The trained classifier and its accuracy on held-out real images."""

    model: JudgeCNN
    heldout_accuracy: float

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Class indices of images in [-1, 1] (``[N, C, R, R]``)."""
        param = next(self.model.parameters())
        return self.model(images.to(param.device, param.dtype)).argmax(dim=1)

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of ``images`` classified as ``labels``."""
        return (self.predict(images).cpu() == labels.cpu()).float().mean().item()


def _train(images: Tensor, labels: Tensor, num_classes: int, seed: int) -> Judge:
    _, c, r, _ = images.shape
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    cut = max(1, int(0.8 * len(labels)))
    train_idx, test_idx = order[:cut], order[cut:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JudgeCNN(c, r, num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(_STEPS):
        batch = train_idx[torch.randint(len(train_idx), (_BATCH,), generator=generator)]
        x = images[batch]
        # Light noise and 1-pixel shifts: generated digits are a little off the data.
        x = x + 0.15 * torch.randn(x.shape, generator=generator)
        dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(model(x), labels[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval().requires_grad_(False)
    judge = Judge(model, 1.0)
    if len(test_idx):
        judge.heldout_accuracy = judge.accuracy(images[test_idx], labels[test_idx])
    return judge


def load_or_train_judge(
    images: Tensor, labels: Tensor, num_classes: int, cache_dir: str | Path, seed: int = 0
) -> Judge:
    """The classifier for these images (``[-1, 1]``, fp32, CPU), trained once and cached."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, c, r, _ = images.shape
    if r % 4:
        raise ValueError(f"Invalid resolution: {r} (the sample classifier needs a multiple of 4)")
    spec = json.dumps(
        [_FORMAT, _STEPS, _BATCH, seed, num_classes, data_fingerprint(images, labels)]
    )
    key = hashlib.sha256(spec.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"judge-{key}.safetensors"
    if path.is_file():
        model = JudgeCNN(c, r, num_classes)
        model.load_state_dict(load_file(path))
        with safe_open(str(path), framework="pt") as handle:
            heldout = float(handle.metadata()["heldout_accuracy"])
        return Judge(model.eval().requires_grad_(False), heldout)
    judge = _train(images.float().cpu(), labels.cpu(), num_classes, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(
        dict(judge.model.state_dict()),
        staging,
        metadata={"heldout_accuracy": repr(judge.heldout_accuracy)},
    )
    os.replace(staging, path)
    return judge
