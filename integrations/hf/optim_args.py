"""``--optim_args`` for the Emo optimizers: text -> constructor keyword arguments, type-checked.

transformers splits ``optim_args`` on every comma and hands each handler raw strings, so
``betas=(0.9,0.99)`` breaks and ``bool("False")`` is True. Here the text is split on
top-level commas only, every value is read with ``ast.literal_eval`` and checked against the
optimizer's ``__init__`` annotations, so a mistake fails before training, naming the key.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import types
import typing
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["FlagError", "did_you_mean", "optimizer_keywords", "parse_optim_args"]

# Set from other TrainingArguments fields, or not expressible as a literal.
_RESERVED = {
    "params": "the Trainer passes the model's parameters",
    "lr": "use learning_rate (1.0 by default for Emo optimizers)",
    "weight_decay": "use weight_decay; the Trainer exempts biases and norms from it",
    "process_group": "not expressible as text; the default (WORLD) is used",
    "writer": "use report_to (the Trainer logs learning_rate, emo_scalar, emo_trust)",
    "log_every": "the Trainer logs the Emo metrics every logging_steps",
}


class FlagError(ValueError):
    """A bad value of one training argument; ``flag`` names it, so a CLI can say which."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'emosens'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name.lower(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def optimizer_keywords(optimizer_cls: type) -> dict[str, Any]:
    """The keyword arguments ``optim_args`` may set for ``optimizer_cls``, with their types."""
    hints = typing.get_type_hints(optimizer_cls.__init__)
    signature = inspect.signature(optimizer_cls.__init__)
    return {
        name: hints.get(name, Any)
        for name, parameter in signature.parameters.items()
        if name != "self"
        and name not in _RESERVED
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


def parse_optim_args(text: str | None, optimizer_cls: type) -> dict[str, Any]:
    """Parse ``"use_shadow=True,betas=(0.9,0.99)"`` into checked kwargs for ``optimizer_cls``.

    Raises:
        FlagError: (a ``ValueError``, ``flag="optim_args"``) naming the entry, for a malformed
            entry, an unknown or reserved key, or a value of the wrong type.
    """
    if text is None or not text.strip():
        return {}
    allowed = optimizer_keywords(optimizer_cls)
    name = optimizer_cls.__name__
    kwargs: dict[str, Any] = {}
    for entry in _split_top_level(text):
        key, sep, raw = entry.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise FlagError(
                "optim_args",
                f"Invalid optim_args entry {entry.strip()!r}: expected key=value, "
                'e.g. "use_shadow=True,betas=(0.9,0.99)"',
            )
        if key in _RESERVED:
            raise FlagError(
                "optim_args", f"Invalid optim_args key {key!r} for {name}: {_RESERVED[key]}"
            )
        if key not in allowed:
            raise FlagError(
                "optim_args",
                f"Invalid optim_args key {key!r} for {name}{did_you_mean(key, allowed)}; "
                f"accepted keys: {', '.join(sorted(allowed))}",
            )
        if key in kwargs:
            raise FlagError("optim_args", f"Invalid optim_args: {key!r} given twice")
        kwargs[key] = _coerce(key, raw, allowed[key], name)
    return kwargs


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _coerce(key: str, raw: str, hint: Any, owner: str) -> Any:
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # bare words, e.g. state_dtype=bfloat16
    ok, converted = _conform(value, hint)
    if not ok:
        raise FlagError(
            "optim_args",
            f"Invalid optim_args value {key}={raw!r} for {owner}: expected {_describe(hint)}",
        )
    return converted


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(does ``value`` fit ``hint``, the value converted to it)."""
    if hint is Any or hint is object:
        return True, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _conform(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is torch.dtype:
        if isinstance(value, str):
            dtype = getattr(torch, value.removeprefix("torch."), None)
            return isinstance(dtype, torch.dtype), dtype
        return isinstance(value, torch.dtype), value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)) or len(value) != len(args):
            return False, value
        items = [_conform(v, a) for v, a in zip(value, args)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    return isinstance(value, hint) if isinstance(hint, type) else True, value


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return "torch dtype name (e.g. bfloat16)" if hint is torch.dtype else hint.__name__
    return str(hint).replace("typing.", "")
