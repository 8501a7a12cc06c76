"""The two figures: training-loss and effective-LR curves (quality), step-time ratios (speed).

matplotlib is imported inside the functions with the non-interactive Agg backend, so
importing this module has no side effects and no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .quality import QualityRow

__all__ = ["plot_quality", "plot_speed"]

_COLORS = {
    "EmoSens": "#d62728",
    "EmoAiry": "#ff7f0e",
    "EmoCats": "#e377c2",
    "Prodigy": "#2ca02c",
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
    return {"adamw": "#1f77b4", "lion": "#7f7f7f"}.get(family)


def plot_quality(
    results: dict[str, list[QualityRow]],
    titles: dict[str, str],
    log_scale: dict[str, bool],
    path: Path,
) -> Path:
    """Top row: seed-mean training loss; bottom row: effective LR of seed 0 (log scale)."""
    plt = _pyplot()
    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.8), squeeze=False, sharex="col")
    for col, (name, rows) in enumerate(results.items()):
        top, bottom = axes[0][col], axes[1][col]
        for r in rows:
            if r.family == "adamw" and not r.role:
                continue
            label = r.optimizer
            if r.role.startswith("tuned"):
                label = "AdamW tuned (best of sweep, lr in title)"
            elif r.role:
                label += f" ({r.role})"
            style = "--" if r.role == "default" else "-"
            steps = max((s for s, _ in r.lr_curve), default=len(r.curve))
            xs = [i * steps / max(1, len(r.curve)) for i in range(len(r.curve))]
            color = _color(r.optimizer, r.family)
            ys = [y if math.isfinite(y) else float("nan") for y in r.curve]
            top.plot(xs, ys, style, color=color, label=label, lw=1.3)
            if r.lr_curve:
                bottom.plot(*zip(*r.lr_curve, strict=True), style, color=color, lw=1.3)
        tuned = next((r for r in rows if r.role.startswith("tuned")), None)
        extra = f"\ntuned AdamW lr={tuned.lr:g}" if tuned else ""
        top.set_title(titles[name] + extra, fontsize=9)
        top.set_yscale("log" if log_scale.get(name) else "linear")
        top.set_ylabel("training loss (seed mean)" if col == 0 else "")
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
        bottom.set_ylabel("effective LR (seed 0)" if col == 0 else "")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        finite = [y for r in rows for y in r.curve if math.isfinite(y)]
        if finite and not log_scale.get(name):
            low = min(finite)
            high = sorted(finite)[int(0.97 * (len(finite) - 1))]
            top.set_ylim(low - 0.05 * (high - low), high)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=max(1, min(len(labels), 5, 2 * n)), fontsize=8
    )
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


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
