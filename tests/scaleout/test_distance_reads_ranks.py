"""2 gloo ranks, a model of 140 tensors (its distance sample read every 3rd call): the ranks
agree on when to read (a host count of calls, the same on every rank), so DDP replicas stay
bitwise identical and FSDP2 shards find DDP's scale."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emo_core import EmoAiry, EmoCats, EmoSens
from tests.scaleout._ranks import spawn_ranks

pytestmark = pytest.mark.distributed
CLASSES = {"emosens": EmoSens, "emoairy": EmoAiry, "emocats": EmoCats}  # their defaults
STEPS = 10
BLOCKS = 70


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(BLOCKS)))


def _train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    rank = dist.get_rank()
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, cls in CLASSES.items():
        replica = _model()
        ref = cls(replica.parameters(), lr=1e3)  # (lr: the 10 steps move the parameters)
        _train(DistributedDataParallel(replica), ref)
        sharded = _model()
        for block in sharded:
            fully_shard(block[0], mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        opt = cls(sharded.parameters(), lr=1e3)
        _train(sharded, opt)
        results[name] = {
            "period": ref._plan["plan"].period,
            "params": [p.detach().clone() for p in replica.parameters()],
            "distance": {k: v.clone() for k, v in ref.emo_state["emo_distance"].items()},
            "sharded_params": [p.full_tensor() for p in sharded.parameters()],
            "sharded_num": opt.emo_state["emo_distance"]["num"].clone(),
            "sharded_lr": opt.get_effective_lr(),
            "lr": ref.get_effective_lr(),
        }
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn_ranks(_worker, 2, tmp_path_factory.mktemp("reads"), timeout_s=120)


@pytest.mark.parametrize("name", list(CLASSES))
def test_ddp_replicas_stay_identical_between_reads(results: list, name: str) -> None:
    rank0, rank1 = results[0][name], results[1][name]
    assert rank0["period"] == 3
    for p, q in zip(rank0["params"], rank1["params"]):
        assert torch.equal(p, q)
    for key, value in rank0["distance"].items():
        assert torch.equal(value, rank1["distance"][key]), key
    assert rank0["distance"]["num"][0] > 0, "the sample read no distance"


@pytest.mark.parametrize("name", list(CLASSES))
def test_fsdp2_finds_ddps_scale(results: list, name: str) -> None:
    rank0 = results[0][name]
    assert rank0["sharded_num"].tolist() == pytest.approx(
        rank0["distance"]["num"].tolist(), rel=1e-4
    )
    assert rank0["sharded_lr"] == pytest.approx(rank0["lr"], rel=1e-5)
    for p, q in zip(rank0["sharded_params"], rank0["params"]):
        assert (p - q).abs().max() <= 1e-5
