"""LightningCLI example: an MLP on scikit-learn's digits, trained by an Emo optimizer.

    python -m emo_lightning.example fit --config configs/lightning/digits.yaml
    python -m emo_lightning.example fit --config digits_emocats    # a shipped config by name

The optimizer comes from the config (``optimizer: class_path: emo_core.EmoSens``, or
``EmoAiry``/``EmoCats``), ``EmoCallback`` from ``trainer.callbacks``; the module has no
``configure_optimizers`` of its own, so LightningCLI builds the configured one. After ``fit``
the validation accuracy is printed. The data ships with scikit-learn (no download).

Checkpoints are written whole or not at all and checked before loading
(``CrashSafeCheckpointIO``); ``fit --ckpt_path latest`` resumes from the newest whole
``.ckpt`` under ``trainer.default_root_dir``. The shuffle of epoch ``e`` depends only on
``(split_seed, e)``, so a resume from an epoch-end checkpoint is exact.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from emo_configs import ConfigNotFoundError, resolve_config

from .checkpoint_io import CrashSafeCheckpointIO, check_ckpt_file, resolve_ckpt_path

__all__ = ["DigitsData", "DigitsMLP", "EpochShuffle", "main"]


class EpochShuffle(Sampler[int]):
    """A fresh permutation every epoch that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before each epoch, also on resume, so a resumed run
    draws the same order as an uninterrupted one (a loader's own seeded generator would
    restart at epoch 0's order in every new process).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class DigitsData(pl.LightningDataModule):
    """The 8x8 digits (1797 images, 10 classes), pixels scaled to [0, 1], a seeded split.

    Args:
        batch_size: training and validation batch size (default: 64).
        val_fraction: share of the images held out for validation (default: 0.2).
        split_seed: seed of the train/validation split and of the shuffling (default: 0).
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, split_seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected batch_size >= 1)")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"Invalid val_fraction: {val_fraction} (expected 0 < val_fraction < 1)"
            )
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def setup(self, stage: str) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "The digits example needs scikit-learn: pip install 'emo-optim[bench]'"
            ) from error
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(len(x) * self.val_fraction)
        val, train = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffle(len(self.train_set), self.split_seed)
        return DataLoader(self.train_set, self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size)


class DigitsMLP(pl.LightningModule):
    """64 -> hidden -> hidden -> 10 MLP with GELU; logs ``train_loss``, ``val_loss``, ``val_acc``.

    Args:
        hidden: width of the two hidden layers (default: 64).
    """

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)


class EmoCLI(LightningCLI):
    """LightningCLI: crash-safe checkpoints, ``--ckpt_path latest``, val accuracy after ``fit``."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here, before anything else:
        # check the file first so that a damaged one is named, not a pickle error.
        if self.config.get("subcommand"):
            check_ckpt_file(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a configured one
            trainer.strategy.checkpoint_io = CrashSafeCheckpointIO()
        return trainer

    def fit(self, model: pl.LightningModule, ckpt_path: Any = None, **kwargs: Any) -> None:
        self.trainer.fit(model, ckpt_path=resolve_ckpt_path(ckpt_path, self.trainer), **kwargs)

    def after_fit(self) -> None:
        metrics = self.trainer.callback_metrics
        if "val_acc" in metrics and self.trainer.is_global_zero:
            print(
                f"digits: val_acc={float(metrics['val_acc']):.4f} "
                f"val_loss={float(metrics['val_loss']):.4f} "
                f"after {self.trainer.global_step} steps ({type(self.trainer.optimizers[0]).__name__})"
            )


def main(args: Sequence[str] | None = None) -> EmoCLI:
    """Run the CLI (``args`` as on the command line; None = ``sys.argv``).

    ``--config`` takes a path or a shipped config's name (``digits``, ``lightning/digits.yaml``).
    """
    args = resolve_config_args(list(sys.argv[1:] if args is None else args))
    return EmoCLI(DigitsMLP, DigitsData, args=args, save_config_kwargs={"overwrite": True})


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with each ``--config``/``-c`` value that names a shipped config replaced by its
    path; exits with status 2 and the shipped names for a name that matches nothing. Inline
    YAML (``--config '{...}'``) passes through to LightningCLI unchanged."""
    resolved = list(args)
    for i, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        if sep and flag == "--config":
            resolved[i] = f"--config={_config_path(value)}"
        elif i > 0 and args[i - 1] in ("--config", "-c"):
            resolved[i] = _config_path(arg)
    return resolved


def _config_path(value: str) -> str:
    if any(ch in value for ch in "{}:\n"):  # inline YAML, not a file name
        return value
    try:
        return str(resolve_config(value, "lightning"))
    except ConfigNotFoundError as error:
        print(f"error: --config: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
