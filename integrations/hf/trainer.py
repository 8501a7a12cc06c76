"""``EmoTrainerMixin`` / ``EmoTrainer``: the transformers ``Trainer`` hooks an Emo optimizer needs.

Three public hooks, nothing patched:

- ``get_optimizer_cls_and_kwargs``: ``optim="emosens"|"emoairy"|"emocats"`` -> the class and
  its arguments; ``Trainer.create_optimizer`` still builds the param groups, so weight decay
  and the no-decay group (biases, norms) are exactly transformers'.
- ``training_step``: feeds each micro-batch loss to the optimizer (``set_loss`` for the
  first micro-batch of an optimizer step, ``add_loss`` for the rest). ``training_step``
  returns the loss already divided for gradient accumulation (by the number of micro-batches,
  or by the token count of the whole accumulated batch when the model takes
  ``num_items_in_batch``), so it is multiplied by the number of micro-batches; the optimizer
  then senses their mean, which is the step's loss exactly as the Trainer logs it. Under DDP
  ``emo_core`` averages it across ranks.
- ``log``: reports the applied LR as ``learning_rate`` (the first group's; further groups as
  ``emo_lr_group1``, ...; the scheduler's value, a multiplier, moves to ``scheduled_lr``) and
  adds ``emo_scalar``, ``emo_trust`` (and noise, pulse, skipped steps) to the training logs, and stops training on the early-stop signal when
  ``args.emo_stop_on_signal`` is set. Reading these values syncs the device, so it happens
  only at ``logging_steps``.

With averaging (EmoSens's and EmoCats's default; ``optim_args="average=False"`` turns it
off): transformers itself calls ``optimizer.train()`` before each training step and ``optimizer.eval()`` before
evaluating, so evaluation (and a checkpoint written right after it) sees the average;
``train()`` here ends with ``optimizer.eval()``, so the model holds the average for
``save_model`` (not with ``load_best_model_at_end``, whose loaded weights it would mix).

Any Emo optimizer the Trainer holds gets the loss feed and logs, including one passed via
``optimizers=`` or ``optimizer_cls_and_kwargs=``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from emo_core import get_optimizer, log_metrics, unwrap

from .arguments import emo_optim_name
from .checkpointing import CheckpointingMixin
from .optim_args import parse_optim_args

__all__ = ["EmoTrainer", "EmoTrainerMixin"]

logger = logging.getLogger(__name__)


class EmoTrainerMixin(CheckpointingMixin):
    """Mix into any ``transformers.Trainer`` subclass: ``class T(EmoTrainerMixin, SFTTrainer)``.

    Checkpoints are crash-safe and checked on resume (``CheckpointingMixin``).
    """

    @classmethod
    def get_optimizer_cls_and_kwargs(
        cls, args: Any, model: nn.Module | None = None
    ) -> tuple[Any, Any]:
        """The Emo class and kwargs for ``args.optim``; transformers' choice for other names."""
        name = emo_optim_name(args)
        if name is None:
            return super().get_optimizer_cls_and_kwargs(args, model)
        optimizer_cls = get_optimizer(name)
        kwargs = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
        kwargs.update(parse_optim_args(args.optim_args, optimizer_cls))
        return optimizer_cls, kwargs

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``train``; with averaging the model holds the average after it."""
        result = super().train(*args, **kwargs)
        emo = unwrap(self.optimizer)
        if emo is not None and not self.args.load_best_model_at_end:
            emo.eval()
        return result

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """transformers' step, plus this micro-batch's loss (in user units) to the optimizer."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        emo = unwrap(self.optimizer)
        if emo is not None:
            micro_batches = getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
            value = loss * micro_batches
            # The first micro-batch of a window replaces whatever is pending, so losses of a
            # window whose step never ran (fp16 GradScaler skip) do not leak into the next.
            if getattr(self, "_emo_window", None) != self.state.global_step:
                self._emo_window = self.state.global_step
                emo.set_loss(value)
            else:
                emo.add_loss(value)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the Emo metrics to training logs; stop on the signal if asked to."""
        emo = unwrap(self.optimizer)
        training_log = emo is not None and "loss" in logs
        if training_log:
            metrics = log_metrics(emo, prefix="emo_")
            if "learning_rate" in logs:
                logs["scheduled_lr"] = logs["learning_rate"]
            # One key per value: the applied LR is learning_rate, not also emo_lr.
            logs["learning_rate"] = metrics.pop("emo_lr")
            logs.update(metrics)
        super().log(logs, start_time)
        if training_log and getattr(self.args, "emo_stop_on_signal", False) and emo.should_stop:
            logger.info(
                "%s signalled that the loss has settled at step %d; stopping "
                "(emo_stop_on_signal=True).",
                type(emo).__name__,
                self.state.global_step,
            )
            self.control.should_training_stop = True


class EmoTrainer(EmoTrainerMixin, Trainer):
    """``transformers.Trainer`` that runs ``optim="emosens"|"emoairy"|"emocats"``.

    Use with ``EmoTrainingArguments``; see ``EmoTrainerMixin`` for what it adds.
    """
