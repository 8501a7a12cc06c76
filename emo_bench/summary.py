"""The numbers that decide: gap, within-2% count, geometric-mean ratio, best single AdamW LR.

Definitions (``results``: rows per workload, each workload's tuned AdamW marked by
:func:`emo_bench.quality.mark_roles`):

- *gap* (per workload): ``100·(metric − tuned)/|tuned|`` for lower-is-better metrics,
  ``100·(tuned − metric)/|tuned|`` for higher-is-better ones: how much worse than tuned
  AdamW, in percent; negative = better.
- *within 2%*: workloads with gap ≤ 2% and no diverged seed.
- *ratio* (per workload): ``1 + gap/100`` (1 = tuned AdamW, 1.1 = 10% worse, 0.9 = 10%
  better), clipped to [``RATIO_FLOOR``, ``RATIO_CAP``]; a workload without a finite mean
  counts as ``RATIO_CAP``. *geomean ratio*: the geometric mean of the ratios over the
  workloads (lower is better; tuned AdamW is 1 by definition).
- *best single AdamW LR*: the sweep LR whose AdamW rows have the lowest geomean ratio: the
  best a user can do with one LR for every workload.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .quality import QualityRow

__all__ = [
    "RATIO_CAP",
    "RATIO_FLOOR",
    "TARGET_GAP_PCT",
    "Comparison",
    "SummaryRow",
    "best_single_adamw",
    "geomean_ratio",
    "load_reference",
    "ratio",
    "reference_path",
    "summary",
    "summary_markdown",
]

TARGET_GAP_PCT = 2.0
RATIO_CAP = 10.0
RATIO_FLOOR = 0.1
RESULTS_JSON = Path(__file__).resolve().parent / "results" / "quality.json"


@dataclass
class SummaryRow:
    """One optimizer over all workloads."""

    optimizer: str
    family: str
    role: str
    within_2pct: int
    workloads: int
    geomean_ratio: float
    divergences: int
    gaps: dict[str, float | None] = field(default_factory=dict)
    lr: float = math.nan

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)


def ratio(row: QualityRow) -> float:
    """``1 + gap/100`` clipped to [RATIO_FLOOR, RATIO_CAP]; no finite result: RATIO_CAP;
    no tuned AdamW to compare with (gap ``None``): NaN."""
    gap = row.gap_to_tuned_adamw_pct
    if gap is None:
        return math.nan
    if not math.isfinite(gap):
        return RATIO_CAP
    return min(RATIO_CAP, max(RATIO_FLOOR, 1.0 + gap / 100.0))


def geomean_ratio(rows: list[QualityRow]) -> float:
    """Geometric mean of :func:`ratio` over ``rows`` (one per workload); NaN if any is."""
    ratios = [ratio(r) for r in rows]
    if not ratios or any(math.isnan(x) for x in ratios):
        return math.nan
    return math.exp(sum(math.log(x) for x in ratios) / len(ratios))


def _within(row: QualityRow) -> bool:
    gap = row.gap_to_tuned_adamw_pct
    return row.diverged == 0 and gap is not None and math.isfinite(gap) and gap <= TARGET_GAP_PCT


def _row(name: str, rows: list[QualityRow], role: str = "") -> SummaryRow:
    return SummaryRow(
        optimizer=name,
        family=rows[0].family,
        role=role,
        within_2pct=sum(_within(r) for r in rows),
        workloads=len(rows),
        geomean_ratio=geomean_ratio(rows),
        divergences=sum(r.diverged for r in rows),
        gaps={r.workload: r.gap_to_tuned_adamw_pct for r in rows},
        lr=rows[0].lr,
    )


def _by_optimizer(results: dict[str, list[QualityRow]]) -> dict[str, list[QualityRow]]:
    """Rows of each optimizer present on every workload, in first-workload order."""
    names = [r.optimizer for r in next(iter(results.values()))]
    table = {
        n: [next((r for r in rows if r.optimizer == n), None) for rows in results.values()]
        for n in names
    }
    return {n: rows for n, rows in table.items() if all(r is not None for r in rows)}


def best_single_adamw(results: dict[str, list[QualityRow]]) -> SummaryRow | None:
    """The AdamW sweep LR with the lowest geomean ratio over all workloads (ties: first)."""
    sweep = [
        _row(n, rows, "best single AdamW LR")
        for n, rows in _by_optimizer(results).items()
        if rows[0].family == "adamw"
    ]
    return min(sweep, key=lambda s: s.geomean_ratio) if sweep else None


def summary(results: dict[str, list[QualityRow]]) -> list[SummaryRow]:
    """Every non-AdamW optimizer, then tuned AdamW (per workload), then the best single LR."""
    rows = [_row(n, rs) for n, rs in _by_optimizer(results).items() if rs[0].family != "adamw"]
    tuned = [next((r for r in rs if r.role.startswith("tuned")), None) for rs in results.values()]
    if all(t is not None for t in tuned):
        t = _row("AdamW tuned per workload", tuned, "tuned AdamW")
        t.lr = math.nan
        rows.append(t)
    best = best_single_adamw(results)
    if best is not None:
        rows.append(best)
    return rows


def _gap(g: float | None) -> str:
    return "n/a" if g is None or not math.isfinite(g) else f"{g:+.1f}%"


def _ratio(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def summary_markdown(rows: list[SummaryRow], workloads: list[str]) -> list[str]:
    """Markdown lines of the summary table (Emo rows bold)."""
    lines = [
        "| optimizer | within 2% | geomean ratio | div | " + " | ".join(workloads) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(workloads),
    ]
    for s in rows:
        label = f"**{s.optimizer}**" if s.family == "emo" else s.optimizer
        if s.role == "best single AdamW LR":
            label = f"AdamW best single LR ({s.optimizer.split('=')[-1]})"
        cells = [_gap(s.gaps.get(w)) for w in workloads]
        lines.append(
            f"| {label} | {s.within_2pct}/{s.workloads} | {_ratio(s.geomean_ratio)} | "
            f"{s.divergences} | " + " | ".join(cells) + " |"
        )
    return lines


@dataclass
class StoredTuned:
    row: QualityRow
    steps: int


def reference_path(reference: str | Path) -> Path:
    return RESULTS_JSON if reference == "stored" else Path(reference)


def load_reference(reference: str | Path = "stored") -> dict[str, StoredTuned]:
    """Tuned-AdamW rows (and the steps they ran) per workload from a ``quality.json``."""
    path = reference_path(reference)
    if reference == "stored" and not path.is_file():
        raise FileNotFoundError(
            f"Invalid reference='stored': the stored tuned-AdamW numbers ({path.name}) come "
            "with a clone of the repository, not with the installed package; pass "
            "reference='measure' to run the AdamW sweep here, or reference=PATH to a "
            "quality.json written by emo-bench quality"
        )
    doc = json.loads(path.read_text(encoding="utf-8"))
    steps = doc["settings"]["steps"]
    out = {}
    for r in doc["results"]:
        if r["family"] == "adamw" and r["role"].startswith("tuned"):
            fields = {k: v for k, v in r.items() if k in QualityRow.__dataclass_fields__}
            fields = {k: (math.nan if v is None else v) for k, v in fields.items()}
            row = QualityRow(**fields)
            row.role = "tuned"
            out[r["workload"]] = StoredTuned(row, int(steps[r["workload"]]))
    return out


class Comparison:
    """Result of :func:`emo_bench.quality.compare`: rows per workload and their summary."""

    def __init__(self, results: dict[str, list[QualityRow]], source: str) -> None:
        self.results = results
        self.source = source
        self.rows = summary(results)

    def markdown(self) -> str:
        head = f"Reference: tuned AdamW from {self.source}"
        return "\n".join([head, "", *summary_markdown(self.rows, list(self.results))])

    def __str__(self) -> str:
        return self.markdown()
