"""Shipped configs by name (``emo_configs``), for every CLI; emo-bench's results folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from emo_configs import ConfigNotFoundError, resolve_config, shipped_configs

REPO = Path(__file__).resolve().parents[2]


def test_every_config_in_the_repo_is_shipped() -> None:
    on_disk = sorted(p.relative_to(REPO / "configs").as_posix() for p in REPO.glob("configs/*/*.*"))
    assert sorted(shipped_configs()) == on_disk
    assert sorted(shipped_configs("hf")) == [n for n in on_disk if n.startswith("hf/")]


@pytest.mark.parametrize(
    "name", ["tiny_sd3_lora", "tiny_sd3_lora.yaml", "diffusers/tiny_sd3_lora.yaml",
             "configs/diffusers/tiny_sd3_lora.yaml", "./configs/diffusers/tiny_sd3_lora"],
)  # fmt: skip
def test_a_name_resolves_to_the_shipped_file(tmp_path, monkeypatch, name) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert resolve_config(name, "diffusers") == REPO / "configs/diffusers/tiny_sd3_lora.yaml"


def test_an_existing_path_wins(tmp_path) -> None:
    own = tmp_path / "tiny_sd3_lora"
    own.write_text("rank: 2\n")
    assert resolve_config(own, "diffusers") == own


def test_unknown_name_lists_the_shipped_names_of_that_kind() -> None:
    with pytest.raises(
        ConfigNotFoundError, match=r"shipped: digits, digits_emoairy, digits_emocats"
    ):
        resolve_config("digits_adam", "lightning")
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped hf config"):
        resolve_config("tiny_sd3_lora", "hf")  # a diffusers config is not an hf one


def test_diffusers_cli_takes_a_name(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("diffusers")
    from emo_diffusers.train_lora_flow import parse_args

    monkeypatch.chdir(tmp_path)
    assert parse_args(["--config", "tiny_flux_lora"]).model_type == "flux"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", "tiny_sd4_lora"])
    assert exit_info.value.code == 2
    assert "shipped: tiny_flux_lora, tiny_sd3_lora" in capsys.readouterr().err


def test_lightning_cli_config_names_become_paths(capsys) -> None:
    pytest.importorskip("lightning")
    from emo_lightning.example import resolve_config_args

    path = str(REPO / "configs/lightning/digits_emoairy.yaml")
    assert resolve_config_args(["fit", "--config", "digits_emoairy"]) == [
        "fit", "--config", path,
    ]  # fmt: skip
    assert resolve_config_args(["fit", "--config=lightning/digits_emoairy.yaml"]) == [
        "fit", f"--config={path}",
    ]  # fmt: skip
    assert resolve_config_args(["fit", "-c", "{trainer: {max_epochs: 1}}"])[2].startswith("{")
    with pytest.raises(SystemExit) as exit_info:
        resolve_config_args(["fit", "--config", "digitz"])
    assert exit_info.value.code == 2
    assert "shipped: digits, digits_emoairy, digits_emocats" in capsys.readouterr().err


def test_bench_results_stay_in_the_clone_when_run_from_it() -> None:
    from emo_bench import cli

    assert cli.RUNNING_FROM_CLONE
    assert cli.RESULTS_DIR == REPO / "emo_bench" / "results"
