"""Rank body for ``test_fsdp2``: FSDP2 (``fully_shard``, DTensor parameters) against DDP.

Runs in each of two gloo processes started by ``torch.multiprocessing.spawn``; rank 0
writes what it measured to ``<out_dir>/fsdp2.json`` for the test to assert on.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from emo_core import EmoAiry, EmoCats, EmoSens

CLASSES = {"emosens": EmoSens, "emoairy": EmoAiry, "emocats": EmoCats}
# Each name keeps its configuration explicit: the bare names are upstream's v3.7 pulse (SPEC
# §2, one LR from the loss alone).
OPTIMIZERS = {name: functools.partial(cls, pulse="v37") for name, cls in CLASSES.items()}
# The distance controller too (its sample spans the shards), here without averaging. It
# starts at 1e-6 and lr multiplies what it finds: lr=1e3 makes STEPS steps move bf16
# parameters measurably (the scale itself grows as at lr=1: the distance is counted in lr=1
# units).
OPTIMIZERS.update(
    {
        f"{name}-distance": functools.partial(
            cls, pulse="distance", lr=1e3, **({} if cls is EmoAiry else {"average": False})
        )
        for name, cls in CLASSES.items()
    }
)
# and Schedule-Free averaging on it (x sharded like its parameter): with emoairy-distance,
# the defaults.
OPTIMIZERS.update(
    {
        f"{name}-average-distance": functools.partial(
            CLASSES[name], pulse="distance", average=True, lr=1e3
        )
        for name in ("emosens", "emocats")
    }
)
STEPS = 6


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Same initial weights on every rank; 5 rows in the middle layer shard unevenly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return model.to(dtype)


def shard(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(t: Any) -> Any:
    return t.full_tensor() if isinstance(t, DTensor) else t


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    before_step: Callable[[int], None] | None = None,
) -> None:
    """Rank-dependent batches (as a distributed sampler gives), loss fed to the optimizer."""
    rank = dist.get_rank()
    dtype = next(model.parameters()).dtype
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(4, 8, generator=gen).to(dtype)
        y = torch.randn(4, 3, generator=gen).to(dtype)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step(step)
        opt.step(loss=loss)


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max((full(x).float() - full(y).float()).abs().max().item() for x, y in zip(a, b))


def compare_with_ddp(name: str, mesh: DeviceMesh) -> dict[str, Any]:
    """Train the same data sharded and replicated; compare parameters, state and LR."""
    cls = OPTIMIZERS[name]
    sharded = shard(make_model(), mesh)
    opt = cls(sharded.parameters())
    train(sharded, opt, range(STEPS))

    replica = make_model()
    ref = cls(replica.parameters())
    train(DistributedDataParallel(replica), ref, range(STEPS))

    params, ref_params = list(sharded.parameters()), list(replica.parameters())
    state_diff, shapes = 0.0, {}
    for index, (p, q) in enumerate(zip(params, ref_params)):
        for key, value in opt.state[p].items():
            state_diff = max(state_diff, max_diff([value], [ref.state[q][key]]))
            shapes[f"{index}.{key}"] = list(full(value).shape)
    lrs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(lrs, opt.get_effective_lr())
    return {
        "param_diff": max_diff(params, ref_params),
        "state_diff": state_diff,
        "moved": max_diff(params, list(make_model().parameters())),
        "sharded": all(isinstance(p, DTensor) for p in params),
        "local_rows": [p.to_local().shape[0] for p in params],
        "state_shapes": shapes,
        "param_shapes": [list(p.shape) for p in params],
        "lrs": lrs,
        "ref_lr": ref.get_effective_lr(),
        # the distance controller's numerator (its sample of x0 − x and g, summed) per
        # group, sharded and replicated: equal only if the sample spans the shards
        "num": opt.emo_state["emo_distance"]["num"].tolist()
        if "emo_distance" in opt.emo_state
        else None,
        "ref_num": ref.emo_state["emo_distance"]["num"].tolist()
        if "emo_distance" in ref.emo_state
        else None,
        "skipped": opt.telemetry()["skipped_steps"],
    }


def empty_shard(name: str, mesh: DeviceMesh) -> dict[str, Any]:
    """A one-row head (``Linear(6, 1)``: rank 1's shard of its weight is empty) trained
    sharded and replicated (EmoAiry's column statistic kept the row sharding there and
    every rank failed in the update)."""
    cls = OPTIMIZERS[name]

    def head() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1))

    sharded, replica = shard(head(), mesh), head()
    opt, ref = cls(sharded.parameters()), cls(replica.parameters())
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen)
        for model, optimizer in ((sharded, opt), (DistributedDataParallel(replica), ref)):
            loss = ((model(x) - y) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(loss=loss)
    params, ref_params = list(sharded.parameters()), list(replica.parameters())
    rows: list[Any] = [None] * dist.get_world_size()  # every rank's local rows
    dist.all_gather_object(rows, [p.to_local().shape[0] for p in params])
    return {
        "local_rows": rows,
        "param_diff": max_diff(params, ref_params),
        "moved": max_diff(params, list(head().parameters())),
    }


def nonfinite_shard(name: str, mesh: DeviceMesh) -> dict[str, Any]:
    """A nan in one rank's gradient shard: every rank skips the step and changes nothing."""
    model = shard(make_model(), mesh)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, range(2))
    before = [full(p).clone() for p in model.parameters()]

    def poison(_: int) -> None:
        if dist.get_rank() == 1:
            next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")

    train(model, opt, range(2, 3), before_step=poison)
    skipped: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(skipped, opt.telemetry()["skipped_steps"])
    return {"unchanged": max_diff(list(model.parameters()), before) == 0.0, "skipped": skipped}


