"""Tiny, randomly initialised diffusion pipelines saved in the diffusers layout.

Third-party training scripts (kohya sd-scripts, the diffusers examples) load a pipeline
with ``from_pretrained(path)``. These builders make one small enough to train on a CPU
in seconds, fully offline, so those scripts can be run unmodified against it:

    python integrations/recipes/tiny_models.py sd15 /tmp/tiny-sd15
    python integrations/recipes/tiny_models.py sd3 /tmp/tiny-sd3

The tokenizers are built in memory (a byte-level CLIP BPE vocabulary, a small T5
unigram vocabulary) and saved with ``save_pretrained``; nothing comes from a hub.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch

# Latent geometry shared by both pipelines: 64 px images, 4 VAE blocks (8x down), 4 channels.
IMAGE_SIZE = 64
LATENT_CHANNELS = 4
VAE_BLOCKS = (32, 32, 32, 32)
CLIP_MAX_LENGTH = 77
# sd-scripts loads its CLIP tokenizer from ``--tokenizer_cache_dir/<this name>`` when present.
KOHYA_TOKENIZER_NAME = "openai_clip-vit-large-patch14"


def _byte_unicode_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for the bytes 0..255."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_clip_tokenizer(max_length: int = CLIP_MAX_LENGTH):
    """A CLIP tokenizer over single bytes (no merges): every text encodes, ~515 ids."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _byte_unicode_alphabet():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_t5_tokenizer(max_length: int = CLIP_MAX_LENGTH):
    """A T5 unigram tokenizer over letters, digits and a few whole words."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for word in ("a", "photo", "of", "digit", "handwritten", "sks", "number"):
        pieces.append(("\u2581" + word, -3.0))
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        pieces.append((char, -5.0))
        pieces.append(("\u2581" + char, -5.5))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text_config(tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection is None else {"projection_dim": projection}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_vae(**latent_scaling: float):
    """A 4-block VAE (8x down). SD3 scripts also need ``shift_factor`` in its config."""
    from diffusers import AutoencoderKL

    blocks = len(VAE_BLOCKS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
        **latent_scaling,
    )


def build_tiny_sd15(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny SD1.x pipeline (U-Net with SD1.x's four block types, 2-layer CLIP).

    The U-Net keeps SD1.x's block types and 32 GroupNorm groups but has channels
    (32, 32, 64, 64) and one layer per block, so a LoRA on it trains in milliseconds a step.
    The CLIP tokenizer is also saved where sd-scripts' ``--tokenizer_cache_dir`` looks.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden=32))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (len(VAE_BLOCKS) - 1),
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=build_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    tokenizer.save_pretrained(out / "tokenizer_cache" / KOHYA_TOKENIZER_NAME)
    return out


def build_tiny_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny SD3 pipeline: 2-layer SD3 transformer, two tiny CLIPs and a tiny T5.

    SD3 pads the concatenated CLIP features (32 + 32) to the T5 width, so the T5 width,
    ``joint_attention_dim`` and the CLIP sum are all 64; ``pooled_projection_dim`` is
    the sum of the two CLIP projections (32 + 32).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    clip_1 = CLIPTextModelWithProjection(_clip_text_config(clip_tokenizer, 32, projection=32))
    clip_2 = CLIPTextModelWithProjection(_clip_text_config(clip_tokenizer, 32, projection=32))
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2 ** (len(VAE_BLOCKS) - 1),
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=build_tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),  # SD3's VAE values
        text_encoder=clip_1,
        tokenizer=clip_tokenizer,
        text_encoder_2=clip_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(out)
    return out


BUILDERS = {"sd15": build_tiny_sd15, "sd3": build_tiny_sd3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(BUILDERS), help="which pipeline to build")
    parser.add_argument("out_dir", help="directory to save the pipeline into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(BUILDERS[args.kind](args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
