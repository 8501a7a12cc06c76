"""``--optim_args`` for the Emo optimizers: ``emo_core.optim_args`` with the Trainer's reserved keys.

The parsing (top-level comma split, ``ast.literal_eval``, checks against the optimizer's
annotations) is shared with the diffusers script's ``--optimizer_args``; see
``emo_core.optim_args``.
"""

from __future__ import annotations

from typing import Any

from emo_core import optim_args as _core

__all__ = ["optimizer_keywords", "parse_optim_args"]

# Set from other TrainingArguments fields, or not expressible as a literal.
_RESERVED = {
    "params": "the Trainer passes the model's parameters",
    "lr": "use learning_rate (1.0 by default for Emo optimizers)",
    "weight_decay": "use weight_decay; the Trainer exempts biases and norms from it",
    "process_group": "not expressible as text; the default (WORLD) is used",
    "writer": "use report_to (the Trainer logs emo_lr, emo_scalar, emo_trust)",
    "log_every": "the Trainer logs the Emo metrics every logging_steps",
}


def optimizer_keywords(optimizer_cls: type) -> dict[str, Any]:
    """The keyword arguments ``optim_args`` may set for ``optimizer_cls``, with their types."""
    return _core.optimizer_keywords(optimizer_cls, _RESERVED)


def parse_optim_args(text: str | None, optimizer_cls: type) -> dict[str, Any]:
    """Parse ``"use_shadow=True,betas=(0.9,0.99)"`` into checked kwargs for ``optimizer_cls``.

    Raises:
        ValueError: naming the entry, for a malformed entry, an unknown or reserved key, or a
            value of the wrong type.
    """
    if text is None or not text.strip():
        return {}
    return _core.parse_optim_args(text, optimizer_cls, reserved=_RESERVED)
