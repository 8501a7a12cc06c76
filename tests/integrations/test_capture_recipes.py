"""Drop-in recipes against the real packages: a plain transformers ``Trainer`` with
``capture_loss=True``, TRL's ``SFTTrainer`` with ``optim="emosens"``, an accelerate loop with
accumulation, Lightning without ``EmoCallback``. Tiny models built from configs, no hub.

What an optimizer sensed is read through its sensor: a reference optimizer fed the expected
per-step losses explicitly must end with the same EMAs, scalar, trust, noise and pulse.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from emo_core import EmoCats, EmoSens, capture, unwrap
from tests.core.cases import assert_sensed_as_fed


@pytest.fixture(autouse=True)
def _no_capture_left() -> Any:
    yield
    assert not capture.capture_installed(), "a recipe left a capturing optimizer open"


assert_sensed = partial(assert_sensed_as_fed, rtol=1e-5, atol=1e-9)
# The optimizers whose sensor is checked: assert_sensed compares the pulse too, which under
# pulse="v37" is a function of the losses alone (the distance controller's also depends on
# the parameters and gradients).
SENSED = {"pulse": "v37"}


def regression_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


# ------------------------------------------------------------------ transformers
def tiny_causal_lm(folder: Path) -> Any:
    """A 1-layer Llama and a byte tokenizer, saved and loaded back like a hub checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from emo_hf.data import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def logged_losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_plain_hf_trainer_with_capture_senses_the_logged_losses(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from emo_hf.data import split_blocks, stdlib_text

    model, tokenizer = tiny_causal_lm(tmp_path / "model")
    blocks, _ = split_blocks(stdlib_text(6_000), tokenizer, 32, 0.0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,  # the Trainer divides each micro-batch loss
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=blocks,
        optimizer_cls_and_kwargs=(EmoSens, {"capture_loss": True, **SENSED}),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*received no loss")
        trainer.train()
    emo = unwrap(trainer.optimizer)
    assert_sensed(emo, logged_losses(trainer))  # every step's loss, as the Trainer logs it
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    emo.close()


def test_hf_arguments_warn_about_a_small_learning_rate_at_the_user_line(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from emo_hf import EmoTrainingArguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EmoTrainingArguments(
            output_dir=str(tmp_path), optim="emocats", learning_rate=1e-4, report_to="none"
        )
    guard = [w for w in caught if "multiplies the automatic learning rate" in str(w.message)]
    assert len(guard) == 1 and guard[0].filename == __file__
    # The arguments' probe optimizer with capture_loss=True leaves no patch behind.
    EmoTrainingArguments(output_dir=str(tmp_path), optim="emosens", optim_args="capture_loss=True")
    assert not capture.capture_installed()


def test_trl_sft_trainer_takes_optim_emosens_in_its_own_config(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import HfArgumentParser
    from trl import SFTConfig, SFTTrainer

    from emo_hf import EmoArgumentsMixin, EmoTrainerMixin, emo_arguments

    folder = tmp_path / "model"
    tiny_causal_lm(folder)
    data = Dataset.from_dict({"text": [f"def f{i}(x):\n    return x + {i}\n" for i in range(16)]})
    EmoSFTConfig = emo_arguments(SFTConfig)
    assert emo_arguments(SFTConfig) is EmoSFTConfig and issubclass(EmoSFTConfig, SFTConfig)

    class EmoSFTTrainer(EmoTrainerMixin, SFTTrainer):
        pass

    common = {"output_dir": str(tmp_path / "out"), "report_to": "none", "bf16": False}
    args = EmoSFTConfig(
        optim="emosens",
        optim_args="pulse=v37",  # (SENSED)
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_length=48,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        **common,
    )
    assert args.optim == "emosens" and args.learning_rate == 1.0
    torch.save(args, tmp_path / "args.bin")  # what the Trainer does at each checkpoint
    restored = torch.load(tmp_path / "args.bin", weights_only=False)
    assert type(restored) is EmoSFTConfig and restored.to_dict() == args.to_dict()
    assert EmoSFTConfig(use_cpu=True, **common).learning_rate == 2e-5  # SFTConfig's own default
    trainer = EmoSFTTrainer(model=str(folder), args=args, train_dataset=data)
    trainer.train()
    assert_sensed(unwrap(trainer.optimizer), logged_losses(trainer))
    # The command line and a hand-written mixin class take the names too.
    (parsed,) = HfArgumentParser(EmoSFTConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--optim",
            "emocats",
            "--use_cpu",
            "true",
            "--bf16",
            "false",
        ]
    )
    assert parsed.optim == "emocats"

    class MyConfig(EmoArgumentsMixin, SFTConfig):
        pass

    assert MyConfig(optim="EmoAiry", use_cpu=True, **common).optim == "emoairy"
    with pytest.raises(
        ValueError,
        match="Invalid optim: 'emosense' \\(did you mean 'emosens'\\?\\). Emo optimizers",
    ):
        EmoSFTConfig(optim="emosense", use_cpu=True, **common)


# --------------------------------------------------------------------- accelerate
@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad-scaler"])
def test_accelerate_loop_with_capture_and_accumulation(scaled: bool) -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    n = 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    accelerator = Accelerator(gradient_accumulation_steps=n, cpu=True)
    if scaled:
        # accelerate builds its GradScaler only for fp16 on a GPU; hand it a real CPU one
        # (before prepare, as accelerate does) whose scale doubles after every step, so its
        # own backward (scaler.scale(loss / n).backward()) and step/update paths run.
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)
    opt = EmoSens(model.parameters(), capture_loss=True, **SENSED)
    loader = DataLoader(regression_data(48), batch_size=4)  # 12 batches: 4 full windows
    model, opt, loader = accelerator.prepare(model, opt, loader)
    micro = []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)  # divides by n before backward
            opt.step()  # a no-op until the window is complete
            opt.zero_grad()
            micro.append(float(loss.detach()))
    windows = [math.fsum(micro[i : i + n]) / n for i in range(0, len(micro), n)]
    assert len(windows) == 4
    if scaled:
        assert accelerator.scaler.get_scale() == 8.0 * 2**4
    assert_sensed(unwrap(opt), windows)
    unwrap(opt).close()


# ---------------------------------------------------------------------- Lightning
def lightning_module(optimizer: type, **kwargs: Any) -> Any:
    pl = pytest.importorskip("lightning.pytorch")

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
            self.recorded: list[float] = []

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.recorded.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer(self.parameters(), **kwargs)

    return Regression()


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_lightning_without_callback_senses_the_window_mean_with_capture(precision: str) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision

    n = 2
    model = lightning_module(EmoCats, capture_loss=True, **SENSED)
    extra: dict[str, Any] = {}
    scaler = None
    if precision == "16-mixed":  # on CPU the plugin is spelled out; a scale that changes
        scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=1)
        extra["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        accumulate_grad_batches=n,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **extra,
    )
    trainer.fit(model, DataLoader(regression_data(32), batch_size=4))  # 8 batches per epoch
    windows = [math.fsum(model.recorded[i : i + n]) / n for i in range(0, len(model.recorded), n)]
    assert trainer.global_step == len(windows) == 8
    if scaler is not None:
        assert scaler.get_scale() == 64.0 * 2**8  # grew after every step
    emo = trainer.optimizers[0]
    assert_sensed(emo, windows)
    emo.close()
