"""Full fine-tuning of a pretrained digits MLP to a shifted input distribution.

The model (the digits MLP, 64-128-128-10) is pretrained once per process, deterministically
(seed 0, AdamW 3e-3, 600 steps on the clean training split; cached in memory), to ~98%
validation accuracy. Each run then fine-tunes *all* its weights on only 128 training images
moved one pixel right and down (a camera shift), a distribution on which the pretrained
model is at chance. Metric: the mean of the validation accuracies on shifted images (what
fine-tuning must learn) and on clean images (what pretraining knew). Too small a step does
not learn the shift; too large a step overwrites the pretrained weights, and clean accuracy
falls towards chance: the overshoot that fine-tuning must avoid is measured, not assumed.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task, Workload
from .digits import load_digits_split

__all__ = ["FINETUNE", "pretrained_digits_mlp", "shift_images"]

BATCH = 32
FINETUNE_IMAGES = 128
PRETRAIN_STEPS = 600
PRETRAIN_LR = 3e-3
PRETRAIN_BATCH = 64


def shift_images(x: Tensor) -> Tensor:
    """Flattened 8x8 images moved one pixel right and down (the vacated row/column is 0)."""
    img = torch.zeros_like(x).view(-1, 8, 8)
    img[:, 1:, 1:] = x.view(-1, 8, 8)[:, :-1, :-1]
    return img.reshape(x.shape)


def digits_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


@functools.cache
def pretrained_digits_mlp(steps: int = PRETRAIN_STEPS) -> dict[str, Tensor]:
    """State dict of the digits MLP after ``steps`` of AdamW on clean digits (seed 0)."""
    x_train, y_train, _, _ = load_digits_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = digits_mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(len(x_train), (PRETRAIN_BATCH,), generator=gen)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class FinetuneTask(Task):
    def __init__(self, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self.model = digits_mlp()
        self.model.load_state_dict(pretrained_digits_mlp(PRETRAIN_STEPS))
        self.model.to(device)
        x_train, y_train, x_val, y_val = load_digits_split()
        pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))
        pick = pick[:FINETUNE_IMAGES]  # the same 128 images for every seed
        self.x_ft = shift_images(x_train[pick]).to(device)
        self.y_ft = y_train[pick].to(device)
        self.x_val_new = shift_images(x_val).to(device)
        self.x_val_old = x_val.to(device)
        self.y_val = y_val.to(device)
        self.gen = torch.Generator().manual_seed(seed)

    def train_loss(self) -> Tensor:
        idx = torch.randint(len(self.x_ft), (BATCH,), generator=self.gen).to(self.x_ft.device)
        return F.cross_entropy(self.model(self.x_ft[idx]), self.y_ft[idx])

    @torch.no_grad()
    def evaluate(self) -> float:
        accs = [
            (self.model(x).argmax(dim=1) == self.y_val).float().mean()
            for x in (self.x_val_new, self.x_val_old)
        ]
        return 100.0 * float(torch.stack(accs).mean())


FINETUNE = Workload(
    name="finetune",
    title="Full fine-tune of a pretrained digits MLP to shifted digits (128 images)",
    metric="mean val accuracy % (shifted, clean)",
    higher_is_better=True,
    steps=200,
    quick_steps=60,
    batch=BATCH,
    build=FinetuneTask,
)
