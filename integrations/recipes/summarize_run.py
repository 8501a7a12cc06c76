"""Summarise one drop-in run: the loss the script logged and the LR actually applied.

Reads the script's own TensorBoard scalars (``loss/current`` for kohya, ``loss`` for the
diffusers examples) and the ``--trace`` file of ``run_offline.py``, and prints one JSON
object: steps, mean loss over the first and last ``--window`` steps, the LR the script
logged, and the applied LR (``emo_lr`` for Emo optimizers, the group lr otherwise).

    python integrations/recipes/summarize_run.py RUN_LOG_DIR RUN/trace.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean

LOSS_TAGS = ("loss/current", "loss", "train_loss")


def read_scalars(log_dir: Path) -> dict[str, list[float]]:
    """All scalar series found in the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[float]] = {}
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return series


def read_trace(trace: Path) -> list[dict]:
    return [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]


def summarize(log_dir: Path, trace: Path | None, window: int = 10) -> dict[str, object]:
    scalars = read_scalars(log_dir)
    tag = next((t for t in LOSS_TAGS if t in scalars), None)
    if tag is None:
        raise ValueError(f"no loss series in {log_dir} (looked for {', '.join(LOSS_TAGS)})")
    losses = scalars[tag]
    summary: dict[str, object] = {
        "steps": len(losses),
        f"loss_first{window}": round(fmean(losses[:window]), 4),
        f"loss_last{window}": round(fmean(losses[-window:]), 4),
        "logged_lr_last": {t: v[-1] for t, v in scalars.items() if t.startswith("lr")},
    }
    if trace is not None and trace.is_file():
        steps = read_trace(trace)
        key = "emo_lr" if steps and "emo_lr" in steps[-1] else "lr"
        applied = [step[key][0] for step in steps]
        summary.update(
            optimizer=steps[-1]["optimizer"] if steps else None,
            applied_lr_key=key,
            applied_lr_first=applied[0] if applied else None,
            applied_lr_last=applied[-1] if applied else None,
            applied_lr_min=min(applied, default=None),
            applied_lr_max=max(applied, default=None),
        )
        if steps and "sensed_steps" in steps[-1]:
            summary["sensed_steps"] = steps[-1]["sensed_steps"]
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log_dir", type=Path)
    parser.add_argument("trace", type=Path, nargs="?")
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args(argv)
    print(json.dumps(summarize(args.log_dir, args.trace, args.window)))


if __name__ == "__main__":
    main()
