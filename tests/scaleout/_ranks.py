"""Run a function on several gloo ranks in fresh processes and collect what each returns."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_ranks(
    body: Callable[[int, int], Any], world: int, out: Path, timeout_s: int = 60
) -> list[Any]:
    """``body(rank, world)`` on ``world`` gloo ranks (one intra-op thread each, a file
    rendezvous in ``out``); returns each rank's result, saved with ``torch.save``."""
    args = (body, world, str(out / "rendezvous"), str(out), timeout_s)
    mp.spawn(_entry, args=args, nprocs=world, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def _entry(
    rank: int, body: Callable[[int, int], Any], world: int, init_file: str, out_dir: str,
    timeout_s: int,
) -> None:  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    try:
        torch.save(body(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo's threads occasionally abort
