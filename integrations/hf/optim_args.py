"""``--optim_args`` for the Emo optimizers: ``emo_core.optim_args`` with the Trainer's reserved keys.

The parsing (top-level comma split, ``ast.literal_eval``, checks against the optimizer's
annotations) is shared with the diffusers script's ``--optimizer_args``; see
``emo_core.optim_args``. Errors are :class:`FlagError` for ``optim_args``, so the CLI can name
the flag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from emo_core import optim_args as _core
from emo_core.optim_args import did_you_mean

__all__ = ["FlagError", "did_you_mean", "optimizer_keywords", "parse_optim_args"]

# Set from other TrainingArguments fields, or not expressible as a literal.
_RESERVED = {
    "params": "the Trainer passes the model's parameters",
    "lr": "use learning_rate (1.0 by default for Emo optimizers)",
    "weight_decay": "use weight_decay; the Trainer exempts biases and norms from it",
    "process_group": "not expressible as text; the default (WORLD) is used",
    "writer": "use report_to (the Trainer logs emo_lr, emo_scalar, emo_trust)",
    "log_every": "the Trainer logs the Emo metrics every logging_steps",
}


class FlagError(ValueError):
    """A bad value of one training argument; ``flag`` names it, so a CLI can say which."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


def optimizer_keywords(optimizer_cls: type) -> dict[str, Any]:
    """The keyword arguments ``optim_args`` may set for ``optimizer_cls``, with their types."""
    return _core.optimizer_keywords(optimizer_cls, _RESERVED)


def parse_optim_args(
    text: str | Sequence[str] | Mapping[str, Any] | None, optimizer_cls: type
) -> dict[str, Any]:
    """Parse ``"use_shadow=True,betas=(0.9,0.99)"`` into checked kwargs for ``optimizer_cls``.

    ``optim_args`` from a JSON or YAML config (``HfArgumentParser.parse_json_file`` /
    ``parse_yaml_file``, or a dict passed in code) may also be a mapping of parsed values
    (``{"use_shadow": true}``) or a list of ``key=value`` strings.

    Raises:
        FlagError: for ``optim_args``, naming the entry: a malformed entry, an unknown or
            reserved key (with the closest valid one), or a value of the wrong type.
    """
    if text is None or isinstance(text, str) and not text.strip():
        return {}
    if not isinstance(text, str | Mapping) and not (
        isinstance(text, Sequence) and all(isinstance(entry, str) for entry in text)
    ):
        raise FlagError(
            "optim_args",
            f"Invalid optim_args: {text!r} (expected a string like 'use_shadow=True,"
            "max_lr=3e-3', a list of such key=value strings, or a mapping of values)",
        )
    try:
        return _core.parse_optim_args(text, optimizer_cls, reserved=_RESERVED)
    except ValueError as error:
        raise FlagError("optim_args", str(error)) from None
