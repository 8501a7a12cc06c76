"""``emo-bench`` command line: JSON documents, files written, clear errors, demo wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo_bench import cli
from emo_bench.contenders import emo_contenders


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_quality_json_has_documented_fields(tmp_path: Path, capsys) -> None:
    doc = _run_json(
        capsys,
        [
            "quality",
            "--steps",
            "5",
            "--seeds",
            "0,1",
            "--workloads",
            "quadratic,digits",
            "--optimizers",
            "emosens,adamw,schedule-free",
            "--out",
            str(tmp_path),
            "--json",
            "--no-progress",
        ],
    )
    assert doc["command"] == "quality"
    assert {"command", "quick", "seeds", "steps", "adamw_sweep", "device", "jobs", "wall_s"} <= set(
        doc["settings"]
    )
    assert doc["settings"]["steps"] == {"quadratic": 5, "digits": 5}
    assert {
        "cpu",
        "cores",
        "torch_threads",
        "torch",
        "python",
        "os",
        "device",
        "emo",
        "load_avg",
    } <= set(doc["machine"])
    names = {(r["workload"], r["optimizer"]) for r in doc["results"]}
    # "emosens" names the default row exactly (a prefix picks all only when no row is
    # named so: "adamw" the sweep)
    emo = ["EmoSens"]
    assert {n for _, n in names if n.startswith("EmoSens")} == set(emo)
    assert len(names) == 2 * (1 + 6 + 1)  # EmoSens, 6 AdamW lrs, SF
    assert len([c for c in emo_contenders() if c.name.startswith("EmoSens")]) == 4
    fields = {
        "workload",
        "optimizer",
        "family",
        "lr",
        "metric",
        "higher_is_better",
        "mean",
        "std",
        "values",
        "diverged",
        "seeds",
        "wall_s",
        "lr_min",
        "lr_max",
        "gap_to_tuned_adamw_pct",
        "role",
        "lr_median",
    }
    for r in doc["results"]:
        assert set(r) == fields
        assert len(r["values"]) == 2
    for key in ("markdown", "plot", "lr_plot", "json"):
        assert Path(doc["files"][key]).is_file()
    for key in ("plot", "lr_plot"):
        assert 10_000 < Path(doc["files"][key]).stat().st_size < 300_000
    summary = {s["optimizer"]: s for s in doc["summary"]}
    assert {*emo, "Schedule-Free AdamW", "AdamW tuned per workload"} <= set(summary)
    fields = {"optimizer", "family", "role", "within_2pct", "workloads", "geomean_ratio"}
    assert all(fields | {"divergences", "gaps", "lr"} == set(s) for s in doc["summary"])
    assert summary["AdamW tuned per workload"]["geomean_ratio"] == 1.0
    assert doc["best_single_adamw_lr"] in doc["settings"]["adamw_sweep"]
    assert set(doc["tuned_adamw_lr"]) == {"quadratic", "digits"}
    assert [step for step, _ in doc["lr_traces"]["digits"][emo[0]]][-1] == 5
    markdown = Path(doc["files"]["markdown"]).read_text()
    assert f"| **{emo[0]}** |" in markdown and "(tuned" in markdown
    assert markdown.index("## Summary") < markdown.index("## Digits MLP")
    assert "quality_lr.png" in markdown
    assert [s["optimizer"] for s in doc["spike"]] == emo  # the spike probe, Emo rows only
    assert all(s["lr_before"] > 0 and s["lr_recovered"] > 0 for s in doc["spike"])
    assert "## Loss spike" in markdown
    assert json.loads(Path(doc["files"]["json"]).read_text()) == doc


def test_speed_json_has_documented_fields(tmp_path: Path, capsys) -> None:
    doc = _run_json(
        capsys,
        [
            "speed",
            "--layouts",
            "lora",
            "--optimizers",
            "emocats",
            "--repeats",
            "1",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
            "--json",
            "--no-progress",
        ],
    )
    assert doc["command"] == "speed"
    assert {"command", "quick", "device", "warmup", "repeats", "steps", "wall_s"} <= set(
        doc["settings"]
    )
    assert doc["machine"]["torch_threads"] == 1
    assert [lay["tensors"] for lay in doc["layouts"]] == [400]
    assert [r["optimizer"] for r in doc["results"]] == [
        "AdamW fused",
        "AdamW foreach",
        "AdamW for-loop",
        "EmoCats",
    ]
    assert all({"target", "measured", "met"} == set(t) for t in doc["targets"])
    assert doc["roofline"] is None
    cats = doc["results"][-1]
    assert cats["syncs_per_step"] == 0
    assert cats["state_bytes_per_param"] == pytest.approx(4.0, abs=0.01)
    for key in ("markdown", "plot", "json"):
        assert Path(doc["files"][key]).is_file()


def test_demo_runs_quick_quality_then_quick_speed(monkeypatch, capsys, tmp_path) -> None:
    calls = []

    def fake(kind: str):
        def run(args, quick):
            calls.append((kind, quick))
            return {"files": {"markdown": f"{kind}.md", "plot": f"{kind}.png"}}

        return run

    monkeypatch.setattr(cli, "run_quality_command", fake("quality"))
    monkeypatch.setattr(cli, "run_speed_command", fake("speed"))
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert calls == [("quality", True), ("speed", True)]
    assert "quality.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quality", "--workloads", "mnist"], "Invalid --workloads: mnist"),
        (["quality", "--optimizers", "sgd"], "Invalid --optimizers: sgd"),
        (["quality", "--seeds", "a,b"], "Invalid --seeds"),
        (["speed", "--layouts", "conv"], "Invalid --layouts: conv"),
        (["speed", "--roofline"], "Invalid --roofline: needs --device cuda"),
        (["quality", "--workloads", ","], "argument --workloads: empty"),  # ($EMPTY,)
        (["speed", "--optimizers", ""], "argument --optimizers: empty"),
        (["quality", "--out", __file__], "argument --out: "),  # a file: before any run
    ],
)
def test_bad_arguments_name_the_flag(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        cli.main([*argv, "--no-progress"])
    assert err.value.code == 2  # like argparse's own errors
    text = capsys.readouterr().err
    assert message in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--quick", "--optimizers", "prodigy"],
            "--optimizers: prodigy is not timed in quick mode",
        ),
        (["--quick", "--optimizers", "emosens-use"], "emosens-use is not timed in quick mode"),
        (["--optimizers", "emocats-compiled"], "emocats-compiled is timed only with --compile"),
    ],
)
def test_speed_optimizers_left_out_by_a_flag_say_which_flag(argv, message, capsys) -> None:
    """Prodigy is timed by the full run only: "Invalid --optimizers: prodigy" was wrong."""
    with pytest.raises(SystemExit) as err:
        cli.main(["speed", *argv, "--no-progress"])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert message in text and "Invalid" not in text


def test_an_out_folder_that_cannot_be_made_is_refused_before_the_run(
    tmp_path, capsys, monkeypatch
) -> None:
    """--out inside a file failed with a bare NotADirectoryError after the whole run."""
    from emo_bench import quality

    monkeypatch.setattr(quality, "run_quality", lambda *a, **k: pytest.fail("ran first"))
    a_file = tmp_path / "results.md"
    a_file.write_text("")
    with pytest.raises(SystemExit) as err:
        cli.main(["quality", "--out", str(a_file / "run1"), "--no-progress"])
    assert err.value.code == 2
    assert "argument --out: " in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_a_device_the_benchmarks_cannot_run_on_is_refused(device, capsys) -> None:
    """meta/mps parsed, then the first run failed with a bare RuntimeError."""
    with pytest.raises(SystemExit) as err:
        cli.main(["speed", "--device", device, "--no-progress"])
    assert err.value.code == 2
    assert f"argument --device: Invalid --device: {device!r}" in capsys.readouterr().err


def test_an_exact_optimizer_name_picks_one_entry_and_a_prefix_picks_all() -> None:
    names = ["AdamW fused", "AdamW foreach", "EmoCats", "EmoCats compile_update"]
    assert cli._pick(["emocats"], names, "--optimizers") == ["EmoCats"]
    assert cli._pick(["emocats-compile"], names, "--optimizers") == ["EmoCats compile_update"]
    assert cli._pick(["adamw"], names, "--optimizers") == ["AdamW fused", "AdamW foreach"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--profile", "emosnes"],
        ["--profile", "emosens,nosuch"],
        ["--profile", "emosens", "--optimizers", "emocats"],  # profiled only if timed
        ["--quick", "--profile", "prodigy"],
    ],
)
def test_speed_profile_names_are_checked_before_the_run(argv, capsys, monkeypatch) -> None:
    """An unknown --profile name was skipped silently after the whole timing run."""
    from emo_bench import speed

    monkeypatch.setattr(speed, "run_speed", lambda **kw: pytest.fail("ran before the check"))
    with pytest.raises(SystemExit) as err:
        cli.main(["speed", *argv, "--no-progress"])
    assert err.value.code == 2
    assert "emo-bench: error: Invalid --profile: " in capsys.readouterr().err


def test_compare_scores_a_factory_against_a_stored_tuned_adamw(tmp_path: Path, capsys) -> None:
    """The one-liner for trying a new optimizer: gaps against the numbers a run stored."""
    import torch

    from emo_bench.quality import compare, run_one
    from emo_bench.workloads import WORKLOADS

    doc = _run_json(
        capsys,
        ["quality", "--steps", "6", "--seeds", "0", "--workloads", "quadratic,digits"]
        + ["--optimizers", "adamw", "--out", str(tmp_path), "--json", "--no-progress"],
    )
    path = tmp_path / "quality.json"
    tuned = next(r for r in doc["results"] if r["workload"] == "quadratic" and r["role"] == "tuned")

    def sgd(ps):
        return torch.optim.SGD(ps, lr=0.05)

    result = compare(sgd, name="SGD", workloads=["quadratic"], seeds=[0], reference=path)
    mine = run_one(WORKLOADS["quadratic"], sgd, 0, steps=6).metric  # the stored steps
    expected = 100 * (mine - tuned["mean"]) / tuned["mean"]
    row = result.rows[0]
    assert row.optimizer == "SGD"
    assert row.gaps["quadratic"] == pytest.approx(expected)
    assert row.geomean_ratio == pytest.approx(1 + expected / 100)
    assert "| SGD | " in str(result) and str(path) in str(result)
    with pytest.raises(ValueError, match="no stored tuned AdamW for conv"):
        compare(sgd, workloads=["conv"], seeds=[0], reference=path)


def test_a_seed_given_twice_is_refused(capsys, monkeypatch) -> None:
    """--seeds 0,0 ran seed 0 twice and reported 2 seeds with std 0."""
    from emo_bench import quality

    monkeypatch.setattr(quality, "run_quality", lambda *a, **k: pytest.fail("ran first"))
    with pytest.raises(SystemExit) as err:
        cli.main(["quality", "--seeds", "0,1,0", "--no-progress"])
    assert err.value.code == 2
    assert "argument --seeds: Invalid --seeds: '0,1,0' (0 given twice)" in capsys.readouterr().err


def test_an_installed_package_has_no_stored_reference_and_says_what_to_pass(
    tmp_path, monkeypatch
) -> None:
    """The wheel ships no results: compare()'s default reference says what to pass instead
    of a bare FileNotFoundError; the machine line does not read a surrounding repository."""
    from emo_bench import machine, summary

    monkeypatch.setattr(summary, "RESULTS_JSON", tmp_path / "quality.json")
    with pytest.raises(FileNotFoundError, match=r"reference='measure'.*reference=PATH"):
        summary.load_reference("stored")
    monkeypatch.setattr(machine, "RUNNING_FROM_CLONE", False)
    assert machine._source_revision() == "installed"
