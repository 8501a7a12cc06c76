"""Crash-safe checkpoints of ``python -m emo_hf.train``: a real run killed, real damage."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from emo_core import unwrap  # noqa: E402
from emo_core.checkpoint import (  # noqa: E402
    MANIFEST_NAME,
    CorruptCheckpointError,
    IncompleteCheckpointWarning,
)
from emo_hf.train import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--optim", "emosens", "--hidden_size", "32", "--num_hidden_layers", "1",
    "--num_attention_heads", "2", "--intermediate_size", "64", "--block_size", "32",
    "--max_chars", "20000", "--per_device_train_batch_size", "8", "--report_to", "none",
    "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--lr_scheduler_type",
    "constant", "--logging_steps", "1", "--plot", "false", "--save_strategy", "steps",
    "--save_steps", "1",
]  # fmt: skip


def _argv(out: Path, steps: int, *extra: str) -> list[str]:
    return [*TINY, "--output_dir", str(out), "--max_steps", str(steps), *extra]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real CLI run, saving every step, SIGKILLed once its third checkpoint is complete."""
    out = tmp_path_factory.mktemp("killed_run") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "emo_hf.train", *_argv(out, 10_000)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-3" / MANIFEST_NAME).is_file():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never wrote its checkpoints"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return out


def _copy(killed_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(killed_run, tmp_path / "out"))


def _complete_steps(out: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / MANIFEST_NAME).is_file()
    )


def test_killed_run_resumes_from_newest_complete_checkpoint_exactly(
    killed_run: Path, tmp_path: Path
) -> None:
    out = _copy(killed_run, tmp_path)
    newest = _complete_steps(out)[-1]
    # What a write killed after the weights leaves (transformers writes the model first).
    half = out / "checkpoint-9000"
    half.mkdir()
    shutil.copy(out / f"checkpoint-{newest}" / "model.safetensors", half)
    steps = newest + 2

    with pytest.warns(IncompleteCheckpointWarning, match="checkpoint-9000"):
        resumed = main(_argv(out, steps, "--resume_from_checkpoint", "latest"))
    uninterrupted = main(_argv(tmp_path / "full", steps, "--save_strategy", "no"))

    assert resumed.state.global_step == uninterrupted.state.global_step == steps
    for (name, a), b in zip(
        uninterrupted.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    telemetry = unwrap(uninterrupted.optimizer).telemetry()
    assert unwrap(resumed.optimizer).telemetry() == telemetry


def test_garbage_optimizer_file_is_one_clear_error(killed_run: Path, tmp_path: Path) -> None:
    out = _copy(killed_run, tmp_path)
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes())

    with pytest.raises(CorruptCheckpointError, match="resume_from_checkpoint.*optimizer.pt"):
        main(_argv(out, 4, "--resume_from_checkpoint", str(out / "checkpoint-2")))


def test_resume_without_optimizer_file_warns_that_loss_statistics_start_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    main(_argv(out, 2, "--save_only_model", "true"))  # checkpoints without optimizer.pt
    checkpoint = out / "checkpoint-2"
    assert not (checkpoint / "optimizer.pt").exists()

    with caplog.at_level(logging.WARNING, logger="emo_hf"):
        trainer = main(_argv(out, 3, "--resume_from_checkpoint", str(checkpoint)))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("optimizer.pt" in m and "loss statistics" in m for m in warned), warned
    assert unwrap(trainer.optimizer).telemetry()["sensed_steps"] == 1  # it did start fresh


def test_a_checkpoint_folder_saved_again_is_unmarked_while_it_is_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run in the same output_dir (here a resume from step 2) dies while rewriting
    checkpoint-3, after the model file and before the optimizer's: the first run's manifest
    must not vouch for that mix of two runs' files."""
    from transformers import Trainer

    from emo_hf.checkpointing import resolve_resume_checkpoint

    out = tmp_path / "out"
    main(_argv(out, 3))
    assert _complete_steps(out) == [1, 2, 3]

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed while writing optimizer.pt")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed)
    with pytest.raises(KeyboardInterrupt):
        main(_argv(out, 3, "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert _complete_steps(out) == [1, 2]
    with pytest.warns(IncompleteCheckpointWarning, match="checkpoint-3"):
        assert Path(resolve_resume_checkpoint("latest", str(out))).name == "checkpoint-2"


def test_an_emo_checkpoint_resumed_with_another_optim_is_one_clear_error(tmp_path: Path) -> None:
    """torch's AdamW failed on the Emo state with a bare ``KeyError: 'step'``."""
    out = tmp_path / "out"
    main(_argv(out, 2))
    argv = _argv(tmp_path / "other", 3, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    argv[argv.index("emosens")] = "adamw_torch"
    with pytest.raises(
        ValueError,
        match=r"optimizer.pt was written by EmoSens, but this run's "
        r"optimizer is AdamW .*optim='emosens'",
    ):
        main([*argv, "--learning_rate", "1e-3"])
