"""FSDP2, 2 gloo ranks: a state dict that is invalid in one rank's shards only is refused on
every rank, and no rank changes (before, the other rank loaded it: one optimizer, two
states; the loss sensor and step of rank 0 no longer matched rank 1's)."""

from __future__ import annotations

import pytest
import torch

from emo_core.distributed import local_shard
from tests.scaleout._fsdp_worker import OPTIMIZERS, make_model, shard, train
from tests.scaleout._ranks import spawn_ranks

pytestmark = pytest.mark.distributed
NAMES = ("emosens", "emoairy", "emocats", "emosens-average-distance")


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name in NAMES:
        model = shard(make_model(), mesh)
        opt = OPTIMIZERS[name](model.parameters())
        train(model, opt, range(3))
        saved = opt.state_dict()
        first = saved["state"][0]
        key = next(k for k, v in first.items() if hasattr(v, "to_local"))
        damaged = first[key].clone()
        if rank == 1:  # a nan in rank 1's shard only
            damaged.to_local().view(-1)[0] = float("nan")
        saved = {**saved, "state": {**saved["state"], 0: {**first, key: damaged}}}

        other = shard(make_model(), mesh)
        other_opt = OPTIMIZERS[name](other.parameters())
        train(other, other_opt, range(2))
        before = [
            {k: local_shard(v).clone() for k, v in other_opt.state[p].items()}
            for p in other.parameters()
        ]
        telemetry = other_opt.telemetry()
        try:
            other_opt.load_state_dict(saved)
            error = None
        except ValueError as refusal:
            error = str(refusal)
        unchanged = telemetry == other_opt.telemetry() and all(
            torch.equal(local_shard(v), state[k])
            for p, state in zip(other.parameters(), before)
            for k, v in other_opt.state[p].items()
        )
        train(other, other_opt, range(2, 4))  # training goes on, ranks in step
        results[name] = {"error": error, "unchanged": unchanged}
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn_ranks(_worker, 2, tmp_path_factory.mktemp("refused"))


@pytest.mark.parametrize("name", NAMES)
def test_a_shard_refused_on_one_rank_is_refused_on_every_rank(results: list, name: str) -> None:
    rank0, rank1 = results[0][name], results[1][name]
    assert rank1["error"] is not None and "Invalid state_dict" in rank1["error"]
    assert rank0["error"] is not None and "refused on 1 other rank" in rank0["error"]
    assert rank0["unchanged"] and rank1["unchanged"]
