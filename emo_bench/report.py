"""Markdown tables and JSON documents for the quality and speed results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .machine import machine_line
from .quality import QualityRow
from .summary import RATIO_CAP, RATIO_FLOOR, best_single_adamw, summary, summary_markdown

__all__ = [
    "clean_json",
    "dumps",
    "quality_json",
    "quality_markdown",
    "speed_markdown",
    "write_json",
    "write_text",
]


def _num(x: float, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _lr(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.1e}"


def _label(row: QualityRow) -> str:
    tags = {"tuned": "tuned", "default": "default", "tuned,default": "tuned = default"}
    suffix = f" ({tags[row.role]})" if row.role else ""
    return f"**{row.optimizer}**" if row.family == "emo" else f"{row.optimizer}{suffix}"


def _gap(row: QualityRow) -> str:
    g = row.gap_to_tuned_adamw_pct
    if g is None or not math.isfinite(g):
        return "n/a"
    return f"{g:+.1f}%"


def _shown(rows: list[QualityRow]) -> list[QualityRow]:
    """All rows but the AdamW sweep points that are neither tuned nor default."""
    return [r for r in rows if r.family != "adamw" or r.role]


def _definitions(settings: dict[str, Any]) -> str:
    return (
        "One fixed configuration per optimizer on every workload: Emo optimizers at `lr=1.0` "
        '(a bare class name: its defaults, `pulse="distance"`, averaged for EmoSens and '
        "EmoCats; `pulse=v37` rows: the faithful upstream v3.7 emoPulse, where the "
        "constructor offers it; `average=False`: the distance controller alone), AdamW at each of "
        f"{', '.join(f'{lr:g}' for lr in settings['adamw_sweep'])} (weight decay 0.01; "
        "*tuned* = best mean of the sweep per workload, *default* = 1e-3), Prodigy `lr=1.0`, "
        "Prodigy + Schedule-Free (`prodigy-plus-schedule-free`, `lr=1.0`, package defaults), "
        "Schedule-Free AdamW at its defaults (lr 0.0025); both Schedule-Free optimizers are "
        "switched with `train()`/`eval()`. Metric: final validation value, mean ± std over "
        "seeds. *gap*: how much worse than tuned AdamW, relative, in percent "
        "(`100·(metric − tuned)/|tuned|`, sign flipped for higher-is-better metrics; "
        "negative = better). *within 2%*: workloads with gap ≤ 2% and no diverged seed. "
        "*geomean ratio*: geometric mean over workloads of `1 + gap/100` (clipped to "
        f"[{RATIO_FLOOR:g}, {RATIO_CAP:g}], a workload without a finite result counts "
        f"{RATIO_CAP:g}); lower is better, tuned AdamW = 1. *AdamW best single LR*: the one "
        "sweep LR with the lowest geomean ratio over all workloads. *div*: runs whose loss "
        "went non-finite or ended above 1.5x their start. *eff. LR*: range (median) of the "
        "step size actually applied (Emo: `get_effective_lr()` read every ~2% of steps; "
        "Prodigy and Prodigy + Schedule-Free: d·lr; Schedule-Free AdamW: scheduled lr)."
    )


def quality_markdown(
    results: dict[str, list[QualityRow]],
    titles: dict[str, tuple[str, int, int]],
    settings: dict[str, Any],
    machine: dict[str, Any],
    plot_name: str | None,
    lr_plot_name: str | None = None,
) -> str:
    """The full quality report: the summary, one table per workload, the AdamW sweep."""
    seeds = settings["seeds"]
    jobs = settings.get("jobs", 1)
    lines = [
        "# emo-bench quality",
        "",
        f"Command: `{settings['command']}` · seeds {', '.join(map(str, seeds))} · "
        f"total wall {settings['wall_s'] / 60:.1f} min ({jobs} worker process"
        f"{'es' if jobs > 1 else ''})",
        "",
        f"Machine: {machine_line(machine)}",
        "",
        "## Summary: gap to tuned AdamW per workload",
        "",
        *summary_markdown(summary(results), list(results)),
        "",
        _definitions(settings),
        "",
    ]
    if lr_plot_name:
        lines += [f"![effective LR per workload, tuned AdamW LR marked]({lr_plot_name})", ""]
    for name, rows in results.items():
        title, steps, batch = titles[name]
        direction = "higher" if rows[0].higher_is_better else "lower"
        lines += [
            f"## {title}",
            "",
            f"`{name}`: {rows[0].metric} ({direction} is better) · {steps} steps · "
            f"batch {batch} · {len(seeds)} seeds",
            "",
            f"| optimizer | {rows[0].metric} | gap | div | s/run | eff. LR (median) |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in _shown(rows):
            lines.append(
                f"| {_label(r)} | {_num(r.mean)} ± {_num(r.std, 2)} | {_gap(r)} | "
                f"{r.diverged}/{r.seeds} | {r.wall_s:.1f} | {_lr(r.lr_min)} – {_lr(r.lr_max)} "
                f"({_lr(r.lr_median)}) |"
            )
        lines.append("")
    lines += [
        "## AdamW learning-rate sweep",
        "",
        "| workload | " + " | ".join(f"lr={lr:g}" for lr in settings["adamw_sweep"]) + " |",
        "|---|" + "---:|" * len(settings["adamw_sweep"]),
    ]
    for name, rows in results.items():
        by_lr = {r.lr: r for r in rows if r.family == "adamw"}
        cells = []
        for lr in settings["adamw_sweep"]:
            r = by_lr.get(lr)
            if r is None:
                cells.append("–")
                continue
            cell = f"{_num(r.mean)} ± {_num(r.std, 2)}" + (" (div)" if r.diverged else "")
            cells.append(f"**{cell}**" if r.role.startswith("tuned") else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if plot_name:
        lines += ["", f"![training loss per workload]({plot_name})", ""]
    return "\n".join(lines) + "\n"


def quality_json(
    results: dict[str, list[QualityRow]],
    settings: dict[str, Any],
    machine: dict[str, Any],
    files: dict[str, str],
) -> dict[str, Any]:
    """Documented fields: see ``emo_bench.cli`` (``--json``)."""
    best = best_single_adamw(results)
    return {
        "command": "quality",
        "settings": settings,
        "machine": machine,
        "summary": [s.public() for s in summary(results)],
        "best_single_adamw_lr": best.lr if best else None,
        "tuned_adamw_lr": {
            name: next((r.lr for r in rows if r.role.startswith("tuned")), None)
            for name, rows in results.items()
        },
        "results": [r.public() for rows in results.values() for r in rows],
        "lr_traces": {
            name: {r.optimizer: [list(p) for p in r.lr_curve] for r in rows if r.family != "adamw"}
            for name, rows in results.items()
        },
        "files": files,
    }


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} s" if value >= 0.1 else f"{value * 1e3:.0f} ms"


def speed_markdown(doc: dict[str, Any]) -> str:
    """The speed report: one table per layout, then the targets."""
    s = doc["settings"]
    lines = [
        "# emo-bench speed",
        "",
        f"Command: `{s['command']}` · median of {s['repeats']} repeats × {s['steps']} steps "
        f"after {s['warmup']} warm-up steps, optimizers interleaved round-robin (averaged "
        "rows: whole fold periods after their ramp; distance rows: whole reads of the sample; "
        "garbage collection paused in a timed block, as `timeit` does)",
        "",
        f"Machine: {machine_line(doc['machine'])}",
        "",
        "Time of `opt.step()` alone (gradients fixed, no forward/backward), relative to "
        "torch's AdamW in the same run. *state B/param*: bytes of all optimizer state tensors "
        "(including 0-dim step counters and the Emo loss sensor) / parameter count. "
        "*syncs/step*: host reads of device values counted during 3 steps (`.item()`, "
        "`bool()`, `float()`, `.tolist()`, `.cpu()`...; on CUDA also kernel-level syncs); "
        "*reads/step* also counts torch's deliberately host-side `step` counters. "
        "*first step*: the untimed first call, which allocates the state and, for "
        "`compile_update` rows (the opt-in `torch.compile`d update), compiles.",
        "",
    ]
    for layout in doc["layouts"]:
        rows = [r for r in doc["results"] if r["layout"] == layout["name"]]
        lines += [
            f"## {layout['title']}",
            "",
            f"{layout['params'] / 1e6:.1f}M parameters in {layout['tensors']} tensors",
            "",
            "| optimizer | ms/step | × AdamW fused | × AdamW foreach | × AdamW for-loop | "
            "state B/param | syncs/step | reads/step | first step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            name = f"**{r['optimizer']}**" if r["optimizer"].startswith("Emo") else r["optimizer"]
            lines.append(
                f"| {name} | {r['step_ms']:.2f} | {_ratio(r['ratio_fused'])} | "
                f"{_ratio(r['ratio_foreach'])} | {_ratio(r['ratio_forloop'])} | "
                f"{r['state_bytes_per_param']:.3f} | {r['syncs_per_step']:g} | "
                f"{r['reads_per_step']:g} | {_seconds(r.get('first_step_s'))} |"
            )
        lines.append("")
    if doc.get("targets"):
        lines += ["## Targets (issue 6)", "", "| target | measured | met |", "|---|---|---|"]
        for t in doc["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    if doc.get("roofline"):
        lines += [
            f"## Memory-bandwidth roofline ({doc['roofline']['params'] / 1e9:.2f}B parameters)",
            "",
            f"Measured copy bandwidth {doc['roofline']['bandwidth_gbs']:.0f} GB/s",
            "",
            "| optimizer | ms/step | bytes/param moved | roofline ms | fraction |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in doc["roofline"]["rows"]:
            lines.append(
                f"| {r['optimizer']} | {r['step_ms']:.2f} | {r['bytes_per_param']} | "
                f"{r['roofline_ms']:.2f} | {r['fraction']:.2f} |"
            )
        lines.append("")
    if doc["files"].get("plot"):
        lines += [f"![step time relative to fused AdamW]({Path(doc['files']['plot']).name})", ""]
    return "\n".join(lines) + "\n"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def clean_json(value: Any) -> Any:
    """``value`` with non-finite floats as ``None``, so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def dumps(doc: dict[str, Any]) -> str:
    """Strict JSON text of a result document."""
    return json.dumps(clean_json(doc), indent=2, allow_nan=False)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    write_text(path, dumps(doc) + "\n")
