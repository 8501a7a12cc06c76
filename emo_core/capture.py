"""Opt-in loss capture: ``capture_loss=True`` senses every scalar ``backward()``.

Scripts that choose an optimizer by class path (kohya-ss sd-scripts, the diffusers example
scripts, OneTrainer, a plain ``transformers.Trainer``) never pass the loss to ``step()``.
With ``capture_loss=True`` the optimizer takes it from the backward passes instead, with no
change to the script. This is the package's one global side effect, and it is opt-in.

Contract (extends SPEC §1, the sources of the loss):

- **What is patched.** While at least one capturing optimizer is alive,
  ``torch.autograd.backward`` (which ``Tensor.backward``, ``accelerator.backward``, the HF
  ``Trainer`` and Lightning all end in) is wrapped, and so are ``torch.amp.GradScaler.scale``
  (and FSDP1's ``ShardedGradScaler.scale`` if it is imported first), which tags the scaled
  loss with the unscaled one, and ``GradScaler.step``, which drops what a skipped step
  captured. The wrappers are installed once however many optimizers capture, and the
  originals are put back when the last capturing optimizer is closed (``opt.close()``) or
  garbage-collected (an optimizer sits in reference cycles, so that waits for the cyclic GC;
  ``close()`` ends it at once). A wrapper that another library has wrapped in turn is left in
  place, inert, rather than unwrapping theirs.
- **What is captured.** Each ``backward()`` of a one-element tensor without an explicit
  gradient (a loss), called outside the autograd engine (not the inner backward of reentrant
  activation checkpointing). A ``torch.compile``'d function that calls ``backward()`` runs the
  wrapper eagerly (it is excluded from tracing, a graph break there), so every call of a
  compiled training step is sensed; copies of a capturing optimizer (deepcopy, pickle)
  capture too, from an empty sum. The value is detached and
  stays on its device (no host sync); a loss scaled by a ``GradScaler`` is replaced by the loss
  before scaling, so a change of the loss scale never reads as a loss spike.
- **Sum, not mean.** Each capturing optimizer adds up what it captured since its own last
  ``step()`` or ``zero_grad()``: the objective whose gradient it is about to apply.
  accelerate's ``accelerator.backward``, the HF ``Trainer`` and Lightning divide each
  micro-batch loss by the number of micro-batches N (by the window's token count when the
  model takes ``num_items_in_batch``) before backward, so the sum is the mean micro-batch loss
  of the step, exactly what explicit ``add_loss`` feeding senses. The HF Trainer divides a
  short last window by its real length k, so it stays exact; accelerate and Lightning divide it
  by N as well, so there the capture senses k/N of that window's mean, as its gradient is
  scaled (explicit feeding, e.g. ``EmoCallback``, is exact). A loop that does not divide
  senses N times the mean; the sensor is invariant to a constant loss scale, so only a
  changing N matters there.
- **Who senses what.** Capture is process-wide (backward calls in any thread) and goes to
  every capturing optimizer. ``zero_grad()`` on an optimizer drops what it captured (those
  gradients are gone), so in the usual pattern ``opt_d.zero_grad(); d_loss.backward();
  opt_d.step(); opt_g.zero_grad(); g_loss.backward(); opt_g.step()`` each optimizer senses
  its own loss. Without ``zero_grad`` between them, an optimizer senses every loss
  backpropagated since its last step.
- **Priority.** Explicit feeding wins: ``step(loss=)``, then a pending ``set_loss``/
  ``add_loss``, then the captured sum, then a closure's return value. The captured sum goes
  before the closure because frameworks build closures (Lightning's returns the last
  micro-batch's loss divided by N), while the capture includes the closure's own backward.
- **Thread safety.** One re-entrant lock guards installing, removing and every update of the
  captured sums.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .pulse import sensor_dtype_for

__all__ = [
    "attach",
    "attach_copy",
    "capture_installed",
    "discard",
    "is_capturing",
    "peek",
    "release",
    "take",
]

_BUFFER_ATTR = "_captured"  # per optimizer: {"sum": Tensor | None}; shared by wrappers' copies
_UNSCALED_ATTR = "_emo_unscaled_loss"  # set on a GradScaler's output: the loss it scaled

_lock = threading.RLock()
# (weakref to the optimizer, its buffer). Rebound, never mutated, so a reader may iterate an
# old tuple while a garbage-collection callback replaces it.
_live: tuple[tuple[weakref.ref, dict[str, Any]], ...] = ()
_saved: list[tuple[Any, str, Any, Any]] = []  # (owner, name, original, wrapper) while installed
# Which installation is live: a wrapper left in place under someone else's (see _uninstall)
# must stay inert after a later re-install, or a backward would be counted twice.
_generation = {"live": 0, "next": 1}


def attach(optimizer: Any) -> None:
    """Start capturing for ``optimizer``; installs the wrappers if it is the first."""
    global _live
    buffer = optimizer.__dict__.setdefault(_BUFFER_ATTR, {"sum": None})
    with _lock:
        if any(entry[1] is buffer for entry in _live):
            return
        ref = weakref.ref(optimizer, functools.partial(_forget, buffer))
        _live = (*_live, (ref, buffer))
        if not _saved:
            _install()


def attach_copy(optimizer: Any) -> None:
    """Capture for a copy (deepcopy, unpickling) of a capturing optimizer: a buffer of its
    own, nothing captured yet (the original keeps what it has)."""
    optimizer.__dict__.pop(_BUFFER_ATTR, None)
    attach(optimizer)


def release(optimizer: Any) -> None:
    """Stop capturing for ``optimizer``; removes the wrappers if it was the last. Idempotent."""
    buffer = getattr(optimizer, _BUFFER_ATTR, None)
    if buffer is not None:
        _forget(buffer)
        buffer["sum"] = None


def is_capturing(optimizer: Any) -> bool:
    """Whether backward calls currently reach ``optimizer``."""
    buffer = getattr(optimizer, _BUFFER_ATTR, None)
    return buffer is not None and any(entry[1] is buffer for entry in _live)


def capture_installed() -> bool:
    """Whether the wrappers are installed (some capturing optimizer is alive)."""
    return bool(_saved)


def peek(optimizer: Any) -> Tensor | None:
    """What ``optimizer`` captured since its last step or ``zero_grad``, left in place."""
    buffer = getattr(optimizer, _BUFFER_ATTR, None)
    return None if buffer is None else buffer["sum"]


def take(optimizer: Any) -> Tensor | None:
    """What ``optimizer`` captured since its last step or ``zero_grad`` (cleared), or None."""
    buffer = getattr(optimizer, _BUFFER_ATTR, None)
    if buffer is None:
        return None
    with _lock:
        value, buffer["sum"] = buffer["sum"], None
    return value


def discard(optimizer: Any) -> None:
    """Drop what ``optimizer`` captured (its gradients were zeroed or its step skipped)."""
    buffer = getattr(optimizer, _BUFFER_ATTR, None)
    if buffer is not None:
        with _lock:
            buffer["sum"] = None


# ------------------------------------------------------------------ internals
def _forget(buffer: dict[str, Any], _ref: Any = None) -> None:
    global _live
    with _lock:
        kept = tuple(entry for entry in _live if entry[1] is not buffer)
        if len(kept) != len(_live):
            _live = kept
            if not _live:
                _uninstall()


def _record(value: Tensor) -> None:
    """Add one captured loss to every capturing optimizer's sum."""
    source = getattr(value, _UNSCALED_ATTR, value)
    dtype = sensor_dtype_for(source.device)
    loss = source.detach().to(dtype=dtype, copy=True)
    with _lock:
        for _, buffer in _live:
            total = buffer["sum"]
            buffer["sum"] = loss if total is None else total + loss


