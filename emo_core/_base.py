"""``EmoOptimizer``: what the three Emo optimizers share.

One optimizer step, in order (SPEC §1-5):

1. call the closure once under ``enable_grad`` (if given);
2. pick the loss: ``step(loss=)`` > pending ``set_loss``/``add_loss`` > the sum captured from
   ``backward()`` (``capture_loss=True``, ``capture.py``) > closure value;
3. check every gradient (sparse -> error) before anything changes;
4. one device flag for "loss and all gradients finite", folded into the loss so that the
   optional cross-rank mean (one 0-dim all-reduce) makes all ranks agree;
5. advance the loss sensor once (``pulse.pulse_update``) and the chosen controller
   (``pulse="distance"``: ``distance.distance_update``; ``"v37"``: the sensor's pulse);
6. per group ``lr_g = pulse * group["lr"]``, shadow, then the subclass's
   update rule, bucketed by device and dtype, computed in the state dtype (fp32 for half
   parameters) and written back with optional stochastic rounding.

Nothing in ``step()`` reads a tensor value on the host: skipped steps are masked, not branched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import capture, state_check
from ._validation import as_bool, as_float_dtype, as_int, check_lr, check_range, loss_to_tensor
from .averaging import (
    AVERAGE_GROWTH,
    average_weight,
    fold_average_,
    fold_due,
    init_average_state,
)
from .distance import (
    D0,
    GROWTH,
    SamplePlan,
    distance_update,
    gather_sample,
    init_distance_state,
    plan_sample,
)
from .distributed import local_shard, mean_loss_over_ranks, refusals_elsewhere, world_size
from .lr_guard import warn_if_small_lr
from .metrics import metric_values
from .precision import LOW_PRECISION, copy_stochastic_, default_state_dtype
from .pulse import init_sensor_state, pulse_update

__all__ = [
    "COMMON_OPTIONS",
    "COMPILE_CHUNK",
    "CPU_BLOCK",
    "Bucket",
    "EmoOptimizer",
    "common_options",
    "compiled",
]

# Elements per block of the blocked CPU kernels: the block of each operand and the scratch
# buffers stay in a core's L2 (~2 MB) across the ops on it, and full-size temporaries (DRAM
# traffic, and page faults when freshly allocated) are avoided.
CPU_BLOCK = 1 << 17
_PLAIN = (Tensor, torch.nn.Parameter)
_SAME_SIZE_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
_REAL_DTYPE = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}
DEFAULT_ROUNDING_SEED = 0x5EED
# Tensors per call of a compiled update: inductor's compile time grows faster than the graph
# (400 tensors in one graph: ~90 s on 2 cores; in chunks of 32: ~6 s), while a call costs
# ~0.1-0.3 ms (guards on its tensors), which matters only for many small tensors.
COMPILE_CHUNK = 32
SENSOR_STATE_KEY = "emo_pulse"
META_STATE_KEY = "emo_meta"
DISTANCE_STATE_KEY = "emo_distance"
AVERAGE_STATE_KEY = "emo_average"
PULSES = ("distance", "v37")
"""``pulse=`` values: the distance-to-init controller (``distance.md``) or upstream's v3.7
pulse (SPEC §2)."""
DEFAULT_PULSE = "distance"
"""The default controller: it finds the scale (emo-bench quality, README "Which pulse is the
default, and why"); ``"v37"`` is upstream's, kept as SPEC §2 pins it."""
AVERAGED_WEIGHT_DECAY, PLAIN_WEIGHT_DECAY = 0.0, 0.01
"""``weight_decay=None`` resolves to these: none under iterate averaging (Schedule-Free's
choice: the decay ``lr·wd`` grows with the large LR averaging finds, ``averaging.md``,
"Weight decay"), upstream's 0.01 otherwise."""


def pulse_name(pulse: Any) -> Any:
    """``pulse`` as given, unquoted: class-path users may pass a quoted literal."""
    return pulse.strip().strip("'\"") if isinstance(pulse, str) else pulse


def resolve_average(
    params: Any, average: bool | None, pulse: str, use_shadow: bool
) -> tuple[Any, bool]:
    """``(params, average)`` for a constructor: ``params`` listed (it is read here, then by
    torch: a generator once; a lone tensor is left for torch to refuse, listing it would
    iterate its rows) and ``average`` resolved. ``average=None`` (the default): iterate
    averaging with the distance controller, unless ``use_shadow=True`` asks for the shadow,
    which averaging excludes, or a parameter is bf16/fp16: the stepped point
    ``z = y + β/(1 − β)·(y − x)`` is implied by the stored ``y``, so each rounding of ``y``
    reaches the average amplified ~``1/(1 − β)`` (10x), and at a small LR that noise
    outgrows the steps (``averaging.md``, "Default and low precision"). An explicit value
    wins (and is checked against ``pulse`` by the constructor)."""
    params = params if isinstance(params, Tensor) else list(params)
    if average is not None:
        return params, as_bool("average", average)
    if isinstance(params, Tensor):  # (torch refuses it next)
        return params, False
    tensors = []
    for item in params:
        if isinstance(item, dict):  # listed in place, as torch's add_param_group does
            if "params" in item and not isinstance(item["params"], (Tensor, list)):
                item["params"] = list(item["params"])
            group = item.get("params", [])
            tensors.extend([group] if isinstance(group, Tensor) else group)
        else:
            tensors.append(item)
    half = any(
        isinstance(t, Tensor) and t.dtype in (torch.bfloat16, torch.float16) for t in tensors
    )
    averaged = pulse_name(pulse) == "distance" and not as_bool("use_shadow", use_shadow)
    return params, averaged and not half


def resolve_weight_decay(weight_decay: float | None, average: bool) -> float:
    """``weight_decay=None``: :data:`AVERAGED_WEIGHT_DECAY` with averaging, else
    :data:`PLAIN_WEIGHT_DECAY`."""
    if weight_decay is not None:
        return weight_decay
    return AVERAGED_WEIGHT_DECAY if average else PLAIN_WEIGHT_DECAY


_DEFAULT_LR_RANGE = {"distance": (1e-8, 1.0), "v37": (1e-6, 1e-3)}

_NO_LOSS_WARNING = (
    "{name}.step() received no loss, so emoPulse cannot adapt and the previous learning rate "
    "is reused. Feed the training loss each step in one of three ways: opt.step(loss=loss), "
    "opt.set_loss(loss) / opt.add_loss(loss) before step(), or a closure that returns the "
    "loss. With Lightning add emo_lightning.EmoCallback; with transformers use emo_hf; for a "
    "script you cannot change, construct the optimizer with capture_loss=True."
)


@dataclass
class Bucket:
    """Tensors of one param group that share a device and dtype, ready for an update rule.

    ``params``, ``grads`` and the ``states`` lists are in the compute dtype (fp32 for half
    parameters); ``lr`` is the effective LR and ``valid`` the step's finite flag, both 0-dim
    on the bucket's device. An update rule must leave every tensor bitwise unchanged when
    ``valid`` is False. ``mix`` is the fold weight ``C`` of ``average=True``
    (``averaging.py``; 0 on a skipped step and between folds) and ``average_steps`` the
    valid steps counted so far (this one included), both None without averaging; ``fold``
    says whether this step folds (the base class runs the fold after the update rule).
    """

    params: list[Tensor]
    grads: list[Tensor]
    states: dict[str, list[Tensor | None]]
    lr: Tensor
    valid: Tensor
    group: dict[str, Any]
    impl: str
    mix: Tensor | None = None
    average_steps: Tensor | None = None
    fold: bool = False

    def masked_grads(self) -> list[Tensor]:
        """Gradients with every element zeroed on a skipped step (so 0 * grad stays 0)."""
        if not self.grads:
            return []
        bits = _SAME_SIZE_INT.get(self.grads[0].dtype)
        if bits is None or type(self.grads[0]) is not Tensor or torch.compiler.is_compiling():
            # (compiled: fused into the update anyway.) A 0-dim zero, not the number 0.0:
            # with a Python scalar torch.where takes a type-promoting path ~3x slower on CPU.
            zero = self.grads[0].new_zeros(())
            return [torch.where(self.valid, g, zero) for g in self.grads]
        # 2-5x faster than torch.where on CPU (plain tensors only; DTensor has no dtype views).
        keep = self.keep_bits(bits)
        return [torch.bitwise_and(g.view(bits), keep).view(g.dtype) for g in self.grads]

    def keep_bits(self, bits: torch.dtype) -> Tensor:
        """A 0-dim integer mask: ``x.view(bits) & mask`` keeps x bitwise on a valid step and
        gives +0.0 on a skipped one (nan and inf included)."""
        return self.valid.to(bits).neg()  # -1 has every bit set

    def decay(self, beta: float) -> Tensor:
        """``beta`` on a valid step and 1 on a skipped one: ``state * decay`` keeps the state."""
        return torch.where(self.valid, beta, 1.0).to(self.lr.dtype)

    def blend(self, weight: float) -> list[Tensor]:
        """``weight`` on a valid step and 0 on a skipped one, as a per-tensor list for
        ``torch._foreach_lerp_`` (a 0-dim tensor weight there would be read on the host)."""
        return [(self.valid * weight).to(self.lr.dtype)] * len(self.params)

    def step_lr(self) -> Tensor:
        """The effective LR on a valid step and 0 on a skipped one."""
        return self.lr * self.valid

    def is_plain_cpu(self) -> bool:
        """Eager CPU tensors of no subclass (not DTensor): blocked CPU kernels may view and
        slice them (under torch.compile their Python loops over blocks would be traced)."""
        return (
            self.lr.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and all(type(p) in _PLAIN for p in self.params)
        )

    def cpu_blocks(self, *states: list[Tensor]) -> Iterator[tuple[Tensor, Tensor, list[Tensor]]]:
        """For blocked CPU kernels (on a :meth:`split_large` bucket): per block of
        ``CPU_BLOCK`` elements of each tensor, ``(g, scratch, [p, *states])``: the gradient's
        block masked bitwise (+0.0 everywhere on a skipped step, nan and inf included), a
        scratch block of the same size, and the block's views of the parameter and of each
        state list. The two buffers are reused, so they stay in L2 while the tensors are
        streamed from memory once."""
        dtype = self.lr.dtype
        keep = self.keep_bits(torch.int32)
        grad_buffer = torch.empty(CPU_BLOCK, dtype=torch.int32)
        scratch = torch.empty(CPU_BLOCK, dtype=dtype)
        for g, *tensors in zip(self.grads, self.params, *states):
            flat_g, flats = g.view(-1), [t.view(-1) for t in tensors]
            for start in range(0, flat_g.numel(), CPU_BLOCK):
                block = slice(start, start + CPU_BLOCK)
                views = [flat[block] for flat in flats]
                size = views[0].numel()
                masked = torch.bitwise_and(
                    flat_g[block].view(torch.int32), keep, out=grad_buffer[:size]
                )
                yield masked.view(dtype), scratch[:size], views

    def split_large(self) -> tuple[Bucket | None, Bucket | None]:
        """``(large, rest)``: the contiguous fp32 tensors of at least ``CPU_BLOCK`` elements
        (for a blocked CPU kernel, whose bitwise mask views them as int32) and the others;
        None for an empty side. Only for :meth:`is_plain_cpu` buckets."""
        large = [
            i
            for i, (p, g) in enumerate(zip(self.params, self.grads))
            if p.numel() >= CPU_BLOCK
            and p.dtype == torch.float32
            and p.is_contiguous()
            and g.is_contiguous()
        ]
        if not large:
            return None, self
        return self.split(large)

    def subset(self, indices: Iterable[int]) -> Bucket:
        """The bucket restricted to the tensors at ``indices``."""
        indices = list(indices)
        return dataclasses.replace(
            self,
            params=[self.params[i] for i in indices],
            grads=[self.grads[i] for i in indices],
            states={key: [values[i] for i in indices] for key, values in self.states.items()},
        )

    def split(self, indices: list[int]) -> tuple[Bucket, Bucket | None]:
        """The tensors at ``indices``, and the others (None if there are none)."""
        chosen = set(indices)
        rest = [i for i in range(len(self.params)) if i not in chosen]
        return self.subset(indices), (self.subset(rest) if rest else None)

    def chunks(self, size: int) -> Iterator[Bucket]:
        """The bucket in consecutive parts of at most ``size`` tensors."""
        for start in range(0, len(self.params), size):
            yield self.subset(range(start, min(start + size, len(self.params))))


_COMPILED: dict[Callable[..., None], Callable[..., None]] = {}
# Inductor re-checks every input's size and stride on each call by default; the guards
# already cover them (about 1 µs per tensor, which adds up over hundreds of LoRA tensors).
_COMPILE_OPTIONS = {"size_asserts": False}


def compiled(kernel: Callable[..., None]) -> Callable[..., None]:
    """``kernel`` (a per-tensor update loop) through ``torch.compile``, built on first use.

    Inductor fuses each tensor's whole update into one vectorised loop, so the tensors are
    read and written once (torch's foreach ops make a pass per op). Shared by all instances:
    the compiled code is cached per kernel, shapes and hyperparameter values.
    """
    fn = _COMPILED.get(kernel)
    if fn is None:
        fn = _COMPILED[kernel] = torch.compile(kernel, fullgraph=True, options=_COMPILE_OPTIONS)
    return fn


COMMON_OPTIONS = (
    "lr",
    "weight_decay",
    "pulse",
    "use_shadow",
    "min_lr",
    "max_lr",
    "sync_loss",
    "process_group",
    "state_dtype",
    "stochastic_rounding",
    "foreach",
    "compile_update",
    "writer",
    "log_every",
    "maximize",
    "capture_loss",
)
"""Constructor arguments every Emo optimizer takes and hands to :class:`EmoOptimizer`."""


def common_options(arguments: dict[str, Any]) -> dict[str, Any]:
    """The :data:`COMMON_OPTIONS` out of a constructor's ``locals()``."""
    return {name: arguments[name] for name in COMMON_OPTIONS}


class EmoOptimizer(Optimizer):
    """Base class of EmoSens, EmoAiry and EmoCats; see the module docstring for one step.

    ``direction_power``: how far the subclass's update direction is from an Adam direction
    in size under gradient noise (0: Adam-type; 1: sign); the distance controller scales its
    LR by ``ρ^direction_power`` (``distance.md``). ``growth_limit``: the most the distance
    controller's scale may grow per step without averaging (``distance.md`` step 5):
    :data:`~emo_core.distance.GROWTH` for an update that carries a first moment (stale and
    coherent over the first steps), ``math.inf`` for one that has none.

    Subclasses add their hyperparameter checks (``_check_group``), lazy per-parameter state
    (``_init_state``), the kernel choice (``_pick_impl``) and the update rule (``_update``).
    """

    direction_power = 0.0
    growth_limit = GROWTH
    average_growth_limit = AVERAGE_GROWTH  # the same with averaging (averaging.md)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        lr: float,
        weight_decay: float | None,
        pulse: str,
        use_shadow: bool,
        min_lr: float | None,
        max_lr: float | None,
        sync_loss: bool,
        process_group: object | None,
        state_dtype: torch.dtype | None,
        stochastic_rounding: bool | None,
        foreach: bool | None,
        compile_update: bool,
        writer: Any | None,
        log_every: int,
        maximize: bool = False,
        capture_loss: bool = False,
        average: bool = False,
    ) -> None:
        lr = check_range("lr", lr, 0.0, low_inclusive=False)
        pulse = pulse_name(pulse)
        if pulse not in PULSES:
            raise ValueError(f"Invalid pulse: {pulse!r} (expected one of {', '.join(PULSES)})")
        self.pulse = pulse
        self.average = as_bool("average", average)
        if self.average and pulse != "distance":
            raise ValueError(
                f"Invalid average=True with pulse={pulse!r}: iterate averaging is built on the "
                "distance controller; pass pulse='distance' too"
            )
        low, high = _DEFAULT_LR_RANGE[pulse]
        min_lr = low if min_lr is None else min_lr
        max_lr = high if max_lr is None else max_lr
        self.min_lr = check_range("min_lr", min_lr, 0.0, low_inclusive=False)
        self.max_lr = check_range("max_lr", max_lr, 0.0, low_inclusive=False)
        if self.min_lr > self.max_lr:
            raise ValueError(
                f"Invalid min_lr/max_lr: {min_lr} > {max_lr} (expected 0 < min_lr <= max_lr)"
            )
        self.sync_loss = as_bool("sync_loss", sync_loss)
        self.maximize = as_bool("maximize", maximize)
        self.process_group = process_group
        self.state_dtype = as_float_dtype("state_dtype", state_dtype)
        self.stochastic_rounding = as_bool(
            "stochastic_rounding", stochastic_rounding, allow_none=True
        )
        self.foreach = as_bool("foreach", foreach, allow_none=True)
        self.compile_update = as_bool("compile_update", compile_update)
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise ValueError(
                f"Invalid writer: {writer!r} (expected None or an object with "
                "add_scalar(tag, value, step), e.g. torch.utils.tensorboard.SummaryWriter)"
            )
        self.writer = writer
        self.log_every = as_int("log_every", log_every)
        if self.log_every < 1:
            raise ValueError(f"Invalid log_every: {log_every!r} (expected log_every >= 1)")
        self.capture_loss = as_bool("capture_loss", capture_loss)
        defaults = {
            "lr": lr,
            "weight_decay": resolve_weight_decay(weight_decay, self.average),
            "use_shadow": as_bool("use_shadow", use_shadow),
            **defaults,
        }
        # Mutable containers, changed in place: framework wrappers such as Lightning's
        # LightningOptimizer copy this object's __dict__, so rebinding an attribute on the
        # wrapper would be invisible to the optimizer.
        self._pending: dict[str, Any] = {"sum": None, "count": 0}
        self._flags: dict[str, Any] = {"warned_no_loss": False, "eval_mode": False, "calls": 0}
        self._plan: dict[str, Any] = {"plan": None, "layout": None}
        super().__init__(params, defaults)
        # The loss sensor and the step counter: optimizer-wide, so not in ``self.state``, which
        # holds per-parameter state only (torch.distributed.checkpoint maps each of its keys
        # to a parameter name). ``state_dict()`` carries them in ``param_groups[0]``.
        self.emo_state: dict[str, dict[str, Any]] = {
            SENSOR_STATE_KEY: self._new_sensor_state(self._sensor_device()),
            META_STATE_KEY: self._new_meta_state(),
        }
        if self.average:
            sensor = self._sensor["ema_long"]
            self.emo_state[AVERAGE_STATE_KEY] = init_average_state(sensor.device, sensor.dtype)
        self._refresh_effective_lr()
        if self.capture_loss:  # last: a failed constructor installs nothing
            capture.attach(self)

    # ----------------------------------------------------------------- construction
    def _new_sensor_state(self, device: torch.device) -> dict[str, Tensor]:
        """A fresh loss sensor (also the template a loaded sensor is checked against)."""
        return init_sensor_state(device, self._first_lr())

    @staticmethod
    def _new_meta_state() -> dict[str, Any]:
        """Fresh step counter and rounding seed (also the template for loading)."""
        return {
            "steps": _step_count(0),
            # Stochastic rounding draws from (seed + step): one fixed seed, so every rank
            # of a data-parallel run rounds identically and replicas stay equal.
            "seed": DEFAULT_ROUNDING_SEED,
        }

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate (and normalise in place) one param group's hyperparameters."""
        group["lr"] = check_lr("lr", group["lr"])
        group["weight_decay"] = check_range("weight_decay", group["weight_decay"], 0.0)
        group["use_shadow"] = as_bool("use_shadow", group["use_shadow"])
        if group["use_shadow"] and self.average:
            raise ValueError(
                "Invalid use_shadow=True with average=True: the shadow would pull the "
                "interpolated training point, not the average; choose one"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyperparameters; nothing changes on error."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid param_group: expected a dict, got {type(param_group)}")
        candidate = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(candidate)
        warn_if_small_lr(self, candidate["lr"])
        param_group = {**param_group, **candidate}
        super().add_param_group(param_group)
        if "emo_state" not in self.__dict__:  # (during __init__)
            return
        if DISTANCE_STATE_KEY in self.emo_state:
            # The controller's per-group state gets the new group now (its scale starts at
            # D0; the sample restarts), as the next step would: a state_dict saved before
            # that step then loads into an optimizer built with all its groups.
            self._distance_plan()
        self._refresh_effective_lr()  # the new group's emo_lr

    def _sensor_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def __getstate__(self) -> dict[str, Any]:
        """Everything but torch's hook registries (like ``torch.optim``), so that deepcopy,
        pickle and ``torch.save(opt)`` keep every setting. An unpicklable ``writer`` or
        ``process_group`` is replaced by None (no logging; the default group) with a warning."""
        state = state_check.picklable_state(self)
        state["_capturing"] = capture.is_capturing(self)  # a copy captures as the original
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        capturing = state.pop("_capturing", False)
        super().__setstate__(state)
        if capturing:
            capture.attach_copy(self)
        self.__dict__.setdefault("_pending", {"sum": None, "count": 0})
        self.__dict__.setdefault("_flags", {"warned_no_loss": False})
        self.__dict__.setdefault("compile_update", False)
        self.__dict__.setdefault("maximize", False)
        self.__dict__.setdefault("pulse", "v37")
        self.__dict__.setdefault("average", False)
        self.__dict__.setdefault("_plan", {"plan": None, "layout": None})
        if "emo_state" not in self.__dict__:  # pickled by a version that kept it in self.state
            self.emo_state = {
                key: self.state.pop(key) for key in (SENSOR_STATE_KEY, META_STATE_KEY)
            }
        for group in self.param_groups:
            group.setdefault("use_shadow", False)

    # ------------------------------------------------------------------ loss intake
    @property
    def _sensor(self) -> dict[str, Tensor]:
        return self.emo_state[SENSOR_STATE_KEY]

    def _as_loss(self, loss: Any, source: str) -> Tensor:
        sensor_t = self._sensor["ema_long"]
        return loss_to_tensor(loss, source, sensor_t.device, sensor_t.dtype)

    def set_loss(self, loss: float | Tensor) -> None:
        """Set the loss the next ``step()`` senses, replacing anything pending."""
        self._pending.update(sum=self._as_loss(loss, "set_loss()"), count=1)

    def add_loss(self, loss: float | Tensor) -> None:
        """Add a micro-batch loss; the next ``step()`` senses the mean of those added."""
        value = self._as_loss(loss, "add_loss()")
        pending = self._pending
        pending["sum"] = value if pending["sum"] is None else pending["sum"] + value
        pending["count"] += 1

    def _pick_loss(
        self,
        explicit: Any,
        closure_value: Any,
        has_closure: bool,
        captured: Tensor | None = None,
    ) -> Tensor | None:
        if explicit is not None:
            return self._as_loss(explicit, "step(loss=...)")
        if self._pending["sum"] is not None:
            return self._pending["sum"] / self._pending["count"]
        if captured is not None:  # capture_loss=True: the sum since the last step (capture.py)
            return self._as_loss(captured, "capture_loss")
        if has_closure and closure_value is not None:
            return self._as_loss(closure_value, "closure()")
        # No loss (also a closure returning None): warned once, the previous LR is kept.
        return None

    @torch._disable_dynamo  # as torch's own zero_grad (no graph break inside emo_core)
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Like ``torch.optim``; also drops the losses captured for the zeroed gradients."""
        super().zero_grad(set_to_none)
        capture.discard(self)

    def close(self) -> None:
        """End ``capture_loss``: backward calls no longer reach this optimizer, and the
        backward patch is removed once no capturing optimizer is left. Idempotent."""
        capture.release(self)

    # ------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One optimizer step; returns the closure's value like ``torch.optim``.

        Args:
            closure: re-evaluates the model and returns the loss; called once under grad.
            loss: this step's training loss (number or one-element tensor); takes priority
                over a pending ``set_loss``/``add_loss`` value and the closure's value.
        """
        if self._flags.get("eval_mode"):
            raise RuntimeError(
                f"{type(self).__name__}.step() called in eval mode: the parameters hold the "
                "average (average=True); call optimizer.train() before training steps"
            )
        closure_value = None
        if closure is not None:
            with torch.enable_grad():
                closure_value = closure()
        # The loss is checked first (a loss of the wrong shape is refused before the lazy
        # state is created and before the captured sum is taken), then the gradients.
        loss_t = self._pick_loss(loss, closure_value, closure is not None, capture.peek(self))
        work = self._collect()  # raises before anything changes
        plans = self._prepare(work)  # likewise: every check that can refuse this step
        has_grads = any(work)
        capture.take(self)  # (what peek returned: the sum is cleared)
        self._pending.update(sum=None, count=0)
        # Every rank must join the same loss collective, whatever it was fed (SPEC §1).
        across_ranks = self.sync_loss and world_size(self.process_group) > 1
        if loss_t is None and not has_grads and closure is not None and not across_ranks:
            return closure_value  # nothing to sense and nothing to update
        if loss_t is not None and self.maximize:
            loss_t = -loss_t  # a rising objective reads as a falling loss

        sensor = self._sensor
        senses = loss_t is not None or across_ranks
        distance = senses and self.pulse == "distance"
        plan = self._distance_plan() if distance else self._plan["plan"]
        period = 1 if plan is None else plan.period  # (a plan exists only under "distance")
        # (a host count; under torch.compile only where something reads it, as it breaks
        # the graph)
        meta = self.emo_state[META_STATE_KEY]
        counted = self.average or period > 1 or not torch.compiler.is_compiling()
        calls = self._count_call(meta) if counted else None
        # The controller's sample is read before the gradient norms stream every gradient
        # through the caches, while _prepare has just touched the tensors it views (~5% of a
        # step on 400 small tensors); nothing in between writes a parameter or a gradient.
        # A sample of more than SAMPLE_READS tensors is read every `period` calls.
        reads = distance and (period == 1 or (calls is not None and (calls - 1) % period == 0))
        sample = self._distance_sample(plan) if reads else None
        valid = self._grads_finite(work, sensor["ema_long"].device)
        if loss_t is None:
            self._warn_no_loss()
        if not senses:
            if valid is not None:
                sensor["skipped"] = sensor["skipped"] + (~valid).to(sensor["skipped"].dtype)
        else:
            sensed = None
            if across_ranks:  # the mean over the ranks that had a loss; nan if any was bad
                loss_t, sensed, sample = mean_loss_over_ranks(
                    loss_t, valid, sensor["ema_long"], self.process_group, sample
                )
            elif valid is not None:  # fold the gradient flag into the loss: nan if not finite
                loss_t = torch.where(valid, loss_t, float("nan"))
            valid = torch.isfinite(loss_t)
            updated = pulse_update(
                sensor,
                loss_t,
                valid if sensed is None else valid & sensed,
                scope=1.0,
                min_lr=self.min_lr,
                max_lr=self.max_lr,
            )
            if sensed is not None:  # no rank had a loss: no information, not a skipped step
                updated["skipped"] = sensor["skipped"] + (~valid).to(sensor["skipped"].dtype)
            self.emo_state[SENSOR_STATE_KEY] = updated
            if distance:
                self._advance_distance(sample, loss_t, valid if sensed is None else valid & sensed)
        self._refresh_effective_lr()
        if valid is None:
            valid = torch.ones((), dtype=torch.bool, device=sensor["ema_long"].device)

        meta["steps"] += 1
        fold = self.average and fold_due(calls)
        self._rounding_streams = 0  # stochastic rounding: one noise stream per bucket
        # use_shadow turned off: its shadow is dropped (a state_dict keeping it would not
        # load, and turning it on again would pull towards those old weights)
        for index in self._flags.pop("shadow_off", ()):
            for p in self.param_groups[index]["params"]:
                self.state.get(p, {}).pop("shadow", None)
        # (no gradient at all: nothing steps, so no averaging weight is spent)
        average = self._advance_average(valid, fold) if self.average and has_grads else None
        for group, plan in zip(self.param_groups, plans):
            for prepared in plan:
                self._step_bucket(group, prepared, valid, meta, average)
        if self.writer is not None:
            steps = int(meta["steps"])
            if steps % self.log_every == 0:
                self._log(steps)
        return closure_value

    def _collect(self) -> list[list[tuple[int, Tensor]]]:
        """Per group, the (index, param) pairs that have a gradient; rejects sparse grads.
        An empty tensor (``numel() == 0``, e.g. ``Linear(0, n)``) has nothing to update and
        is left out (EmoAiry's row and column means of it would be nan)."""
        work = []
        for gi, group in enumerate(self.param_groups):
            params = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(param group {gi}, parameter index {pi}); use a dense embedding "
                        "(sparse=False) or torch.optim.SparseAdam for that parameter"
                    )
                params.append((pi, p))
            work.append(params)
        return work

    def _grads_finite(
        self, work: list[list[tuple[int, Tensor]]], device: torch.device
    ) -> Tensor | None:
        """One 0-dim bool tensor: may this step's gradients be applied? ``None`` if none.

        One rule on every size, dtype and path (SPEC §5): a gradient tensor whose squared
        2-norm overflows the compute dtype (``‖g‖ >= sqrt(finfo.max)``, so nan and inf too)
        makes the step a skipped one. Below that bound every ``g²`` and every sum of them is
        finite, so no update rule can write a non-finite value from finite inputs (an
        element-wise finite check would let ``g = 1e37`` through, whose ``g²`` is inf in
        fp32). Half-precision gradients are normed in fp32, their compute dtype.
        """
        # FSDP2: check this rank's shard; the flag is folded into the loss, whose cross-rank
        # mean (sync_loss) makes every rank skip together. Complex gradients: the 2-norm of
        # a complex tensor is that of its pairs of reals.
        # A gradient of another dtype than its parameter (``p.grad_dtype``) is checked
        # against its parameter's compute dtype, which the update casts it to.
        params = [p for group in work for _, p in group]
        grads = [p.grad for p in params]
        if [g.dtype for g in grads] == [p.dtype for p in params]:  # (the common case)
            by_device = {
                (device, dtype, dtype): tensors
                for (device, dtype), tensors in _by_kind(grads, shards=True).items()
            }
        else:
            by_device = {}
            for p, g in zip(params, map(local_shard, grads)):
                by_device.setdefault((g.device, g.dtype, p.dtype), []).append(g)
        if not by_device:
            return None
        finite = []
        for (_, dtype, param_dtype), grads in by_device.items():
            real = _REAL_DTYPE.get(param_dtype, param_dtype)
            compute_dtype = _compute_dtype(real, self.state_dtype)
            norm_dtype = compute_dtype if dtype in LOW_PRECISION else None
            peak = torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype)).amax()
            finite.append(peak < _overflow_norm(compute_dtype))
        if len(finite) == 1:
            return finite[0].to(device)
        return torch.stack([flag.to(device) for flag in finite]).all()

    def _warn_no_loss(self) -> None:
        if self._flags["warned_no_loss"] or all(
            type(group["lr"]) is not Tensor and group["lr"] == 0 for group in self.param_groups
        ):  # (all groups frozen: e.g. torch.distributed.checkpoint's state-creating step)
            return
        self._flags["warned_no_loss"] = True
        warnings.warn(_NO_LOSS_WARNING.format(name=type(self).__name__), stacklevel=3)

    def _refresh_effective_lr(self) -> None:
        """``group["emo_lr"] = pulse * group["lr"]``: ``lr`` is a plain multiplier. The
        distance controller's pulse is per group (its ``lr``); v3.7's is one for all."""
        pulse = self._sensor["pulse"]
        per_group = self.emo_state.get(DISTANCE_STATE_KEY, {}).get("lr")
        for index, group in enumerate(self.param_groups):
            base = pulse
            if self.pulse == "distance" and per_group is not None and index < per_group.numel():
                base = per_group[index]
            group["emo_lr"] = (base * group["lr"]).to(torch.float32)

    def _controller_mismatch(self, keys: set[str], sensed: bool, stepped: bool) -> str | None:
        """Why a state dict whose optimizer-wide entries are ``keys`` was not saved by an
        optimizer configured like this one (None if it could have been). ``sensed``: its
        sensor has sensed a loss (a distance controller would have state then); ``stepped``:
        it has taken a step or holds per-parameter state."""
        name = type(self).__name__
        if DISTANCE_STATE_KEY in keys and self.pulse != "distance":
            return (
                f"it holds the distance controller's state ({DISTANCE_STATE_KEY!r}), so it was "
                f"saved with pulse='distance'; construct {name}(..., pulse='distance') to resume it"
            )
        if self.pulse == "distance" and DISTANCE_STATE_KEY not in keys and sensed:
            return (
                f"it has no {DISTANCE_STATE_KEY!r} entry although its sensor has sensed losses, "
                f"so it was saved with pulse='v37' (or the entry was removed); construct "
                f"{name}(..., pulse='v37') to resume it"
            )
        if self.average and AVERAGE_STATE_KEY not in keys and stepped:
            return (
                f"it has no {AVERAGE_STATE_KEY!r} entry although it has stepped, so it was not "
                f"saved with average=True (or the entry was removed); construct {name} as "
                "it was saved to resume it"
            )
        return None

    def _controller_template(self, key: str, saved: dict[str, Any]) -> dict[str, Tensor] | None:
        """The fresh state a saved optimizer-wide entry ``key`` is checked against (None:
        not a key of this optimizer). The distance controller's sample size is the saved one
        (a changed layout restarts the sample at the next step, keeping ``d``)."""
        sensor = self._sensor["ema_long"]
        if key == AVERAGE_STATE_KEY and self.average:
            return init_average_state(sensor.device, sensor.dtype)
        if key != DISTANCE_STATE_KEY:
            return None
        # the sample size is the saved one (x0's; s's when x0 is missing, which is reported)
        vectors = [saved.get(name) for name in ("x0", "s")]
        sizes = [v.numel() for v in vectors if isinstance(v, Tensor)]
        fresh = init_distance_state(
            sizes[0] if sizes else 0,
            len(self.param_groups),
            sensor.device,
            sensor.dtype,
            self.direction_power > 0,
        )
        if "lr" not in saved and isinstance(saved.get("d"), Tensor) and saved["d"].dim() == 0:
            # saved before the scale was per group: one d for all (the sample restarts)
            fresh.update(d=fresh["d"][0], num=fresh["num"][0])
            del fresh["lr"]
        return fresh

    def _first_lr(self) -> float:
        """The LR before the first loss: ``max_lr`` (v3.7) or the controller's start."""
        return self.max_lr if self.pulse == "v37" else max(self.min_lr, min(D0, self.max_lr))

    # ----------------------------------------------------- distance controller
    def _distance_plan(self) -> Any:
        """The sample plan for the current layout (built on first use, rebuilt when groups
        are added or a tensor is frozen or unfrozen: only trainable tensors are sampled);
        the controller's sample restarts when the plan changes during a run."""
        layout = tuple(
            tuple([p.requires_grad for p in group["params"]]) for group in self.param_groups
        )
        cache = self._plan
        if cache["layout"] != layout:
            sensor = self._sensor["ema_long"]
            world = world_size(self.process_group) if self.sync_loss else 1
            old_plan = cache["plan"]
            cache["plan"] = plan_sample(self.param_groups, sensor.device, world)
            cache["layout"] = layout
            cache["views"] = [None] * len(cache["plan"].pieces)
            cache["average_views"] = [None] * len(cache["plan"].pieces)
            state = self.emo_state.get(DISTANCE_STATE_KEY)
            groups = len(self.param_groups)
            if (
                state is None
                or state["x0"].numel() != cache["plan"].size
                or state["d"].shape != (groups,)
                # (mid-run, other coordinates: x0 and s no longer describe them)
                or (old_plan is not None and old_plan.pieces != cache["plan"].pieces)
            ):
                fresh = init_distance_state(
                    cache["plan"].size,
                    groups,
                    sensor.device,
                    sensor.dtype,
                    self.direction_power > 0,
                    lr=self._first_lr(),
                )
                if state is not None:  # keep the scales found so far, restart the sample
                    # (a state saved with one d for all groups gives it to each; a new
                    # group starts from D0)
                    old = state["d"].reshape(-1)
                    kept = old.expand(groups) if old.numel() == 1 else old[:groups]
                    fresh["d"][: kept.numel()] = kept
                    fresh["lr"] = self._sensor["pulse"].expand(groups).to(fresh["lr"]).clone()
                self.emo_state[DISTANCE_STATE_KEY] = fresh
        return cache["plan"]

    def _distance_sample(self, plan: SamplePlan) -> tuple[Tensor, Tensor]:
        """The sampled ``(x, g)`` of this step (``plan``: :meth:`_distance_plan`'s)."""
        device = self._sensor["ema_long"].device
        views = self._plan["views"]
        x, g = gather_sample(plan, self.param_groups, device, None, views)
        if self.average:  # the distance is that of the stepped sequence z
            x = self._stepped_sample(plan, x, device)
        # maximize: the update descends along -g, so the distance is measured along it too
        return (x, -g) if self.maximize else (x, g)

    def _stepped_sample(self, plan: SamplePlan, y: Tensor, device: torch.device) -> Tensor:
        """``z = y + β/(1 − β)·(y − x)`` at the sampled coordinates, from the sampled
        parameters ``y`` and the average ``x``. ``x`` stands still between folds, so its
        sample is gathered once per fold and kept (not saved: a gather copies exactly)."""
        cached = self._plan.get("x_sample")
        if cached is None or cached[0] is not plan:
            views = self._plan["average_views"]  # (x is state: its storage stays)
            average, _ = gather_sample(
                plan, self.param_groups, device, self._average_point, views, grads=False
            )
            betas = torch.tensor(
                [self._interpolation(group) for group in self.param_groups],
                dtype=average.dtype,
                device=plan.groups.device,
            )
            gain = (betas / (1.0 - betas))[plan.groups].to(device)
            cached = (plan, average, gain)
            if not torch.compiler.is_compiling():
                self._plan["x_sample"] = cached
        _, average, gain = cached
        return y + gain * (y - average)

    def _average_point(self, p: Tensor) -> Tensor:
        """``x`` of ``p`` (complex: its real view, as sampled), or ``p`` before it exists."""
        state = self.state.get(p)
        return p if not state or "x" not in state else state["x"]

    def _advance_distance(
        self, sample: tuple[Tensor, Tensor] | None, loss: Tensor, valid: Tensor
    ) -> None:
        """One controller step; ``sample`` None between reads of the sample."""
        sensor = self._sensor
        state, lr = distance_update(
            self.emo_state[DISTANCE_STATE_KEY],
            *(sample or (None, None)),
            self._plan["plan"],
            sensor,
            loss,
            valid,
            min_lr=self.min_lr,
            max_lr=self.max_lr,
            direction_power=self.direction_power,
            settle=not self.average,
            growth=self.average_growth_limit if self.average else self.growth_limit,
            multipliers=self._multipliers(sensor["ema_long"]),
        )
        self.emo_state[DISTANCE_STATE_KEY] = state
        # the sensor's one pulse (telemetry, the averaging weights): the largest group's
        top = torch.amax(lr) if lr.numel() else sensor["pulse"]
        sensor["pulse"] = torch.where(valid, top, sensor["pulse"])

    def _multipliers(self, like: Tensor) -> Tensor:
        """Each group's ``lr`` as one ``[n_groups]`` tensor like ``like`` (a number is
        multiplied in, a tensor ``lr`` moved over: no host read)."""
        one = torch.ones((), dtype=like.dtype, device=like.device)
        return torch.stack(
            [
                one * (lr.to(like) if isinstance(lr := group["lr"], Tensor) else lr)
                for group in self.param_groups
            ]
        )

    # ------------------------------------------------------------ iterate averaging
    @torch._disable_dynamo  # (a host count: no recompile per step under torch.compile)
    def _count_call(self, meta: dict[str, Any]) -> int:
        """Count this step call on the host (1, 2, …), beside ``meta["steps"]`` (which lives
        in a tensor; reading it here would count as a host read): the averaging's fold
        schedule (:func:`~emo_core.averaging.fold_due`) and the distance sample's reads
        (every ``period`` calls) follow it."""
        calls = self._flags.get("calls")
        calls = int(meta["steps"]) + 1 if calls is None else calls + 1  # (None: an old pickle)
        self._flags["calls"] = calls
        return calls

    def _advance_average(self, valid: Tensor, fold: bool) -> tuple[Tensor, Tensor, bool]:
        """This step's fold weight ``C`` (``averaging.py``), from the pulse, the count of
        valid steps (for the bias correction of ``v``) and whether the step folds."""
        self._warn_if_interpolation_changed()
        state, spent = average_weight(
            self.emo_state[AVERAGE_STATE_KEY], self._sensor["pulse"], valid, fold
        )
        self.emo_state[AVERAGE_STATE_KEY] = state
        if fold:
            self._plan["x_sample"] = None  # the average moves: sample it afresh
        return spent, state["steps"], fold

    def _warn_if_interpolation_changed(self) -> None:
        """Warn once if a group's interpolation weight ``β`` changed between steps: the
        parameters hold ``y = β·x + (1 − β)·z``, so a new ``β`` moves the average ``x`` that
        ``eval()`` recovers (``OneCycleLR`` cycles ``betas[0]`` by default). A group added
        since the last step (``add_param_group``) is new, not changed."""
        betas = [self._interpolation(group) for group in self.param_groups]
        seen = self._flags.get("interpolation")
        self._flags["interpolation"] = betas
        unchanged = seen is None or seen == betas[: len(seen)]
        if unchanged or self._flags.get("warned_interpolation"):
            return
        self._flags["warned_interpolation"] = True
        which = "interpolation" if "interpolation" in self.param_groups[0] else "betas[0]"
        warnings.warn(
            f"{type(self).__name__}(average=True): {which} changed between steps "
            f"({seen} -> {betas}). It is the interpolation weight of the average, so changing "
            "it moves the average that eval() recovers; keep it constant (OneCycleLR: pass "
            "cycle_momentum=False)",
            stacklevel=4,
        )

    @torch.no_grad()
    def train(self) -> None:
        """Parameters to the training point (``average=True``; otherwise nothing happens).
        Call before training steps after :meth:`eval`; a no-op when already training."""
        self._switch_mode(evaluating=False)

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters to the average for evaluating or saving (``average=True``; otherwise
        nothing happens). :meth:`train` switches back; ``step()`` refuses to run until then."""
        self._switch_mode(evaluating=True)

    @property
    def training(self) -> bool:
        """False between :meth:`eval` and :meth:`train` with ``average=True``; else True."""
        return not self._flags.get("eval_mode", False)

    def _switch_mode(self, evaluating: bool) -> None:
        if not self.average or self._flags.get("eval_mode", False) == evaluating:
            return
        self._upgrade_average_state()
        state = self.emo_state[AVERAGE_STATE_KEY]
        spent = 1.0 - state["pending"]  # the mixes since the last fold
        for group in self.param_groups:
            beta = self._interpolation(group)
            for p in group["params"]:
                entry = self.state.get(p)
                if not entry or "x" not in entry:
                    continue  # (no step taken yet: the parameter is its own average)
                y, x = _real(p), entry["x"]
                if evaluating:  # keep y for train(); the parameters take the average as a
                    # fold now would make it, x + C/(1 − β)·(y − x); the state stays as it is
                    entry["y"] = y.detach().clone(memory_format=torch.preserve_format)
                    wide = torch.promote_types(y.dtype, x.dtype)  # (mixed: in the wider)
                    toward = (1.0 - spent / (1.0 - beta)).to(device=x.device, dtype=wide)
                    y.copy_(torch.lerp(y.to(wide), x.to(wide), toward))
                elif "y" in entry:
                    y.copy_(entry.pop("y"))
        self._flags["eval_mode"] = evaluating
        state["eval_mode"] = torch.full_like(state["eval_mode"], evaluating)

    def _upgrade_average_state(self) -> None:
        """State saved by emo 0.1 (``z``, the stepped sequence, in place of ``x``) to this
        layout: ``x = (y − (1 − β)·z)/β`` in training mode; in eval mode the parameters
        held ``x`` and ``y = β·x + (1 − β)·z`` is kept for ``train()``. Once, after a load."""
        if not self._flags.pop("z_states", False):
            return
        evaluating = self._flags.get("eval_mode", False)
        for group in self.param_groups:
            beta = self._interpolation(group)
            for p in group["params"]:
                entry = self.state.get(p)
                if not entry or "z" not in entry:
                    continue
                point, z = _real(p), entry.pop("z")
                wide = torch.promote_types(point.dtype, z.dtype)
                if evaluating:
                    entry["x"] = point.detach().to(z.dtype, copy=True)
                    y = torch.lerp(point.to(wide), z.to(wide), 1.0 - beta)
                    entry["y"] = y.to(point.dtype)
                else:
                    x = torch.lerp(point.to(wide), z.to(wide), 1.0 - 1.0 / beta)
                    entry["x"] = x.to(z.dtype)
        self._plan["x_sample"] = None

    # ------------------------------------------------------------------- per group
    def _prepare(self, work: list[list[tuple[int, Tensor]]]) -> list[list[_Prepared]]:
        """Per group, its buckets ready to step: hyperparameters edited since the last step
        re-checked, lazy state created, layouts and state shapes checked, kernels chosen.
        Everything here that can refuse the step does so before the step changes anything
        (the loss sensor, the controller, the step count, an earlier group); state created
        for a refused step is removed again."""
        self._revalidate_groups()
        self._upgrade_average_state()  # (a format change after a load: no new values)
        created: list[tuple[dict[str, Any], str | None]] = []
        try:
            return [
                [
                    self._prepare_bucket(group, originals, created)
                    for originals in _by_kind([p for _, p in params]).values()
                ]
                for group, params in zip(self.param_groups, work)
            ]
        except BaseException:
            for state, key in created:
                if key is None:
                    state.clear()
                else:
                    state.pop(key, None)
            raise

    def _revalidate_groups(self) -> None:
        """Re-check a group's hyperparameters when they changed since they were last checked
        (a user or a scheduler writes ``param_groups`` between steps; torch.optim checks
        nothing there): a bad value is refused by name before it reaches a kernel. A group's
        snapshot is a tuple of its values, so an unchanged group costs one comparison; a
        tensor ``lr`` is compared by identity and its value is not read (no host sync)."""
        checked = self._flags.setdefault("checked_groups", {})
        for index, group in enumerate(self.param_groups):
            snapshot = _snapshot(group, self.defaults)
            if checked.get(index) == snapshot:
                continue
            candidate = {key: group[key] for key in self.defaults if key in group}
            tensor_lr = candidate.get("lr") if isinstance(candidate.get("lr"), Tensor) else None
            if tensor_lr is not None:
                candidate["lr"] = 0.0  # (its value was checked where it was set)
            self._check_group(candidate)
            if tensor_lr is not None:
                candidate["lr"] = tensor_lr
            group.update(candidate)
            before, checked[index] = checked.get(index), _snapshot(group, self.defaults)
            shadow_was_on = before is not None and before[list(self.defaults).index("use_shadow")]
            if shadow_was_on and not group["use_shadow"]:  # turned off: dropped at this step
                self._flags.setdefault("shadow_off", set()).add(index)

    def _prepare_bucket(
        self,
        group: dict[str, Any],
        originals: list[Tensor],
        created: list[tuple[dict[str, Any], str | None]],
    ) -> _Prepared:
        # Complex parameters are updated as pairs of reals (a dict, as torch.compile cannot
        # trace dtype.to_real()).
        dtype = _REAL_DTYPE.get(originals[0].dtype, originals[0].dtype)
        compute_dtype = _compute_dtype(dtype, self.state_dtype)
        per_param = [self.state[p] for p in originals]  # hashing a tensor is Python code
        for p, state in zip(originals, per_param):
            if not state:
                created.append((state, None))
                self._init_full_state(p, group, dtype)
                # (a parameter new to the optimizer, or replaced and its state removed, as
                # the shape check advises: the distance controller's sample plan, which
                # views each tensor by its size, is rebuilt at this step)
                self._plan["layout"] = None
            elif group["use_shadow"] and "shadow" not in state:  # use_shadow turned on
                created.append((state, "shadow"))
                state["shadow"] = self._new_shadow(p, dtype)
        real = dtype is not originals[0].dtype
        self._check_state_shapes(originals, per_param, real)
        grads = [p.grad for p in originals]
        aligned = self._aligned(originals, grads, per_param, real)
        impl = self._pick_impl(originals, per_param, compute_dtype, aligned=aligned)
        return _Prepared(originals, per_param, compute_dtype, impl)

    def _check_state_shapes(
        self, params: list[Tensor], states: list[dict[str, Any]], real: bool
    ) -> None:
        """State whose shape differs from its parameter's (``p.data`` replaced by a tensor of
        another shape, or state edited by hand) is refused by name; a kernel would fail on it
        halfway through the step, or the fused one write past its buffers."""
        keys = self._layout_keys()
        shapes = [_real(p).shape if real else p.shape for p in params]
        if all([state[key].shape for state in states] == shapes for key in keys):
            return  # (list comparisons: this runs every step on every tensor)
        for index, (shape, state) in enumerate(zip(shapes, states)):
            for key in keys:
                if state[key].shape != shape:
                    raise _shape_error(self, key, state[key].shape, shape, index)

    def _step_bucket(
        self,
        group: dict[str, Any],
        prepared: _Prepared,
        valid: Tensor,
        meta: dict[str, Any],
        average: tuple[Tensor, Tensor, bool] | None = None,
    ) -> None:
        originals, per_param, compute_dtype = prepared.params, prepared.states, prepared.dtype
        device = originals[0].device
        grads = [p.grad for p in originals]
        state_copies: list[tuple[Tensor, Tensor]] = []
        keys = dict.fromkeys(k for state in per_param for k in state if k != "shadow")
        states = {key: [state.get(key) for state in per_param] for key in keys}
        for key, values in states.items():
            if key != "step" and any(
                v is not None and v.dtype is not compute_dtype for v in values
            ):  # state kept in another dtype (state_dtype, or a loaded checkpoint)
                states[key] = [_as_compute(v, compute_dtype, state_copies) for v in values]
        param_copies: list[tuple[Tensor, Tensor]] = []
        if originals[0].dtype == compute_dtype:  # real, and no copies (the common case)
            work_params, work_grads = originals, grads
            if any(g.dtype is not compute_dtype for g in grads):  # (p.grad_dtype set)
                work_grads = [_as_compute(g, compute_dtype, None) for g in grads]
        else:
            work_params = [_as_compute(p, compute_dtype, param_copies) for p in originals]
            work_grads = [_as_compute(p.grad, compute_dtype, None) for p in originals]
        if self.maximize:  # ascend: the rules descend along -g
            work_grads = torch._foreach_neg(work_grads)
        mix = average_steps = None
        fold = False
        if average is not None:
            mix, average_steps = (t.to(device=device, dtype=compute_dtype) for t in average[:2])
            fold = average[2]
        lr = group["emo_lr"].to(device=device, dtype=compute_dtype)
        if mix is not None:  # lr = 0 freezes a group: no fold either
            mix = torch.where(lr != 0, mix, torch.zeros_like(mix))
        bucket = Bucket(
            params=work_params,
            grads=work_grads,
            states=states,
            lr=lr,
            valid=valid.to(device),
            group=group,
            impl=prepared.impl,
            mix=mix,
            average_steps=average_steps,
            fold=fold,
        )
        if group["use_shadow"]:
            self._apply_shadow(bucket, [state["shadow"] for state in per_param])
        if bucket.impl == "compiled":
            for part in bucket.chunks(COMPILE_CHUNK):
                self._update(part)
        else:
            self._update(bucket)
        if bucket.fold:
            fold_average_(bucket.params, bucket.states["x"], bucket.mix, self._interpolation(group))
        self._write_back(param_copies, state_copies, device, meta)

    def _init_full_state(self, p: Tensor, group: dict[str, Any], dtype: torch.dtype) -> None:
        self._init_state(_real(p), self.state[p], default_state_dtype(dtype, self.state_dtype))
        if group["use_shadow"]:
            self.state[p]["shadow"] = self._new_shadow(p, dtype)

    def _new_shadow(self, p: Tensor, dtype: torch.dtype) -> Tensor:
        """A shadow copy of ``p`` (its real view), in the state dtype (SPEC §4)."""
        return _real(p).detach().to(default_state_dtype(dtype, self.state_dtype), copy=True)

    def _layout_keys(self) -> tuple[str, ...]:
        """The state keys, shaped like their parameter, that a kernel of the subclass pairs
        with the parameter by memory position (torch's fused kernel, the blocked CPU
        kernels): the step keeps them in their parameter's layout (:func:`_follow_layout`)."""
        return ()

    def _aligned(
        self, params: list[Tensor], grads: list[Tensor], per_param: list[dict[str, Any]], real: bool
    ) -> bool:
        """Whether each gradient and :meth:`_layout_keys` state of a bucket has its
        parameter's strides, after :func:`_follow_layout` (``real``: complex parameters,
        whose state is of their real view).

        The common case costs two contiguity passes: the flag ``contiguous_state`` records
        that every parameter and state was contiguous when last scanned; state then stays
        so (fresh state copies a contiguous parameter's layout; a load clears the flag), and
        a parameter or gradient whose layout changed is seen by the passes."""
        keys = self._layout_keys()
        if not keys:
            return False
        contiguous = Tensor.is_contiguous
        plain = all(map(contiguous, params))
        if plain and self._flags.get("contiguous_state", False) and all(map(contiguous, grads)):
            return True
        if real:
            params, grads = list(map(_real, params)), list(map(_real, grads))
        aligned = _follow_layout(params, grads, per_param, keys)
        # The whole-optimizer scan only where it can succeed: a non-contiguous parameter of
        # this bucket (a channels_last model, every step) fails it, without reading the rest.
        self._flags["contiguous_state"] = (
            plain
            and all(map(contiguous, self.state))
            and all(
                contiguous(state[key])
                for state in self.state.values()
                for key in keys
                if key in state
            )
        )
        return aligned

    def _interpolation(self, group: dict[str, Any]) -> float:
        """``β`` of ``y = β·x + (1 − β)·z`` under ``average=True`` (``averaging.md``)."""
        return group["betas"][0]

    def _pick_impl(
        self,
        params: list[Tensor],
        states: list[dict[str, Any]],
        compute_dtype: torch.dtype,
        *,
        aligned: bool,
    ) -> str:
        """The kernel for one bucket: its params, their state dicts, the compute dtype, and
        whether every gradient and :meth:`_layout_keys` state has its parameter's strides."""
        # Inside a torch.compile'd step the plain loop is traced into the caller's graph.
        if self.compile_update:
            return "single" if torch.compiler.is_compiling() else "compiled"
        if self.foreach is False:
            return "single"
        return "foreach"

    def _apply_shadow(self, bucket: Bucket, shadows: list[Tensor]) -> None:
        """Self-repair (SPEC §4): pull back on large |σ|, else let the shadow follow."""
        sensor = self._sensor
        device = bucket.lr.device
        dtype = bucket.lr.dtype
        magnitude = sensor["scalar"].abs().to(device=device, dtype=dtype)
        trust = sensor["trust"].abs().to(device=device, dtype=dtype)
        moving = bucket.valid & (bucket.lr != 0)  # lr = 0 freezes a group, shadow included
        pull = torch.where(magnitude > 0.625, 1.0 - magnitude, 0.0) * moving
        follow = torch.where(pull > 0, 0.0, 0.1 * trust) * moving
        work_shadows = [_real(s).to(dtype) for s in shadows]
        toward_shadow = torch._foreach_sub(work_shadows, bucket.params)
        torch._foreach_mul_(toward_shadow, pull)
        torch._foreach_add_(bucket.params, toward_shadow)
        toward_param = torch._foreach_sub(bucket.params, work_shadows)
        torch._foreach_mul_(toward_param, follow)
        torch._foreach_add_(work_shadows, toward_param)
        for stored, work in zip(shadows, work_shadows):
            if _real(stored) is not work:
                _real(stored).copy_(work)

    def _write_back(
        self,
        param_copies: list[tuple[Tensor, Tensor]],
        state_copies: list[tuple[Tensor, Tensor]],
        device: torch.device,
        meta: dict[str, Any],
    ) -> None:
        """Copy compute-dtype results back into low-precision parameters and state."""
        generator = None
        for target, work in param_copies:
            if target.dtype in LOW_PRECISION and self.stochastic_rounding is not False:
                if generator is None:
                    generator = torch.Generator(device=device)
                    generator.manual_seed(self._rounding_seed(meta, target))
                # (state_dtype=float64: rounded to fp32 first, then stochastically)
                copy_stochastic_(target, work.to(torch.float32), generator)
            else:
                target.copy_(work)
        for target, work in state_copies:
            if target.dtype == torch.float16:  # saturate: g² of a finite g can exceed 65504
                work = work.clamp(-_FP16_MAX, _FP16_MAX)
            target.copy_(work)

    def _rounding_seed(self, meta: dict[str, Any], target: Tensor) -> int:
        """The stochastic-rounding seed of this step's next bucket: the saved seed and the
        step (so a resumed run rounds alike, and DDP replicas too), a stream per bucket (two
        param groups of equal shapes drew the same noise), and the shard for a sharded
        (FSDP2) parameter (every shard drew the same noise as the others). The shard is this
        rank's coordinate on the mesh dimensions the tensor is split over, not its rank:
        under HSDP (a replicate x shard mesh) the replicas of one shard hold equal values and
        get equal gradients, and must round alike (they drifted apart)."""
        stream = getattr(self, "_rounding_streams", 0)
        self._rounding_streams = stream + 1
        rank = 0
        mesh = getattr(target, "device_mesh", None)
        if mesh is not None:
            coordinate = mesh.get_coordinate() or [0] * mesh.ndim
            for dim, placement in enumerate(target.placements):
                if not placement.is_replicate():
                    rank = rank * mesh.size(dim) + coordinate[dim]
        mixed = meta["seed"] + int(meta["steps"]) + _STREAM_STRIDE * stream + _RANK_STRIDE * rank
        return mixed % (2**63)

    # ------------------------------------------------------------ subclass hooks
    def _init_state(self, p: Tensor, state: dict[str, Any], dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _update(self, bucket: Bucket) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------- reading results
    @property
    def should_stop(self) -> bool:
        """True once the loss has settled (SPEC §2.8); sticky until ``reset_stop()``. Syncs."""
        return bool(self._sensor["stop"])

    def reset_stop(self) -> None:
        """Clear the early-stop signal; it needs a fresh window of calm steps to rise again."""
        sensor = self._sensor
        sensor["stop"] = torch.zeros_like(sensor["stop"])
        sensor["hist_count"] = torch.zeros_like(sensor["hist_count"])

    def get_effective_lr(self) -> list[float]:
        """The effective learning rate of each param group at the last step. Syncs."""
        return [float(group["emo_lr"]) for group in self.param_groups]

    def telemetry(self) -> dict[str, float]:
        """The loss sensor's current values as floats (for logging; syncs)."""
        s = self._sensor
        return {
            "ema_short": float(s["ema_short"]),
            "ema_medium": float(s["ema_medium"]),
            "ema_long": float(s["ema_long"]),
            "scalar": float(s["scalar"]),
            "trust": float(s["trust"]),
            "noise": float(s["noise"]),
            "d": float(s["d"]),
            "H": float(s["H"]),
            "pulse": float(s["pulse"]),
            "skipped_steps": float(s["skipped"]),
            "step": float(self.emo_state[META_STATE_KEY]["steps"]),
            "sensed_steps": float(s["t"]),
            "should_stop": float(s["stop"]),
        }

    def _log(self, step: int) -> None:
        for tag, value in metric_values(self).items():
            self.writer.add_scalar(tag, value, step)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict; the loss sensor and step counter ride along in
        ``param_groups[0]["emo_state"]`` with the writing class (see :mod:`state_check`).
        State-dict hooks see the complete dict."""
        if self.pulse == "distance" and DISTANCE_STATE_KEY not in self.emo_state:
            # (not stepped with a loss yet, e.g. only torch.distributed.checkpoint's
            # state-creating step: its state dict is the template dcp.load fills, and an
            # entry missing there would be dropped from the loaded checkpoint)
            self._distance_plan()
        with _hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            state_dict = super().state_dict()
        state_dict = state_check.pack_state_dict(self, state_dict)
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim`` after checking everything; on error nothing changes.

        The state dict (after any load pre-hooks) is validated against what this optimizer
        would create itself: group count and sizes, group hyperparameters, which optimizer
        wrote it, per-parameter keys, shapes, dtype classes and finiteness, and the loss
        sensor and step counter (:func:`state_check.checked_load`); one ``ValueError`` names
        the offending entry. State keeps its saved dtype (fp32 state of half parameters
        stays fp32, where ``Optimizer.load_state_dict`` would cast it) on its parameter's
        device. Older state dicts of this project (sensor in ``state``) load too.
        """
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        plan = self._checked_load(state_dict)
        with _hooks_held(
            self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        ) as post_hooks:
            super().load_state_dict(plan.torch_state_dict)
        for p, state in plan.per_param:
            self.state[p] = state
        self.emo_state.clear()  # in place: wrappers (LightningOptimizer) share the dict
        self.emo_state.update({SENSOR_STATE_KEY: plan.sensor, META_STATE_KEY: plan.meta})
        self.emo_state.update(plan.controller)
        if self.average:  # (saved before the first step by an older version: fresh)
            sensor = self._sensor["ema_long"]
            fresh = init_average_state(sensor.device, sensor.dtype)
            averaging = self.emo_state.setdefault(AVERAGE_STATE_KEY, fresh)
            # A state saved before the averaging step count existed (weights spent, count 0)
            # counts the optimizer's steps, so the bias correction does not restart.
            older = (averaging["steps"] == 0) & (averaging["weight_sum"] > 0)
            taken = plan.meta["steps"].to(averaging["steps"])
            averaging["steps"] = torch.where(older, taken, averaging["steps"])
            self._flags["eval_mode"] = bool(averaging["eval_mode"])
            self._flags["z_states"] = any("z" in state for _, state in plan.per_param)
        # the sample plan (and its cached views) is rebuilt at the next step
        self._plan.update(plan=None, layout=None, views=None)
        self._flags["warned_no_loss"] = False
        self._flags["contiguous_state"] = False  # loaded state may have another layout
        self._flags["calls"] = int(plan.meta["steps"])  # (a CPU tensor: no device sync)
        self._refresh_effective_lr()
        for hook in post_hooks.values():
            hook(self)

    def _checked_load(self, state_dict: dict[str, Any]) -> state_check.LoadPlan:
        """:func:`state_check.checked_load`, agreed across ranks for sharded (FSDP2)
        parameters: each rank checks only its own shards, so a nan in one rank's shard was
        refused there and loaded on the others, which then held another optimizer state
        (sensor, step, moments) than that rank's shards. Now every rank refuses it."""
        sharded = (
            self.sync_loss
            and world_size(self.process_group) > 1
            and any(local_shard(p) is not p for group in self.param_groups for p in group["params"])
        )
        if not sharded:
            return state_check.checked_load(self, state_dict)
        like = self._sensor["ema_long"]
        try:
            plan = state_check.checked_load(self, state_dict)
        except ValueError:
            refusals_elsewhere(True, like, self.process_group)
            raise
        others = refusals_elsewhere(False, like, self.process_group)
        if others:
            raise ValueError(
                f"Invalid state_dict: refused on {others} other rank(s), whose shards of it "
                "are invalid (their error names the entry); nothing was loaded on any rank"
            )
        return plan


@contextlib.contextmanager
def _hooks_held(opt: Optimizer, *names: str) -> Iterator[dict[Any, Callable[..., Any]]]:
    """Empty torch's hook registries ``names`` for the block and yield the last one's hooks:
    the Emo optimizer runs them itself, once its own part is done."""
    held = {name: getattr(opt, name) for name in names}
    for name in names:
        setattr(opt, name, OrderedDict())
    try:
        yield held[names[-1]]
    finally:
        for name, hooks in held.items():
            setattr(opt, name, hooks)


_STREAM_STRIDE = 0x9E3779B97F4A7C15  # (odd, far apart: seeds of nearby steps stay distinct)
_RANK_STRIDE = 0xC2B2AE3D27D4EB4F


def _compute_dtype(dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the update of a (real) parameter of ``dtype`` is computed in: the state
    dtype, at least fp32 (state may be stored low, the math is fp32), and never narrower than
    the parameter itself: fp64 parameters with a narrower ``state_dtype`` keep fp64 math, or
    every step (a skipped one and an ``lr = 0`` group included) would round them to fp32."""
    compute = default_state_dtype(dtype, state_dtype)
    if compute in LOW_PRECISION:
        compute = torch.float32
    return torch.promote_types(compute, dtype)


def _overflow_norm(dtype: torch.dtype) -> float:
    """The smallest 2-norm whose square overflows ``dtype``: sqrt(finfo(dtype).max)."""
    return math.sqrt(torch.finfo(dtype).max)


_FP16_MAX = torch.finfo(torch.float16).max


@dataclass
class _Prepared:
    """One bucket of a step, checked and ready (:meth:`EmoOptimizer._prepare`)."""

    params: list[Tensor]
    states: list[dict[str, Any]]
    dtype: torch.dtype  # the compute dtype
    impl: str


def _snapshot(group: dict[str, Any], defaults: dict[str, Any]) -> tuple:
    """A group's hyperparameters as a comparable tuple (a tensor by identity, a list as a
    tuple: ``group["betas"][1] = ...`` on a list is seen)."""

    def frozen(value: Any) -> Any:
        if isinstance(value, Tensor):
            return ("tensor", id(value))
        if isinstance(value, list | tuple):
            return tuple(map(frozen, value))
        return value

    return tuple(frozen(group.get(key)) for key in defaults)


def _shape_error(
    optimizer: EmoOptimizer, key: str, got: torch.Size, shape: torch.Size, index: int
) -> RuntimeError:
    return RuntimeError(
        f"{type(optimizer).__name__}: state[{key!r}] of shape {tuple(got)} does not match its "
        f"parameter of shape {tuple(shape)} (tensor {index} of its bucket); optimizer state "
        "must keep its parameter's shape (a parameter replaced by one of another shape needs "
        "a new optimizer, or its state removed: del optimizer.state[p])"
    )


def _real(t: Tensor) -> Tensor:
    """Complex tensors are updated as pairs of reals."""
    return torch.view_as_real(t) if t.is_complex() else t


def _by_kind(
    tensors: list[Tensor], shards: bool = False
) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """``tensors`` grouped by ``(device, dtype)``, in order; with ``shards``, each DTensor's
    local shard in its place (FSDP2: what this rank holds). The common case, one kind of
    plain tensor, takes a few list passes instead of a dict lookup per tensor: on a layout of
    hundreds of small tensors the step's per-tensor Python is a large part of its cost."""
    if tensors:
        first = tensors[0]
        dtype, device, n = first.dtype, first.device, len(tensors)
        if (
            (not shards or [type(t) for t in tensors].count(Tensor) == n)
            and [t.dtype for t in tensors].count(dtype) == n
            and [t.device for t in tensors].count(device) == n
        ):
            return {(device, dtype): tensors}
    grouped: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in map(local_shard, tensors) if shards else tensors:
        grouped.setdefault((t.device, t.dtype), []).append(t)
    return grouped


def _follow_layout(
    params: list[Tensor],
    grads: list[Tensor],
    per_param: list[dict[str, Any]],
    keys: tuple[str, ...],
) -> bool:
    """Whether every gradient and state of ``keys`` has its parameter's strides; first, state
    of ``keys`` of a dense parameter takes the parameter's strides (as it was created).

    State loaded from a checkpoint of another layout, or kept while its parameter changed
    layout (``module.to(memory_format=torch.channels_last)``), is copied into it once: the
    fused and blocked kernels pair elements by memory position and would mix them up (or
    fail to view the state)."""
    layout = [p.stride() for p in params]
    aligned = [g.stride() for g in grads] == layout
    for key in keys:
        if [state[key].stride() for state in per_param] == layout:
            continue  # (list comparisons: this runs every step on every tensor)
        for p, state in zip(params, per_param):
            value = state[key]
            if value.stride() != p.stride() and value.shape == p.shape and _dense(p):
                state[key] = value = torch.empty_like(p, dtype=value.dtype).copy_(value)
            aligned = aligned and value.stride() == p.stride()
    return aligned


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers its memory without gaps or overlaps (in any dimension order):
    then ``empty_like(t)`` has ``t``'s strides. (A parameter with gaps keeps compact state,
    as it was created, and takes the multi-tensor kernels.)"""
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _as_compute(
    t: Tensor | None, dtype: torch.dtype, copies: list[tuple[Tensor, Tensor]] | None
) -> Tensor | None:
    """``t`` as a real tensor of ``dtype``; a converted copy is recorded for write-back."""
    if t is None:
        return None
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == dtype:
        return t
    work = t.to(dtype)
    if copies is not None:
        copies.append((t, work))
    return work


def _step_count(value: int | Tensor) -> Tensor:
    """The optimizer's step count as a CPU int64 tensor, not an int.

    torch.compile specialises on ints kept in dicts and would recompile every step; a CPU
    tensor is advanced in place inside the graph, and reading it is no device sync.
    """
    return torch.tensor(int(value), dtype=torch.int64)
