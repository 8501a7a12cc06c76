"""LoRA flow-matching fine-tuning of an SD3/Flux transformer with an Emo optimizer.

Reads like diffusers' ``train_dreambooth_lora_sd3.py``, in small pieces, and runs offline:

    python -m emo_diffusers.train_lora_flow --config tiny_sd3_lora \\
        --optimizer emosens --mixed_precision bf16 --max_train_steps 300 --output_dir out/lora

* base: a local diffusers transformer directory (``--pretrained_model_name_or_path``), or a
  tiny random-init one written once with ``save_pretrained`` to ``<output_dir>/base_model``
  and loaded back with ``from_pretrained``;
* conditioning: a learned class embedding instead of text encoders (``conditioning.py``);
* data: sklearn digits or ``--train_data_dir``, through a lossless pixel "VAE" (``data.py``);
* training: rectified flow as diffusers does it (``flow_matching.py``), LoRA via peft, all
  weights in bf16 with ``--mixed_precision bf16`` (Emo keeps fp32 state and rounds bf16
  updates stochastically), accelerate for precision, accumulation and checkpoints;
* outputs in ``--output_dir``: ``pytorch_lora_weights.safetensors`` (diffusers format),
  ``class_conditioner.safetensors``, ``samples.png``, ``loss_lr.png``, ``history.json``
  (per-step loss, LR, seconds), ``metrics.json`` (summary),
  TensorBoard logs under ``logs/``, and ``checkpoint-<step>/`` folders (trainable weights,
  optimizer with its loss statistics, LR schedule, RNG, loss history; ``checkpointing.py``).

Every micro-batch's data, noise and timesteps are drawn from ``(seed, micro-batch index)``,
so ``--resume_from_checkpoint`` continues exactly where the saved run was.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from emo_configs import ConfigNotFoundError, resolve_config, shipped_configs
from emo_core import log_metrics, unwrap
from emo_core.extras import require_extra
from emo_core.optim_args import as_flag_error

from .checkpointing import (
    CHECKPOINT_PREFIX,
    find_resume_checkpoint,
    load_checkpoint,
    register_trainable_checkpointing,
    save_checkpoint,
)
from .conditioning import (
    CONDITIONER_WEIGHT_NAME,
    ClassConditioner,
    load_conditioner,
    save_conditioner,
)
from .data import BatchOrder, ImageSet, PixelCodec, class_names, load_images
from .evaluation import evaluate_samples, save_comparison
from .flow_matching import (
    WEIGHTING_SCHEMES,
    add_noise,
    flow_matching_loss,
    loss_weighting,
    sample_density,
    sigmas_from_density,
    velocity_target,
)
from .history import TrainHistory
from .judge import load_or_train_judge
from .lora import DEFAULT_TARGET_MODULES, add_lora, save_lora
from .models import MODEL_TYPES, TINY_CONFIGS, FlowModel, build_base_model, load_transformer
from .optimizers import (
    OPTIMIZERS,
    build_optimizer,
    effective_lr,
    optimizer_state_bytes,
    parse_optimizer_args,
)
from .pretraining import (
    PRETRAIN_INFO,
    PretrainSpec,
    data_fingerprint,
    default_cache_dir,
    ensure_pretrained_base,
)

__all__ = [
    "TrainingSetup",
    "build_accelerator",
    "build_data",
    "build_model",
    "build_training",
    "main",
    "parse_args",
    "train_step",
]

logger = logging.getLogger(__name__)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


# --------------------------------------------------------------------------- arguments
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emo_diffusers.train_lora_flow",
        description="LoRA flow-matching fine-tuning (SD3/Flux transformer) with Emo optimizers.",
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML file of defaults (keys = flag names), or a shipped one by name: "
        + ", ".join(Path(name).stem for name in shipped_configs("diffusers")),
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Local diffusers transformer directory (a class_conditioner.safetensors next to "
        "its config.json is used too). Default: a tiny --model_type model pretrained here "
        "on --pretrain_classes, cached in --cache_dir, loaded back with from_pretrained.",
    )
    g.add_argument("--model_type", default="sd3", choices=sorted(MODEL_TYPES))
    g.add_argument(
        "--transformer_config",
        type=json.loads,
        default=None,
        help="JSON (or a YAML mapping) of constructor arguments for the tiny base. "
        "Default: models.TINY_CONFIGS[model_type].",
    )
    g.add_argument(
        "--base_model_dir",
        default=None,
        help="Where the tiny base is written. Default: <cache_dir>/base-<model_type>-<hash of "
        "its settings> (reused while they are unchanged); <output_dir>/base_model with "
        "--pretrain_steps 0.",
    )
    g.add_argument("--base_seed", type=int, default=0, help="Seed of the base's random init.")
    g.add_argument(
        "--cache_dir",
        default=None,
        help="Cache of pretrained bases and the sample classifier. Default: "
        "$EMO_DIFFUSERS_CACHE or ~/.cache/emo_diffusers.",
    )
    g.add_argument(
        "--pretrain_steps",
        type=int,
        default=3000,
        help="Full-model pretraining steps of the tiny base (fp32, AdamW, once, cached); "
        "0: a random-init base.",
    )
    g.add_argument(
        "--pretrain_classes",
        default="",
        help="Comma-separated class names the tiny base is pretrained on (a list in YAML); "
        "empty: all. The shipped configs: 0-4.",
    )
    g.add_argument("--pretrain_learning_rate", type=float, default=1e-3)
    g.add_argument("--pretrain_batch_size", type=int, default=32)
    g.add_argument(
        "--scheduler_shift", type=float, default=3.0, help="Flow-matching schedule shift."
    )
    g.add_argument("--num_tokens", type=int, default=4, help="Tokens per class prompt.")
    g.add_argument(
        "--train_conditioner",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Train the class embedding together with the LoRA.",
    )
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, default=None, help="Default: --rank.")
    g.add_argument(
        "--lora_layers",
        default=",".join(DEFAULT_TARGET_MODULES),
        help="Comma-separated module names to adapt (a list in YAML). Default: the attention "
        "projections.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--train_data_dir", default=None, help="Image folder; default sklearn digits.")
    g.add_argument(
        "--train_classes",
        default="",
        help="Comma-separated class names the LoRA learns and is measured on (a list in "
        "YAML); empty: all. The shipped configs: 5-9, which their base never saw.",
    )
    g.add_argument("--resolution", type=int, default=16, help="Image size; latents are half.")
    g.add_argument("--train_batch_size", type=int, default=16)
    g = p.add_argument_group("flow matching")
    g.add_argument("--weighting_scheme", default="logit_normal", choices=WEIGHTING_SCHEMES)
    g.add_argument("--logit_mean", type=float, default=0.0)
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29)
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", default="emosens", choices=list(OPTIMIZERS))
    g.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Default: 1.0 for Emo optimizers and Prodigy (a multiplier), 1e-4 for AdamW.",
    )
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument(
        "--optimizer_args",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help='Further optimizer keywords, kohya style: --optimizer_args "max_lr=3e-3" '
        '"use_shadow=True" (a mapping in YAML); type-checked against the optimizer.',
    )
    g.add_argument(
        "--stochastic_rounding",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Emo optimizers: round bf16 parameter updates stochastically.",
    )
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=300)
    g.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default="out/lora_flow")
    g.add_argument("--checkpointing_steps", type=int, default=0, help="0: no checkpoints.")
    g.add_argument(
        "--resume_from_checkpoint", default=None, help="'latest' or a checkpoint directory."
    )
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"])
    g.add_argument("--logging_steps", type=int, default=1, help="Loss/LR readout cadence.")
    g.add_argument("--samples_per_class", type=int, default=4, help="Rows of samples.png.")
    g.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Label base and base+LoRA samples of --train_classes with a small classifier "
        "(trained once, cached) and write sample_accuracy_base/_lora to metrics.json.",
    )
    g.add_argument("--eval_samples_per_class", type=int, default=20)
    g.add_argument("--num_inference_steps", type=int, default=20)
    g.add_argument("--disable_progress_bar", action="store_true")
    return p


def _load_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    import yaml

    try:
        config_path = resolve_config(path, "diffusers")  # a path or a shipped name
    except ConfigNotFoundError as error:
        parser.error(f"--config: {error}")
    data = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(data, dict):
        parser.error(f"--config {path!r}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    for key, value in data.items():
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(str(key), list(actions), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (keys are the flag names)"
            parser.error(f"--config {path!r}: unknown key {key!r}{hint}")
        if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction) and (
            not isinstance(value, bool)
        ):
            parser.error(f"--config {path!r}: {key} must be true or false, got {value!r}")
    for key in ("lora_layers", "pretrain_classes", "train_classes"):
        if isinstance(data.get(key), list):  # a YAML list of names
            data[key] = ",".join(map(str, data[key]))
        elif isinstance(data.get(key), int | float) and not isinstance(data[key], bool):
            data[key] = str(data[key])  # one name: `train_classes: 7` (0 is class 0, not "all")
    if data.get("mixed_precision") is False:  # YAML 1.1 reads a bare `no` as false
        data["mixed_precision"] = "no"
    if data.get("optimizer_args") is not None and not isinstance(
        data["optimizer_args"], dict | list
    ):
        parser.error(
            f"--config {path!r}: optimizer_args must be a mapping (max_lr: 3.0e-3) or a list "
            "of key=value strings"
        )
    return data


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags, with defaults taken from ``--config`` (YAML) and overridden on the command line."""
    require_extra(
        "emo_diffusers.train_lora_flow", "diffusers", "yaml", "diffusers", "peft", "accelerate"
    )
    parser = _parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None:
        parser.set_defaults(**_load_config(parser, pre.config))
    args = parser.parse_args(argv)
    for action in parser._actions:  # argparse checks choices only for command-line values
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            parser.error(
                f"argument {action.option_strings[0]}: invalid choice: {value!r} "
                f"(choose from {', '.join(map(str, action.choices))})"
            )
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("checkpointing_steps", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.logging_steps < 1:
        parser.error(f"--logging_steps must be >= 1, got {args.logging_steps}")
    if args.resolution < 2 or args.resolution % 2:
        parser.error(f"--resolution must be an even number >= 2, got {args.resolution}")
    if args.transformer_config is not None and not isinstance(args.transformer_config, dict):
        parser.error("--transformer_config must be a JSON object / YAML mapping")
    for name in (
        "pretrain_batch_size",
        "eval_samples_per_class",
        "samples_per_class",  # (0 trained the whole run, then failed in sampling)
        "num_inference_steps",  # (0 "sampled" pure noise)
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.scheduler_shift > 0:  # (0: every sigma 0, training on clean images)
        parser.error(f"--scheduler_shift must be > 0, got {args.scheduler_shift}")
    if not args.logit_std >= 0:
        parser.error(f"--logit_std must be >= 0, got {args.logit_std}")
    if args.pretrain_steps < 0:
        parser.error(f"--pretrain_steps must be >= 0, got {args.pretrain_steps}")
    try:
        _check_resolution(args)
        _check_optimizer(args)
        names = class_names(args.train_data_dir)
        class_indices(args.train_classes, names, "train_classes")
        if args.pretrained_model_name_or_path is None:
            class_indices(args.pretrain_classes, names, "pretrain_classes")
    except ValueError as err:
        parser.error(str(err))
    return args


def _base_config(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``(model_type, transformer config)`` of the base the run will load."""
    if args.pretrained_model_name_or_path is not None:
        config_file = Path(args.pretrained_model_name_or_path) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        model_type = {v: k for k, v in MODEL_TYPES.items()}.get(config.get("_class_name"), "sd3")
        return model_type, config
    return args.model_type, args.transformer_config or TINY_CONFIGS[args.model_type]


def _check_resolution(args: argparse.Namespace) -> None:
    """What the transformer and the classifier need of the latent size (resolution / 2).

    (Without it an SD3 patch_size 2 at --resolution 6 or 10 failed in its first forward, in
    pretraining or training, with a bare tensor-size RuntimeError; --evaluate's classifier
    refused a resolution not a multiple of 4 only after the whole run.)
    """
    resolution = args.resolution
    model_type, config = _base_config(args)
    latent = resolution // 2
    if model_type == "sd3":
        patch = int(config.get("patch_size", 2))
        if latent % patch:
            raise ValueError(
                f"Invalid resolution: {resolution} (latents are {latent}x{latent}, not a "
                f"multiple of the transformer's patch_size {patch}: use a multiple of "
                f"{2 * patch})"
            )
        limit = config.get("pos_embed_max_size", 96)
        if limit and latent // patch > limit:
            raise ValueError(
                f"Invalid resolution: {resolution} ({latent // patch} patches a side, more "
                f"than the transformer's pos_embed_max_size {limit}: at most {2 * patch * limit})"
            )
    elif latent % 2:
        raise ValueError(
            f"Invalid resolution: {resolution} (Flux packs 2x2 latent patches: use a multiple of 4)"
        )
    if args.evaluate and resolution % 4:
        raise ValueError(
            f"Invalid resolution: {resolution} (the --evaluate classifier needs a multiple of "
            "4; or pass --no-evaluate)"
        )


def _optimizer_from_args(
    args: argparse.Namespace, params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """The run's optimizer over ``params``, as the flags choose it."""
    return build_optimizer(
        args.optimizer,
        params,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        stochastic_rounding=args.stochastic_rounding,
        optimizer_args=args.optimizer_args,
    )


def _check_optimizer(args: argparse.Namespace) -> None:
    """Build the optimizer once on a dummy parameter, so that its range checks (lr,
    weight_decay, optimizer_args) fail now, not after the base is pretrained."""
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    try:
        with warnings.catch_warnings():  # (the run's own optimizer warns, once)
            warnings.simplefilter("ignore")
            probe = _optimizer_from_args(args, dummy)
    except ValueError as error:  # (lr is the optimizer's name; the flag's is learning_rate)
        renamed = as_flag_error(str(error), {"lr": "learning_rate"})
        raise ValueError(str(error) if renamed is None else renamed[1]) from None
    if hasattr(probe, "close"):  # capture_loss=True: do not keep the probe's backward patch
        probe.close()


def class_indices(text: str | None, names: Sequence[str], option: str) -> list[int]:
    """Label indices of comma-separated class ``names`` (empty: all classes)."""
    wanted = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not wanted:
        return list(range(len(names)))
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(
            f"Invalid {option}: {', '.join(unknown)} not among the data's classes "
            f"({', '.join(names)})"
        )
    return [list(names).index(n) for n in wanted]


# ------------------------------------------------------------------------------ build
@dataclass
class TrainingSetup:
    """Everything ``train_step`` and the loop need, after ``accelerator.prepare``."""

    args: argparse.Namespace
    accelerator: Any
    model: Any  # the prepared FlowModel
    optimizer: Any
    lr_scheduler: Any
    trainable: list[Tensor]
    latents: Tensor  # the LoRA's training set: images of --train_classes
    labels: Tensor
    num_classes: int
    order: BatchOrder
    schedule_sigmas: Tensor
    scheduler_config: dict[str, Any]
    model_type: str
    history: TrainHistory
    images: ImageSet | None = None  # every class (the sample classifier learns from it)
    train_classes: list[int] = field(default_factory=list)
    base_conditioner: dict[str, Tensor] = field(default_factory=dict)  # as loaded
    base_info: dict[str, Any] = field(default_factory=dict)  # where the base came from

    @property
    def emo(self):
        """The Emo optimizer inside the accelerate wrapper, or None for AdamW/Prodigy."""
        return unwrap(self.optimizer)


def build_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )


def weight_dtype(args: argparse.Namespace) -> torch.dtype:
    """bf16 for ``--mixed_precision bf16`` (base, LoRA and conditioner), else fp32."""
    return torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32


def cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def _latent_channels(model_type: str, transformer_config: dict[str, Any]) -> int:
    channels = int(transformer_config.get("in_channels", 4 if model_type == "sd3" else 64))
    return channels // 4 if model_type == "flux" else channels


def build_data(args: argparse.Namespace, latent_channels: int) -> tuple[ImageSet, Tensor]:
    """The images of every class and their latents (``PixelCodec``, fp32, on the CPU)."""
    codec = PixelCodec()
    images = load_images(
        args.resolution, codec.image_channels(latent_channels), args.train_data_dir
    )
    return images, codec.encode(images.images)


def prepare_base(
    args: argparse.Namespace, accelerator=None
) -> tuple[Path, ImageSet, Tensor, dict[str, Any]]:
    """``(base directory, images, latents, info)``: the given base, or the tiny one.

    The tiny base is pretrained on ``--pretrain_classes`` once and cached by a hash of its
    settings (``pretraining.py``); with ``--pretrain_steps 0`` it is random-init.
    """
    if args.pretrained_model_name_or_path is not None:
        path = Path(args.pretrained_model_name_or_path)
        config_file = path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        model_type = {v: k for k, v in MODEL_TYPES.items()}.get(config.get("_class_name"), "sd3")
        images, latents = build_data(args, _latent_channels(model_type, config))
        return path, images, latents, {"base": str(path), "pretrained_here": False}
    config = args.transformer_config or TINY_CONFIGS[args.model_type]
    images, latents = build_data(args, _latent_channels(args.model_type, config))
    first = accelerator.main_process_first() if accelerator else contextlib.nullcontext()
    if args.pretrain_steps == 0:
        path = Path(args.base_model_dir or Path(args.output_dir) / "base_model")
        with first:
            build_base_model(args.model_type, config, path, seed=args.base_seed)
        return path, images, latents, {"base": str(path), "pretrained_here": False}
    spec = PretrainSpec(
        model_type=args.model_type,
        transformer_config=config,
        num_classes=images.num_classes,
        num_tokens=args.num_tokens,
        classes=tuple(class_indices(args.pretrain_classes, images.class_names, "pretrain_classes")),
        steps=args.pretrain_steps,
        learning_rate=args.pretrain_learning_rate,
        batch_size=args.pretrain_batch_size,
        seed=args.base_seed,
        scheduler_shift=args.scheduler_shift,
        weighting={
            "weighting_scheme": args.weighting_scheme,
            "logit_mean": args.logit_mean,
            "logit_std": args.logit_std,
            "mode_scale": args.mode_scale,
        },
        data=data_fingerprint(images.images, images.labels),
    )
    with first:
        path, built = ensure_pretrained_base(
            spec,
            latents,
            images.labels,
            cache_dir(args),
            args.base_model_dir,
            progress=not args.disable_progress_bar
            and (accelerator is None or accelerator.is_local_main_process),
        )
    info = json.loads((path / PRETRAIN_INFO).read_text())
    return (
        path,
        images,
        latents,
        {
            "base": str(path),
            "pretrained_here": built,
            "pretrain_seconds": info["seconds"] if built else 0.0,
            "pretrain_final_loss": info["final_loss"],
            "pretrain_classes": [images.class_names[i] for i in spec.classes],
        },
    )


def build_model(args: argparse.Namespace, path: Path, num_classes: int) -> FlowModel:
    """Load the base transformer (and its class conditioner, if saved), add LoRA."""
    dtype = weight_dtype(args)
    model_type, transformer = load_transformer(path, dtype)
    lora_layers = [name.strip() for name in args.lora_layers.split(",") if name.strip()]
    add_lora(transformer, args.rank, args.lora_alpha, lora_layers)
    cfg = transformer.config
    conditioner = None
    if (path / CONDITIONER_WEIGHT_NAME).is_file():
        conditioner = load_conditioner(path)
        if conditioner.num_classes != num_classes or conditioner.num_tokens != args.num_tokens:
            raise ValueError(
                f"Invalid pretrained_model_name_or_path: its {CONDITIONER_WEIGHT_NAME} has "
                f"{conditioner.num_classes} classes x {conditioner.num_tokens} tokens, the data "
                f"{num_classes} classes and --num_tokens {args.num_tokens}"
            )
    if conditioner is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            conditioner = ClassConditioner(
                num_classes, args.num_tokens, cfg.joint_attention_dim, cfg.pooled_projection_dim
            )
    conditioner = conditioner.to(dtype)
    conditioner.requires_grad_(args.train_conditioner)
    return FlowModel(transformer, conditioner, model_type)


def build_training(args: argparse.Namespace) -> TrainingSetup:
    """Accelerator, base, model, data, optimizer and LR schedule, prepared (``train`` resumes)."""
    from accelerate.utils import set_seed
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler

    accelerator = build_accelerator(args)
    set_seed(args.seed)
    path, images, latents, base_info = prepare_base(args, accelerator)
    model = build_model(args, path, images.num_classes)
    base_conditioner = {k: v.detach().clone() for k, v in model.conditioner.state_dict().items()}
    train_classes = class_indices(args.train_classes, images.class_names, "train_classes")
    keep = torch.isin(images.labels, torch.tensor(train_classes))
    if not keep.any():
        raise ValueError(f"Invalid train_classes: no images of {args.train_classes!r}")
    noise_scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=args.scheduler_shift
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer_from_args(args, trainable)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    register_trainable_checkpointing(accelerator)
    history = TrainHistory()
    accelerator.register_for_checkpointing(history)
    device = accelerator.device
    return TrainingSetup(
        args=args,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        trainable=trainable,
        latents=latents[keep].to(device),
        labels=images.labels[keep].to(device),
        num_classes=images.num_classes,
        order=BatchOrder(int(keep.sum()), args.train_batch_size, args.seed),
        schedule_sigmas=noise_scheduler.sigmas.clone().to(device),
        scheduler_config=dict(noise_scheduler.config),
        model_type=accelerator.unwrap_model(model).model_type,
        history=history,
        images=images,
        train_classes=train_classes,
        base_conditioner=base_conditioner,
        base_info=base_info,
    )


# ------------------------------------------------------------------------------ train
def _micro_seed(seed: int, micro_batch: int, rank: int) -> int:
    return (seed * 1_000_003 + micro_batch * 1_009 + rank) % (2**63)


def train_step(setup: TrainingSetup, micro_batch: int) -> Tensor:
    """One micro-batch: flow-matching loss, backward, and the optimizer step when due.

    The data, noise and timesteps come from ``(seed, micro_batch)`` only. The loss reaches
    an Emo optimizer through ``add_loss``, so after ``gradient_accumulation_steps``
    micro-batches it senses their mean. Returns the (detached) micro-batch loss.
    """
    args, accelerator = setup.args, setup.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    index = setup.order.indices(micro_batch, rank=rank, world_size=world).to(setup.latents.device)
    x0, labels = setup.latents[index], setup.labels[index]
    generator = torch.Generator(device=x0.device).manual_seed(
        _micro_seed(args.seed, micro_batch, rank)
    )
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    u = sample_density(
        args.weighting_scheme,
        x0.shape[0],
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
        generator=generator,
        device=x0.device,
    )
    num_train_timesteps = setup.scheduler_config["num_train_timesteps"]
    sigmas, timesteps = sigmas_from_density(u, setup.schedule_sigmas, num_train_timesteps)
    noisy = add_noise(x0, noise, sigmas)  # z_t = (1 - sigma) * x0 + sigma * noise
    with accelerator.accumulate(setup.model):
        prediction = setup.model(noisy, timesteps, labels)
        loss = flow_matching_loss(
            prediction, velocity_target(x0, noise), loss_weighting(args.weighting_scheme, sigmas)
        )
        accelerator.backward(loss)
        emo = setup.emo
        if emo is not None:
            emo.add_loss(loss.detach())
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(setup.trainable, args.max_grad_norm)
        setup.optimizer.step()
        setup.lr_scheduler.step()
        setup.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _checkpoint_step(path: Path) -> int:
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    if not path.name.startswith(CHECKPOINT_PREFIX) or not suffix.isdigit():
        raise ValueError(
            f"Invalid resume_from_checkpoint: {str(path)!r} (expected a folder named "
            f"{CHECKPOINT_PREFIX}<step>, as written by --checkpointing_steps)"
        )
    return int(suffix)


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as TensorBoard hparams accept them (scalars and strings only)."""
    return {
        k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
        for k, v in vars(args).items()
    }


def train(setup: TrainingSetup) -> dict[str, Any]:
    """The loop: optimizer steps up to ``max_train_steps``, logging and checkpoints."""
    from tqdm.auto import tqdm

    args, accelerator = setup.args, setup.accelerator
    global_step = 0
    checkpoint = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        global_step = _checkpoint_step(checkpoint)
        load_checkpoint(accelerator, checkpoint)
        logger.info("Resumed from %s at step %d.", checkpoint, global_step)
        if global_step >= args.max_train_steps:
            if accelerator.is_main_process:
                print(
                    f"{checkpoint} is already at max_train_steps={args.max_train_steps}, "
                    "nothing to do (raise --max_train_steps to train on)"
                )
            if setup.emo is not None:  # outputs still missing are written from the average
                setup.emo.eval()
            return {**setup.history.summary(), "nothing_to_do": True}
    if args.report_to != "none":
        accelerator.init_trackers("emo_lora_flow", config=_tracker_config(args))

    progress = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        desc=f"{setup.model_type} LoRA [{args.optimizer}]",
        disable=args.disable_progress_bar or not accelerator.is_local_main_process,
    )
    setup.model.train()
    accumulation = args.gradient_accumulation_steps
    tick, timed_steps = time.perf_counter(), 0  # (checkpoint I/O left out of the time)
    while global_step < args.max_train_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for k in range(accumulation):
            step_loss += train_step(setup, global_step * accumulation + k)
        global_step += 1
        timed_steps += 1
        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            loss_value = float(step_loss) / accumulation  # the readout syncs, at this cadence
            lr = effective_lr(setup.optimizer)
            now = time.perf_counter()
            # per step since the last record: a checkpoint or the last step can end an
            # interval early, so divide by the steps timed, not by logging_steps
            setup.history.record(global_step, loss_value, lr, (now - tick) / timed_steps)
            tick, timed_steps = now, 0
            logs = {"loss": loss_value, "lr": lr, **log_metrics(setup.optimizer)}
            accelerator.log(logs, step=global_step)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        progress.update(1)
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            saving = time.perf_counter()
            save_checkpoint(
                accelerator, Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{global_step}"
            )
            tick += time.perf_counter() - saving  # leave checkpoint I/O out of the step time
    progress.close()
    if setup.emo is not None:  # EmoSens(average=True): sample and save the average
        setup.emo.eval()
    return setup.history.summary()


def save_outputs(setup: TrainingSetup) -> tuple[dict[str, Path], dict[str, Any]]:
    """LoRA + conditioner weights, base vs LoRA samples, loss/LR curve (main process only).

    Returns the paths and the evaluation metrics (``sample_accuracy_base``/``_lora`` with
    ``--evaluate``).
    """
    args, accelerator = setup.args, setup.accelerator
    output_dir = Path(args.output_dir)
    model: FlowModel = accelerator.unwrap_model(setup.model)
    paths = {
        "lora": save_lora(model.transformer, setup.model_type, output_dir),
        "conditioner": save_conditioner(model.conditioner, output_dir),
    }
    judge = None
    metrics: dict[str, Any] = {}
    if args.evaluate:
        images = setup.images
        judge = load_or_train_judge(
            images.images, images.labels, images.num_classes, cache_dir(args), seed=args.seed
        )
        metrics["classifier_heldout_accuracy"] = judge.heldout_accuracy
    per_class = max(args.samples_per_class, args.eval_samples_per_class if judge else 0)
    samples = evaluate_samples(
        model,
        setup.base_conditioner,
        setup.train_classes,
        setup.scheduler_config,
        args.resolution // 2,
        samples_per_class=per_class,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        judge=judge,
        autocast=accelerator.autocast,
    )
    metrics.update({k: v for k, v in samples.items() if k.startswith("sample_accuracy")})
    names = [setup.images.class_names[i] for i in setup.train_classes]
    paths["samples"] = save_comparison(
        samples["base"],
        samples["lora"],
        names,
        output_dir / "samples.png",
        rows=args.samples_per_class,
    )
    title = f"{setup.model_type} LoRA, {args.optimizer}, {args.mixed_precision}"
    paths["curve"] = setup.history.plot(output_dir / "loss_lr.png", title=title)
    paths["history"] = output_dir / "history.json"
    paths["history"].write_text(json.dumps(setup.history.state_dict()))
    return paths, metrics


def _refuse_other_runs_checkpoints(args: argparse.Namespace) -> None:
    """A new run (no --resume_from_checkpoint) in an output_dir that holds checkpoints.

    They are an earlier run's: this run overwrites those at its own checkpointing steps
    and leaves the others, so ``--resume_from_checkpoint latest`` later resumed from one of
    them (another run's weights, optimizer state and history) without a word.
    """
    if args.resume_from_checkpoint is not None or not Path(args.output_dir).is_dir():
        return
    found = sorted(
        (
            p
            for p in Path(args.output_dir).iterdir()
            if p.is_dir()
            and p.name.startswith(CHECKPOINT_PREFIX)
            and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        ),
        key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
    )
    if found:
        raise ValueError(
            f"Invalid output_dir: {args.output_dir!r} holds another run's checkpoints "
            f"({', '.join(p.name for p in found)}); continue that run with "
            "--resume_from_checkpoint latest, or remove them, or pass another --output_dir"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, save, and return the run's summary (also written to ``metrics.json``)."""
    start = time.perf_counter()
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    _refuse_other_runs_checkpoints(args)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup = build_training(args)
    train_start = time.perf_counter()
    summary = train(setup)
    accelerator = setup.accelerator
    metrics_file = output_dir / "metrics.json"
    if summary.pop("nothing_to_do", False) and metrics_file.is_file():
        accelerator.end_training()
        return json.loads(metrics_file.read_text())
    train_seconds = time.perf_counter() - train_start
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        paths, evaluation = save_outputs(setup)
        paths["metrics"] = metrics_file
        summary.update(
            evaluation,
            optimizer=args.optimizer,
            learning_rate=args.learning_rate,
            optimizer_args=parse_optimizer_args(args.optimizer, args.optimizer_args),
            stochastic_rounding=args.stochastic_rounding,
            mixed_precision=args.mixed_precision,
            model_type=setup.model_type,
            train_classes=[setup.images.class_names[i] for i in setup.train_classes],
            optimizer_state_bytes=optimizer_state_bytes(setup.optimizer),
            train_seconds=train_seconds,
            wall_time_s=time.perf_counter() - start,
            **setup.base_info,
            files={k: str(v) for k, v in paths.items()},
        )
        metrics_file.write_text(json.dumps(summary, indent=2, default=str))
        print(f"Outputs in {output_dir}:")
        for name, path in paths.items():
            print(f"  {name:12s} {path}")
        if "sample_accuracy_lora" in summary:
            print(
                f"sample accuracy on classes {', '.join(summary['train_classes'])}: base "
                f"{summary['sample_accuracy_base']:.2f}, base + LoRA "
                f"{summary['sample_accuracy_lora']:.2f}"
            )
    accelerator.end_training()
    if not math.isfinite(summary["final_loss"]):
        logger.warning("The final loss is not finite: %s", summary["final_loss"])
    return summary


def _cli() -> None:
    """``python -m``: bad input is one line on stderr and exit status 2, not a traceback."""
    import sys

    try:
        result = main()
    except (ValueError, FileNotFoundError) as err:
        print(f"train_lora_flow: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2, default=str))


if __name__ == "__main__":
    _cli()
