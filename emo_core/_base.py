"""``EmoOptimizer``: what the three Emo optimizers share.

One optimizer step, in order (SPEC §1-5):

1. call the closure once under ``enable_grad`` (if given);
2. pick the loss: ``step(loss=)`` > pending ``set_loss``/``add_loss`` > closure value;
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

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._validation import as_bool, as_float_dtype, as_int, check_range, loss_to_tensor
from .distance import D0, distance_update, gather_sample, init_distance_state, plan_sample
from .distributed import all_reduce_loss_, local_shard, world_size
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
_SMALL_GRADS = 1 << 16  # mean elements per gradient below which the AMP check kernel is used
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
PULSES = ("distance", "v37")
"""``pulse=`` values: the distance-to-init controller (``distance.md``) or upstream's v3.7
pulse (SPEC §2)."""
DEFAULT_PULSE = "v37"
_DEFAULT_LR_RANGE = {"distance": (1e-8, 1.0), "v37": (1e-6, 1e-3)}

_NO_LOSS_WARNING = (
    "{name}.step() received no loss, so emoPulse cannot adapt and the previous learning rate "
    "is reused. Feed the training loss each step in one of three ways: opt.step(loss=loss), "
    "opt.set_loss(loss) / opt.add_loss(loss) before step(), or a closure that returns the "
    "loss. With Lightning add emo_lightning.EmoCallback; with transformers use emo_hf."
)


@dataclass
class Bucket:
    """Tensors of one param group that share a device and dtype, ready for an update rule.

    ``params``, ``grads`` and the ``states`` lists are in the compute dtype (fp32 for half
    parameters); ``lr`` is the effective LR and ``valid`` the step's finite flag, both 0-dim
    on the bucket's device. An update rule must leave every tensor bitwise unchanged when
    ``valid`` is False.
    """

    params: list[Tensor]
    grads: list[Tensor]
    states: dict[str, list[Tensor | None]]
    lr: Tensor
    valid: Tensor
    group: dict[str, Any]
    impl: str

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
)
"""Constructor arguments every Emo optimizer takes and hands to :class:`EmoOptimizer`."""


def common_options(arguments: dict[str, Any]) -> dict[str, Any]:
    """The :data:`COMMON_OPTIONS` out of a constructor's ``locals()``."""
    return {name: arguments[name] for name in COMMON_OPTIONS}


