"""EmoTrainer with a real transformers.Trainer: loss feed, logs, early stop, resume, LoRA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch import nn  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from emo_core import EmoSens, unwrap  # noqa: E402
from emo_hf import EmoTrainer, EmoTrainingArguments  # noqa: E402
from emo_hf.data import build_byte_tokenizer, split_blocks, stdlib_text  # noqa: E402
from emo_hf.train import ModelArguments, build_model  # noqa: E402

BLOCK = 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def blocks(tokenizer):
    train, _ = split_blocks(stdlib_text(12_000), tokenizer, BLOCK, 0.0)
    return train


def tiny_llama(tokenizer, lora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    sizes = ModelArguments(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, lora=lora
    )
    return build_model(sizes, tokenizer, BLOCK)


def emo_args(tmp_path: Path, **overrides) -> EmoTrainingArguments:
    settings = {
        "output_dir": str(tmp_path / "out"),
        "optim": "emosens",
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_pin_memory": False,
    }
    settings.update(overrides)
    return EmoTrainingArguments(**settings)


class SensedLosses(TrainerCallback):
    """The loss the optimizer sensed at each step, recovered from its short EMA (SPEC §2.2).

    The first sensed step sets the EMA to the loss; after that
    ``ema_short = 0.3·L + 0.7·ema_short_prev``. Also marks how many forward passes each
    optimizer step covered.
    """

    def __init__(self, forward_log: list) -> None:
        self.forward_log = forward_log
        self.emas: list[float] = []
        self.boundaries: list[int] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.emas.append(unwrap(optimizer).telemetry()["ema_short"])
        self.boundaries.append(len(self.forward_log))

    def losses(self) -> list[float]:
        sensed = [self.emas[0]]
        sensed += [(e - 0.7 * p) / 0.3 for p, e in zip(self.emas, self.emas[1:])]
        return sensed

    def windows(self) -> list[list]:
        starts = [0, *self.boundaries[:-1]]
        return [self.forward_log[a:b] for a, b in zip(starts, self.boundaries)]


def test_accumulated_loss_is_mean_of_micro_batch_losses_token_normalized_model(
    tmp_path, tokenizer, blocks
):
    """Llama takes num_items_in_batch: the Trainer normalises by the accumulated token count.

    The optimizer must still sense the plain mean of the micro-batch mean losses.
    """
    model = tiny_llama(tokenizer)
    forward_log: list[float] = []

    def record(module, args, kwargs, output):
        labels = kwargs["labels"]
        tokens = int(labels[..., 1:].ne(-100).sum())
        scale = kwargs.get("num_items_in_batch")
        assert scale is not None, "expected transformers to pass num_items_in_batch"
        # The model returned sum(CE)/num_items_in_batch; its own mean loss is sum(CE)/tokens.
        forward_log.append(float(output.loss.detach()) * float(scale) / tokens)

    model.register_forward_hook(record, with_kwargs=True)
    spy = SensedLosses(forward_log)
    args = emo_args(tmp_path, gradient_accumulation_steps=3, max_steps=4)
    trainer = EmoTrainer(model=model, args=args, train_dataset=blocks, callbacks=[spy])
    trainer.train()

    windows = spy.windows()
    assert [len(w) for w in windows] == [3, 3, 3, 3]
    expected = [sum(w) / len(w) for w in windows]
    assert spy.losses() == pytest.approx(expected, rel=1e-5)
    # The micro-batch losses really differ, so feeding only one of them would fail here.
    assert max(windows[0]) - min(windows[0]) > 1e-3


class Regression(nn.Module):
    """A plain module (no **kwargs in forward): the Trainer divides its loss by the window."""

    def __init__(self, log: list[float] | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.log = log

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)
        if self.log is not None and self.training:
            self.log.append(float(loss.detach()))
        return {"loss": loss}


class RegressionData(torch.utils.data.Dataset):
    def __init__(self, n: int, signal: float = 1.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = signal * self.x.sum(-1) + torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def test_accumulated_loss_is_mean_of_returned_losses_with_short_last_window(tmp_path):
    """7 micro-batches per epoch with gradient_accumulation_steps=3: windows of 3, 3 and 1."""
    forward_log: list[float] = []
    spy = SensedLosses(forward_log)
    args = emo_args(tmp_path, gradient_accumulation_steps=3, max_steps=-1, num_train_epochs=1)
    trainer = EmoTrainer(
        model=Regression(forward_log), args=args, train_dataset=RegressionData(14), callbacks=[spy]
    )
    assert trainer.model_accepts_loss_kwargs is False
    trainer.train()

    windows = spy.windows()
    assert [len(w) for w in windows] == [3, 3, 1]
    assert spy.losses() == pytest.approx([sum(w) / len(w) for w in windows], rel=1e-5)


def test_window_whose_step_never_ran_does_not_leak_into_the_next(tmp_path):
    """An fp16 GradScaler can skip ``optimizer.step()``; global_step still advances."""
    forward_log: list[float] = []
    model = Regression(forward_log)
    data = RegressionData(8)
    trainer = EmoTrainer(model=model, args=emo_args(tmp_path, gradient_accumulation_steps=2))
    optimizer = unwrap(trainer.create_optimizer())
    batches = [{"x": data.x[i : i + 2], "labels": data.y[i : i + 2]} for i in range(0, 8, 2)]
    trainer.current_gradient_accumulation_steps = 2
    for batch in batches[:2]:  # window of step 0, whose step is skipped
        trainer.training_step(model, batch)
    trainer.state.global_step += 1
    model.zero_grad()
    for batch in batches[2:]:  # window of step 1
        trainer.training_step(model, batch)
    optimizer.step()
    sensed = optimizer.telemetry()["ema_short"]  # first sensed step: the loss itself
    assert sensed == pytest.approx(sum(forward_log[2:]) / 2, rel=1e-6)
    assert sensed != pytest.approx(sum(forward_log) / 4, rel=1e-6)


def test_emo_optimizer_passed_directly_is_fed_and_logged(tmp_path, recwarn):
    """Plain TrainingArguments + ``optimizers=(EmoSens(...), None)``: same feed and logs."""
    forward_log: list[float] = []
    spy = SensedLosses(forward_log)
    model = Regression(forward_log)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, logging_steps=1, gradient_accumulation_steps=2,
        per_device_train_batch_size=2, report_to="none", disable_tqdm=True,
        save_strategy="no", dataloader_pin_memory=False,
    )  # fmt: skip
    trainer = EmoTrainer(
        model=model,
        args=args,
        train_dataset=RegressionData(32),
        optimizers=(EmoSens(model.parameters()), None),
        callbacks=[spy],
    )
    trainer.train()
    assert not [w for w in recwarn if "received no loss" in str(w.message)]
    assert spy.losses() == pytest.approx([sum(w) / len(w) for w in spy.windows()], rel=1e-5)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all("emo_lr" not in e and e["learning_rate"] < 1e-2 for e in logs)


@pytest.mark.parametrize("pulse", ["default", "v37"])
def test_logs_hold_emo_metrics_and_effective_learning_rate(tmp_path, tokenizer, blocks, pulse):
    """The default pulse finds a scale per param group (the Trainer's decay and no-decay
    groups): ``emo_pulse`` is the largest; v37's one pulse is every group's."""
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    args = emo_args(
        tmp_path,
        max_steps=6,
        logging_steps=2,
        report_to=["tensorboard"],
        lr_scheduler_type="linear",
        **({"optim_args": "pulse=v37"} if pulse == "v37" else {}),
    )
    trainer = EmoTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=blocks)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4, 6]
    for entry in logs:
        for key in ("learning_rate", "emo_scalar", "emo_trust", "emo_pulse", "scheduled_lr"):
            assert math.isfinite(entry[key]), key
        assert "emo_lr" not in entry  # the applied LR is logged once, as learning_rate
        # learning_rate is the LR the step used: emoPulse x the scheduler's multiplier.
        multiplier = entry["scheduled_lr"] / args.learning_rate
        applied = [entry["learning_rate"], entry["emo_lr_group1"]]
        assert max(applied) == pytest.approx(entry["emo_pulse"] * multiplier, rel=1e-6)
        if pulse == "v37":
            assert entry["learning_rate"] == pytest.approx(
                entry["emo_pulse"] * multiplier, rel=1e-6
            )
    assert logs[0]["scheduled_lr"] > logs[-1]["scheduled_lr"]  # linear decay acts on it
    assert logs[0]["learning_rate"] < 1e-2  # an emoPulse LR, not the multiplier 1.0

    (run_dir,) = {p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")}
    events = tensorboard.EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/emo_scalar", "train/emo_trust", "train/learning_rate"} <= tags
    assert "train/emo_lr" not in tags
    written = [e.value for e in events.Scalars("train/learning_rate")]
    assert written == pytest.approx([entry["learning_rate"] for entry in logs], rel=1e-6)


def converged_regression(data: RegressionData) -> Regression:
    """A model already at the least-squares optimum of ``data``: the loss stays flat."""
    model = Regression()
    design = torch.cat([data.x, torch.ones(len(data), 1)], dim=1)
    solution = torch.linalg.lstsq(design, data.y.unsqueeze(-1)).solution.squeeze(-1)
    with torch.no_grad():
        model.linear.weight.copy_(solution[:-1].unsqueeze(0))
        model.linear.bias.fill_(solution[-1])
    return model


@pytest.mark.parametrize("stop", [True, False], ids=["stop_on_signal", "ignore_signal"])
def test_early_stop_on_signal(tmp_path, stop):
    args = emo_args(
        tmp_path,
        per_device_train_batch_size=64,
        max_steps=160,
        logging_steps=10,
        lr_scheduler_type="constant",
        emo_stop_on_signal=stop,
    )
    data = RegressionData(64)
    trainer = EmoTrainer(model=converged_regression(data), args=args, train_dataset=data)
    trainer.train()
    optimizer = unwrap(trainer.optimizer)
    assert optimizer.should_stop  # the loss is flat, so the signal rises either way
    if stop:
        steps = trainer.state.global_step
        assert steps < args.max_steps
        assert steps % args.logging_steps == 0  # checked at logging cadence
        assert optimizer.telemetry()["sensed_steps"] >= 100  # not before the long EMA's horizon
    else:
        assert trainer.state.global_step == args.max_steps


def test_averaging_evaluates_at_the_average_and_training_ends_there(tmp_path):
    """optim_args="pulse=distance,average=True": transformers' own train()/eval() calls put
    every evaluation at the average and every step back at the training point (step()
    refuses eval mode); after train() the model holds the average."""
    at_average = []

    class Spy(TrainerCallback):
        def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
            at_average.append(not unwrap(optimizer).training)

    args = emo_args(
        tmp_path,
        optim_args="pulse=distance,average=True",
        max_steps=12,
        eval_strategy="steps",
        eval_steps=4,
        per_device_train_batch_size=8,
    )
    trainer = EmoTrainer(
        model=Regression(),
        args=args,
        train_dataset=RegressionData(64),
        eval_dataset=RegressionData(16, seed=1),
        callbacks=[Spy()],
    )
    trainer.train()
    assert at_average == [True, True, True]
    optimizer = unwrap(trainer.optimizer)
    assert optimizer.average and not optimizer.training
    assert trainer.state.global_step == 12


def test_resume_from_checkpoint_is_exact(tmp_path, tokenizer, blocks):
    settings = {
        "max_steps": 20,
        "save_strategy": "steps",
        "save_steps": 10,
        "logging_steps": 5,
        "gradient_accumulation_steps": 2,
    }
    full = EmoTrainer(
        model=tiny_llama(tokenizer),
        args=emo_args(tmp_path / "full", **settings),
        train_dataset=blocks,
    )
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-10"

    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert "emo_pulse" in saved["param_groups"][0]["emo_state"]  # the sensor is in optimizer.pt

    resumed = EmoTrainer(
        model=tiny_llama(tokenizer),
        args=emo_args(tmp_path / "resumed", **settings),
        train_dataset=blocks,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert unwrap(full.optimizer).telemetry() == unwrap(resumed.optimizer).telemetry()
    losses = [(e["step"], e["loss"]) for e in full.state.log_history if "loss" in e]
    resumed_losses = [(e["step"], e["loss"]) for e in resumed.state.log_history if "loss" in e]
    assert [step for step, _ in losses] == [5, 10, 15, 20]
    assert resumed_losses == losses  # 5 and 10 come from the checkpoint, 15 and 20 recomputed


def test_lora_trains_with_emosens(tmp_path, tokenizer, blocks):
    pytest.importorskip("peft")
    model = tiny_llama(tokenizer, lora=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = EmoTrainer(model=model, args=emo_args(tmp_path, max_steps=4), train_dataset=blocks)
    trainer.train()

    optimizer = unwrap(trainer.optimizer)
    assert isinstance(optimizer, EmoSens)
    decay, no_decay = optimizer.param_groups
    assert no_decay["params"] == []  # LoRA has no biases or norms: an empty group is fine
    trained = {id(p) for p in decay["params"]}
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert id(p) in trained
            assert not torch.equal(p, before[name]), name  # B starts at zero and moved
        elif not p.requires_grad:
            assert torch.equal(p, before[name]), name  # the base model is untouched
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
