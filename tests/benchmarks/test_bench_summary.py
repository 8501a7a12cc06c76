"""Summary math on hand-made rows: gap, within 2%, geomean ratio, best single AdamW LR."""

from __future__ import annotations

import math

import pytest

from emo_bench.quality import QualityRow, mark_roles
from emo_bench.summary import best_single_adamw, geomean_ratio, ratio, summary, summary_markdown


def row(
    workload: str, name: str, family: str, mean: float, lr: float = math.nan,
    higher: bool = False, diverged: int = 0,
) -> QualityRow:  # fmt: skip
    return QualityRow(
        workload, name, family, lr, "m", higher, mean, 0.0, [mean], diverged, 1, 0.0, lr, lr
    )


def table() -> dict[str, list[QualityRow]]:
    """Two workloads: ``a`` lower-is-better (tuned 1.0 at lr 1e-3), ``b`` higher-is-better
    (tuned 90 at lr 1e-2)."""
    a = [
        row("a", "AdamW lr=0.001", "adamw", 1.0, 1e-3),
        row("a", "AdamW lr=0.01", "adamw", 1.21, 1e-2),
        row("a", "Emo", "emo", 1.01),
        row("a", "Other", "prodigy", 0.5),
    ]
    b = [
        row("b", "AdamW lr=0.001", "adamw", 81.0, 1e-3, higher=True),
        row("b", "AdamW lr=0.01", "adamw", 90.0, 1e-2, higher=True),
        row("b", "Emo", "emo", 88.2, higher=True),
        row("b", "Other", "prodigy", 99.0, higher=True, diverged=1),
    ]
    return {"a": mark_roles(a), "b": mark_roles(b)}


def test_gap_within_2pct_and_geomean_on_hand_made_rows() -> None:
    rows = {s.optimizer: s for s in summary(table())}
    emo = rows["Emo"]
    assert emo.gaps == {"a": pytest.approx(1.0), "b": pytest.approx(2.0)}
    assert emo.within_2pct == 2 and emo.divergences == 0  # 2.0% counts as within
    assert emo.geomean_ratio == pytest.approx(math.sqrt(1.01 * 1.02))
    other = rows["Other"]
    assert other.gaps["a"] == pytest.approx(-50.0) and other.gaps["b"] == pytest.approx(-10.0)
    assert other.within_2pct == 1  # better on b, but a diverged seed does not count
    assert other.divergences == 1
    assert other.geomean_ratio == pytest.approx(math.sqrt(0.5 * 0.9))
    assert rows["AdamW tuned per workload"].geomean_ratio == 1.0
    assert rows["AdamW tuned per workload"].within_2pct == 2


def test_best_single_adamw_lr_is_the_lowest_geomean_over_workloads() -> None:
    best = best_single_adamw(table())
    # lr=1e-3: ratios 1.0 and 1.1 -> sqrt(1.1) = 1.049; lr=1e-2: 1.21 and 1.0 -> 1.1
    assert best is not None and best.lr == 1e-3
    assert best.geomean_ratio == pytest.approx(math.sqrt(1.1))
    assert best.role == "best single AdamW LR"
    assert summary(table())[-1].optimizer == "AdamW lr=0.001"


def test_ratio_is_clipped_and_a_missing_result_counts_as_the_cap() -> None:
    rows = table()["a"]
    nan_row = row("a", "Broken", "emo", math.nan, diverged=1)
    huge = row("a", "Huge", "emo", 1e6)
    mark_roles([*rows, nan_row, huge])
    assert ratio(nan_row) == 10.0 and ratio(huge) == 10.0
    assert geomean_ratio([nan_row, rows[0]]) == pytest.approx(math.sqrt(10.0))
    unrated = row("a", "No reference", "emo", 1.0)  # never compared: gap None
    assert math.isnan(ratio(unrated)) and math.isnan(geomean_ratio([unrated, rows[0]]))
    assert (
        "| **No reference** | 0/1 | n/a |" in summary_markdown(summary({"a": [unrated]}), ["a"])[2]
    )


def test_summary_markdown_lists_every_optimizer_and_workload() -> None:
    lines = summary_markdown(summary(table()), ["a", "b"])
    assert lines[0].startswith("| optimizer | within 2% | geomean ratio | div | a | b |")
    assert any(line.startswith("| **Emo** | 2/2 | 1.015 | 0 | +1.0% | +2.0% |") for line in lines)
    assert any(line.startswith("| AdamW best single LR (0.001) |") for line in lines)
