"""``emo-bench quality``: train every contender on every workload over several seeds.

Each run: seed, build the task, ``steps`` optimizer steps of (batch → loss → backward →
step), then the validation metric. The loss history is kept on the device and read once at
the end; the effective LR is read every ``lr_every`` steps (that read may sync, so not every
step). A run *diverges* if its training loss becomes non-finite or the mean of its last
10% of losses ends above 1.5x the mean of its first five (slow is not diverged); diverged
runs stop early and count in ``div``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .contenders import ADAMW_DEFAULT_LR, Contender, quality_contenders
from .workloads import Workload

__all__ = ["QualityRow", "RunResult", "run_quality", "run_one", "summarize"]

_CURVE_POINTS = 100


@dataclass
class RunResult:
    """One (workload, contender, seed) training run."""

    workload: str
    optimizer: str
    seed: int
    steps: int
    metric: float
    diverged: bool
    wall_s: float
    losses: list[float]
    lr_trace: list[tuple[int, float]]


@dataclass
class QualityRow:
    """Aggregate of one contender on one workload over seeds (a table row)."""

    workload: str
    optimizer: str
    family: str
    lr: float
    metric: str
    higher_is_better: bool
    mean: float
    std: float
    values: list[float]
    diverged: int
    seeds: int
    wall_s: float
    lr_min: float
    lr_max: float
    gap_to_tuned_adamw_pct: float | None = None
    role: str = ""
    curve: list[float] = field(default_factory=list, repr=False)
    lr_curve: list[tuple[int, float]] = field(default_factory=list, repr=False)

    def public(self) -> dict:
        """The JSON fields (curves left out)."""
        data = asdict(self)
        data.pop("curve")
        data.pop("lr_curve")
        return data


def run_one(
    workload: Workload,
    contender: Contender,
    seed: int,
    steps: int,
    device: torch.device,
    lr_every: int | None = None,
) -> RunResult:
    """Train one seeded task with one optimizer and return its validation metric and traces."""
    lr_every = lr_every or max(1, steps // 50)
    start = time.perf_counter()
    task = workload.make(seed, device)
    opt = contender.build(task.parameters())
    contender.train_mode(opt)
    losses: list[torch.Tensor] = []
    lr_trace: list[tuple[int, float]] = []
    diverged = False
    for step in range(steps):
        loss = task.train_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        contender.step(opt, loss)
        losses.append(loss.detach())
        if step % lr_every == 0 or step == steps - 1:
            lr_trace.append((step + 1, contender.effective_lr(opt)))
            if not math.isfinite(
                float(loss.detach())
            ):  # checked at the LR cadence: no per-step sync
                diverged = True
                break
    history = torch.stack(losses).double().cpu().tolist()
    contender.eval_mode(opt)
    metric = task.evaluate()
    tail = history[-max(1, len(history) // 10) :]
    if not diverged:
        diverged = (
            not all(math.isfinite(v) for v in history)
            or not math.isfinite(metric)
            or statistics.fmean(tail) > 1.5 * statistics.fmean(history[:5])
        )
    return RunResult(
        workload=workload.name,
        optimizer=contender.name,
        seed=seed,
        steps=steps,
        metric=metric,
        diverged=diverged,
        wall_s=time.perf_counter() - start,
        losses=history,
        lr_trace=lr_trace,
    )


def _mean_curve(runs: list[RunResult], steps: int) -> list[float]:
    """Seed-mean of the training loss, smoothed and thinned to about ``_CURVE_POINTS``."""
    width = max(1, steps // _CURVE_POINTS)
    curves = []
    for r in runs:
        padded = r.losses + [math.nan] * (steps - len(r.losses))
        curves.append([statistics.fmean(padded[i : i + width]) for i in range(0, steps, width)])
    return [statistics.fmean(col) for col in zip(*curves, strict=True)]


def summarize(
    workload: Workload, contender: Contender, runs: list[RunResult], steps: int
) -> QualityRow:
    """Mean ± std of the final metric over seeds (finite values), divergences, LR range."""
    finite = [r.metric for r in runs if math.isfinite(r.metric)]
    lrs = [lr for r in runs for _, lr in r.lr_trace if math.isfinite(lr)]
    lr_curve = runs[0].lr_trace if runs else []
    return QualityRow(
        workload=workload.name,
        optimizer=contender.name,
        family=contender.family,
        lr=contender.lr,
        metric=workload.metric,
        higher_is_better=workload.higher_is_better,
        mean=statistics.fmean(finite) if finite else math.nan,
        std=statistics.stdev(finite) if len(finite) > 1 else 0.0,
        values=[r.metric for r in runs],
        diverged=sum(r.diverged for r in runs),
        seeds=len(runs),
        wall_s=statistics.fmean(r.wall_s for r in runs),
        lr_min=min(lrs) if lrs else math.nan,
        lr_max=max(lrs) if lrs else math.nan,
        curve=_mean_curve(runs, steps),
        lr_curve=lr_curve,
    )


def _score(row: QualityRow) -> float:
    """Larger is better; diverged or non-finite configurations rank last."""
    if row.diverged or not math.isfinite(row.mean):
        return -math.inf
    return row.mean if row.higher_is_better else -row.mean


def gap_pct(row: QualityRow, reference: QualityRow) -> float:
    """How much worse than ``reference`` in percent (negative: better)."""
    if not (math.isfinite(row.mean) and math.isfinite(reference.mean)) or reference.mean == 0:
        return math.nan
    worse = reference.mean - row.mean if row.higher_is_better else row.mean - reference.mean
    return 100.0 * worse / abs(reference.mean)


def mark_roles(rows: list[QualityRow]) -> list[QualityRow]:
    """Tag the tuned (best-of-sweep) and default AdamW rows and fill the gap column."""
    adamw = [r for r in rows if r.family == "adamw"]
    if not adamw:
        return rows
    tuned = max(adamw, key=_score)
    tuned.role = "tuned"
    for r in adamw:
        if r.lr == ADAMW_DEFAULT_LR:
            r.role = (r.role + ",default").strip(",")
    for r in rows:
        r.gap_to_tuned_adamw_pct = gap_pct(r, tuned)
    return rows


def run_quality(
    workloads: list[Workload],
    contenders: list[Contender] | None = None,
    seeds: list[int] | None = None,
    quick: bool = False,
    steps: int | None = None,
    device: torch.device | None = None,
    progress: bool = True,
) -> dict[str, list[QualityRow]]:
    """Rows per workload name, in contender order, with roles and gaps filled in."""
    contenders = contenders or quality_contenders()
    seeds = seeds if seeds is not None else [0, 1, 2]
    device = device or torch.device("cpu")
    plan = [(w, c, s) for w in workloads for c in contenders for s in seeds]
    bar = tqdm(total=len(plan), desc="quality", unit="run", disable=not progress)
    results: dict[str, list[QualityRow]] = {}
    for w in workloads:
        w.make(seeds[0], device)  # load and cache the data outside the timed runs
        n_steps = steps or (w.quick_steps if quick else w.steps)
        rows = []
        for c in contenders:
            runs = []
            for s in seeds:
                bar.set_postfix_str(f"{w.name} · {c.name} · seed {s}")
                runs.append(run_one(w, c, s, n_steps, device))
                bar.update()
            rows.append(summarize(w, c, runs, n_steps))
        results[w.name] = mark_roles(rows)
    bar.close()
    return results
