"""Under torch.distributed every rank computes the same LR, so replicas stay identical."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from emo_core._base import PULSES
from tests.core.cases import OPTIMIZERS, small_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, sync_loss: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for (name, cls), pulse in itertools.product(OPTIMIZERS.items(), PULSES):
            model = small_model(seed=0)
            params = list(model.parameters())
            opt = cls(params, sync_loss=sync_loss, pulse=pulse)
            gen = torch.Generator().manual_seed(rank)  # each rank sees different data
            for step in range(20):
                for p in params:
                    # a consistent direction plus rank-local noise
                    p.grad = 1.0 + torch.randn(p.shape, generator=gen)
                    dist.all_reduce(p.grad)  # averaged as DDP does
                    p.grad /= world
                local_loss = 1.0 / (step + 1) + rank * (step % 3)  # ranks disagree
                opt.step(loss=torch.tensor(local_loss))
            results[f"{name}-{pulse}"] = [p.detach().clone() for p in params]
            results[f"{name}-{pulse}-lr"] = opt.emo_state["emo_pulse"]["pulse"].clone()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo's threads occasionally abort


def _run(tmp_path, sync_loss: bool) -> tuple[dict, dict]:
    mp.spawn(_worker, args=(2, _free_port(), sync_loss, str(tmp_path)), nprocs=2, join=True)
    return (
        torch.load(tmp_path / "rank0.pt", weights_only=True),
        torch.load(tmp_path / "rank1.pt", weights_only=True),
    )


@pytest.mark.distributed
def test_replicas_identical_with_sync_loss_and_drift_without(tmp_path) -> None:
    (tmp_path / "sync").mkdir()
    (tmp_path / "local").mkdir()
    rank0, rank1 = _run(tmp_path / "sync", sync_loss=True)
    runs = [f"{name}-{pulse}" for name in OPTIMIZERS for pulse in PULSES]
    for run in runs:
        for a, b in zip(rank0[run], rank1[run]):
            assert torch.equal(a, b), run
        assert torch.equal(rank0[f"{run}-lr"], rank1[f"{run}-lr"]), run
    for name in OPTIMIZERS:  # the distance controller has grown its scale (it is in use)
        assert float(rank0[f"{name}-distance-lr"]) > 1e-5, name
    # The upstream defect, kept as a test: rank-local losses give rank-local LRs.
    rank0, rank1 = _run(tmp_path / "local", sync_loss=False)
    for run in runs:
        assert not all(torch.equal(a, b) for a, b in zip(rank0[run], rank1[run])), run


# What each rank feeds at each step: "loss", "none" (step() without a loss), "none-nan"
# (no loss and a nan gradient), "closure-none" (a closure returning None).
FEEDS = {
    3: ("loss", "none"),
    5: ("none", "none"),
    7: ("none-nan", "loss"),
    9: ("closure-none", "loss"),
}


def _missing_loss_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import datetime

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        results = {}
        for name, cls in OPTIMIZERS.items():
            model = small_model(seed=0)
            params = list(model.parameters())
            opt = cls(params)
            gen = torch.Generator().manual_seed(rank)
            trace = []
            for step in range(12):
                feed = FEEDS.get(step, ("loss", "loss"))[rank]
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                    dist.all_reduce(p.grad)
                    p.grad /= world
                if feed == "none-nan":
                    params[0].grad[0, 0] = float("nan")
                if feed == "loss":
                    opt.step(loss=torch.tensor(1.0 / (step + 1) + rank))
                elif feed == "closure-none":
                    opt.step(lambda: None)  # gradients present, no loss returned
                else:
                    opt.step()
                trace.append(opt.telemetry())
            results[name] = {"params": [p.detach().clone() for p in params], "trace": trace}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.distributed
def test_a_rank_without_a_loss_joins_the_same_collective(tmp_path) -> None:
    """Before: a rank stepping without a loss skipped the loss all-reduce; the next
    collectives mismatched and both ranks died. Now every rank runs the same all-reduce of
    [loss * has_loss, has_loss]: ranks without a loss contribute nothing."""
    mp.spawn(
        _missing_loss_worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in OPTIMIZERS:
        for a, b in zip(rank0[name]["params"], rank1[name]["params"]):
            assert torch.equal(a, b), name
        trace0, trace1 = rank0[name]["trace"], rank1[name]["trace"]
        assert trace0 == trace1, name  # every rank computed the same sensor and LR
        sensed = [t["sensed_steps"] for t in trace0]
        skipped = [t["skipped_steps"] for t in trace0]
        # Step 3: only rank 0 had a loss -> sensed (its loss alone, 1/4 + 0).
        assert sensed[3] == sensed[2] + 1
        assert trace0[3]["ema_short"] != trace0[2]["ema_short"]
        # Step 5: no rank had a loss -> no information: nothing sensed, nothing skipped.
        assert sensed[5] == sensed[4] and skipped[5] == skipped[4]
        assert trace0[5]["pulse"] == trace0[4]["pulse"]
        # Step 7: the rank without a loss had a nan gradient -> every rank skipped.
        assert skipped[7] == skipped[6] + 1 and sensed[7] == sensed[6]
        # Step 9: a closure returning None on rank 0 -> rank 1's loss alone.
        assert sensed[9] == sensed[8] + 1
        assert skipped[-1] == 1
