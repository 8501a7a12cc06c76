"""Loss curves of several train_lora_flow runs in one PNG, and their summary as a table.

    python integrations/diffusers/results/compare.py OUT/sd3_emosens OUT/sd3_adamw ... \\
        --png integrations/diffusers/results/sd3_bf16_optimizers.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, current = [], None
    for v in values:
        current = v if current is None else alpha * v + (1 - alpha) * current
        out.append(current)
    return out


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("runs", nargs="+", type=Path, help="output_dir of each run")
    cli.add_argument("--png", type=Path, required=True)
    opts = cli.parse_args()

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=80)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
    print("| run | optimizer | bf16 rounding | final loss (last 20 steps) | s/step | train s |")
    print("|---|---|---|---|---|---|")
    for run in opts.runs:
        history = json.loads((run / "history.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        ax_loss.plot(history["steps"], _ema(history["losses"]), label=run.name)
        ax_lr.plot(history["steps"], history["lrs"], label=run.name)
        emo = metrics["optimizer"].startswith("emo")
        rounding = ("stochastic" if metrics["stochastic_rounding"] else "nearest") if emo else "-"
        print(
            f"| {run.name} | {metrics['optimizer']} | {rounding} "
            f"| {metrics['final_loss']:.4f} | {metrics['seconds_per_step']:.3f} "
            f"| {sum(history['seconds']):.0f} |"
        )
    ax_loss.set_ylabel("loss (EMA 0.1)")
    ax_loss.legend(fontsize=7)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("effective LR")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(opts.png)


if __name__ == "__main__":
    main()
