"""Training script for ``test_accelerate_ddp``: run by ``accelerate launch --num_processes 2 --cpu``.

Each optimizer trains a tiny regression model under DDP with gradient accumulation; the loss
reaches the optimizer through the ``AcceleratedOptimizer`` (``emo_core.unwrap(opt)``). The
main process writes what it measured to the JSON path given as the only argument.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emo_core

ACCUMULATION = 2


def gather(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def train(name: str, dtype: torch.dtype = torch.float32, seed: int | None = None) -> dict:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    torch.manual_seed(0)  # same data everywhere; the prepared loader shards it per rank
    data = TensorDataset(torch.randn(64, 6), torch.randn(64, 2))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    torch.manual_seed(accelerator.process_index)  # replicas must not rely on equal init
    opt = emo_core.get_optimizer(name)(model.parameters())
    if seed is not None:
        opt.emo_state["emo_meta"]["seed"] = seed
    model, opt, loader = accelerator.prepare(
        model, opt, DataLoader(data, batch_size=4, shuffle=False)
    )
    emo = emo_core.unwrap(opt)
    micro_losses: list[float] = []
    first_step_ema = None
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
            accelerator.backward(loss)
            emo.add_loss(loss)  # the step senses the mean of its micro-batch losses
            micro_losses.append(loss.item())
            opt.step()  # AcceleratedOptimizer: steps only when gradients are synced
            opt.zero_grad()
        if first_step_ema is None and accelerator.sync_gradients:
            first_step_ema = emo.telemetry()["ema_short"]  # = the first sensed loss
    params = [p.detach().float().flatten() for p in model.parameters()]
    replicas = gather(torch.cat(params).tolist())
    first_losses = gather(micro_losses[:ACCUMULATION])
    telemetry = emo.telemetry()
    accelerator.free_memory()
    return {
        "wrapped": isinstance(opt, AcceleratedOptimizer),
        "unwrap_is_inner": emo is opt.optimizer,
        "replicas_identical": all(r == replicas[0] for r in replicas),
        "replica_max_diff": max(abs(a - b) for a, b in zip(replicas[0], replicas[-1])),
        "first_sensed_loss": first_step_ema,
        "first_step_global_mean": sum(sum(r) for r in first_losses) / sum(map(len, first_losses)),
        "steps": telemetry["step"],
        "micro_batches": len(micro_losses),
        "skipped": telemetry["skipped_steps"],
        "lr": emo.get_effective_lr(),
        "world": dist.get_world_size(),
    }


def main(out_path: str) -> None:
    results = {name: train(name) for name in ("emosens", "emoairy", "emocats")}
    results["emosens-bf16"] = train("emosens", torch.bfloat16)
    results["emosens-bf16-same-seed"] = train("emosens", torch.bfloat16, seed=1234)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
    # Skip interpreter teardown, where gloo's threads occasionally abort (SIGABRT).
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
