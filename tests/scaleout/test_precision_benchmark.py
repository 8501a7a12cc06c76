"""``python -m emo_bench.precision`` runs end to end and writes its table (tiny settings)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("sklearn")

from emo_bench import precision  # noqa: E402


def test_precision_benchmark_writes_the_table(tmp_path, capsys) -> None:
    out = tmp_path / "precision.md"
    assert precision.main(["--steps", "3", "--seeds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| emo")]
    assert [row.split("|")[1].strip() for row in rows] == list(precision.OPTIMIZERS)
    for row in rows:
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert len(cells) == 3 * len(precision.PRECISIONS) - 1
        assert all(math.isfinite(float(c.split(" ")[0])) for c in cells)
