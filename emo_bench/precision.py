"""bf16 vs fp32: the digits MLP trained fully in bf16 with each Emo optimizer.

Three precisions per optimizer, same seeds, initialisation and batch order:

- ``fp32``: fp32 parameters (the reference);
- ``bf16 + SR``: bf16 parameters, activations and gradients; fp32 optimizer state and update
  math, parameter writes rounded stochastically (the default for bf16 parameters);
- ``bf16 RTN``: the same with ``stochastic_rounding=False`` (round to nearest).

Reported per cell: the final training loss and validation accuracy of the learned weights
(evaluated in fp32, so the numbers compare weights, not bf16 inference), mean ± std over
seeds, and the share of weights that moved from their initial value at all: an update
smaller than half of bf16's spacing (2^-8 relative) is rounded away by RTN.

    python -m emo_bench.precision                # 800 steps x 3 seeds, about a minute on one core
    python -m emo_bench.precision --steps 200 --seeds 1

Prints the markdown table and writes it to ``emo_bench/results/precision.md``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from emo_core import get_optimizer

from .machine import RESULTS_DIR, describe_machine, machine_line, set_threads
from .workloads.digits import BATCH, load_digits_split

__all__ = ["PRECISIONS", "main", "train"]

OPTIMIZERS = ("emosens", "emocats", "emoairy")
PRECISIONS = {
    "fp32": (torch.float32, None),
    "bf16 + SR": (torch.bfloat16, True),
    "bf16 RTN": (torch.bfloat16, False),
}
DEFAULT_OUT = RESULTS_DIR / "precision.md"  # (an installed package: the working directory)


def train(name: str, precision: str, seed: int, steps: int) -> dict[str, float]:
    """One run; returns final train loss, val accuracy (%) and % of weights that moved."""
    dtype, rounding = PRECISIONS[precision]
    x_train, y_train, x_val, y_val = load_digits_split()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).to(dtype)
    initial = [p.detach().clone() for p in model.parameters()]
    kwargs = {} if rounding is None else {"stochastic_rounding": rounding}
    opt = get_optimizer(name)(model.parameters(), **kwargs)
    opt.emo_state["emo_meta"]["seed"] = seed  # reproducible stochastic rounding
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x_train), (BATCH,), generator=gen)
        loss = F.cross_entropy(model(x_train[idx].to(dtype)), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(loss=loss)
    moved = sum(int((p != q).sum()) for p, q in zip(model.parameters(), initial))
    total = sum(p.numel() for p in initial)
    weights = copy.deepcopy(model).float()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(weights(x_train), y_train))
        accuracy = 100.0 * float((weights(x_val).argmax(dim=1) == y_val).float().mean())
    return {"loss": train_loss, "accuracy": accuracy, "moved": 100.0 * moved / total}


def _cell(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: dict[tuple[str, str], list[dict[str, float]]]) -> str:
    """Markdown: one row per optimizer; loss, accuracy and moved weights per precision."""
    names = list(PRECISIONS)
    header = (
        ["optimizer"]
        + [f"train loss, {p}" for p in names]
        + [f"val acc %, {p}" for p in names]
        + [f"weights moved %, {p}" for p in names[1:]]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in OPTIMIZERS:
        runs = {p: results[(name, p)] for p in names}
        row = [name]
        row += [_cell([r["loss"] for r in runs[p]], 4) for p in names]
        row += [_cell([r["accuracy"] for r in runs[p]], 1) for p in names]
        row += [_cell([r["moved"] for r in runs[p]], 1) for p in names[1:]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emo_bench.precision", description=__doc__)
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="runs per cell (seeds 0..n-1)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default: 1; the MLP is tiny)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be >= 1")
    set_threads(args.threads)
    runs = [(n, p, s) for n in OPTIMIZERS for p in PRECISIONS for s in range(args.seeds)]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    start = time.perf_counter()
    for name, precision, seed in tqdm(runs, desc="precision runs", unit="run"):
        results.setdefault((name, precision), []).append(train(name, precision, seed, args.steps))
    wall = time.perf_counter() - start
    command = shlex.join(["python", "-m", "emo_bench.precision", *(argv or sys.argv[1:])])
    markdown = "\n".join(
        [
            "# bf16 vs fp32: digits MLP (64-128-128-10) trained fully in bf16",
            "",
            table(results),
            "",
            f"{args.steps} steps, batch {BATCH}, seeds 0..{args.seeds - 1} (mean ± std), "
            "lr=1.0 and default arguments. Loss and accuracy of the learned weights evaluated "
            "in fp32 (train loss on all 1438 training images, accuracy on the 359 held-out "
            "ones). bf16 runs keep fp32 optimizer state; SR = stochastic rounding of the "
            "parameter writes (default), RTN = round to nearest.",
            "",
            f"Command: `{command}` ({wall:.0f} s). "
            f"Machine: {machine_line(describe_machine(torch.device('cpu')))}",
            "",
        ]
    )
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
