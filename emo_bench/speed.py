"""``emo-bench speed``: optimizer step time, state bytes and host syncs on fixed layouts.

Only ``opt.step()`` is timed: every optimizer steps its own copy of the same parameters
with the same gradients, restored before each timed block because some optimizers (e.g.
Schedule-Free) write into ``p.grad`` (Emo optimizers also get a loss from a fixed trace),
after a warm-up that allocates state. The optimizers are interleaved round-robin, ``repeats`` times, and each
reports the median time per step, so a burst of load on a shared machine hits all of them
alike. Ratios are against torch's AdamW (fused, foreach, for-loop) from the same run.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from emo_core import EmoAiry, EmoCats, EmoOptimizer, EmoSens
from emo_core.averaging import FOLD_EVERY, FOLD_RAMP

from .lion import Lion
from .syncs import count_host_reads, host_step_counters

__all__ = [
    "Layout",
    "SpeedEntry",
    "count_syncs",
    "layouts",
    "profile_steps",
    "roofline",
    "run_speed",
    "sample_period",
    "speed_entries",
    "state_bytes",
]

_SYNC_STEPS = 3


@dataclass(frozen=True)
class Layout:
    """A set of parameter shapes standing in for a model."""

    name: str
    title: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def params(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)


def layouts(quick: bool = False) -> list[Layout]:
    """(a) a dense model of a few big Linear weights, (b) LoRA-like: 400 small tensors."""
    width = 1024 if quick else 2560
    dense = Layout("dense", f"Dense: 4 Linear weights {width}x{width}", ((width, width),) * 4)
    rank, dim = 8, 1024
    lora = Layout(
        "lora",
        f"LoRA-like: 200 pairs of {rank}x{dim} and {dim}x{rank}",
        ((rank, dim), (dim, rank)) * 200,
    )
    return [dense, lora]


@dataclass(frozen=True)
class SpeedEntry:
    """One optimizer configuration for the speed table."""

    name: str
    factory: Callable[[list[Tensor]], torch.optim.Optimizer]
    bytes_moved: int | None = None  # per parameter per step, for the HBM roofline
    compiled: bool = False  # step through torch.compile(opt.step) (warm-up compiles)
    # average=True: steps before timing, so that the average folds at its steady period,
    # and the fewest steps per timed block, so that each block holds one fold
    # (emo_core/averaging.md: every step at first, every FOLD_EVERY-th from step STEADY_CALLS)
    steady_calls: int = 0
    block_steps: int = 0

    def build(self, params: list[Tensor]) -> torch.optim.Optimizer:
        opt = self.factory(params)
        if hasattr(opt, "train") and type(opt).__module__.startswith("schedulefree"):
            opt.train()
        return opt


def _prodigy(ps: list[Tensor]) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(ps, lr=1.0)


def _schedulefree(ps: list[Tensor]) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(ps)


REFERENCE = ("AdamW fused", "AdamW foreach", "AdamW for-loop")
_AVERAGED = {"steady_calls": FOLD_EVERY * FOLD_RAMP, "block_steps": FOLD_EVERY}


def compiled_entries() -> list[SpeedEntry]:
    """The Emo optimizers with ``torch.compile(opt.step)`` (``--compile``; slow warm-up)."""
    return [
        SpeedEntry("EmoSens compiled step", lambda ps: EmoSens(ps, pulse="v37"), compiled=True),
        SpeedEntry("EmoAiry compiled step", lambda ps: EmoAiry(ps, pulse="v37"), compiled=True),
        SpeedEntry("EmoCats compiled step", lambda ps: EmoCats(ps, pulse="v37"), compiled=True),
    ]


def speed_entries(quick: bool = False, device: torch.device | None = None) -> list[SpeedEntry]:
    """torch AdamW's three paths first (the references), then Emo, then the others.

    The rows named by the class alone (and their kernel variants) are upstream's v3.7 pulse,
    the configuration the speed and memory targets were set for; the ``pulse=distance``
    rows are the distance controller without averaging, the ``average=True`` rows with it
    (the EmoSens and EmoCats defaults)."""
    entries = [
        SpeedEntry("AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), 28),
        SpeedEntry("AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        SpeedEntry("AdamW for-loop", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False)),
        SpeedEntry("EmoSens", lambda ps: EmoSens(ps, pulse="v37"), 28),
        SpeedEntry("EmoSens foreach", lambda ps: EmoSens(ps, pulse="v37", foreach=True)),
        SpeedEntry("EmoAiry", lambda ps: EmoAiry(ps, pulse="v37"), 16),
        SpeedEntry("EmoCats", lambda ps: EmoCats(ps, pulse="v37"), 20),
        # The scale-finding controller (its sampled coordinates are read every step).
        SpeedEntry(
            "EmoSens pulse=distance", lambda ps: EmoSens(ps, pulse="distance", average=False), 28
        ),
        SpeedEntry("EmoAiry pulse=distance", lambda ps: EmoAiry(ps, pulse="distance"), 16),
        SpeedEntry(
            "EmoCats pulse=distance", lambda ps: EmoCats(ps, pulse="distance", average=False), 20
        ),
        SpeedEntry(
            "EmoSens pulse=distance average=True",
            lambda ps: EmoSens(ps, pulse="distance", average=True),
            28,
            **_AVERAGED,
        ),
        SpeedEntry(
            "EmoCats pulse=distance average=True",
            lambda ps: EmoCats(ps, pulse="distance", average=True),
            28,
            **_AVERAGED,
        ),
        # The opt-in compiled update (one fused loop per tensor); the first step compiles.
        SpeedEntry(
            "EmoSens compile_update", lambda ps: EmoSens(ps, pulse="v37", compile_update=True), 28
        ),
        SpeedEntry(
            "EmoAiry compile_update", lambda ps: EmoAiry(ps, pulse="v37", compile_update=True), 16
        ),
        SpeedEntry(
            "EmoCats compile_update", lambda ps: EmoCats(ps, pulse="v37", compile_update=True), 20
        ),
        SpeedEntry("Adafactor (torch)", lambda ps: torch.optim.Adafactor(ps, lr=1e-2)),
        SpeedEntry("Lion (reference, foreach)", lambda ps: Lion(ps, lr=1e-4)),
    ]
    if not quick:
        entries += [
            SpeedEntry("EmoSens use_shadow", lambda ps: EmoSens(ps, pulse="v37", use_shadow=True)),
            # What one fused loop per element does for averaging (averaging.md, "Cost").
            SpeedEntry(
                "EmoSens pulse=distance average=True compile_update",
                lambda ps: EmoSens(ps, pulse="distance", average=True, compile_update=True),
                28,
                **_AVERAGED,
            ),
            SpeedEntry("Prodigy", _prodigy),
            SpeedEntry("Schedule-Free AdamW", _schedulefree),
        ]
    return entries


def make_params(layout: Layout, device: torch.device, seed: int = 0) -> list[Tensor]:
    """fp32 parameters with fixed random gradients."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in layout.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.02)
        p.grad = torch.randn(shape, generator=gen, device=device) * 1e-3
        params.append(p)
    return params


