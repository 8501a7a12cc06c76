"""HSDP (FSDP2 on a 2-D replicate x shard mesh, 4 gloo ranks): the replicas of a shard stay
bitwise equal with bf16 stochastic rounding.

Ranks r and r + 2 hold the same shard and receive the same reduced gradient; the rounding
noise was seeded with the global rank, so they drew different noise and drifted apart (the
fp32 run stayed equal). The seed now mixes in the shard's coordinate only.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emo_core import EmoAiry, EmoCats, EmoSens
from tests.scaleout._ranks import spawn_ranks

pytestmark = pytest.mark.distributed
OPTIMIZERS = {"emosens": EmoSens, "emoairy": EmoAiry, "emocats": EmoCats}


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    results = {}
    for name, cls in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).bfloat16()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = cls(model.parameters())  # stochastic rounding: on for bf16
        for step in range(4):
            gen = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)
            loss = ((model(x.bfloat16()).float() - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss)
        results[name] = [p.to_local().detach().float().clone() for p in model.parameters()]
    return results


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn_ranks(_worker, 4, tmp_path_factory.mktemp("hsdp"), timeout_s=120)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_hsdp_replicas_of_a_shard_round_alike(shards: list[dict], name: str) -> None:
    for replica, twin in ((0, 2), (1, 3)):  # mesh coordinates (0, s) and (1, s)
        for a, b in zip(shards[replica][name], shards[twin][name]):
            assert torch.equal(a, b), f"ranks {replica} and {twin} hold one shard"
    # (the two shards are different parts of the tensors)
    assert any(
        a.shape != b.shape or not torch.equal(a, b)
        for a, b in zip(shards[0][name], shards[1][name])
    )