class EmoOptimizer(Optimizer):
    """Base class of EmoSens, EmoAiry and EmoCats; see the module docstring for one step.

    ``direction_power``: how far the subclass's update direction is from an Adam direction
    in size under gradient noise (0: Adam-type; 1: sign); the distance controller scales its
    LR by ``ρ^direction_power`` (``distance.md``).

    Subclasses add their hyperparameter checks (``_check_group``), lazy per-parameter state
    (``_init_state``), the kernel choice (``_pick_impl``) and the update rule (``_update``).
    """

    direction_power = 0.0

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        lr: float,
        weight_decay: float,
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
    ) -> None:
        lr = check_range("lr", lr, 0.0, low_inclusive=False)
        if isinstance(pulse, str):  # class-path users may pass a quoted literal
            pulse = pulse.strip().strip("'\"")
        if pulse not in PULSES:
            raise ValueError(f"Invalid pulse: {pulse!r} (expected one of {', '.join(PULSES)})")
        self.pulse = pulse
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
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "use_shadow": as_bool("use_shadow", use_shadow),
            **defaults,
        }
        # Mutable containers, changed in place: framework wrappers such as Lightning's
        # LightningOptimizer copy this object's __dict__, so rebinding an attribute on the
        # wrapper would be invisible to the optimizer.
        self._pending: dict[str, Any] = {"sum": None, "count": 0}
        self._flags: dict[str, bool] = {"warned_no_loss": False}
        self._plan: dict[str, Any] = {"plan": None, "layout": None}
        super().__init__(params, defaults)
        device = self._sensor_device()
        self.state[SENSOR_STATE_KEY] = init_sensor_state(device, self._first_lr())
        self.state[META_STATE_KEY] = {
            "steps": _step_count(0),
            # Stochastic rounding draws from (seed + step): one fixed seed, so every rank
            # of a data-parallel run rounds identically and replicas stay equal.
            "seed": DEFAULT_ROUNDING_SEED,
        }
        self._refresh_effective_lr()

    # ----------------------------------------------------------------- construction
    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate (and normalise in place) one param group's hyperparameters."""
        group["lr"] = (
            group["lr"] if isinstance(group["lr"], Tensor) else check_range("lr", group["lr"], 0.0)
        )
        group["weight_decay"] = check_range("weight_decay", group["weight_decay"], 0.0)
        group["use_shadow"] = as_bool("use_shadow", group["use_shadow"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyperparameters; nothing changes on error."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid param_group: expected a dict, got {type(param_group)}")
        candidate = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(candidate)
        param_group = {**param_group, **candidate}
        super().add_param_group(param_group)

    def _sensor_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_pending", {"sum": None, "count": 0})
        self.__dict__.setdefault("_flags", {"warned_no_loss": False})
        self.__dict__.setdefault("compile_update", False)
        self.__dict__.setdefault("pulse", "v37")
        self.__dict__.setdefault("_plan", {"plan": None, "layout": None})
        for group in self.param_groups:
            group.setdefault("use_shadow", False)

    # ------------------------------------------------------------------ loss intake
    @property
    def _sensor(self) -> dict[str, Tensor]:
        return self.state[SENSOR_STATE_KEY]

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
        self, explicit: Any, closure_value: Any, has_closure: bool, has_grads: bool
    ) -> Tensor | None:
        if explicit is not None:
            return self._as_loss(explicit, "step(loss=...)")
        if self._pending["sum"] is not None:
            return self._pending["sum"] / self._pending["count"]
        if has_closure:
            if closure_value is None and has_grads:
                raise TypeError(
                    "Invalid loss from closure: the closure returned None but there are "
                    "gradients to apply; return the loss from the closure, or feed it with "
                    "step(loss=loss) / set_loss(loss) (e.g. in Lightning manual optimization)"
                )
            # None with no gradients: a skipped batch (Lightning's training_step -> None).
            return None if closure_value is None else self._as_loss(closure_value, "closure()")
        return None

    # ------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One optimizer step; returns the closure's value like ``torch.optim``.

        Args:
            closure: re-evaluates the model and returns the loss; called once under grad.
            loss: this step's training loss (number or one-element tensor); takes priority
                over a pending ``set_loss``/``add_loss`` value and the closure's value.
        """
        closure_value = None
        if closure is not None:
            with torch.enable_grad():
                closure_value = closure()
        work = self._collect()  # raises before anything changes
        has_grads = any(work)
        loss_t = self._pick_loss(loss, closure_value, closure is not None, has_grads)
        self._pending.update(sum=None, count=0)
        if loss_t is None and not has_grads and closure is not None:
            return closure_value  # nothing to sense and nothing to update

        sensor = self._sensor
        valid = self._grads_finite(work, sensor["ema_long"].device)
        if loss_t is None:
            self._warn_no_loss()
            if valid is not None:
                sensor["skipped"] = sensor["skipped"] + (~valid).to(sensor["skipped"].dtype)
        else:
            if valid is not None:  # fold the gradient flag into the loss: nan if not finite
                loss_t = torch.where(valid, loss_t, float("nan"))
            sample = self._distance_sample() if self.pulse == "distance" else None
            if self.sync_loss:
                loss_t, sample = _all_reduce(loss_t, sample, self.process_group)
            valid = torch.isfinite(loss_t)
            sensor = self.state[SENSOR_STATE_KEY] = pulse_update(
                sensor, loss_t, valid, scope=1.0, min_lr=self.min_lr, max_lr=self.max_lr
            )
            if sample is not None:
                self._advance_distance(sample, valid)
        self._refresh_effective_lr()
        if valid is None:
            valid = torch.ones((), dtype=torch.bool, device=sensor["ema_long"].device)

        meta = self.state[META_STATE_KEY]
        meta["steps"] += 1
        for group, params in zip(self.param_groups, work):
            if params:
                self._step_group(group, params, valid, meta)
        if self.writer is not None:
            steps = int(meta["steps"])
            if steps % self.log_every == 0:
                self._log(steps)
        return closure_value

    def _collect(self) -> list[list[tuple[int, Tensor]]]:
        """Per group, the (index, param) pairs that have a gradient; rejects sparse grads."""
        work = []
        for gi, group in enumerate(self.param_groups):
            params = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
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

    @staticmethod
    def _grads_finite(work: list[list[tuple[int, Tensor]]], device: torch.device) -> Tensor | None:
        """One 0-dim bool tensor: are all gradients finite? ``None`` if there are none.

        Uses 2-norms (torch's fastest reduction over large tensors; the inf-norm is an order
        of magnitude slower on CPU): nan and inf propagate, and a gradient whose norm
        overflows fp32 (> 3.4e38) counts as non-finite too. Many small CPU gradients (LoRA)
        go through the AMP kernel that checks and unscales in one loop, with scale 1: about
        half the per-tensor cost of a norm, and ``g * 1.0`` leaves every value bitwise as it
        was (``tests/core/test_contract.py``).
        """
        by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for params in work:
            for _, p in params:
                # FSDP2: check this rank's shard; the flag is folded into the loss, whose
                # cross-rank mean (sync_loss) makes every rank skip together. Complex
                # gradients: the 2-norm of a complex tensor propagates nan/inf as well.
                g = local_shard(p.grad)
                key = (g.device, g.dtype)
                grads = by_device.get(key)
                if grads is None:
                    by_device[key] = [g]
                else:
                    grads.append(g)
        if not by_device:
            return None
        finite = []
        for (grad_device, dtype), grads in by_device.items():
            if _amp_check_pays(grad_device, dtype, grads):
                found_inf = torch.zeros((), dtype=torch.float32, device=grad_device)
                one = torch.ones((), dtype=torch.float32, device=grad_device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)
                finite.append(found_inf == 0)
            else:
                peak = torch.stack(torch._foreach_norm(grads, 2)).amax()
                finite.append(torch.isfinite(peak))
        return torch.stack([flag.to(device) for flag in finite]).all()

    def _warn_no_loss(self) -> None:
        if not self._flags["warned_no_loss"]:
            self._flags["warned_no_loss"] = True
            warnings.warn(_NO_LOSS_WARNING.format(name=type(self).__name__), stacklevel=3)

    def _refresh_effective_lr(self) -> None:
        """``group["emo_lr"] = pulse * group["lr"]``: ``lr`` is a plain multiplier."""
        pulse = self._sensor["pulse"]
        for group in self.param_groups:
            group["emo_lr"] = (pulse * group["lr"]).to(torch.float32)

    def _first_lr(self) -> float:
        """The LR before the first loss: ``max_lr`` (v3.7) or the controller's start."""
        return self.max_lr if self.pulse == "v37" else max(self.min_lr, min(D0, self.max_lr))

    # ----------------------------------------------------- distance controller
    def _distance_plan(self) -> Any:
        """The sample plan for the current layout (built on first use, rebuilt if groups
        are added); the controller's sample restarts when the layout changes."""
        layout = tuple(len(group["params"]) for group in self.param_groups)
        cache = self._plan
        if cache["layout"] != layout:
            sensor = self._sensor["ema_long"]
            world = world_size(self.process_group) if self.sync_loss else 1
            cache["plan"] = plan_sample(self.param_groups, sensor.device, world)
            cache["layout"] = layout
            state = self.state.get(DISTANCE_STATE_KEY)
            if state is None or state["x0"].numel() != cache["plan"].size:
                fresh = init_distance_state(
                    cache["plan"].size, sensor.device, sensor.dtype, self.direction_power > 0
                )
                if state is not None:  # keep the scale found so far, restart the sample
                    fresh["d"] = state["d"]
                self.state[DISTANCE_STATE_KEY] = fresh
        return cache["plan"]

    def _distance_sample(self) -> tuple[Tensor, Tensor]:
        sensor = self._sensor["ema_long"]
        return gather_sample(self._distance_plan(), self.param_groups, sensor.device)

    def _advance_distance(self, sample: tuple[Tensor, Tensor], valid: Tensor) -> None:
        sensor = self._sensor
        state, lr = distance_update(
            self.state[DISTANCE_STATE_KEY],
            *sample,
            self._plan["plan"].weights,
            sensor,
            valid,
            min_lr=self.min_lr,
            max_lr=self.max_lr,
            direction_power=self.direction_power,
        )
        self.state[DISTANCE_STATE_KEY] = state
        sensor["pulse"] = torch.where(valid, lr, sensor["pulse"])

    # ------------------------------------------------------------------- per group
    def _step_group(
        self,
        group: dict[str, Any],
        params: list[tuple[int, Tensor]],
        valid: Tensor,
        meta: dict[str, Any],
    ) -> None:
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for _, p in params:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), originals in buckets.items():
            # Complex parameters are updated as pairs of reals (a dict, as torch.compile cannot
            # trace dtype.to_real()).
            dtype = _REAL_DTYPE.get(dtype, dtype)
            compute_dtype = default_state_dtype(dtype, self.state_dtype)
            if compute_dtype in LOW_PRECISION:
                compute_dtype = torch.float32  # state may be stored low, math is fp32
            per_param = [self.state[p] for p in originals]  # hashing a tensor is Python code
            for p, state in zip(originals, per_param):
                if not state:
                    self._init_full_state(p, group, dtype)
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
                work_params, work_grads = originals, [p.grad for p in originals]
            else:
                work_params = [_as_compute(p, compute_dtype, param_copies) for p in originals]
                work_grads = [_as_compute(p.grad, compute_dtype, None) for p in originals]
            bucket = Bucket(
                params=work_params,
                grads=work_grads,
                states=states,
                lr=group["emo_lr"].to(device=device, dtype=compute_dtype),
                valid=valid.to(device),
                group=group,
                impl=self._pick_impl(originals, per_param, compute_dtype),
            )
            if group["use_shadow"]:
                self._apply_shadow(bucket, [state["shadow"] for state in per_param])
            if bucket.impl == "compiled":
                for part in bucket.chunks(COMPILE_CHUNK):
                    self._update(part)
            else:
                self._update(bucket)
            self._write_back(param_copies, state_copies, device, meta)

    def _init_full_state(self, p: Tensor, group: dict[str, Any], dtype: torch.dtype) -> None:
        state_dtype = default_state_dtype(dtype, self.state_dtype)
        real = _real(p)
        self._init_state(real, self.state[p], state_dtype)
        if group["use_shadow"]:
            self.state[p]["shadow"] = real.detach().to(state_dtype, copy=True)

    def _pick_impl(
        self, params: list[Tensor], states: list[dict[str, Any]], compute_dtype: torch.dtype
    ) -> str:
        """The kernel for one bucket: its params, their state dicts and the compute dtype."""
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
        pull = torch.where(magnitude > 0.625, 1.0 - magnitude, 0.0) * bucket.valid
        follow = torch.where(pull > 0, 0.0, 0.1 * trust) * bucket.valid
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
            if target.dtype == torch.bfloat16 and self.stochastic_rounding is not False:
                if generator is None:
                    generator = torch.Generator(device=device)
                    generator.manual_seed((meta["seed"] + int(meta["steps"])) % (2**63))
                copy_stochastic_(target, work, generator)
            else:
                target.copy_(work)
        for target, work in state_copies:
            target.copy_(work)

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
            "step": float(self.state[META_STATE_KEY]["steps"]),
            "sensed_steps": float(s["t"]),
            "should_stop": float(s["stop"]),
        }

    def _log(self, step: int) -> None:
        from .adapters import log_metrics  # adapters imports this module

        for tag, value in log_metrics(self).items():
            self.writer.add_scalar(tag, value, step)

    # ------------------------------------------------------------------ resume
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim``, but keep fp32 state fp32 for half parameters.

        ``Optimizer.load_state_dict`` casts floating state to the parameter's dtype; Emo
        state is kept in its own dtype (SPEC §5), so the incoming tensors are restored as
        saved, on the parameter's device.
        """
        incoming = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in incoming.get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)
        device = self._sensor_device()
        sensor = incoming.get(SENSOR_STATE_KEY)
        fresh = init_sensor_state(device, self._first_lr())
        self.state[SENSOR_STATE_KEY] = _restore(sensor, fresh)
        distance = incoming.get(DISTANCE_STATE_KEY)
        self.state.pop(DISTANCE_STATE_KEY, None)
        self._plan.update(plan=None, layout=None)
        if distance is not None:
            size = distance["x0"].numel()
            self.state[DISTANCE_STATE_KEY] = _restore(
                distance,
                init_distance_state(
                    size, device, fresh["ema_long"].dtype, self.direction_power > 0
                ),
            )
        meta = dict(incoming.get(META_STATE_KEY) or {"seed": 0})
        meta["steps"] = _step_count(meta.get("steps", 0))  # also reads int counts
        self.state[META_STATE_KEY] = meta
        self._refresh_effective_lr()


def _restore(saved: dict[str, Any] | None, fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """Saved 0-dim/sample state onto ``fresh``'s device and dtypes; missing keys fresh."""
    if saved is None:
        return fresh
    return {
        key: saved[key]
        .detach()
        .to(
            device=fresh[key].device,
            dtype=fresh[key].dtype if fresh[key].is_floating_point() else None,
            copy=True,
        )
        if key in saved
        else fresh[key]
        for key in fresh
    }


