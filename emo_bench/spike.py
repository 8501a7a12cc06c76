"""Loss-spike response: does a one-step spike cut the effective LR, and does it recover?

``spike_response(factory)`` trains a workload (default: the digits MLP) and at
``spike_step`` multiplies that step's loss by ``factor`` before ``backward()`` (so the
gradient spikes with it, as a bad batch would). The effective LR is read after every step
(this reads the device: a measurement, not a training loop). Returned numbers:
``lr_before`` (mean over the 10 steps before the spike), ``lr_after`` (the lowest within 5
steps after it), ``lr_recovered`` (mean over steps ``spike_step + 40 .. + 50``), and the full
trace. Usage::

    from emo_bench.spike import spike_response
    from emo_core import EmoSens

    r = spike_response(lambda ps: EmoSens(ps, lr=1.0))
    print(r.lr_before, r.lr_after, r.lr_recovered)
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .contenders import Contender, from_factory
from .workloads import WORKLOADS

__all__ = ["SpikeResponse", "spike_markdown", "spike_response", "spike_rows"]


@dataclass
class SpikeResponse:
    lr_before: float
    lr_after: float
    lr_recovered: float
    lrs: list[float]


def spike_response(
    factory: Callable[[Iterable[Tensor]], torch.optim.Optimizer] | Contender,
    workload: str = "digits",
    spike_step: int = 100,
    factor: float = 10.0,
    seed: int = 0,
) -> SpikeResponse:
    """Train ``spike_step + 51`` steps with one ``factor``x loss at ``spike_step``."""
    if spike_step < 10:
        raise ValueError(f"Invalid spike_step: {spike_step} (expected >= 10)")
    contender = factory if isinstance(factory, Contender) else from_factory(factory)
    task = WORKLOADS[workload].make(seed, torch.device("cpu"))
    opt = contender.build(task.parameters())
    contender.train_mode(opt)
    lrs = []
    for step in range(spike_step + 51):
        loss = task.train_loss()
        if step == spike_step:
            loss = loss * factor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        contender.step(opt, loss)
        lrs.append(contender.effective_lr(opt))
    return SpikeResponse(
        lr_before=statistics.fmean(lrs[spike_step - 10 : spike_step]),
        lr_after=min(lrs[spike_step : spike_step + 5]),
        lr_recovered=statistics.fmean(lrs[spike_step + 40 : spike_step + 50]),
        lrs=lrs,
    )


def spike_rows(contenders: list[Contender]) -> list[dict[str, float | str]]:
    """The probe for every Emo contender: ``optimizer``, ``lr_before``, ``lr_after``,
    ``lr_recovered`` (the JSON ``spike`` field)."""
    rows = []
    for c in contenders:
        if c.family != "emo":
            continue
        r = spike_response(c)
        rows.append(
            {
                "optimizer": c.name,
                "lr_before": r.lr_before,
                "lr_after": r.lr_after,
                "lr_recovered": r.lr_recovered,
            }
        )
    return rows


def spike_markdown(rows: list[dict[str, float | str]]) -> list[str]:
    """A table: effective LR before, just after and 40-50 steps after a 10x loss spike."""
    if not rows:
        return []
    lines = [
        "## Loss spike: one step at 10x loss (digits MLP, step 100, seed 0)",
        "",
        "Effective LR: mean of the 10 steps before, lowest of the 5 steps from the spike on, "
        "mean of steps +40..+50. A sensor that brakes shows *after* < *before*, and recovery "
        "shows *recovered* ≈ *before*.",
        "",
        "| optimizer | before | after | after / before | recovered | recovered / before |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b, a, rec = float(r["lr_before"]), float(r["lr_after"]), float(r["lr_recovered"])
        lines.append(
            f"| **{r['optimizer']}** | {b:.2e} | {a:.2e} | {a / b:.2f} | {rec:.2e} | "
            f"{rec / b:.2f} |"
        )
    return [*lines, ""]
