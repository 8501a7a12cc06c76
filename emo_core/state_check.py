"""State dicts of the Emo optimizers: their layout, the checks before a load, pickling.

Layout (format 2). ``state`` holds per-parameter state only, keyed like ``torch.optim``;
the optimizer-wide part travels in ``param_groups[0]["emo_state"]``::

    {"optimizer": "EmoSens", "format": 2,
     "emo_pulse": {...loss sensor tensors...}, "emo_meta": {"steps": ..., "seed": ...}}

so that ``torch.distributed.checkpoint.state_dict`` (which maps every key of ``state`` to a
parameter name and keeps the group entries) handles it like any torch optimizer. Format 1
(this project before, no class name) kept the two dicts as ``state["emo_pulse"]`` and
``state["emo_meta"]``; it still loads.

:func:`checked_load` validates a whole state dict against what the optimizer would create
itself (its own ``_init_state`` on each parameter, its fresh sensor and meta as templates),
so it stays right when state keys are added, and raises one ``ValueError`` naming the
offending entry before anything changes.
"""

from __future__ import annotations

import numbers
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._validation import STATE_DTYPES
from .distributed import local_shard
from .precision import default_state_dtype
from .pulse import HIST_LEN
from .settle import SETTLE_KEYS

DEFAULTED_KEYS = SETTLE_KEYS | {"steps", "pending", "x_prev", "m_prev", "d_hat"}
"""Controller entries a state saved by an earlier version may lack (they load fresh):
settling's, the averaging step count (``_base.load_state_dict`` fills that one in) and its
pending mixes (none: the old format kept the average up to date), and the distance
controller's last sample and lr multipliers (fresh: an lr of 1, no shift) and its last
estimate (fresh: 0, so ``d`` waits for the next read of the sample to grow)."""

BOUNDS: dict[str, dict[str, tuple[float, bool, float, bool]]] = {
    # key -> entry -> (lower bound, lower bound allowed, upper bound, whole numbers only)
    "emo_distance": {
        "d": (0.0, False, float("inf"), False),
        "lr": (0.0, False, float("inf"), False),
        "settle": (0.0, False, 1.0, False),
        "n": (0.0, True, float("inf"), True),
        "l_var": (0.0, True, float("inf"), False),
        "v": (0.0, True, float("inf"), False),
        "k": (0.0, True, float("inf"), True),
        "m_prev": (0.0, True, float("inf"), False),
    },
    "emo_average": {
        "lr_max": (0.0, True, float("inf"), False),
        "weight_sum": (0.0, True, float("inf"), False),
        "steps": (0.0, True, float("inf"), True),
        "pending": (0.0, True, 1.0, False),
    },
    "emo_pulse": {  # the loss sensor (SPEC §2): what its update can produce
        "t": (0.0, True, float("inf"), True),
        "scalar": (-1.0, True, 1.0, False),
        "trust": (-1.0, True, 1.0, False),
        "noise": (0.0, True, float("inf"), False),
        "d": (0.0, True, float("inf"), False),
        "H": (0.0, True, float("inf"), False),
        "hist_count": (0.0, True, float(HIST_LEN), True),
        "pulse": (0.0, False, float("inf"), False),
        "skipped": (0.0, True, float("inf"), True),
    },
}
"""Values the sensor and a controller can hold: a scale, pulse or LR of 0 or below (which
would pin the LR at ``min_lr`` for good, or step up the gradient), an emotion scalar or trust
outside [-1, 1], a negative weight or count, a fractional count are refused on load."""

SECOND_MOMENTS = ("exp_avg_sq", "row_var", "col_var")
"""Per-parameter state that is a mean of squares: a negative value is refused on load (its
square root is nan, written into the parameter by the next finite step)."""

if TYPE_CHECKING:
    from ._base import EmoOptimizer

__all__ = [
    "EMO_GROUP_KEY",
    "FORMAT",
    "SENSOR_DEFAULTED_KEYS",
    "LoadPlan",
    "checked_load",
    "pack_state_dict",
    "picklable_state",
]