def _all_reduce(
    loss: Tensor, sample: tuple[Tensor, Tensor] | None, process_group: object | None
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The loss's cross-rank mean and the sample's cross-rank sum, in one collective."""
    if sample is None or world_size(process_group) == 1:
        return all_reduce_loss_(loss, process_group), sample
    x, g = sample
    size = world_size(process_group)
    stacked = torch.cat([loss.reshape(1), x.to(loss.dtype), g.to(loss.dtype)])
    all_reduce_loss_(stacked, process_group)  # the mean; the sample was scaled to sum
    n = x.numel()
    x, g = stacked[1 : 1 + n] * size, stacked[1 + n :] * size
    return stacked[0], (x.to(sample[0].dtype), g.to(sample[1].dtype))


def _amp_check_pays(device: torch.device, dtype: torch.dtype, grads: list[Tensor]) -> bool:
    """Whether the AMP check kernel beats 2-norms: eager, on CPU, for small writable tensors
    of a dtype it supports (it writes ``g * 1.0`` back, so no expanded or subclass tensors)."""
    return (
        device.type == "cpu"
        and dtype in _SAME_SIZE_INT  # the floating dtypes
        and sum(g.numel() for g in grads) < _SMALL_GRADS * len(grads)
        and not torch.compiler.is_compiling()
        and all(type(g) is Tensor and g.is_contiguous() for g in grads)
    )


def _real(t: Tensor) -> Tensor:
    """Complex tensors are updated as pairs of reals."""
    return torch.view_as_real(t) if t.is_complex() else t


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
