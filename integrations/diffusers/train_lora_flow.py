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
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from emo_configs import ConfigNotFoundError, resolve_config, shipped_configs
from emo_core import log_metrics, unwrap

from .checkpointing import (
    CHECKPOINT_PREFIX,
    find_resume_checkpoint,
    load_checkpoint,
    register_trainable_checkpointing,
    save_checkpoint,
)
from .conditioning import ClassConditioner, save_conditioner
from .data import BatchOrder, ImageSet, PixelCodec, class_names, load_images
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
from .lora import DEFAULT_TARGET_MODULES, add_lora, save_lora
from .models import MODEL_TYPES, TINY_CONFIGS, FlowModel, build_base_model, load_transformer
from .optimizers import OPTIMIZERS, build_optimizer, effective_lr
from .sampling import sample_images, save_grid

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
        help="Local diffusers transformer directory. Default: a tiny random-init "
        "--model_type model, saved to --base_model_dir and loaded back.",
    )
    g.add_argument("--model_type", default="sd3", choices=sorted(MODEL_TYPES))
    g.add_argument(
        "--transformer_config",
        type=json.loads,
        default=None,
        help="JSON (or a YAML mapping) of constructor arguments for the tiny base. "
        "Default: models.TINY_CONFIGS[model_type].",
    )
    g.add_argument("--base_model_dir", default=None, help="Default: <output_dir>/base_model.")
    g.add_argument("--base_seed", type=int, default=0, help="Seed of the base's random init.")
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
    g.add_argument("--samples_per_class", type=int, default=4)
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
    actions = {a.dest: a for a in parser._actions}
    for key, value in data.items():
        action = actions.get(key)
        if action is None or key in ("help", "config"):
            parser.error(f"--config {path!r}: unknown key {key!r} (keys are the flag names)")
        if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction) and (
            not isinstance(value, bool)
        ):
            parser.error(f"--config {path!r}: {key} must be true or false, got {value!r}")
    if isinstance(data.get("lora_layers"), list):  # a YAML list of module names
        data["lora_layers"] = ",".join(map(str, data["lora_layers"]))
    return data


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags, with defaults taken from ``--config`` (YAML) and overridden on the command line."""
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
    return args


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
    latents: Tensor
    labels: Tensor
    num_classes: int
    order: BatchOrder
    schedule_sigmas: Tensor
    scheduler_config: dict[str, Any]
    model_type: str
    history: TrainHistory

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


def build_model(args: argparse.Namespace, num_classes: int, accelerator=None) -> FlowModel:
    """Load the base transformer, add LoRA, attach a fresh class conditioner."""
    dtype = weight_dtype(args)
    path = args.pretrained_model_name_or_path
    if path is None:
        path = Path(args.base_model_dir or Path(args.output_dir) / "base_model")
        config = args.transformer_config or TINY_CONFIGS[args.model_type]
        if accelerator is None:
            build_base_model(args.model_type, config, path, seed=args.base_seed)
        else:
            with accelerator.main_process_first():
                build_base_model(args.model_type, config, path, seed=args.base_seed)
    model_type, transformer = load_transformer(path, dtype)
    lora_layers = [name.strip() for name in args.lora_layers.split(",") if name.strip()]
    add_lora(transformer, args.rank, args.lora_alpha, lora_layers)
    cfg = transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        conditioner = ClassConditioner(
            num_classes, args.num_tokens, cfg.joint_attention_dim, cfg.pooled_projection_dim
        ).to(dtype)
    conditioner.requires_grad_(args.train_conditioner)
    return FlowModel(transformer, conditioner, model_type)


def build_data(args: argparse.Namespace, latent_channels: int) -> tuple[ImageSet, Tensor]:
    """The training images and their latents (``PixelCodec``, fp32, on the CPU)."""
    codec = PixelCodec()
    images = load_images(
        args.resolution, codec.image_channels(latent_channels), args.train_data_dir
    )
    return images, codec.encode(images.images)


def build_training(args: argparse.Namespace) -> TrainingSetup:
    """Accelerator, model, data, optimizer and LR schedule, prepared (``train`` resumes)."""
    from accelerate.utils import set_seed
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler

    accelerator = build_accelerator(args)
    set_seed(args.seed)
    model = build_model(args, len(class_names(args.train_data_dir)), accelerator)
    images, latents = build_data(args, model.latent_channels)
    noise_scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=args.scheduler_shift
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        args.optimizer,
        trainable,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        stochastic_rounding=args.stochastic_rounding,
    )
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
        latents=latents.to(device),
        labels=images.labels.to(device),
        num_classes=images.num_classes,
        order=BatchOrder(len(images), args.train_batch_size, args.seed),
        schedule_sigmas=noise_scheduler.sigmas.clone().to(device),
        scheduler_config=dict(noise_scheduler.config),
        model_type=accelerator.unwrap_model(model).model_type,
        history=history,
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
    tick = time.perf_counter()
    while global_step < args.max_train_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for k in range(accumulation):
            step_loss += train_step(setup, global_step * accumulation + k)
        global_step += 1
        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            loss_value = float(step_loss) / accumulation  # the readout syncs, at this cadence
            lr = effective_lr(setup.optimizer)
            now = time.perf_counter()
            setup.history.record(global_step, loss_value, lr, (now - tick) / args.logging_steps)
            tick = now
            logs = {"loss": loss_value, "lr": lr, **log_metrics(setup.optimizer)}
            accelerator.log(logs, step=global_step)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        progress.update(1)
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            save_checkpoint(
                accelerator, Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{global_step}"
            )
            tick = time.perf_counter()  # leave checkpoint I/O out of the step time
    progress.close()
    return setup.history.summary()


def save_outputs(setup: TrainingSetup) -> dict[str, Path]:
    """LoRA + conditioner weights, sample grid, loss/LR curve and its data (main process only)."""
    args, accelerator = setup.args, setup.accelerator
    output_dir = Path(args.output_dir)
    model: FlowModel = accelerator.unwrap_model(setup.model)
    paths = {
        "lora": save_lora(model.transformer, setup.model_type, output_dir),
        "conditioner": save_conditioner(model.conditioner, output_dir),
    }
    # One column per class, samples_per_class rows.
    labels = torch.arange(setup.num_classes, device=accelerator.device)
    labels = labels.repeat(args.samples_per_class)
    with accelerator.autocast():
        images = sample_images(
            model,
            setup.scheduler_config,
            labels,
            args.resolution // 2,
            num_inference_steps=args.num_inference_steps,
            seed=args.seed,
        )
    paths["samples"] = save_grid(images, output_dir / "samples.png", setup.num_classes)
    title = f"{setup.model_type} LoRA, {args.optimizer}, {args.mixed_precision}"
    paths["curve"] = setup.history.plot(output_dir / "loss_lr.png", title=title)
    paths["history"] = output_dir / "history.json"
    paths["history"].write_text(json.dumps(setup.history.state_dict()))
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, save, and return the run's summary (also written to ``metrics.json``)."""
    args = parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    setup = build_training(args)
    summary = train(setup)
    accelerator = setup.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        paths = save_outputs(setup)
        summary.update(
            optimizer=args.optimizer,
            learning_rate=args.learning_rate,
            stochastic_rounding=args.stochastic_rounding,
            mixed_precision=args.mixed_precision,
            model_type=setup.model_type,
            files={k: str(v) for k, v in paths.items()},
        )
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    if not math.isfinite(summary["final_loss"]):
        logger.warning("The final loss is not finite: %s", summary["final_loss"])
    return summary


if __name__ == "__main__":
    result = main()
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))
