"""Rank bodies for ``test_dcp_kill_resume``: FSDP2 + torch.distributed.checkpoint.state_dict.

``save_then_die``: train, save model and optimizer with ``get_state_dict`` + ``dcp.save``,
then SIGKILL itself (the process group dies with it). ``resume_and_reference``: new
processes load with ``set_state_dict`` and continue; then the same ranks run the
uninterrupted reference. Rank 0 writes the full parameters of both to ``<out>/<name>.pt``.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh

from tests.scaleout._fsdp_worker import OPTIMIZERS, full, make_model, shard, train

SAVED_AT, STEPS = 3, 7


def _init(rank: int, world: int, init_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    return init_device_mesh("cpu", (world,))


def save_then_die(rank: int, world: int, init_file: str, out_dir: str) -> None:
    mesh = _init(rank, world, init_file)
    for name, cls in OPTIMIZERS.items():
        model = shard(make_model(), mesh)
        opt = cls(model.parameters())
        train(model, opt, range(SAVED_AT))
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out_dir, name))
    dist.barrier()
    os.kill(os.getpid(), signal.SIGKILL)  # no teardown, no destroy_process_group


def resume_and_reference(rank: int, world: int, init_file: str, out_dir: str) -> None:
    mesh = _init(rank, world, init_file)
    try:
        for name, cls in OPTIMIZERS.items():
            resumed = shard(make_model(), mesh)
            resumed_opt = cls(resumed.parameters())
            model_sd, optim_sd = get_state_dict(resumed, resumed_opt)  # the template
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=os.path.join(out_dir, name))
            set_state_dict(
                resumed,
                resumed_opt,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
            )
            train(resumed, resumed_opt, range(SAVED_AT, STEPS))

            reference = shard(make_model(), mesh)
            reference_opt = cls(reference.parameters())
            train(reference, reference_opt, range(STEPS))
            result = {
                "resumed": [full(p).detach().clone() for p in resumed.parameters()],
                "reference": [full(p).detach().clone() for p in reference.parameters()],
                "telemetry": [resumed_opt.telemetry(), reference_opt.telemetry()],
            }
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)
