"""What a run records per optimizer step, its summary, and the loss/LR curve PNG.

``TrainHistory`` has ``state_dict``/``load_state_dict``, so accelerate saves it in
checkpoints (``register_for_checkpointing``) and a resumed run's curve is complete.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["TrainHistory"]


class TrainHistory:
    """Per-step loss (mean over micro-batches), effective LR and wall time."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.seconds: list[float] = []

    def record(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.lrs.append(lr)
        self.seconds.append(seconds)

    def state_dict(self) -> dict[str, list]:
        return {
            "steps": self.steps,
            "losses": self.losses,
            "lrs": self.lrs,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, list]) -> None:
        self.steps = list(state["steps"])
        self.losses = list(state["losses"])
        self.lrs = list(state["lrs"])
        self.seconds = list(state["seconds"])

    def summary(self, window: int = 20) -> dict[str, Any]:
        """Final loss (mean of the last ``window`` steps), finiteness and seconds per step.

        The first step is left out of the timing (it includes one-off setup work).
        """
        tail = self.losses[-window:]
        timed = self.seconds[1:] or self.seconds
        return {
            "steps": self.steps[-1] if self.steps else 0,
            "final_loss": sum(tail) / len(tail) if tail else math.nan,
            "last_loss": self.losses[-1] if self.losses else math.nan,
            "all_finite": all(math.isfinite(v) for v in self.losses),
            "final_lr": self.lrs[-1] if self.lrs else math.nan,
            "seconds_per_step": sum(timed) / len(timed) if timed else math.nan,
        }

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Loss (raw and smoothed) and effective LR (log scale) against the step, as a PNG."""
        from matplotlib.figure import Figure  # no pyplot: no global backend state

        fig = Figure(figsize=(6, 4.5), dpi=80)
        ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
        ax_loss.plot(self.steps, self.losses, color="0.75", linewidth=0.8, label="loss")
        ax_loss.plot(self.steps, _ema(self.losses, 0.1), color="C0", label="loss (EMA 0.1)")
        ax_loss.set_ylabel("flow-matching loss")
        ax_loss.legend(loc="upper right", fontsize=8)
        ax_loss.set_title(title, fontsize=9)
        ax_lr.plot(self.steps, self.lrs, color="C1")
        if self.lrs and min(self.lrs) > 0:
            ax_lr.set_yscale("log")
        ax_lr.set_ylabel("effective LR")
        ax_lr.set_xlabel("optimizer step")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path


def _ema(values: list[float], alpha: float) -> list[float]:
    out, current = [], None
    for v in values:
        current = v if current is None else alpha * v + (1 - alpha) * current
        out.append(current)
    return out