def materialize_state(opt: torch.optim.Optimizer) -> None:
    """Create the lazy per-parameter state with one zero-gradient step (the load overwrites it)."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step(loss=0.0)
    opt.zero_grad()


def dcp_resume(name: str, mesh: DeviceMesh, path: str) -> dict[str, Any]:
    """Save model + ``opt.state_dict()`` with DCP mid-run; the resumed run must be bitwise equal."""
    cls = OPTIMIZERS[name]
    model = shard(make_model(), mesh)
    opt = cls(model.parameters())
    train(model, opt, range(3))
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
    train(model, opt, range(3, STEPS))

    resumed = shard(make_model(), mesh)
    resumed_opt = cls(resumed.parameters())
    materialize_state(resumed_opt)  # DCP loads in place: the state must exist first
    state = {"model": resumed.state_dict(), "optim": resumed_opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optim"])
    train(resumed, resumed_opt, range(3, STEPS))
    return {
        "param_diff": max_diff(list(model.parameters()), list(resumed.parameters())),
        "telemetry_equal": opt.telemetry() == resumed_opt.telemetry(),
        "steps": [opt.telemetry()["step"], resumed_opt.telemetry()["step"]],
    }


def dcp_helpers(name: str, mesh: DeviceMesh, path: str) -> dict[str, Any]:
    """``torch.distributed.checkpoint.state_dict`` get/set helpers, round-tripped through DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    cls = OPTIMIZERS[name]
    model = shard(make_model(), mesh)
    opt = cls(model.parameters())
    train(model, opt, range(3))
    try:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        train(model, opt, range(3, STEPS))
        resumed = shard(make_model(), mesh)
        resumed_opt = cls(resumed.parameters())
        model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(
            resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        train(resumed, resumed_opt, range(3, STEPS))
    except Exception as error:  # reported to the test, which states the gap
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    diff = max_diff(list(model.parameters()), list(resumed.parameters()))
    return {"ok": diff == 0.0, "error": f"resumed run differs by {diff}"}


def bf16(name: str, mesh: DeviceMesh) -> dict[str, Any]:
    """bf16 parameters under FSDP2: fp32 state; moves with stochastic rounding; RTN equals DDP."""
    cls = OPTIMIZERS[name]
    out: dict[str, Any] = {}
    for rounding in (True, False):
        model = shard(make_model(torch.bfloat16), mesh)
        opt = cls(model.parameters(), stochastic_rounding=rounding)
        train(model, opt, range(STEPS))
        params = list(model.parameters())
        out[f"sr={rounding}"] = {
            "moved": max_diff(params, list(make_model(torch.bfloat16).parameters())),
            "finite": all(bool(torch.isfinite(full(p)).all()) for p in params),
            "state_dtypes": sorted(
                {str(v.dtype) for p in params for v in opt.state[p].values() if v.dim() > 0}
            ),
        }
        if not rounding:
            replica = make_model(torch.bfloat16)
            ref = cls(replica.parameters(), stochastic_rounding=False)
            train(DistributedDataParallel(replica), ref, range(STEPS))
            out[f"sr={rounding}"]["ddp_diff"] = max_diff(params, list(replica.parameters()))
    return out


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """``torch.multiprocessing.spawn`` entry point."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results: dict[str, Any] = {}
        for name in OPTIMIZERS:
            results[name] = {
                "compare": compare_with_ddp(name, mesh),
                "nonfinite": nonfinite_shard(name, mesh),
                "empty_shard": empty_shard(name, mesh),
                "dcp": dcp_resume(name, mesh, os.path.join(out_dir, f"{name}-plain")),
                "dcp_helpers": dcp_helpers(name, mesh, os.path.join(out_dir, f"{name}-helpers")),
                "bf16": bf16(name, mesh),
            }
        if rank == 0:
            with open(os.path.join(out_dir, "fsdp2.json"), "w") as f:
                json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown, where gloo's threads occasionally abort (SIGABRT) after
    # the results are written; an exception above still propagates with its traceback.
    os._exit(0)