def _copy_params(master: list[Tensor]) -> list[Tensor]:
    params = []
    for m in master:
        p = torch.nn.Parameter(m.detach().clone())
        p.grad = m.grad.clone()
        params.append(p)
    return params


@torch.no_grad()
def _reset_grads(params: list[Tensor], master: list[Tensor]) -> None:
    torch._foreach_copy_([p.grad for p in params], [m.grad for m in master])


class _Stepper:
    """Calls ``step`` the way a training loop would (Emo: with this step's loss tensor)."""

    def __init__(
        self, opt: torch.optim.Optimizer, device: torch.device, compiled: bool = False
    ) -> None:
        self.opt = opt
        self.step = torch.compile(opt.step) if compiled else opt.step
        self.is_emo = isinstance(opt, EmoOptimizer)
        trace = 2.0 + torch.cos(torch.arange(64.0)) * 0.1 - torch.arange(64.0) * 0.01
        self.losses = [v.to(device) for v in trace]
        self.i = 0

    def __call__(self) -> None:
        if self.is_emo:
            self.step(loss=self.losses[self.i % len(self.losses)])
            self.i += 1
        else:
            self.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state`` and the Emo optimizers' ``emo_state`` (0-dim
    counters and the loss sensor included)."""
    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                total += value.nbytes
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, list | tuple):
            for v in value:
                visit(v)

    visit(list(opt.state.values()))
    visit(getattr(opt, "emo_state", {}))  # the Emo loss sensor and step counter
    return total


def count_syncs(step: Callable[[], None], opt: torch.optim.Optimizer, steps: int = _SYNC_STEPS):
    """``(syncs, reads)`` per step over ``steps`` calls of ``step`` (see :mod:`.syncs`)."""
    with count_host_reads(host_step_counters(opt)) as seen:
        for _ in range(steps):
            step()
    return seen.syncs / steps, seen.reads / steps


def _time_block(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` calls, with Python's garbage collector paused (as
    ``timeit`` does): a full collection of a process holding torch takes ~0.1 s, and where it
    lands in a block of a few steps would otherwise decide that block's time."""
    _sync(device)
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        return (time.perf_counter() - start) / steps
    finally:
        if collecting:
            gc.enable()


