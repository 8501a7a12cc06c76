"""Table and plot of several train_lora_flow runs: loss, LR, sample accuracy, time, memory.

    python integrations/diffusers/results/compare.py OUT/sd3_emosens OUT/sd3_adamw ... \\
        --png integrations/diffusers/results/sd3_bf16_optimizers.png \\
        --md integrations/diffusers/results/sd3_bf16_optimizers.md
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


def _label(metrics: dict) -> str:
    name = metrics["optimizer"]
    lr = metrics.get("learning_rate")
    if lr is not None:
        name += f" lr={lr:g}"
    if metrics.get("optimizer_args"):
        name += " " + ",".join(f"{k}={v}" for k, v in metrics["optimizer_args"].items())
    return name


def table(runs: list[Path]) -> str:
    lines = [
        "| run | optimizer | bf16 rounding | final loss | sample_accuracy_lora "
        "| s/step | optimizer state |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        emo = m["optimizer"].startswith("emo")
        rounding = ("stochastic" if m["stochastic_rounding"] else "nearest") if emo else "nearest"
        lines.append(
            f"| {run.name} | {_label(m)} | {rounding} | {m['final_loss']:.4f} "
            f"| {m.get('sample_accuracy_lora', float('nan')):.2f} "
            f"| {m['seconds_per_step']:.3f} | {m['optimizer_state_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines)


def plot(runs: list[Path], png: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(7, 7), dpi=80)
    ax_loss, ax_lr, ax_acc = fig.subplots(3, 1)
    names, accuracies = [], []
    for run in runs:
        history = json.loads((run / "history.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        ax_loss.plot(history["steps"], _ema(history["losses"]), label=run.name)
        ax_lr.plot(history["steps"], history["lrs"], label=run.name)
        names.append(run.name)
        accuracies.append(metrics.get("sample_accuracy_lora", 0.0))
    ax_loss.set_ylabel("loss (EMA 0.1)")
    ax_loss.legend(fontsize=6, ncol=2)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("effective LR")
    ax_lr.set_xlabel("optimizer step")
    ax_acc.barh(names, accuracies, color="C2")
    ax_acc.set_xlim(0, 1)
    ax_acc.set_xlabel("sample_accuracy_lora (classifier on samples of digits 5-9)")
    ax_acc.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(png)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("runs", nargs="+", type=Path, help="output_dir of each run")
    cli.add_argument("--png", type=Path, required=True)
    cli.add_argument("--md", type=Path, default=None, help="also write the table here")
    opts = cli.parse_args()
    text = table(opts.runs)
    print(text)
    if opts.md:
        opts.md.write_text(text + "\n")
    plot(opts.runs, opts.png)


if __name__ == "__main__":
    main()
