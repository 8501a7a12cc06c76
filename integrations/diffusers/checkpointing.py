"""Checkpoints that hold what trains (LoRA, class embedding), not the frozen base.

``accelerator.save_state`` would write every model's full state dict: for a real base
that is gigabytes per checkpoint of weights that never change (they are reloaded from
``--pretrained_model_name_or_path`` anyway). These accelerate save/load hooks replace the
model part with ``trainable_<i>.safetensors`` (trainable parameters, in their dtype);
optimizer, LR scheduler, RNG and registered objects are saved by accelerate as usual.

Crash-safe (``emo_core.checkpoint``): ``save_checkpoint`` writes into a hidden staging
folder and renames it to ``checkpoint-<step>`` once every file (and a manifest of them) is
on disk, so a killed run never leaves a folder that ``--resume_from_checkpoint latest``
would pick. ``find_resume_checkpoint("latest")`` takes the newest checkpoint that verifies,
warning about each newer one it skips, and ``load_checkpoint`` checks every file first, so
a damaged one fails with one error that names it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from emo_core import unwrap
from emo_core.checkpoint import (
    NO_MANIFEST_WARNING,
    commit_directory,
    find_latest_checkpoint,
    saved_optimizer_name,
    staging_path,
    verify_resume_checkpoint,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "find_resume_checkpoint",
    "load_checkpoint",
    "register_trainable_checkpointing",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


def _trainable_file(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"trainable_{index}.safetensors"


def register_trainable_checkpointing(accelerator: Any) -> None:
    """Make ``accelerator.save_state``/``load_state`` save and load trainable weights only."""

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        from safetensors.torch import save_file

        for index, model in enumerate(models):
            module = accelerator.unwrap_model(model)
            state = {
                name: p.detach().contiguous().cpu()
                for name, p in module.named_parameters()
                if p.requires_grad
            }
            if accelerator.is_main_process:
                save_file(state, _trainable_file(output_dir, index))
        weights.clear()  # accelerate saves no full state dicts

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        from safetensors.torch import load_file

        for index, model in enumerate(models):
            module = accelerator.unwrap_model(model)
            path = _trainable_file(input_dir, index)
            if not path.is_file():
                raise FileNotFoundError(
                    f"Invalid resume_from_checkpoint: no {path.name} in {input_dir!r} (was it "
                    "written by this script's --checkpointing_steps?)"
                )
            state = load_file(path)
            expected = {n for n, p in module.named_parameters() if p.requires_grad}
            if set(state) != expected:
                raise ValueError(
                    f"Invalid resume_from_checkpoint: {path} holds {len(state)} tensors but the "
                    f"model trains {len(expected)}; resume with the same model and LoRA flags "
                    f"(missing e.g. {sorted(expected - set(state))[:3]}, "
                    f"unexpected e.g. {sorted(set(state) - expected)[:3]})"
                )
            shapes = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
            wrong = sorted(n for n in expected if tuple(state[n].shape) != shapes[n])
            if wrong:  # (load_state_dict's bare RuntimeError, one line per tensor)
                raise ValueError(
                    f"Invalid resume_from_checkpoint: {path} holds {wrong[0]} of shape "
                    f"{tuple(state[wrong[0]].shape)} but the model's is {shapes[wrong[0]]} "
                    f"({len(wrong)} of {len(expected)} tensors differ); resume with the same "
                    "--rank and LoRA flags"
                )
            module.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate loads no full state dicts

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Any, directory: str | Path) -> Path:
    """``accelerator.save_state`` into a staging folder, renamed to ``directory`` when whole."""
    final = Path(directory)
    staging = staging_path(final)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed mid-write
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every rank's files are written
    if accelerator.is_main_process:
        commit_directory(staging, final)
    accelerator.wait_for_everyone()
    return final


def find_resume_checkpoint(
    resume_from_checkpoint: str | None, output_dir: str | Path
) -> Path | None:
    """The folder ``--resume_from_checkpoint`` names: a path, or ``latest`` in ``output_dir``.

    ``latest``: the highest ``checkpoint-<step>`` that verifies (each newer, incomplete one
    is skipped with a warning naming it); None, with a warning, if there is none.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(
                f"Invalid resume_from_checkpoint: {str(path)!r} is not a directory; pass a "
                f"{CHECKPOINT_PREFIX}<step> folder or 'latest'"
            )
        return path
    path = find_latest_checkpoint(output_dir, CHECKPOINT_PREFIX)
    if path is None:
        logger.warning("No complete checkpoint in %s; starting a new run.", output_dir)
    return path


def load_checkpoint(accelerator: Any, directory: str | Path) -> None:
    """Check every file of ``directory``, then ``accelerator.load_state`` it.

    A damaged or cut-short file raises ``CorruptCheckpointError`` naming it, before
    anything is loaded.
    """
    if not verify_resume_checkpoint(directory):
        logger.warning(NO_MANIFEST_WARNING, directory)
    if not any(unwrap(opt) is not None for opt in accelerator._optimizers):
        # another optimizer would take an Emo state's groups and fail later, with a bare
        # KeyError (AdamW at load, Prodigy at its first step)
        owner = saved_optimizer_name(Path(directory) / "optimizer.bin")
        if owner is not None:
            raise ValueError(
                f"Invalid --resume_from_checkpoint: {directory} holds the state of {owner}, "
                f"but this run's --optimizer is another; resume with --optimizer "
                f"{owner.lower()}, or start a new --output_dir"
            )
    accelerator.load_state(str(directory))
