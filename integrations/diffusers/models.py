"""The "pretrained" base transformer and one forward for SD3 and Flux.

``build_base_model`` random-initialises a tiny ``SD3Transformer2DModel`` or
``FluxTransformer2DModel`` from a config and writes it with ``save_pretrained``;
``load_transformer`` reads any local diffusers transformer directory with
``from_pretrained``. So the training script always takes the real loading path, and
``--pretrained_model_name_or_path`` can point at a real model directory instead.

``FlowModel`` puts the transformer and the class conditioner behind one call,
``model(latents, timesteps, labels) -> velocity``, hiding the two families' input
conventions (SD3: image latents and timesteps in [0, 1000]; Flux: 2x2-packed latent tokens
with position ids and timesteps in [0, 1]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .conditioning import ClassConditioner

__all__ = ["MODEL_TYPES", "TINY_CONFIGS", "FlowModel", "build_base_model", "load_transformer"]

# model_type -> diffusers class name
MODEL_TYPES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}

# Tiny transformers that pretrain in minutes and LoRA-train in seconds on a CPU (the shipped
# configs' sizes). Latents are 4 x 8 x 8 (a 16 x 16 grey
# image through ``PixelCodec``); Flux packs 2 x 2 latent patches, hence in_channels 16, and
# its rotary axes must add up to attention_head_dim.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3": {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 64,
        "caption_projection_dim": 64,
        "pooled_projection_dim": 64,
        "pos_embed_max_size": 8,
    },
    "flux": {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "axes_dims_rope": [4, 6, 6],
    },
}


def _model_class(model_type: str) -> type[nn.Module]:
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"Invalid model_type: {model_type!r} (expected one of {', '.join(MODEL_TYPES)})"
        )
    import diffusers

    return getattr(diffusers, MODEL_TYPES[model_type])


def build_base_model(
    model_type: str, transformer_config: dict[str, Any], directory: str | Path, seed: int = 0
) -> Path:
    """Write a random-init transformer to ``directory`` with ``save_pretrained``, once.

    An existing model in ``directory`` with the same class and config is kept as is (so a
    resumed run trains on the same base); a different one is an error. The init is seeded
    by ``seed`` without touching the global RNG.
    """
    directory = Path(directory)
    cls = _model_class(model_type)
    config_file = directory / "config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        wanted = {
            "_class_name": MODEL_TYPES[model_type],
            **json.loads(json.dumps(transformer_config)),
        }
        different = sorted(k for k, v in wanted.items() if saved.get(k) != v)
        if different:
            raise ValueError(
                f"Invalid base_model_dir: {str(directory)!r} holds a base built with other "
                f"settings ({', '.join(different)}); delete it or pass another --base_model_dir"
            )
        return directory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**transformer_config)
    model.save_pretrained(directory)
    return directory


def load_transformer(path: str | Path, dtype: torch.dtype) -> tuple[str, nn.Module]:
    """``(model_type, transformer)`` from a local diffusers directory, weights in ``dtype``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"Invalid pretrained_model_name_or_path: {str(path)!r} has no config.json; pass a "
            "local directory written by save_pretrained (the hub is not used)"
        )
    class_name = json.loads(config_file.read_text()).get("_class_name")
    by_class = {name: key for key, name in MODEL_TYPES.items()}
    if class_name not in by_class:
        raise ValueError(
            f"Invalid pretrained_model_name_or_path: {str(path)!r} holds a {class_name}; "
            f"supported: {', '.join(by_class)}"
        )
    model_type = by_class[class_name]
    transformer = _model_class(model_type).from_pretrained(path, torch_dtype=dtype)
    return model_type, transformer


class FlowModel(nn.Module):
    """Transformer + class conditioner: ``forward(latents, timesteps, labels) -> velocity``.

    ``latents`` are ``[B, C, H, W]`` image latents, ``timesteps`` are ``sigma * 1000``
    (as diffusers' scheduler hands them out) and the output has the latents' shape.
    """

    def __init__(self, transformer: nn.Module, conditioner: ClassConditioner, model_type: str):
        super().__init__()
        _model_class(model_type)  # validates the name
        self.transformer = transformer
        self.conditioner = conditioner
        self.model_type = model_type

    @property
    def latent_channels(self) -> int:
        channels = self.transformer.config.in_channels
        return channels // 4 if self.model_type == "flux" else channels

    def forward(self, latents: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
        dtype = self.transformer.dtype
        tokens, pooled = self.conditioner(labels)
        tokens, pooled = tokens.to(dtype), pooled.to(dtype)
        if self.model_type == "sd3":
            return self.transformer(
                hidden_states=latents.to(dtype),
                encoder_hidden_states=tokens,
                pooled_projections=pooled,
                timestep=timesteps,
                return_dict=False,
            )[0]
        return self._flux_forward(latents.to(dtype), timesteps, tokens, pooled)

    def _flux_forward(self, latents: Tensor, timesteps: Tensor, tokens: Tensor, pooled: Tensor):
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs 2x2 latent patches; latent size {h}x{w} must be even")
        packed = (
            latents.view(b, c, h // 2, 2, w // 2, 2)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, (h // 2) * (w // 2), c * 4)
        )
        rows = torch.arange(h // 2, device=latents.device).repeat_interleave(w // 2)
        cols = torch.arange(w // 2, device=latents.device).repeat(h // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(latents.dtype)
        txt_ids = torch.zeros(tokens.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.ones(b, device=latents.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=packed,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=timesteps / 1000.0,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