def sample_period(opt: torch.optim.Optimizer) -> int:
    """Steps between reads of an Emo optimizer's distance sample (1 for other optimizers
    and the v3.7 pulse): a timed block spans a whole number of them."""
    plan = getattr(opt, "_plan", {}).get("plan")
    return 1 if plan is None else plan.period


def _block_steps(steps: int, entry: SpeedEntry, opt: torch.optim.Optimizer) -> int:
    """Steps per timed block: at least ``steps`` and the entry's own (a whole fold period
    of the averaged rows), rounded up to whole reads of the distance sample."""
    block = max(steps, entry.block_steps)
    period = sample_period(opt)
    return -(-block // period) * period


def _ratio(value: float, reference: float | None) -> float | None:
    return None if not reference else value / reference


def run_speed(
    quick: bool = False,
    device: torch.device | None = None,
    entries: list[SpeedEntry] | None = None,
    chosen_layouts: list[Layout] | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    steps: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Time every entry on every layout; returns ``{"layouts": [...], "results": [...]}``."""
    device = device or torch.device("cpu")
    entries = entries or speed_entries(quick, device)
    chosen_layouts = chosen_layouts or layouts(quick)
    warmup = warmup if warmup is not None else (1 if quick else 2)
    repeats = repeats if repeats is not None else (5 if quick else 11)
    steps = steps if steps is not None else (2 if quick else 3)
    results: list[dict[str, Any]] = []
    total = len(chosen_layouts) * len(entries) * (repeats + 1)
    bar = tqdm(total=total, desc="speed", unit="block", disable=not progress)
    for layout in chosen_layouts:
        master = make_params(layout, device)
        numel = sum(p.numel() for p in master)
        built = []
        opt_of: dict[str, torch.optim.Optimizer] = {}
        for entry in entries:
            bar.set_postfix_str(f"{layout.name} · {entry.name} · warm-up")
            params = _copy_params(master)  # own copy: some optimizers write into p.grad
            opt = entry.build(params)
            stepper = _Stepper(opt, device, entry.compiled)
            first_s = _time_block(stepper, 1, device)  # allocates state; compiles if compiled
            for _ in range(max(0, warmup - 1, entry.steady_calls - 1) + 2 * entry.compiled):
                stepper()
            syncs, reads = count_syncs(stepper, opt)
            warmed = 1 + max(0, warmup - 1, entry.steady_calls - 1) + 2 * entry.compiled
            warmed += _SYNC_STEPS
            built.append((entry, params, stepper, syncs, reads, state_bytes(opt), first_s, warmed))
            opt_of[entry.name] = opt
            bar.update()
        times: dict[str, list[float]] = {e.name: [] for e in entries}
        for r in range(repeats):
            for entry, params, stepper, *_ in built:
                bar.set_postfix_str(f"{layout.name} · {entry.name} · repeat {r + 1}")
                _reset_grads(params, master)  # untimed: every block sees the same gradients
                block = _block_steps(steps, entry, opt_of[entry.name])
                times[entry.name].append(_time_block(stepper, block, device))
                bar.update()
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        refs = {name: medians.get(name) for name in REFERENCE}
        for entry, _, _, syncs, reads, nbytes, first_s, warmed in built:
            ms = medians[entry.name] * 1e3
            results.append(
                {
                    "layout": layout.name,
                    "optimizer": entry.name,
                    "step_ms": ms,
                    "step_ms_min": min(times[entry.name]) * 1e3,
                    "ratio_fused": _ratio(medians[entry.name], refs["AdamW fused"]),
                    "ratio_foreach": _ratio(medians[entry.name], refs["AdamW foreach"]),
                    "ratio_forloop": _ratio(medians[entry.name], refs["AdamW for-loop"]),
                    "state_bytes_per_param": nbytes / numel,
                    "syncs_per_step": syncs,
                    "reads_per_step": reads,
                    "first_step_s": first_s,
                    "timed_from_step": warmed + 1,
                    "steps_per_block": _block_steps(steps, entry, opt_of[entry.name]),
                }
            )
        del built, opt_of, master
        gc.collect()
    bar.close()
    return {
        "layouts": [
            {"name": lay.name, "title": lay.title, "params": lay.params, "tensors": len(lay.shapes)}
            for lay in chosen_layouts
        ],
        "results": results,
        "settings": {"warmup": warmup, "repeats": repeats, "steps": steps},
    }


def check_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's speed and memory targets, each with the measured value and a verdict."""
    by = {(r["layout"], r["optimizer"]): r for r in results}
    out = []

    def add(target: str, measured: str, met: bool) -> None:
        out.append({"target": target, "measured": measured, "met": bool(met)})

    for layout in dict.fromkeys(r["layout"] for r in results):

        def ratio(name: str, key: str = "ratio_fused", layout: str = layout) -> float | None:
            row = by.get((layout, name))
            return None if row is None else row[key]

        for name, limit in (("EmoSens", 1.10), ("EmoCats", 1.0), ("EmoAiry", 1.0)):
            for variant in (name, f"{name} compile_update", f"{name} compiled step"):
                x = ratio(variant)
                if x is not None:
                    add(f"{layout}: {variant} ≤ {limit:.2f}× AdamW fused", f"{x:.2f}×", x <= limit)
        for name in ("EmoCats", "EmoAiry"):
            x = ratio(name, "ratio_foreach")
            if x is not None:
                add(f"{layout}: {name} faster than AdamW foreach", f"{x:.2f}×", x < 1.0)
        airy, ada = by.get((layout, "EmoAiry")), by.get((layout, "Adafactor (torch)"))
        if airy and ada:
            x = airy["step_ms"] / ada["step_ms"]
            add(f"{layout}: EmoAiry faster than torch Adafactor", f"{x:.2f}×", x < 1.0)
        for name in ("EmoSens", "EmoAiry", "EmoCats"):
            row = by.get((layout, name))
            if row:
                add(
                    f"{layout}: {name} 0 host syncs/step",
                    f"{row['syncs_per_step']:g}",
                    row["syncs_per_step"] == 0,
                )
    for name, want in (("EmoSens", 8.0), ("EmoCats", 4.0), ("EmoAiry", 0.1)):
        row = by.get(("dense", name))
        if row:
            x = row["state_bytes_per_param"]
            met = x <= want if name == "EmoAiry" else abs(x - want) < 0.05
            sign = "≤" if name == "EmoAiry" else "="
            add(f"dense: {name} state {sign} {want:g} B/param", f"{x:.3f}", met)
    return out


def profile_steps(
    entry: SpeedEntry, layout: Layout, device: torch.device, steps: int = 5, top: int = 15
) -> str:
    """torch.profiler table of where one optimizer's step time goes (self time, top ops)."""
    params = make_params(layout, device)
    opt = entry.build(params)
    stepper = _Stepper(opt, device, entry.compiled)
    for _ in range(3):
        stepper()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            stepper()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def roofline(
    device: torch.device,
    entries: Iterable[SpeedEntry],
    shapes: tuple[tuple[int, ...], ...] = ((8192, 8192),) * 16,
    steps: int = 5,
    copy_mib: int = 1024,
) -> dict[str, Any]:
    """Step time as a fraction of the memory-bandwidth bound for a large (≈1B) layout.

    Bandwidth is measured with a large device-to-device copy; the bound is
    ``bytes moved per param × params / bandwidth``. One optimizer at a time (memory).
    """
    layout = Layout("roofline", "roofline", shapes)
    src = torch.empty(copy_mib * 2**18, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = _time_block(lambda: dst.copy_(src), 10, device)
    bandwidth = 2 * src.nbytes / copy_s
    src = dst = None  # free before the big layout
    rows = []
    for entry in entries:
        if entry.bytes_moved is None:
            continue
        params = make_params(layout, device)
        opt = entry.build(params)
        stepper = _Stepper(opt, device)
        for _ in range(2):
            stepper()
        seconds = statistics.median(_time_block(stepper, steps, device) for _ in range(3))
        bound = entry.bytes_moved * layout.params / bandwidth
        rows.append(
            {
                "optimizer": entry.name,
                "step_ms": seconds * 1e3,
                "bytes_per_param": entry.bytes_moved,
                "roofline_ms": bound * 1e3,
                "fraction": bound / seconds,
            }
        )
        del opt, stepper, params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"params": layout.params, "bandwidth_gbs": bandwidth / 1e9, "rows": rows}