EMO_GROUP_KEY = "emo_state"
FORMAT = 2
SENSOR_KEY = "emo_pulse"
META_KEY = "emo_meta"
SENSOR_DEFAULTED_KEYS: frozenset[str] = frozenset()
"""Sensor keys that older checkpoints may lack; they are filled from a fresh sensor. Every
other key of the fresh sensor is required (add a key here when adding it to the sensor)."""
_DROPPED_WHEN_UNPICKLABLE = ("writer", "process_group")
_FLOAT_CLASS = "a floating dtype"


def _fail(message: str) -> None:
    raise ValueError(f"Invalid state_dict: {message}")


def state_owner(opt: EmoOptimizer) -> str:
    """The class name a state dict records and a load checks: the class's own, or that of
    the class whose layout it shares (``state_owner``, e.g. a preset of EmoSens)."""
    return getattr(type(opt), "state_owner", None) or type(opt).__name__


def pack_state_dict(opt: EmoOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``Optimizer.state_dict()``'s result with the optimizer-wide state in group 0."""
    groups = [dict(group) for group in state_dict["param_groups"]]
    emo = opt.emo_state
    meta = dict(emo[META_KEY])
    meta["steps"] = meta["steps"].clone()  # advanced in place by step()
    groups[0][EMO_GROUP_KEY] = {
        "optimizer": state_owner(opt),
        "format": FORMAT,
        SENSOR_KEY: dict(emo[SENSOR_KEY]),
        META_KEY: meta,
        # the pulse controller's own state (``pulse="distance"``), once it has stepped
        **{key: dict(value) for key, value in emo.items() if key not in (SENSOR_KEY, META_KEY)},
    }
    return {**state_dict, "param_groups": groups}


@dataclass
class LoadPlan:
    """A validated state dict, ready to install: nothing here aliases the caller's tensors
    in a way that a later failure could leave half-applied."""

    torch_state_dict: dict[str, Any]  # param groups for ``Optimizer.load_state_dict``; no state
    per_param: list[tuple[Tensor, dict[str, Any]]]  # (parameter, its state, on its device)
    sensor: dict[str, Tensor]
    meta: dict[str, Any]
    controller: dict[str, dict[str, Tensor]]  # optimizer-wide controller state, by key


def checked_load(opt: EmoOptimizer, state_dict: Any) -> LoadPlan:
    """Validate ``state_dict`` for ``opt`` completely; raise ``ValueError`` or return a plan."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
        _fail("expected a dict with 'state' and 'param_groups' (from optimizer.state_dict())")
    if not isinstance(state_dict["state"], Mapping):
        _fail(f"'state' is a {type(state_dict['state']).__name__}, expected a dict")
    state = dict(state_dict["state"])
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), list | tuple) for g in saved_groups
    ):
        _fail("param_groups must be a list of dicts with 'params'")
    if len(saved_groups) != len(opt.param_groups):
        _fail(
            f"it has {len(saved_groups)} param groups but the optimizer has {len(opt.param_groups)}"
        )
    for index, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            _fail(
                f"param_groups[{index}] has {len(saved['params'])} parameters but the "
                f"optimizer's group {index} has {len(group['params'])}"
            )
    emo = _emo_entry(opt, state, saved_groups)
    groups = [_checked_group(opt, index, saved) for index, saved in enumerate(saved_groups)]

    owner: dict[Any, tuple[int, Tensor, bool]] = {}
    for saved, group, checked in zip(saved_groups, opt.param_groups, groups):
        for saved_id, p in zip(saved["params"], group["params"]):
            owner[saved_id] = (saved_id, p, checked["use_shadow"])
    per_param = []
    for key, entry in state.items():
        if key not in owner:
            _fail(f"state[{key!r}] belongs to no parameter of param_groups")
        saved_id, p, use_shadow = owner[key]
        if not isinstance(entry, Mapping):
            _fail(f"state[{key!r}] is a {type(entry).__name__}, expected a dict")
        if entry:  # an empty entry: state not created yet (lazy), like torch.optim
            per_param.append((p, _checked_param_state(opt, key, entry, p, use_shadow)))

    device = opt._sensor_device()
    sensor = _checked_sensor(emo[SENSOR_KEY], opt._new_sensor_state(device))
    meta = _checked_meta(emo[META_KEY], opt._new_meta_state())
    controller = {}
    keys = [key for key in emo if key not in (SENSOR_KEY, META_KEY, "optimizer", "format")]
    stepped = bool(per_param) or int(meta["steps"]) > 0
    mismatch = opt._controller_mismatch(set(keys), sensed=float(sensor["t"]) > 0, stepped=stepped)
    if mismatch:
        _fail(mismatch)
    for key in keys:
        saved = emo[key]
        template = opt._controller_template(key, saved) if isinstance(saved, Mapping) else None
        if template is None:
            _fail(f"the optimizer-wide entry {key!r} is not known to {type(opt).__name__}")
        controller[key] = _checked_scalars(key, saved, template, DEFAULTED_KEYS)
    torch_groups = []
    for saved, checked in zip(saved_groups, groups):
        torch_groups.append({**checked, "params": list(saved["params"])})
    return LoadPlan(
        {"state": {}, "param_groups": torch_groups}, per_param, sensor, meta, controller
    )


def _emo_entry(opt: EmoOptimizer, state: dict[Any, Any], groups: Any) -> dict[str, Any]:
    """The optimizer-wide entry of format 2 (or 1), popped out of ``state``."""
    name = state_owner(opt)
    entry = groups[0].get(EMO_GROUP_KEY) if groups else None
    legacy = {key: state.pop(key) for key in (SENSOR_KEY, META_KEY) if key in state}
    if entry is None:
        if not legacy:
            looks = sorted({k for e in state.values() if isinstance(e, Mapping) for k in e})
            _fail(
                f"it was not written by an Emo optimizer (no param_groups[0][{EMO_GROUP_KEY!r}] "
                f"and no state[{SENSOR_KEY!r}]; its per-parameter keys are {looks}). Another "
                "optimizer's state (e.g. torch.optim.AdamW) has no loss sensor and different "
                f"moments: start {name} fresh and load only the model weights"
            )
        entry = legacy  # format 1: class not recorded, the per-parameter keys decide
    elif legacy:
        _fail(f"it has both param_groups[0][{EMO_GROUP_KEY!r}] and state[{SENSOR_KEY!r}]")
    else:
        if not isinstance(entry, Mapping):
            _fail(f"param_groups[0][{EMO_GROUP_KEY!r}] is not a dict")
        writer = entry.get("optimizer")
        if writer != name:
            _fail(f"it was written by {writer}, not {name}; load it into a {writer}")
        if entry.get("format") != FORMAT:
            _fail(f"format {entry.get('format')!r} is not known (expected {FORMAT})")
    for key in (SENSOR_KEY, META_KEY):
        if key not in entry:
            _fail(f"the optimizer-wide entry {key!r} is missing")
        if not isinstance(entry[key], Mapping):
            _fail(f"{key!r} is a {type(entry[key]).__name__}, expected a dict")
    return entry


def _checked_group(opt: EmoOptimizer, index: int, saved: Mapping[str, Any]) -> dict[str, Any]:
    """The saved group's hyperparameters after the optimizer's own checks (defaults filled)."""
    group = {k: v for k, v in saved.items() if k not in ("params", EMO_GROUP_KEY)}
    if "scope" not in group and "scope" in opt.defaults and "lr" in group:
        group["scope"] = group["lr"]  # groups saved before the scope key
    for key, value in opt.defaults.items():
        group.setdefault(key, value)
    try:
        opt._check_group(group)
    except ValueError as error:
        _fail(f"param_groups[{index}]: {error}")
    return group


def _param_template(p: Tensor) -> Tensor:
    """``p`` (complex: its real view) as a meta tensor."""
    real_dtype = p.dtype.to_real() if p.is_complex() else p.dtype
    shape = tuple(p.shape) + ((2,) if p.is_complex() else ())
    return torch.empty(shape, dtype=real_dtype, device="meta")


def _state_template(opt: EmoOptimizer, p: Tensor, use_shadow: bool) -> dict[str, Any]:
    """The state the optimizer would create for ``p``, as meta tensors (no memory)."""
    like = _param_template(p)
    real_dtype = like.dtype
    state_dtype = default_state_dtype(real_dtype, opt.state_dtype)
    template: dict[str, Any] = {}
    opt._init_state(like, template, state_dtype)
    if use_shadow:
        template["shadow"] = like.to(state_dtype)
    return template


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "torch.bool"
    if dtype.is_floating_point:
        return _FLOAT_CLASS
    if dtype.is_complex:
        return "a complex dtype"
    return "an integer dtype"


def _checked_tensor(where: str, value: Any, template: Tensor, shape_note: str) -> Tensor:
    """``value`` checked against ``template`` (shape, dtype class, finite); a number for a
    0-dim template becomes a tensor of the template's dtype (torch accepts ``step=3``)."""
    if not isinstance(value, Tensor):
        if template.dim() == 0 and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return torch.tensor(value, dtype=template.dtype)
        _fail(f"{where} is a {type(value).__name__}, expected a tensor")
    if value.is_meta:
        _fail(f"{where} is on the meta device (no values); load a state_dict holding values")
    if tuple(value.shape) != tuple(template.shape):
        _fail(f"{where} has shape {tuple(value.shape)} but {shape_note}")
    want, got = _dtype_class(template.dtype), _dtype_class(value.dtype)
    if want != got:
        _fail(f"{where} has dtype {value.dtype}, expected {want} like {template.dtype}")
    if got == _FLOAT_CLASS and value.dtype not in STATE_DTYPES:
        _fail(f"{where} has dtype {value.dtype}, expected one of {STATE_DTYPES}")
    if got == _FLOAT_CLASS and not bool(torch.isfinite(local_shard(value.detach())).all()):
        _fail(f"{where} contains nan or inf")
    return value


def _checked_param_state(
    opt: EmoOptimizer, key: Any, entry: Mapping[str, Any], p: Tensor, use_shadow: bool
) -> dict[str, Any]:
    template = _state_template(opt, p, use_shadow)
    if not use_shadow and "shadow" in entry:
        # saved after use_shadow was turned off in this group, before its next step (or by
        # a version that kept the shadow then): the shadow is not used, and not loaded
        entry = {k: v for k, v in entry.items() if k != "shadow"}
    if use_shadow and "shadow" not in entry:
        # use_shadow turned on between steps: a parameter that has had no gradient since
        # has no shadow yet; its next step creates it, as it would have without the resume
        del template["shadow"]
    if opt.average and "x" in template:
        if "z" in entry and "x" not in entry:  # emo 0.1's averaged state (upgraded on use)
            template["z"] = template.pop("x")
        if "y" in entry:  # saved in eval mode: the training point that train() restores
            template["y"] = _param_template(p)
    missing = sorted(k for k in template if k not in entry)
    unknown = sorted(k for k in entry if k not in template)
    options = [name for name, on in (("use_shadow", use_shadow), ("average", opt.average)) if on]
    owner = type(opt).__name__ + "".join(f" with {name}=True" for name in options)
    hint = ""
    if ("x" in entry or "z" in entry) and not opt.average:  # (keys only averaging keeps)
        hint = "; a state saved with average=True needs an optimizer with average=True"
    elif opt.average and not {"x", "z"} & entry.keys():  # (saved without averaging)
        hint = (
            "; a state saved without averaging (pulse='v37', or average=False) needs an "
            f"optimizer without it: construct {type(opt).__name__}(..., pulse='v37') or "
            "(..., average=False) as it was saved"
        )
    if missing:
        _fail(f"state[{key!r}] lacks {missing} ({owner} keeps {sorted(template)}){hint}")
    if unknown:
        _fail(
            f"state[{key!r}] has unknown entries {unknown} ({owner} keeps {sorted(template)}){hint}"
        )
    is_dtensor = hasattr(p, "to_local")
    out = {}
    for name, expected in template.items():
        where = f"state[{key!r}][{name!r}]"
        shape = tuple(p.shape)
        note = (
            f"parameter {key!r} has shape {shape}"
            if tuple(expected.shape) == shape
            else f"{type(opt).__name__} keeps shape {tuple(expected.shape)} for a parameter of "
            f"shape {shape}"
        )
        value = _checked_tensor(where, entry[name], expected, note)
        if name in SECOND_MOMENTS and value.numel() and bool((local_shard(value) < 0).any()):
            _fail(f"{where} holds negative values, expected a mean of squares (>= 0)")
        if hasattr(value, "to_local") != is_dtensor and value.dim() > 0:
            kind = "a DTensor" if is_dtensor else "a plain tensor"
            _fail(
                f"{where} must be sharded like parameter {key!r}, which is {kind}; load "
                "sharded state through torch.distributed.checkpoint (set_optimizer_state_dict)"
            )
        # State follows its parameter's device, in the dtype it was saved in (fp32 state of
        # bf16 parameters stays fp32, unlike torch.optim's cast to the parameter dtype).
        device = local_shard(p).device
        out[name] = value.detach().to(device=device, copy=True)
    return out


def _checked_sensor(saved: Mapping[str, Any], fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    return _checked_scalars(SENSOR_KEY, saved, fresh, SENSOR_DEFAULTED_KEYS)


def _checked_scalars(
    key: str,
    saved: Mapping[str, Any],
    fresh: dict[str, Tensor],
    defaulted: frozenset[str] = frozenset(),
) -> dict[str, Tensor]:
    """An optimizer-wide tensor dict (the loss sensor, a controller's state) checked
    against ``fresh``: the same keys (``defaulted`` ones may be missing), shapes, dtype
    classes, finite values; copied onto the template's device and dtype."""
    label = "the loss sensor" if key == SENSOR_KEY else "the controller state"
    unknown = [k for k in saved if k not in fresh]
    if unknown:
        _fail(f"{label} {key!r} has unknown entries {unknown}")
    out = {}
    for name, template in fresh.items():
        if name not in saved:
            if name in defaulted:
                out[name] = template
                continue
            _fail(f"{label} {key!r} lacks {name!r} (it has {sorted(saved)})")
        where = f"{key}[{name!r}]"
        value = _checked_tensor(where, saved[name], template, f"expected {tuple(template.shape)}")
        _check_bounds(where, value, BOUNDS.get(key, {}).get(name))
        out[name] = value.detach().to(device=template.device, dtype=template.dtype, copy=True)
    return out


def _check_bounds(
    where: str, value: Tensor, bounds: tuple[float, bool, float, bool] | None
) -> None:
    if bounds is None or value.numel() == 0 or value.dtype == torch.bool:
        return
    low, low_ok, high, whole = bounds
    values = value.detach().double()
    smallest, largest = float(values.min()), float(values.max())
    if smallest < low or (smallest == low and not low_ok) or largest > high:
        relation = ">=" if low_ok else ">"
        upper = "" if high == float("inf") else f" and <= {high:g}"
        _fail(f"{where} holds {smallest:g}..{largest:g}, expected values {relation} {low:g}{upper}")
    if whole and not torch.equal(values, values.round()):
        _fail(f"{where} holds a fractional count, expected whole numbers")


def _checked_meta(saved: Mapping[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    unknown = [k for k in saved if k not in fresh]
    missing = [k for k in fresh if k not in saved]
    if unknown or missing:
        _fail(f"{META_KEY!r} has entries {sorted(saved)}, expected {sorted(fresh)}")
    out = dict(saved)
    for name in ("steps", "seed"):
        value = saved[name]
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Integral)
            or not 0 <= value < 2**63
        ):
            _fail(f"{META_KEY}[{name!r}] is {saved[name]!r}, expected an integer in [0, 2**63)")
        out[name] = int(value)
    out["steps"] = torch.tensor(out["steps"], dtype=fresh["steps"].dtype)
    return out


def picklable_state(opt: EmoOptimizer) -> dict[str, Any]:
    """``opt.__dict__`` for pickling, without torch's hook registries (torch drops them too);
    a ``writer`` or ``process_group`` that cannot be pickled becomes None, with a warning."""
    state = {k: v for k, v in opt.__dict__.items() if not k.startswith("_optimizer_")}
    for name in _DROPPED_WHEN_UNPICKLABLE:
        value = state.get(name)
        if value is None:
            continue
        try:
            pickle.dumps(value)
        except Exception as error:  # what pickling raises depends on the object
            warnings.warn(
                f"{type(opt).__name__}: {name}={value!r} cannot be copied or pickled "
                f"({type(error).__name__}); the copy has {name}=None "
                f"({'no logging' if name == 'writer' else 'the default (WORLD) group'}). "
                f"Set copy.{name} again if needed.",
                stacklevel=4,
            )
            state[name] = None
    return state
