"""Train a tiny causal LM on stdlib text with any ``--optim``, and plot the loss curve.

    python -m emo_hf.train --optim emosens --output_dir out/emosens --max_steps 200
    python -m emo_hf.train --optim emocats --optim_args "use_shadow=True" --output_dir out/c
    python -m emo_hf.train configs/hf/emosens_lora.json --max_steps 50   # JSON, then overrides
    python -m emo_hf.train emosens --max_steps 50       # a shipped config by name (emo_configs)
    torchrun --nproc_per_node 2 -m emo_hf.train configs/hf/emosens.json --use_cpu true  # DDP, gloo

Every ``TrainingArguments`` flag works (``EmoTrainingArguments``), plus the model and data
flags below. The model is a random-init ``LlamaConfig`` model (or a local
``--model_name_or_path`` folder), optionally wrapped in a peft LoRA (``--lora``); the text
is Python's own docstrings, byte-tokenized. No network is used. At the end the model and
tokenizer are saved to ``output_dir`` and the loss curve is printed and written to
``output_dir/loss_curve.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    default_data_collator,
    set_seed,
)
from transformers.training_args import ParallelMode

from emo_configs import ConfigNotFoundError, resolve_config

from .arguments import EmoTrainingArguments
from .data import build_byte_tokenizer, split_blocks, stdlib_text
from .optim_args import FlagError
from .trainer import EmoTrainer

__all__ = ["DataArguments", "ModelArguments", "build_model", "main", "parse_args"]


@dataclass
class ModelArguments:
    """The model: a tiny random-init Llama, or a saved one from a local folder."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local folder of a saved causal LM (default: random init)."}
    )
    hidden_size: int = field(default=64, metadata={"help": "Width of the random-init Llama."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Layers of the random-init Llama."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "MLP width."})
    lora: bool = field(default=False, metadata={"help": "Train a peft LoRA adapter only."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated module names for LoRA."}
    )


@dataclass
class DataArguments:
    """The text and how it is cut."""

    block_size: int = field(default=64, metadata={"help": "Tokens (bytes) per training sequence."})
    max_chars: int | None = field(
        default=200_000, metadata={"help": "Use at most this many characters of stdlib text."}
    )
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Tail share of the text held out for evaluation."}
    )
    plot: bool = field(default=True, metadata={"help": "Write output_dir/loss_curve.png."})


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, EmoTrainingArguments]:
    """Parse flags; a leading JSON config supplies defaults that later flags override.

    The config is a path or a shipped name (``emosens``, ``hf/emosens.json``; see
    ``emo_configs``). Bad input exits with an argparse-style message naming the flag (exit
    status 2), not a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    dataclass_types = (ModelArguments, DataArguments, EmoTrainingArguments)
    parser = HfArgumentParser(dataclass_types)
    parser.prog = "python -m emo_hf.train"
    parser.usage = "%(prog)s [CONFIG] [--flag value ...]   (--help lists every flag)"
    if argv and not argv[0].startswith("-"):
        parser.set_defaults(**_read_config(parser, argv.pop(0), dataclass_types))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False
        )
    except FlagError as error:
        parser.error(f"argument --{error.flag}: {error}")
    except ValueError as error:  # TrainingArguments' own checks, unused arguments
        parser.error(str(error))
    try:
        _check_data_args(data_args, training_args)
    except FlagError as error:
        parser.error(f"argument --{error.flag}: {error}")
    return model_args, data_args, training_args


def _check_data_args(data_args: DataArguments, training_args: EmoTrainingArguments) -> None:
    """Before the text is read and the model built: the data flags' ranges, and an evaluation
    that would have no data (transformers' ValueError after the model was built)."""
    if data_args.block_size < 2:
        raise FlagError("block_size", f"Invalid block_size: {data_args.block_size} (expected >= 2)")
    if data_args.max_chars is not None and data_args.max_chars < 1:
        raise FlagError(
            "max_chars", f"Invalid max_chars: {data_args.max_chars} (expected >= 1, or None)"
        )
    if not 0.0 <= data_args.validation_fraction < 1.0:
        raise FlagError(
            "validation_fraction",
            f"Invalid validation_fraction: {data_args.validation_fraction} (expected [0, 1))",
        )
    if data_args.validation_fraction == 0.0 and training_args.eval_strategy != "no":
        raise FlagError(
            "validation_fraction",
            "Invalid validation_fraction: 0.0 with eval_strategy="
            f"{training_args.eval_strategy.value!r}: no text is held out to evaluate on; "
            "pass a fraction > 0 or --eval_strategy no",
        )


def _read_config(parser: HfArgumentParser, value: str, dataclass_types: tuple) -> dict:
    try:
        path = resolve_config(value, "hf")
        config = json.loads(path.read_text())
    except (ConfigNotFoundError, json.JSONDecodeError) as error:
        parser.error(f"config {value!r}: {error}")
    if not isinstance(config, dict):
        parser.error(f"config {value!r}: expected a JSON object of flag names to values")
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(config) - known)
    if unknown:
        parser.error(f"config {value!r}: invalid keys {', '.join(unknown)} (keys are flag names)")
    return config


def build_model(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> PreTrainedModel:
    """A random-init tiny Llama sized for ``tokenizer``, or the local ``model_name_or_path``."""
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    else:
        heads = model_args.num_attention_heads
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=model_args.hidden_size,
            intermediate_size=model_args.intermediate_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max(block_size, 64),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    if model_args.lora:
        from peft import LoraConfig, get_peft_model

        targets = [m.strip() for m in model_args.lora_target_modules.split(",") if m.strip()]
        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def main(
    argv: Sequence[str] | None = None, callbacks: list[TrainerCallback] | None = None
) -> EmoTrainer:
    """Run the CLI; returns the trainer (its ``state.log_history`` holds the curve).

    ``callbacks`` are passed to the trainer (for scripts that reuse this entry point).
    """
    _show_emo_logs()
    model_args, data_args, training_args = parse_args(argv)
    _check_distributed(training_args)
    set_seed(training_args.seed)
    tokenizer = build_byte_tokenizer()
    text = stdlib_text(data_args.max_chars)
    try:
        train_set, eval_set = split_blocks(
            text, tokenizer, data_args.block_size, data_args.validation_fraction
        )
    except ValueError as error:  # too little text for one block (of the held-out tail)
        print(f"python -m emo_hf.train: error: argument --block_size: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    model = build_model(model_args, tokenizer, data_args.block_size)
    trainer = EmoTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        curve = [
            (e["step"], e["loss"], e["learning_rate"])
            for e in trainer.state.log_history
            if "loss" in e
        ]
        _print_curve(curve, training_args.optim)
        if data_args.plot and curve:
            path = _plot_curve(curve, training_args.optim, Path(training_args.output_dir))
            print(f"loss curve: {path}")
    return trainer


def _show_emo_logs() -> None:
    """Print emo_hf's INFO messages (e.g. the early-stop notice) on the console."""
    emo_logger = logging.getLogger("emo_hf")
    if not emo_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[emo_hf] %(message)s"))
        emo_logger.addHandler(handler)
        emo_logger.setLevel(logging.INFO)


def _check_distributed(training_args: EmoTrainingArguments) -> None:
    """Refuse a multi-process launch that transformers would train as independent replicas."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and training_args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(
            f"Launched as {world} processes, but transformers is not training distributed "
            f"(parallel_mode={training_args.parallel_mode.value}), so each process would train "
            "its own replica. Without a GPU pass --use_cpu true (DDP over gloo)."
        )


def _print_curve(curve: list[tuple[int, float, float]], optim: str) -> None:
    print(f"{'step':>6}  {'loss':>8}  {'learning_rate':>13}   ({optim})")
    for step, loss, lr in curve:
        print(f"{step:>6}  {loss:>8.4f}  {lr:>13.3e}")


def _plot_curve(curve: list[tuple[int, float, float]], optim: str, output_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return None
    steps, losses, lrs = zip(*curve)
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    loss_axis.plot(steps, losses)
    loss_axis.set_ylabel("training loss")
    loss_axis.set_title(f"emo_hf.train, optim={optim}")
    lr_axis.plot(steps, lrs)
    lr_axis.set_yscale("log")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    figure.tight_layout()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "loss_curve.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
