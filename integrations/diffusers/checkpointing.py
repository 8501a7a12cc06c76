"""Checkpoints that hold what trains (LoRA, class embedding), not the frozen base.

``accelerator.save_state`` would write every model's full state dict: for a real base
that is gigabytes per checkpoint of weights that never change (they are reloaded from
``--pretrained_model_name_or_path`` anyway). These accelerate save/load hooks replace the
model part with ``trainable_<i>.safetensors`` (trainable parameters, in their dtype);
optimizer, LR scheduler, RNG and registered objects are saved by accelerate as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["register_trainable_checkpointing"]


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
            module.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate loads no full state dicts

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
