"""Wall time per optimizer step of the tiny SD3 bf16 LoRA run, per optimizer.

On a shared machine single runs are noisy, so the optimizers take turns: each round times
``--steps`` training steps of every optimizer, and the table reports the median and the
minimum over rounds (the minimum is the least disturbed figure).

    python integrations/diffusers/results/time_steps.py --rounds 7 --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from emo_diffusers.train_lora_flow import build_training, parse_args, train_step

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "configs", "diffusers", "tiny_sd3_lora.yaml"
)
RUNS = {
    "emosens": ["--optimizer", "emosens"],
    "adamw (lr 1e-4)": ["--optimizer", "adamw", "--learning_rate", "1e-4"],
    "prodigy": ["--optimizer", "prodigy"],
}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--rounds", type=int, default=7)
    cli.add_argument("--steps", type=int, default=10)
    cli.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16"])
    opts = cli.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        setups = {}
        for name, extra in RUNS.items():
            argv = ["--config", CONFIG, "--output_dir", tmp, "--report_to", "none"]
            argv += ["--mixed_precision", opts.mixed_precision, *extra]
            setups[name] = build_training(parse_args(argv))
            for i in range(3):  # warm-up
                train_step(setups[name], i)
        times = {name: [] for name in setups}
        for r in range(opts.rounds):
            for name, setup in setups.items():
                start = time.perf_counter()
                for i in range(opts.steps):
                    train_step(setup, 3 + r * opts.steps + i)
                times[name].append((time.perf_counter() - start) / opts.steps)
    print(
        f"load average {os.getloadavg()[0]:.2f} after the runs, torch threads {torch.get_num_threads()}"
    )
    print("| optimizer | median s/step | min s/step |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} |")


if __name__ == "__main__":
    main()
