"""EmoCallback under ``strategy="ddp"``: 2 CPU processes (gloo), replicas must stay identical.

Lightning's DDP launcher re-runs the launching script once per extra rank, which cannot be
pytest itself; so the test runs this file as a script in a subprocess. Each rank saves its
parameters, its optimizer's sensor and the losses it saw; the test compares them.

    python tests/integrations/test_lightning_ddp.py OUT_DIR [--no-sync-loss]
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

N_ACCUMULATE = 2


def run_ddp(out_dir: Path, sync_loss: bool) -> None:
    """The script: fit on 2 ranks, then every rank saves what it has."""
    import lightning.pytorch as pl

    from emo_core import EmoSens
    from emo_lightning import EmoCallback

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
            self.recorded: list[tuple[int, int, float]] = []

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.recorded.append((self.current_epoch, batch_idx, float(loss.detach())))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return EmoSens(self.parameters(), sync_loss=sync_loss)

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    data = TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(32, 1))
    model = Regression()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        accumulate_grad_batches=N_ACCUMULATE,
        callbacks=[EmoCallback()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    torch.save(
        {
            "params": model.state_dict(),
            "telemetry": trainer.optimizers[0].telemetry(),
            "recorded": model.recorded,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


def launch(out_dir: Path, sync_loss: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    args = [sys.executable, __file__, str(out_dir)] + ([] if sync_loss else ["--no-sync-loss"])
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return tuple(torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1))


def window_means(recorded: list[tuple[int, int, float]]) -> list[float]:
    windows: dict[tuple[int, int], list[float]] = {}
    for epoch, batch_idx, loss in recorded:
        windows.setdefault((epoch, batch_idx // N_ACCUMULATE), []).append(loss)
    return [math.fsum(v) / len(v) for _, v in sorted(windows.items())]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_replicas_stay_identical(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    from emo_core import EmoSens

    rank0, rank1 = launch(tmp_path, sync_loss=True)
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    assert rank0["telemetry"] == rank1["telemetry"]
    means0, means1 = window_means(rank0["recorded"]), window_means(rank1["recorded"])
    # The ranks saw different data, so each alone would have sensed different losses and
    # set different learning rates (with sync_loss=False the replicas drift apart).
    assert all(a != b for a, b in zip(means0, means1))
    # Each step sensed the cross-rank mean of the ranks' mean micro-batch losses.
    p = nn.Parameter(torch.zeros(1))
    ref = EmoSens([p])
    for a, b in zip(means0, means1):
        p.grad = torch.zeros(1)
        ref.step(loss=(a + b) / 2)
    want = ref.telemetry()
    for key in ("ema_short", "ema_medium", "ema_long", "scalar", "trust", "pulse", "sensed_steps"):
        assert rank0["telemetry"][key] == pytest.approx(want[key], rel=1e-6), key


if __name__ == "__main__":
    run_ddp(Path(sys.argv[1]), sync_loss="--no-sync-loss" not in sys.argv[2:])
    # Both ranks have written their results; skip interpreter teardown, where gloo's
    # threads occasionally abort (SIGABRT, "terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
