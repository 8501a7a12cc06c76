"""LoRA on the transformer's attention projections, saved in diffusers' format.

``add_lora`` freezes the base and adds a peft adapter (``LoraConfig``) to the attention
projections, like diffusers' ``train_dreambooth_lora_sd3.py``. ``save_lora`` writes
``pytorch_lora_weights.safetensors`` with the pipeline's own ``save_lora_weights`` (keys
prefixed ``transformer.``, adapter config in the metadata), so it loads with
``pipeline.load_lora_weights(dir)`` or ``transformer.load_lora_adapter(dir)`` (``load_lora``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

__all__ = ["DEFAULT_TARGET_MODULES", "LORA_WEIGHT_NAME", "add_lora", "load_lora", "save_lora"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# The joint-attention projections of SD3 and Flux blocks (image stream, then text stream).
DEFAULT_TARGET_MODULES = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def add_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
) -> list[nn.Parameter]:
    """Freeze ``transformer`` and add a LoRA adapter; returns the adapter's parameters.

    ``alpha`` defaults to ``rank`` (scale 1). LoRA weights take the base weights' dtype, so a
    bf16 base gets bf16 adapters.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"Invalid rank: {rank} (expected an integer >= 1)")
    if not target_modules:
        raise ValueError("Invalid lora_layers: empty (name at least one module, e.g. attn.to_q)")
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    transformer.add_adapter(config)
    return [p for p in transformer.parameters() if p.requires_grad]


def _loader_mixin(model_type: str):
    from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin

    mixins = {"sd3": SD3LoraLoaderMixin, "flux": FluxLoraLoaderMixin}
    if model_type not in mixins:
        raise ValueError(
            f"Invalid model_type: {model_type!r} (expected one of {', '.join(mixins)})"
        )
    return mixins[model_type]


def save_lora(transformer: nn.Module, model_type: str, directory: str | Path) -> Path:
    """Write the adapter as ``directory/pytorch_lora_weights.safetensors`` (weights' dtype)."""
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    _loader_mixin(model_type).save_lora_weights(
        save_directory=directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        weight_name=LORA_WEIGHT_NAME,
    )
    return directory / LORA_WEIGHT_NAME


def load_lora(transformer: nn.Module, directory: str | Path, adapter_name: str = "default"):
    """Load a saved adapter into ``transformer`` with diffusers' ``load_lora_adapter``."""
    transformer.load_lora_adapter(
        str(directory),
        prefix="transformer",
        weight_name=LORA_WEIGHT_NAME,
        adapter_name=adapter_name,
    )
    return transformer
