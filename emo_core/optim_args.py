"""Optimizer options as text -> constructor keyword arguments, type-checked, errors naming the key.

Shared by the adapters' ``optim_args`` (Hugging Face: one comma-separated string) and
``optimizer_args`` (the diffusers script: kohya-style ``key=value`` entries, or a YAML
mapping). transformers splits ``optim_args`` on every comma and hands raw strings on, so
``betas=(0.9,0.99)`` breaks and ``bool("False")`` is True. Here a string is split on
top-level commas only, every value is read with ``ast.literal_eval`` and checked against the
optimizer's ``__init__`` annotations (or, where a parameter has none, against the type of
its default), so a mistake fails before training, naming the key.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["as_flag_error", "did_you_mean", "optimizer_keywords", "parse_optim_args"]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'emosens'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name.lower(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def optimizer_keywords(
    optimizer_cls: type, reserved: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The keyword arguments ``optimizer_cls`` accepts (less ``reserved``), with their types."""
    reserved = reserved or {}
    hints = typing.get_type_hints(optimizer_cls.__init__)
    signature = inspect.signature(optimizer_cls.__init__)
    return {
        name: hints.get(name, _hint_from_default(parameter.default))
        for name, parameter in signature.parameters.items()
        if name not in ("self", "params")
        and name not in reserved
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


def _hint_from_default(default: Any) -> Any:
    """A type for an unannotated parameter (e.g. Prodigy's): what its default value is."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int | float  # ``weight_decay=0`` still takes 1e-4
    if isinstance(default, float):
        return float
    if isinstance(default, tuple):
        return tuple[tuple(_hint_from_default(v) for v in default)]  # type: ignore[misc]
    return Any


def parse_optim_args(
    entries: str | Sequence[str] | Mapping[str, Any] | None,
    optimizer_cls: type,
    *,
    reserved: Mapping[str, str] | None = None,
    option: str = "optim_args",
) -> dict[str, Any]:
    """Checked constructor kwargs for ``optimizer_cls`` from text.

    ``entries`` is one string (``"use_shadow=True,betas=(0.9,0.99)"``, split on top-level
    commas), a sequence of ``key=value`` strings (kohya style: ``["max_lr=3e-3",
    "betas=0.9,0.99"]``, one entry each) or a mapping of already-parsed values (YAML).
    ``reserved`` maps keys set elsewhere to the reason; ``option`` names the option in errors.

    Raises:
        ValueError: naming the entry, for a malformed entry, an unknown or reserved key, or a
            value of the wrong type.
    """
    if entries is None:
        return {}
    reserved = reserved or {}
    if isinstance(entries, Mapping):
        # A string value is read like a key=value entry's: YAML 1.1 leaves "3e-3" a string
        pairs = [
            (str(k), _literal(v) if isinstance(v, str) else v, repr(v)) for k, v in entries.items()
        ]
    else:
        items = _split_top_level(entries) if isinstance(entries, str) else list(entries)
        pairs = [_key_value(entry, option) for entry in items if entry.strip()]
    allowed = optimizer_keywords(optimizer_cls, reserved)
    name = optimizer_cls.__name__
    kwargs: dict[str, Any] = {}
    for key, value, raw in pairs:
        if key in reserved:
            raise ValueError(f"Invalid {option} key {key!r} for {name}: {reserved[key]}")
        if key not in allowed:
            raise ValueError(
                f"Invalid {option} key {key!r} for {name}{did_you_mean(key, allowed)}; "
                f"accepted keys: {', '.join(sorted(allowed))}"
            )
        if key in kwargs:
            raise ValueError(f"Invalid {option}: {key!r} given twice")
        ok, converted = _conform(value, allowed[key])
        if not ok:
            raise ValueError(
                f"Invalid {option} value {key}={raw} for {name}: expected {_describe(allowed[key])}"
            )
        kwargs[key] = converted
    return kwargs


def _key_value(entry: str, option: str) -> tuple[str, Any, str]:
    key, sep, raw = entry.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise ValueError(
            f"Invalid {option} entry {entry.strip()!r}: expected key=value, "
            'e.g. "use_shadow=True" or "betas=(0.9,0.99)"'
        )
    return key, _literal(raw), repr(raw)


def _literal(raw: str) -> Any:
    """A Python literal (``3e-3``, ``(0.9, 0.99)``, ``True``), or the text itself for bare
    words (``state_dtype=bfloat16``, ``pulse=distance``)."""
    try:
        return ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        return raw


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
    if origin is not None:  # other generics (e.g. Iterable[...]): not expressible as text
        return False, value
    return isinstance(value, hint) if isinstance(hint, type) else True, value


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return "torch dtype name (e.g. bfloat16)" if hint is torch.dtype else hint.__name__
    return str(hint).replace("typing.", "")


def as_flag_error(message: str, flags: Mapping[str, str]) -> tuple[str, str] | None:
    """``(flag, message)`` for an optimizer's range error about a keyword a script fills
    from its own flag (``flags``: keyword -> flag, e.g. ``{"lr": "learning_rate"}``), with
    the keyword renamed to the flag in the message; None for any other error."""
    for key, flag in flags.items():
        if message.startswith(f"Invalid {key}:"):
            return flag, re.sub(rf"\b{key}\b", flag, message)
    return None
