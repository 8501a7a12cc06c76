"""``EmoCallback``: feed the training loss to Emo optimizers under ``lightning.Trainer``.

An Emo optimizer needs one loss per optimizer step. In automatic optimization Lightning
divides each micro-batch loss by ``accumulate_grad_batches`` and, under ``16-mixed``,
multiplies it by the GradScaler's scale before backward; the optimizer's closure only sees
the last micro-batch, and the GradScaler calls ``step()`` without a closure at all. The
callback reads every micro-batch loss in ``on_before_backward`` (the last public hook before
the step), undoes both factors, and hands it to the optimizer's own accumulator
(``set_loss`` for the first micro-batch of an accumulation window, ``add_loss`` after it),
so the step senses the mean micro-batch loss in the user's units.

A step the GradScaler skips (non-finite gradients) never reaches ``step()``; like the
core's own skipped steps it leaves the loss sensor as it was, and ``set_loss`` at the next
window's start drops its loss, so nothing leaks into the next step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

import emo_core
from emo_core import EmoOptimizer, unwrap

from .lr_monitor import EmoLearningRateMonitor

__all__ = ["EmoCallback"]

_NO_EMO_WARNING = (
    "EmoCallback is attached but no optimizer returned by configure_optimizers() is an Emo "
    "optimizer (EmoSens, EmoAiry, EmoCats); the callback does nothing. Return one from "
    "configure_optimizers() or remove the callback."
)


class EmoCallback(Callback):
    """Feeds each step's loss to the Emo optimizer, logs its LR, surfaces its stop signal.

    Automatic optimization: nothing else to do. The optimizer senses the mean micro-batch
    loss of each step (``accumulate_grad_batches`` and the AMP GradScaler undone), for
    every precision. Manual optimization (e.g. GANs with several optimizers): the callback
    cannot know which loss belongs to which optimizer, so pass it yourself,
    ``opt.step(loss=loss)``; the callback still logs and watches the stop signal.

    Logged through the trainer's loggers at ``log_every_n_steps``: ``emo/lr`` (effective LR,
    ``emo/lr_group1``... for further groups), ``emo/scalar``, ``emo/trust``, ``emo/noise``,
    ``emo/pulse``, ``emo/skipped_steps``; with several Emo optimizers the prefix is
    ``emo/opt{index}/``. A plain ``LearningRateMonitor`` would show ``group["lr"]``, which
    for an Emo optimizer is the multiplier (1.0 by default); with ``show_applied_lr`` the
    callback makes it an ``EmoLearningRateMonitor``, so ``lr-EmoSens`` is the rate applied.

    Without the callback the optimizer senses the closure's value: the last micro-batch's
    loss divided by ``accumulate_grad_batches``, not the window's mean; under ``16-mixed``
    the GradScaler calls ``step()`` without the closure, so nothing is sensed (the optimizer
    warns and keeps its LR). The callback holds no state of its own: the loss statistics
    live in the optimizer's ``state_dict``, which Lightning checkpoints.

    Iterate averaging (EmoSens's and EmoCats's default): the callback calls ``opt.eval()`` before
    validation, test and predict loops and at the end of ``fit`` (the module then holds the
    average, for use and for checkpoints written there), and ``opt.train()`` before each
    training batch. Without averaging both calls do nothing.

    Args:
        stop_on_signal: end ``fit`` (``trainer.should_stop``) once every Emo optimizer's
            ``should_stop`` is set, i.e. the loss has settled. Checked when logs are written
            and at epoch ends, since reading the signal syncs with the device
            (default: False).
        log_metrics: log the ``emo/*`` metrics (default: True).
        show_applied_lr: when an Emo optimizer trains, turn every plain
            ``LearningRateMonitor`` of the trainer into an ``EmoLearningRateMonitor`` (the same
            object and settings; only the LR it reads changes) for the length of ``fit``, so
            its ``lr-*`` keys carry the applied LR, not the multiplier; at the end of ``fit``
            it is a plain ``LearningRateMonitor`` again. ``group["lr"]`` itself is never
            written (default: True).
    """

    def __init__(
        self, stop_on_signal: bool = False, log_metrics: bool = True, show_applied_lr: bool = True
    ) -> None:
        for name, value in [
            ("stop_on_signal", stop_on_signal),
            ("log_metrics", log_metrics),
            ("show_applied_lr", show_applied_lr),
        ]:
            if not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")
        self.stop_on_signal = stop_on_signal
        self.log_metrics = log_metrics
        self.show_applied_lr = show_applied_lr
        self._warned_no_emo = False
        self._window_start = True
        self._last_step = -1
        self._swapped: list[LearningRateMonitor] = []  # monitors made Emo-aware for a fit
        self._active = True  # False for a second EmoCallback of the same trainer
        self._saved_owners: list[str | None] = []  # Emo optimizer that wrote each saved state

    # ----------------------------------------------------------------- set-up
    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Before the optimizers' states are loaded: which Emo optimizer wrote each one, so
        # that a resume with another optimizer is one clear error, not torch's bare
        # KeyError: 'step' (AdamW) from inside Lightning's restore.
        self._saved_owners = [_saved_owner(s) for s in checkpoint.get("optimizer_states", [])]
        if trainer.optimizers:  # strategies that restore after setup (FSDP, DeepSpeed)
            self._check_resumed_optimizers(trainer)

    def _check_resumed_optimizers(self, trainer: pl.Trainer) -> None:
        owners, self._saved_owners = self._saved_owners, []
        if trainer.state.fn != TrainerFn.FITTING:  # validate/test/predict load no optimizer
            return
        for index, (owner, optimizer) in enumerate(zip(owners, trainer.optimizers)):
            if owner is not None and unwrap(optimizer) is None:
                raise ValueError(
                    f"Invalid ckpt_path: its optimizer state {index} was written by {owner}, but "
                    f"this run's optimizer {index} is {type(optimizer).__name__}, which cannot "
                    f"load it. Resume with {owner} (configure_optimizers), or start the new "
                    "optimizer fresh: load only the weights (LightningModule.load_from_checkpoint, "
                    "or load_state_dict of the checkpoint's 'state_dict') and fit without ckpt_path"
                )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_resumed_optimizers(trainer)
        # Each attached EmoCallback would feed every micro-batch loss again: set_loss twice,
        # then add_loss twice, so the step sensed (l1 + 2 l2 + ...)/(2N - 1), not the mean.
        attached = [cb for cb in trainer.callbacks if isinstance(cb, EmoCallback)]
        self._active = attached[0] is self
        if len(attached) > 1 and self._active:
            rank_zero_warn(
                f"EmoCallback is attached {len(attached)} times; only the first one feeds the "
                "loss and logs emo/* (each would feed every micro-batch again). Attach one."
            )
        if not _emo_optimizers(trainer):
            if not self._warned_no_emo:
                self._warned_no_emo = True
                rank_zero_warn(_NO_EMO_WARNING)
            return
        if self.show_applied_lr:
            for monitor in trainer.callbacks:
                if type(monitor) is LearningRateMonitor:  # before its on_train_start
                    monitor.__class__ = EmoLearningRateMonitor
                    self._swapped.append(monitor)
                    rank_zero_info(
                        "EmoCallback: LearningRateMonitor logs the applied LR (group['emo_lr']) "
                        "of Emo optimizers, not the multiplier group['lr'] "
                        "(EmoCallback(show_applied_lr=False) to keep the multiplier)."
                    )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_monitors()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_monitors()

    def _restore_monitors(self) -> None:
        """Give the monitors made Emo-aware for this fit their own class back: the change
        lasts one fit, so a monitor reused by another Trainer (a sweep, a notebook) is as
        its user made it."""
        for monitor in self._swapped:
            if type(monitor) is EmoLearningRateMonitor:
                monitor.__class__ = LearningRateMonitor
        self._swapped.clear()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint is restored (which happens after on_fit_start).
        self._window_start = True
        self._last_step = trainer.global_step

    # -------------------------------------------------------------- loss intake
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Same rule as Lightning's zero_grad: a window starts where batch_idx % N == 0. The
        # flag stays up until a loss is fed: a first micro-batch that returns None (no
        # backward) must not let the next one add to a skipped step's stale loss.
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._window_start = True
        _switch(trainer, evaluating=False)

    # ------------------------------------------- iterate averaging (average=True)
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _switch(trainer, evaluating=True)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _switch(trainer, evaluating=True)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _switch(trainer, evaluating=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _switch(trainer, evaluating=True)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if not pl_module.automatic_optimization or not self._active:
            return  # manual: the user feeds each optimizer (opt.step(loss=loss))
        emo = unwrap(trainer.optimizers[0]) if trainer.optimizers else None
        if emo is None:
            return
        value = _user_loss(trainer, loss)
        if self._window_start:
            emo.set_loss(value)  # also drops the loss of a step the GradScaler skipped
            self._window_start = False
        else:
            emo.add_loss(value)

    # -------------------------------------------------------- logging, stopping
    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # accumulating: no optimizer step in this batch
        self._last_step = trainer.global_step
        # The check LearningRateMonitor uses: True when this batch's logs will be written.
        if not trainer._logger_connector.should_update_logs:
            return
        optimizers = _emo_optimizers(trainer)
        if self.log_metrics and trainer.loggers and self._active:
            for prefix, emo in _prefixed(optimizers):
                pl_module.log_dict(
                    emo_core.log_metrics(emo, prefix=prefix),
                    on_step=True,
                    on_epoch=False,
                    logger=True,
                )
        self._check_stop(trainer, optimizers)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_stop(trainer, _emo_optimizers(trainer))

    def _check_stop(self, trainer: pl.Trainer, optimizers: list[tuple[int, EmoOptimizer]]) -> None:
        if not self.stop_on_signal or not optimizers or trainer.should_stop:
            return
        settled = all(emo.should_stop for _, emo in optimizers)
        # Every rank senses the same all-reduced loss; reduce anyway, like EarlyStopping.
        settled = trainer.strategy.reduce_boolean_decision(settled, all=False)
        if settled:
            trainer.should_stop = True
            rank_zero_info(
                f"EmoCallback: the training loss has settled (Emo should_stop) at global step "
                f"{trainer.global_step}; stopping fit (stop_on_signal=True)."
            )


def _emo_optimizers(trainer: pl.Trainer) -> list[tuple[int, EmoOptimizer]]:
    """(index in ``trainer.optimizers``, Emo optimizer) for every Emo optimizer."""
    found = ((i, unwrap(opt)) for i, opt in enumerate(trainer.optimizers))
    return [(i, emo) for i, emo in found if emo is not None]


def _saved_owner(optimizer_state: Any) -> str | None:
    """The Emo optimizer whose ``state_dict()`` this is (``"EmoSens"``), or None."""
    try:
        return str(optimizer_state["param_groups"][0]["emo_state"]["optimizer"])
    except (KeyError, IndexError, TypeError):
        return None


def _switch(trainer: pl.Trainer, evaluating: bool) -> None:
    """Parameters to the average (``eval()``) or the training point (``train()``) for every
    Emo optimizer; nothing happens without ``average=True`` or when already there."""
    for _, emo in _emo_optimizers(trainer):
        emo.eval() if evaluating else emo.train()


def _prefixed(optimizers: list[tuple[int, EmoOptimizer]]) -> list[tuple[str, EmoOptimizer]]:
    if len(optimizers) == 1:
        return [("emo/", optimizers[0][1])]
    return [(f"emo/opt{i}/", emo) for i, emo in optimizers]


def _user_loss(trainer: pl.Trainer, loss: Tensor) -> Tensor:
    """The micro-batch loss as ``training_step`` returned it (fp32, detached, on device).

    ``on_before_backward`` receives ``loss / accumulate_grad_batches``, times the
    GradScaler's scale under ``16-mixed``. The scale is read as a tensor (``scale(1)``)
    so that no value crosses to the host.
    """
    value = loss.detach().to(torch.float32)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        value = value / scaler.scale(torch.ones((), device=value.device))
    return value * trainer.accumulate_grad_batches
