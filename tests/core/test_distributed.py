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
            results[f"{name}-{pulse}-lr"] = opt.state["emo_pulse"]["pulse"].clone()
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