def _losses(tensors: Any, grad_tensors: Any) -> list[Tensor]:
    """The one-element tensors of a backward call that has no explicit gradient."""
    if grad_tensors is not None:
        return []
    if isinstance(tensors, Tensor):
        tensors = (tensors,)
    elif not isinstance(tensors, (tuple, list)):
        return []  # e.g. a GradientEdge
    return [t for t in tensors if isinstance(t, Tensor) and t.numel() == 1]


def _wrap_backward(original: Callable[..., Any], generation: int) -> Callable[..., Any]:
    # Not traced by torch.compile: a compiled function that calls backward() runs this wrapper
    # (and the backward) eagerly at every call, so its loss is captured. Traced into the graph,
    # the wrapper ran once, at tracing time, and the compiled graph's backward never reached
    # it: not one loss was sensed.
    @functools.wraps(original)
    @torch.compiler.disable
    def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
        result = original(tensors, grad_tensors, *args, **kwargs)
        if (
            _generation["live"] == generation
            and _live
            and not torch.compiler.is_compiling()
            and torch._C._current_autograd_node() is None
        ):
            for loss in _losses(tensors, grad_tensors):
                _record(loss)
        return result

    return backward


def _wrap_scale(original: Callable[..., Any], generation: int) -> Callable[..., Any]:
    @functools.wraps(original)
    def scale(self: Any, outputs: Any) -> Any:
        scaled = original(self, outputs)
        if isinstance(scaled, Tensor) and isinstance(outputs, Tensor) and scaled is not outputs:
            setattr(scaled, _UNSCALED_ATTR, outputs.detach())
        return scaled

    return scale


def _wrap_step(original: Callable[..., Any], generation: int) -> Callable[..., Any]:
    @functools.wraps(original)
    def step(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, optimizer, *args, **kwargs)
        finally:
            # A step that ran took the sum; one the scaler skipped (inf/nan gradients) leaves
            # it, and it must not be added to the next step's loss.
            discard(optimizer)

    return step


def _targets() -> list[tuple[Any, str, Callable[..., Any]]]:
    targets = [
        (torch.autograd, "backward", _wrap_backward),
        (torch.amp.GradScaler, "scale", _wrap_scale),
        (torch.amp.GradScaler, "step", _wrap_step),
    ]
    # FSDP1's scaler has its own scale(); only if already imported (the import costs seconds).
    sharded = sys.modules.get("torch.distributed.fsdp.sharded_grad_scaler")
    scaler_cls = getattr(sharded, "ShardedGradScaler", None)
    if scaler_cls is not None and "scale" in scaler_cls.__dict__:
        targets.append((scaler_cls, "scale", _wrap_scale))
    return targets


def _install() -> None:
    generation = _generation["live"] = _generation["next"]
    _generation["next"] += 1
    for owner, name, make_wrapper in _targets():
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        wrapper = make_wrapper(original, generation)
        setattr(owner, name, wrapper)
        _saved.append((owner, name, original, wrapper))


def _uninstall() -> None:
    _generation["live"] = 0
    while _saved:
        owner, name, original, wrapper = _saved.pop()
        current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
        if current is wrapper:  # else someone wrapped ours: ours stays, inert without _live
            setattr(owner, name, original)
