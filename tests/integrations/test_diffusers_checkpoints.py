"""Crash-safe checkpoints of ``emo_diffusers.train_lora_flow``: a real run killed, real damage."""

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

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from emo_core.checkpoint import (  # noqa: E402
    MANIFEST_NAME,
    CorruptCheckpointError,
    IncompleteCheckpointWarning,
)
from emo_diffusers.train_lora_flow import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "diffusers" / "tiny_sd3_lora.yaml"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each run here starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _argv(out: Path, base: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIG), "--output_dir", str(out), "--base_model_dir", str(base),
        "--max_train_steps", str(steps), "--train_batch_size", "4", "--mixed_precision", "no",
        "--samples_per_class", "1", "--num_inference_steps", "1", "--report_to", "none",
        "--disable_progress_bar", "--pretrain_steps", "0", "--no-evaluate", *extra,
    ]  # fmt: skip


def _trained(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "pytorch_lora_weights.safetensors")


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never wrote its checkpoints"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real CLI run, checkpointing every step, SIGKILLed once its third checkpoint landed.

    Checkpoint writes take most of such a run's time, so the kill mostly lands mid-write.
    """
    root = tmp_path_factory.mktemp("killed_run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "emo_diffusers.train_lora_flow",
         *_argv(root / "out", root / "base", 10_000, "--checkpointing_steps", "1")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _kill_when(process, lambda: (root / "out" / "checkpoint-3").is_dir())
    return root


def _copy_run(killed_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(killed_run, tmp_path, dirs_exist_ok=True)
    return tmp_path / "out", tmp_path / "base"


def test_killed_run_resumes_from_newest_complete_checkpoint_exactly(
    killed_run: Path, tmp_path: Path
) -> None:
    killed, base = _copy_run(killed_run, tmp_path)
    complete = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert complete and all(
        (killed / f"checkpoint-{s}" / MANIFEST_NAME).is_file() for s in complete
    )
    newest = complete[-1]
    # What a write interrupted the old way leaves: the folder, the weights, half an optimizer.
    half = killed / "checkpoint-9000"
    half.mkdir()
    shutil.copy(killed / f"checkpoint-{newest}" / "trainable_0.safetensors", half)
    optimizer = (killed / f"checkpoint-{newest}" / "optimizer.bin").read_bytes()
    (half / "optimizer.bin").write_bytes(optimizer[: len(optimizer) // 2])

    steps = newest + 2
    with pytest.warns(IncompleteCheckpointWarning, match="checkpoint-9000"):
        resumed = main(_argv(killed, base, steps, "--resume_from_checkpoint", "latest"))
    uninterrupted = main(_argv(tmp_path / "full", base, steps))

    assert resumed["steps"] == uninterrupted["steps"] == steps
    assert resumed["final_loss"] == uninterrupted["final_loss"]
    expected, got = _trained(tmp_path / "full"), _trained(killed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("damage", ["garbage optimizer.bin", "truncated trainable_0.safetensors"])
def test_damaged_checkpoint_file_is_one_clear_error(
    killed_run: Path, tmp_path: Path, damage: str
) -> None:
    out, base = _copy_run(killed_run, tmp_path)
    checkpoint = out / "checkpoint-1"
    how, name = damage.split(" ")
    path = checkpoint / name
    if how == "garbage":
        size = path.stat().st_size
        path.write_bytes(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes())
    else:
        path.write_bytes(path.read_bytes()[:-7])

    with pytest.raises(CorruptCheckpointError, match=f"resume_from_checkpoint.*{name}"):
        main(_argv(out, base, 2, "--resume_from_checkpoint", str(checkpoint)))


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_an_emo_checkpoint_resumed_with_another_optimizer_is_one_clear_error(
    tmp_path: Path, optimizer: str
) -> None:
    """AdamW failed with a bare ``KeyError: 'step'`` at load, Prodigy with one at its first
    step (it had taken the Emo state's param groups)."""
    out, base = tmp_path / "out", tmp_path / "base"
    main(_argv(out, base, 2, "--checkpointing_steps", "2"))
    argv = _argv(tmp_path / "other", base, 4, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    with pytest.raises(ValueError, match=r"holds the state of EmoSens.*--optimizer emosens"):
        main([*argv, "--optimizer", optimizer])


def test_a_checkpoint_resumed_with_another_rank_is_one_clear_error(tmp_path: Path) -> None:
    """The same LoRA tensors at another --rank failed with load_state_dict's bare
    RuntimeError (a "size mismatch" line per tensor)."""
    out, base = tmp_path / "out", tmp_path / "base"
    main(_argv(out, base, 2, "--checkpointing_steps", "2", "--rank", "2"))
    argv = _argv(tmp_path / "other", base, 4, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    with pytest.raises(ValueError, match=r"lora_A.* of shape \(2, .*same --rank and LoRA flags"):
        main([*argv, "--rank", "4"])


def test_a_new_run_in_an_output_dir_with_another_runs_checkpoints_is_refused(
    tmp_path: Path,
) -> None:
    """A 4-step run in a 6-step run's folder left its checkpoint-6, which ``latest`` then
    resumed from: the other run's LoRA, optimizer state and history, silently."""
    out, base = tmp_path / "out", tmp_path / "base"
    main(_argv(out, base, 6, "--checkpointing_steps", "2"))
    with pytest.raises(ValueError, match=r"holds another run's checkpoints \(checkpoint-2, "):
        main(_argv(out, base, 4, "--checkpointing_steps", "2", "--learning_rate", "0.5"))
    main(_argv(out, base, 8, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"))
