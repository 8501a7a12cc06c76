"""``emo-bench quality``: train every contender on every workload over several seeds.

Each run: seed, build the task, ``steps`` optimizer steps of (batch → loss → backward →
step), then the validation metric. The loss history is kept on the device and read once at
the end; the effective LR is read every ``lr_every`` steps (that read may sync, so not every
step). A run *diverges* if its training loss becomes non-finite or the mean of its last
10% of losses ends above 1.5x the mean of its first five (slow is not diverged); diverged
runs stop early and count in ``div``.

Python API (for trying an optimizer without the CLI)::

    from emo_bench.quality import run_one, compare
    from emo_bench.workloads import WORKLOADS
    from emo_core import EmoSens

    # one run: final metric, divergence flag, effective-LR trace [(step, lr), ...]
    r = run_one(WORKLOADS["conv"], lambda ps: EmoSens(ps, lr=1.0), seed=0)
    print(r.metric, r.diverged, r.lr_trace[-1])

    # any params -> optimizer factory against the stored tuned-AdamW numbers
    # (emo_bench/results/quality.json, same steps and seeds): gap per workload,
    # workloads within 2%, geometric-mean ratio, divergences, as a markdown table
    print(compare(lambda ps: EmoSens(ps, lr=1.0), name="EmoSens"))

``run_one`` accepts a :class:`~emo_bench.contenders.Contender` or a bare factory (Emo
optimizers get ``step(loss=...)``; the LR trace reads ``group["emo_lr"]`` when present, else
``group["lr"]``). ``compare(..., workloads=["conv", "lora"], seeds=[0])`` narrows it (the
reference is still the stored 3-seed mean); ``reference="measure"`` re-runs the AdamW sweep
instead of reading the stored numbers. The summary math lives in :mod:`emo_bench.summary`.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .contenders import ADAMW_DEFAULT_LR, Contender, from_factory, quality_contenders
from .workloads import WORKLOADS, Workload

__all__ = [
    "QualityRow",
    "RunResult",
    "compare",
    "gap_pct",
    "mark_roles",
    "run_one",
    "run_quality",
    "summarize",
]

_CURVE_POINTS = 100
Factory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


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
    lr_median: float = math.nan
    curve: list[float] = field(default_factory=list, repr=False)
    lr_curve: list[tuple[int, float]] = field(default_factory=list, repr=False)

    def public(self) -> dict:
        """The JSON fields (curves left out)."""
        data = asdict(self)
        data.pop("curve")
        data.pop("lr_curve")
        return data


def _as_contender(contender: Contender | Factory) -> Contender:
    return contender if isinstance(contender, Contender) else from_factory(contender)


def run_one(
    workload: Workload,
    contender: Contender | Factory,
    seed: int,
    steps: int | None = None,
    device: torch.device | None = None,
    lr_every: int | None = None,
) -> RunResult:
    """Train one seeded task with one optimizer (``steps`` default: the workload's full run)
    and return its validation metric, divergence flag and traces."""
    contender = _as_contender(contender)
    steps = steps or workload.steps
    device = device or torch.device("cpu")
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
        lr_median=statistics.median(lrs) if lrs else math.nan,
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


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _pool_run(job: tuple[str, str, int, int, str]) -> RunResult:
    """One run in a worker process: contenders are looked up by name (lambdas don't pickle)."""
    workload, name, seed, steps, device = job
    contender = next(c for c in quality_contenders(lion=True) if c.name == name)
    return run_one(WORKLOADS[workload], contender, seed, steps, torch.device(device))


def _run_all(
    plan: list[tuple[Workload, Contender, int, int]],
    device: torch.device,
    jobs: int,
    bar: Any,
) -> dict[tuple[str, str, int], RunResult]:
    out: dict[tuple[str, str, int], RunResult] = {}
    if jobs <= 1:
        for w, c, s, n in plan:
            bar.set_postfix_str(f"{w.name} · {c.name} · seed {s}")
            out[(w.name, c.name, s)] = run_one(w, c, s, n, device)
            bar.update()
        return out
    known = {c.name for c in quality_contenders(lion=True)}
    custom = sorted({c.name for _, c, _, _ in plan if c.name not in known})
    if custom or any(WORKLOADS.get(w.name) is not w for w, _, _, _ in plan):
        raise ValueError(
            f"Invalid jobs: {jobs} with contenders or workloads not in the registry "
            f"({', '.join(custom) or 'custom workload'}); their factories cannot be sent to "
            "worker processes (use jobs=1)"
        )
    # The slowest workloads first, so the pool does not wait on one long run at the end.
    order = sorted(plan, key=lambda p: -p[3] * (p[0].batch + 8))
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(torch.get_num_threads(),)
    ) as pool:
        work = [(w.name, c.name, s, n, str(device)) for w, c, s, n in order]
        for r in pool.map(_pool_run, work):
            out[(r.workload, r.optimizer, r.seed)] = r
            bar.set_postfix_str(f"{r.workload} · {r.optimizer} · seed {r.seed}")
            bar.update()
    return out


def run_quality(
    workloads: list[Workload],
    contenders: list[Contender] | None = None,
    seeds: list[int] | None = None,
    quick: bool = False,
    steps: int | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    jobs: int = 1,
) -> dict[str, list[QualityRow]]:
    """Rows per workload name, in contender order, with roles and gaps filled in.

    ``jobs > 1`` runs the (workload, contender, seed) runs in that many worker processes
    (registry contenders and workloads only); every run is seeded, so results do not depend
    on ``jobs``.
    """
    contenders = contenders or quality_contenders()
    seeds = seeds if seeds is not None else [0, 1, 2]
    device = device or torch.device("cpu")
    n_steps = {w.name: steps or (w.quick_steps if quick else w.steps) for w in workloads}
    plan = [(w, c, s, n_steps[w.name]) for w in workloads for c in contenders for s in seeds]
    bar = tqdm(total=len(plan), desc="quality", unit="run", disable=not progress)
    if jobs <= 1:
        for w in workloads:
            w.make(seeds[0], device)  # load data, pretrain bases: outside the timed runs
    runs = _run_all(plan, device, jobs, bar)
    bar.close()
    results: dict[str, list[QualityRow]] = {}
    for w in workloads:
        rows = [
            summarize(w, c, [runs[(w.name, c.name, s)] for s in seeds], n_steps[w.name])
            for c in contenders
        ]
        results[w.name] = mark_roles(rows)
    return results


def compare(
    factory: Factory | Contender,
    name: str = "custom",
    workloads: list[str] | None = None,
    seeds: list[int] | None = None,
    reference: str | Any = "stored",
    device: torch.device | None = None,
    jobs: int = 1,
    progress: bool = False,
):
    """Run ``factory`` on the workloads at full steps and compare it with tuned AdamW.

    ``reference``: ``"stored"`` (the tuned-AdamW rows of ``emo_bench/results/quality.json``),
    a path to another ``quality.json``, or ``"measure"`` (run the AdamW sweep now, same
    seeds; ``jobs`` worker processes for that sweep). Returns a
    :class:`emo_bench.summary.Comparison`; ``print`` it for the table.
    """
    from . import summary
    from .contenders import ADAMW_SWEEP, adamw
    from .workloads import get_workloads

    chosen = get_workloads(workloads)
    seeds = seeds if seeds is not None else [0, 1, 2]
    contender = _as_contender(factory)
    if not isinstance(factory, Contender):
        contender = Contender(name, "custom", factory, math.nan)
    if reference == "measure":
        sweep = [adamw(lr) for lr in ADAMW_SWEEP]
        mine = run_quality(chosen, [contender], seeds, device=device, progress=progress)
        ref = run_quality(chosen, sweep, seeds, device=device, progress=progress, jobs=jobs)
        results = {w: mark_roles(mine[w] + ref[w]) for w in mine}
        return summary.Comparison(results, source="measured now")
    stored = summary.load_reference(reference)
    missing = [w.name for w in chosen if w.name not in stored]
    if missing:
        raise ValueError(
            f"Invalid workloads for reference={reference!r}: no stored tuned AdamW for "
            f"{', '.join(missing)} (run `emo-bench quality` first, or reference='measure')"
        )
    mine = {}
    for w in chosen:
        steps = stored[w.name].steps
        runs = [run_one(w, contender, s, steps, device) for s in seeds]
        mine[w.name] = [summarize(w, contender, runs, steps), stored[w.name].row]
        mark_roles(mine[w.name])
    return summary.Comparison(mine, source=str(summary.reference_path(reference)))
