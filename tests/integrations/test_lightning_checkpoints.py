"""``python -m emo_lightning.example``: a real run killed and resumed, real damaged files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")
yaml = pytest.importorskip("yaml")

from emo_core.checkpoint import CorruptCheckpointError, IncompleteCheckpointWarning  # noqa: E402
from emo_lightning.example import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _config(path: Path) -> Path:
    """The shipped EmoSens config, with a checkpoint at the end of every epoch, no logger."""
    config = yaml.safe_load((ROOT / "configs" / "lightning" / "digits.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(logger=False, enable_progress_bar=False)
    trainer["callbacks"] = [
        trainer["callbacks"][0],  # EmoCallback
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"filename": "{epoch}", "save_top_k": -1},
        },
    ]
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, root: Path, epochs: int, *extra: str):
    return main(
        [
            "fit",
            "--config",
            str(config),
            f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={root}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real CLI run of 1000 epochs, SIGKILLed once its epoch-1 checkpoint is on disk."""
    tmp = tmp_path_factory.mktemp("killed_run")
    config, root = _config(tmp / "config.yaml"), tmp / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "emo_lightning.example", "fit", "--config", str(config)]
    process = subprocess.Popen(
        [*command, "--trainer.max_epochs=1000", f"--trainer.default_root_dir={root}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (root / "checkpoints" / "epoch=1.ckpt").is_file():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never wrote its checkpoints"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return config, root


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["emo_lightning.example"])  # not pytest's arguments


def test_resume_of_killed_run_from_epoch_checkpoint_is_exact(
    killed_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, root = killed_run
    checkpoint = root / "checkpoints" / "epoch=0.ckpt"
    resumed = _fit(config, tmp_path / "resumed", 3, f"--ckpt_path={checkpoint}").trainer
    full = _fit(config, tmp_path / "full", 3).trainer

    assert resumed.global_step == full.global_step
    for (name, a), b in zip(
        full.lightning_module.named_parameters(), resumed.lightning_module.parameters()
    ):
        assert torch.equal(a, b), name  # epochs 1 and 2 saw the same batches in the same order
    assert resumed.optimizers[0].telemetry() == full.optimizers[0].telemetry()


def test_latest_skips_a_damaged_newer_checkpoint(
    killed_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, killed = killed_run
    root = Path(shutil.copytree(killed, tmp_path / "run"))
    whole = max((root / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    damaged = root / "checkpoints" / "epoch=999.ckpt"  # what an interrupted copy leaves
    damaged.write_bytes(whole.read_bytes()[:1000])

    with pytest.warns(IncompleteCheckpointWarning, match="epoch=999.ckpt"):
        cli = _fit(config, root, 2, "--ckpt_path=latest")
    assert Path(cli.trainer.ckpt_path) == whole.resolve()


def test_garbage_checkpoint_is_one_clear_error(
    killed_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, root = killed_run
    garbage = tmp_path / "epoch=0.ckpt"
    size = (root / "checkpoints" / "epoch=0.ckpt").stat().st_size
    garbage.write_bytes(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes())

    with pytest.raises(CorruptCheckpointError, match=r"ckpt_path.*epoch=0\.ckpt"):
        _fit(config, tmp_path / "run", 2, f"--ckpt_path={garbage}")
