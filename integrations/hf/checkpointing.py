"""``CheckpointingMixin``: crash-safe ``checkpoint-<step>`` folders for the transformers Trainer.

transformers writes a checkpoint's files straight into ``checkpoint-<step>/``, so a run
killed mid-write leaves a folder that looks like any other, and
``resume_from_checkpoint=True`` picks it because it has the highest step. This mixin keeps
the Trainer's own saving and loading and adds (``emo_core.checkpoint``):

- after every checkpoint, once all ranks have written their files, a manifest
  (``checkpoint_complete.json``, written last, fsynced) marks the folder complete;
- ``train(resume_from_checkpoint="latest")`` (or ``True``) resumes from the newest folder
  that is complete and whose files are whole, warning about each newer one it skips;
- a checkpoint to resume from is checked first: a damaged or cut-short file raises one
  ``CorruptCheckpointError`` that names it, before anything is loaded;
- resuming without ``optimizer.pt`` (``save_only_model=True``, or a lost file) warns that
  the optimizer, and with it an Emo optimizer's loss statistics, starts fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from emo_core import unwrap
from emo_core.checkpoint import (
    MANIFEST_NAME,
    NO_MANIFEST_WARNING,
    find_latest_checkpoint,
    mark_complete,
    saved_optimizer_name,
    verify_resume_checkpoint,
)

__all__ = ["CheckpointingMixin", "resolve_resume_checkpoint"]

logger = logging.getLogger(__name__)

_PREFIX = f"{PREFIX_CHECKPOINT_DIR}-"
_FRESH_OPTIMIZER_WARNING = (
    "Resuming from %s, which has no optimizer state (optimizer.pt; saved with "
    "save_only_model=True, or the file was lost): the optimizer starts FRESH. For an Emo "
    "optimizer that includes its loss statistics (loss EMAs, emotion scalar, trust, "
    "emoPulse): the learning rate restarts from its initial value and the run will not "
    "match an uninterrupted one."
)


def resolve_resume_checkpoint(
    resume_from_checkpoint: str | bool | None, output_dir: str | Path
) -> str | None:
    """The checkpoint folder to resume from, checked; None to start a new run.

    ``"latest"``/``True``: the highest complete ``checkpoint-<step>`` in ``output_dir``
    (``True`` raises if there is none, as transformers does; ``"latest"`` starts fresh with
    a warning). A path: its files are checked (``CorruptCheckpointError`` names a bad one).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True or resume_from_checkpoint == "latest":
        path = find_latest_checkpoint(output_dir, _PREFIX)
        if path is None and resume_from_checkpoint is True:
            raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
        if path is None:
            logger.warning("No complete checkpoint in %s; starting a new run.", output_dir)
            return None
    else:
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            return str(path)  # transformers names the missing folder
        if not verify_resume_checkpoint(path):
            logger.warning(NO_MANIFEST_WARNING, path)
    has_optimizer = any(p.name.startswith("optimizer") for p in path.iterdir())
    if not has_optimizer and not any(path.glob("global_step*")):  # DeepSpeed keeps its own
        logger.warning(_FRESH_OPTIMIZER_WARNING, path)
    return str(path)


class CheckpointingMixin:
    """Mix in before ``transformers.Trainer``: complete-marked checkpoints, checked resumes."""

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint`` also takes ``"latest"`` (see module)."""
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(checkpoint, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """transformers' load; an Emo optimizer's state met by another optimizer (a resume
        with another ``--optim``) is one clear error, not that optimizer's bare ``KeyError``."""
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except (KeyError, ValueError, RuntimeError) as error:
            owner = saved_optimizer_name(Path(checkpoint) / "optimizer.pt") if checkpoint else None
            if owner is None or unwrap(self.optimizer) is not None:
                raise
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # (accelerate's wrap)
            raise ValueError(
                f"resume_from_checkpoint={checkpoint}: its optimizer.pt was written by {owner}, "
                f"but this run's optimizer is {type(inner).__name__} ({error!r}). Resume with "
                f"optim={owner.lower()!r}, or start the new optimizer fresh: load the model from "
                "the checkpoint folder (from_pretrained) and train without resume_from_checkpoint"
            ) from None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # transformers rotates old checkpoints (save_total_limit) at the end of its own
        # _save_checkpoint, just before the manifest below: a kill in that short window
        # leaves the new folder unmarked, and 'latest' falls back to an older one if any.
        folder = Path(self._get_output_dir(trial=trial)) / f"{_PREFIX}{self.state.global_step}"
        if self.args.should_save:
            # A folder saved again (a rerun in the same output_dir, a resume from an earlier
            # step) is unmarked before any file in it is rewritten: with the old manifest
            # left in place, a kill mid-write left a mix of two runs' files that 'latest'
            # took as complete.
            (folder / MANIFEST_NAME).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()  # (no rank writes into a still-marked folder)
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_<rank>) are written
        if self.args.should_save and folder.is_dir():
            mark_complete(folder)
