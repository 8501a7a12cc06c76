"""The figures: training loss and effective LR per workload (quality), step-time ratios (speed).

matplotlib is imported inside the functions with the non-interactive Agg backend, so
importing this module has no side effects and no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .quality import QualityRow

__all__ = ["plot_lr", "plot_quality", "plot_speed"]

_COLORS = {
    "EmoSens": "#d62728",
    "EmoAiry": "#ff7f0e",
    "EmoCats": "#e377c2",
    "Prodigy": "#2ca02c",
    "Prodigy + Schedule-Free": "#17becf",
    "Schedule-Free AdamW": "#9467bd",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(name: str, family: str) -> str | None:
    if name in _COLORS:
        return _COLORS[name]
    if name.split()[0] in _COLORS:  # a variant ("EmoSens pulse=v37"): its optimizer's colour
        return _COLORS[name.split()[0]]
    return {"adamw": "#1f77b4", "lion": "#7f7f7f"}.get(family)


def _style(r: QualityRow) -> str:
    """Dashed: AdamW's default LR and the Emo rows on the faithful v3.7 pulse; dotted: the
    other Emo variants (so each Emo optimizer's rows, drawn in its colour, stay apart);
    solid otherwise (an Emo optimizer at its defaults among them)."""
    if r.role == "default" or (r.family == "emo" and "pulse=v37" in r.optimizer):
        return "--"
    if r.family == "emo" and " " in r.optimizer:
        return ":"
    return "-"


def _grid(plt, n: int, height: float):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _legend(fig, axes, n: int) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, min(len(labels), 5)), fontsize=8)
    rows = math.ceil(n / min(n, 4))
    fig.tight_layout(rect=(0, 0.12 / rows + 0.02, 1, 1))


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def plot_quality(
    results: dict[str, list[QualityRow]],
    titles: dict[str, str],
    log_scale: dict[str, bool],
    path: Path,
) -> Path:
    """One panel per workload: seed-mean training loss of every shown optimizer."""
    plt = _pyplot()
    fig, axes = _grid(plt, len(results), 3.4)
    for ax, (name, rows) in zip(axes, results.items(), strict=True):
        for r in rows:
            if r.family == "adamw" and not r.role:
                continue
            label = r.optimizer
            if r.role.startswith("tuned"):
                label = "AdamW tuned (best of sweep, lr in title)"
            elif r.role:
                label += f" ({r.role})"
            steps = max((s for s, _ in r.lr_curve), default=len(r.curve))
            xs = [i * steps / max(1, len(r.curve)) for i in range(len(r.curve))]
            ys = [y if math.isfinite(y) else float("nan") for y in r.curve]
            ax.plot(xs, ys, _style(r), color=_color(r.optimizer, r.family), label=label, lw=1.2)
        tuned = next((r for r in rows if r.role.startswith("tuned")), None)
        extra = f"\ntuned AdamW lr={tuned.lr:g}" if tuned else ""
        ax.set_title(titles[name] + extra, fontsize=9)
        ax.set_yscale("log" if log_scale.get(name) else "linear")
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("training loss (seed mean)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        finite = [y for r in rows for y in r.curve if math.isfinite(y)]
        if finite and not log_scale.get(name):
            low = min(finite)
            high = sorted(finite)[int(0.97 * (len(finite) - 1))]
            if high > low:
                ax.set_ylim(low - 0.05 * (high - low), high)
    _legend(fig, axes, len(results))
    return _save(fig, plt, path)


def plot_lr(results: dict[str, list[QualityRow]], titles: dict[str, str], path: Path) -> Path:
    """One panel per workload: effective LR over steps (seed 0) of every LR-free optimizer,
    with tuned AdamW's LR as a horizontal line (best single AdamW LR dotted)."""
    from .summary import best_single_adamw

    plt = _pyplot()
    best = best_single_adamw(results)
    fig, axes = _grid(plt, len(results), 3.2)
    for ax, (name, rows) in zip(axes, results.items(), strict=True):
        for r in rows:
            if r.family == "adamw" or not r.lr_curve:
                continue
            steps, lrs = zip(*r.lr_curve, strict=True)
            lrs = [lr if math.isfinite(lr) and lr > 0 else float("nan") for lr in lrs]
            color = _color(r.optimizer, r.family)
            ax.plot(steps, lrs, _style(r), color=color, label=r.optimizer, lw=1.2)
        tuned = next((r for r in rows if r.role.startswith("tuned")), None)
        if tuned is not None:
            ax.axhline(tuned.lr, color="black", lw=1.4, label="tuned AdamW lr (this workload)")
        if best is not None:
            ax.axhline(best.lr, color="black", lw=0.9, ls=":", label="best single AdamW lr")
        ax.set_yscale("log")
        ax.set_title(titles[name], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("effective LR (seed 0)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    _legend(fig, axes, len(results))
    return _save(fig, plt, path)


def plot_speed(doc: dict[str, Any], path: Path) -> Path:
    """Horizontal bars: step time / fused AdamW per optimizer, one panel per layout."""
    plt = _pyplot()
    layouts = doc["layouts"]
    fig, axes = plt.subplots(1, len(layouts), figsize=(5.5 * len(layouts), 4.2), squeeze=False)
    for ax, layout in zip(axes[0], layouts, strict=True):
        rows = [r for r in doc["results"] if r["layout"] == layout["name"]]
        names = [r["optimizer"] for r in rows]
        ratios = [r["ratio_fused"] if r["ratio_fused"] is not None else 0.0 for r in rows]
        # A variant ("EmoCats compile_update") in its optimizer's colour, hatched.
        colors = [_COLORS.get(n, _COLORS.get(n.split()[0], "#1f77b4")) for n in names]
        hatches = ["//" if n not in _COLORS and n.split()[0] in _COLORS else "" for n in names]
        ax.barh(range(len(rows)), ratios, color=colors, hatch=hatches, edgecolor="white")
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlabel("step time / torch AdamW fused (lower is faster)")
        ax.set_title(f"{layout['title']}", fontsize=9)
        for i, r in enumerate(ratios):
            if r > 0:
                ax.text(r, i, f" {r:.2f}", va="center", fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
