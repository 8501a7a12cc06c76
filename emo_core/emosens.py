"""EmoSens: Adam-type update at the emoPulse learning rate (SPEC §4).

``m ← β1·m + (1−β1)·g``; ``v ← β2·v + (1−β2)·g²``; ``p ← p·(1 − wd·lr) − lr·m/(√v + eps)``,
no bias correction. This is AdamW without bias correction at a tensor LR, so the default
path on fp32 parameters is torch's fused AdamW kernel with a step count large enough that
``1 − β^step`` is exactly 1, and the skipped-step flag passed as ``found_inf``.

With ``average=True`` (Schedule-Free averaging, ``averaging.md``) the state holds the
average ``x`` in place of ``m`` and the parameters the training point ``y``. Between folds a
step is ``y ← y − (1 − β1)·lr·u`` with ``u = g/(√v̂ + eps) + wd·y`` and Adam's
``v̂ = v/(1 − β2^k)`` (so the stepped ``z`` moves by ``lr·u``); the base class folds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    DEFAULT_PULSE,
    Bucket,
    EmoOptimizer,
    common_options,
    compiled,
    resolve_average,
)
from ._validation import as_bool, check_betas, check_range
from .averaging import inverse_bias_correction

__all__ = ["EmoSens", "averaged_emosens", "emosens"]

# beta ** _NO_BIAS_CORRECTION_STEP underflows to 0 for every beta < 1 - 1e-30, so the fused
# kernel's bias corrections (1 - beta ** step) are exactly 1.
_NO_BIAS_CORRECTION_STEP = 1e38
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


class EmoSens(EmoOptimizer):
    """Adam-type Emo optimizer: accurate, 8 bytes of state per parameter.

    Leave ``lr=1.0``: the learning rate is automatic (emoPulse, between ``min_lr`` and
    ``max_lr``), chosen by ``pulse``. By default the parameters are averaged (``average``):
    call ``opt.eval()`` before evaluating or saving the model and ``opt.train()`` before
    training again. ``lr`` is a plain multiplier applied after it (and
    after the clamp), like per-group ``lr`` values and LR schedulers. Feed the loss every step:
    ``opt.step(loss=loss)``, ``opt.set_loss``/``add_loss``, or a closure that returns it.

    Args:
        params: parameters or param groups.
        lr: multiplier on the automatic LR; 1.0 is the tested default (default: 1.0).
        betas: first and second moment decay (default: (0.9, 0.995)).
        eps: added to √v (default: 1e-8).
        weight_decay: decoupled weight decay, scaled by the effective LR; None = 0 with
            averaging (Schedule-Free's choice), 0.01 without (default: None).
        use_shadow: keep a shadow copy that pulls parameters back on loss spikes (+4 B/param)
            (default: False).
        pulse: ``"distance"``, the step size from a distance-to-init estimate with the loss
            sensor's brake (``emo_core/distance.md``), or ``"v37"``, upstream's v3.7
            emoPulse from the loss alone (SPEC §2) (default: ``"distance"``).
        min_lr: lower clamp of the pulse; None = 1e-6 (v37) or 1e-8 (distance)
            (default: None).
        max_lr: upper clamp of the pulse; None = 1e-3 (v37) or 1.0 (distance)
            (default: None).
        sync_loss: average the loss over ``process_group`` so every rank uses the same LR
            (default: True).
        process_group: group for ``sync_loss`` (default: None = WORLD).
        state_dtype: dtype of the moments; None = fp32 for bf16/fp16 params (default: None).
        stochastic_rounding: round bf16 and fp16 parameter writes stochastically; None = on
            (default: None).
        foreach: None = fastest available (fused AdamW kernel on fp32 params, else
            multi-tensor), True = multi-tensor, False = per-tensor loop (default: None).
        fused: None = auto, True = require the fused kernel, False = never (default: None).
        compile_update: run the update through ``torch.compile`` (one fused loop per
            tensor, in chunks of 32 tensors); costs a one-off compile of seconds and needs a
            C++ compiler on CPU (default: False).
        writer: object with ``add_scalar(tag, value, step)`` for TensorBoard logging
            (default: None).
        log_every: log to ``writer`` every this many steps (default: 1).
        maximize: maximize the objective instead of minimizing it, like ``torch.optim``:
            the update ascends the gradient and the loss sensor reads the fed value ``L``
            as the loss ``-L`` (a rising objective is progress) (default: False).
        capture_loss: sense the loss of every scalar ``backward()`` while this optimizer
            lives, for scripts that never pass it; patches ``torch.autograd.backward`` until
            ``close()`` (see ``emo_core.capture``) (default: False).
        average: Schedule-Free iterate averaging on top of ``pulse="distance"`` (required):
            the parameters train at an interpolation and hold the average after
            ``opt.eval()``; call ``opt.train()`` before training steps again. ``betas[0]``
            becomes the interpolation weight (no first moment; the memory stays 8 B/param)
            and settling is off (``emo_core/averaging.md``). None = on with
            ``pulse="distance"`` unless ``use_shadow=True`` or a parameter is bf16/fp16
            (``averaging.md``, "Default and low precision") (default: None).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.995),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        *,
        pulse: str = DEFAULT_PULSE,
        use_shadow: bool = False,
        min_lr: float | None = None,
        max_lr: float | None = None,
        sync_loss: bool = True,
        process_group: object | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        compile_update: bool = False,
        writer: Any | None = None,
        log_every: int = 1,
        maximize: bool = False,
        capture_loss: bool = False,
        average: bool | None = None,
    ) -> None:
        params, average = resolve_average(params, average, pulse, use_shadow)
        # Parsed before the cross-checks: class-path users pass strings ("False" is truthy).
        self.fused = as_bool("fused", fused, allow_none=True)
        foreach = as_bool("foreach", foreach, allow_none=True)
        compile_update = as_bool("compile_update", compile_update)
        if self.fused and foreach:
            raise ValueError("Invalid foreach/fused: choose one of foreach=True and fused=True")
        if self.fused and compile_update:
            raise ValueError(
                "Invalid fused/compile_update: choose one of fused=True and compile_update=True"
            )
        super().__init__(
            params,
            {"betas": betas, "eps": eps},
            **common_options(locals()),
            average=average,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        group["betas"] = check_betas("betas", group["betas"])
        group["eps"] = check_range("eps", group["eps"], 0.0, low_inclusive=False)
        if self.average and group["betas"][0] == 0:
            raise ValueError(
                "Invalid betas[0]=0 with average=True: betas[0] is the interpolation weight "
                "between the stepped and the averaged point there (expected 0 < betas[0] < 1, "
                "e.g. 0.9)"
            )

    def _init_state(self, p: Tensor, state: dict[str, Any], dtype: torch.dtype) -> None:
        if self.average:  # the average starts at the parameter
            state["x"] = p.detach().to(dtype, memory_format=torch.preserve_format, copy=True)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _layout_keys(self) -> tuple[str, ...]:
        return ("x" if self.average else "exp_avg", "exp_avg_sq")

    def _pick_impl(
        self,
        params: list[Tensor],
        states: list[dict[str, Any]],
        compute_dtype: torch.dtype,
        *,
        aligned: bool,
    ) -> str:
        # A bucket shares one device and dtype; only the state's dtype can vary per tensor
        # (e.g. loaded from a checkpoint saved with another state_dtype).
        keys = self._layout_keys()
        fusable = (
            params[0].dtype == compute_dtype == torch.float32
            and params[0].device.type in _FUSED_DEVICES
            and all(
                [state[key].dtype for state in states].count(torch.float32) == len(states)
                for key in keys
            )
            # The averaged kernel writes g into g (its first-moment buffer): not into a
            # gradient that is itself differentiable (backward with create_graph=True).
            and not (self.average and any(p.grad.requires_grad for p in params))
        )
        # The kernel pairs elements by memory position: each gradient and state (kept in its
        # parameter's layout by the step) must share the parameter's strides; a gradient
        # assigned in another layout, or a parameter with gaps, goes multi-tensor.
        fusable = fusable and aligned
        if self.fused:  # (the constructor rejects fused=True with compile_update=True)
            if not fusable:
                raise RuntimeError(
                    "EmoSens(fused=True) needs real fp32 parameters and state on a device with "
                    "torch's fused AdamW kernel, and gradients in their parameter's memory "
                    "layout (strides); use fused=None to fall back automatically"
                )
            return "fused"
        # Under torch.compile the multi-tensor path is traced (and fused by the compiler):
        # _fused_adamw_ with a tensor lr has no fake-tensor kernel to trace.
        if self.fused is None and self.foreach is None and not self.compile_update and fusable:
            return "foreach" if torch.compiler.is_compiling() else "fused"
        return super()._pick_impl(params, states, compute_dtype, aligned=aligned)

    def _update(self, bucket: Bucket) -> None:
        beta1, beta2 = bucket.group["betas"]
        rule = emosens if bucket.mix is None else averaged_emosens  # (average=True)
        rule(
            bucket,
            beta1=beta1,
            beta2=beta2,
            eps=bucket.group["eps"],
            weight_decay=bucket.group["weight_decay"],
        )


def emosens(bucket: Bucket, *, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Functional EmoSens update of one bucket, dispatching to the chosen kernel."""
    kernel = {
        "fused": _fused_emosens,
        "foreach": _foreach_emosens,
        "single": _single_tensor_emosens,
    }.get(bucket.impl) or compiled(_single_tensor_emosens)
    kernel(bucket, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


def _single_tensor_emosens(
    bucket: Bucket, *, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    lr = bucket.step_lr()
    keep1, keep2 = bucket.decay(beta1), bucket.decay(beta2)
    shrink = 1.0 - lr * weight_decay
    for p, g, m, v in zip(
        bucket.params, bucket.masked_grads(), bucket.states["exp_avg"], bucket.states["exp_avg_sq"]
    ):
        m.mul_(keep1).add_(g, alpha=1.0 - beta1)
        v.mul_(keep2).addcmul_(g, g, value=1.0 - beta2)
        p.mul_(shrink)
        p.sub_(m / (v.sqrt() + eps) * lr)


def _foreach_emosens(
    bucket: Bucket, *, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    lr = bucket.step_lr()
    grads = bucket.masked_grads()
    exp_avgs, exp_avg_sqs = bucket.states["exp_avg"], bucket.states["exp_avg_sq"]
    torch._foreach_lerp_(exp_avgs, grads, bucket.blend(1.0 - beta1))
    torch._foreach_mul_(exp_avg_sqs, bucket.decay(beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    torch._foreach_mul_(bucket.params, 1.0 - lr * weight_decay)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    step = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(step, lr)
    torch._foreach_sub_(bucket.params, step)


def averaged_emosens(
    bucket: Bucket, *, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    """Functional averaged (Schedule-Free) EmoSens step of one bucket between folds:
    ``y ← y − lr·(1 − β)·u`` with ``u = g/(√v̂ + eps) + wd·y`` (``averaging.md``); ``beta1``
    is the interpolation weight ``β`` there. The base class folds (``bucket.fold``)."""
    options = {"beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay}
    if bucket.impl == "foreach" and bucket.is_plain_cpu():
        # Large contiguous fp32 CPU tensors in cache-sized blocks, the rest multi-tensor.
        blocked, rest = bucket.split_large()
        if blocked is not None:
            _blocked_averaged(blocked, **options)
            if rest is not None:
                _foreach_averaged(rest, **options)
            return
    kernel = {
        "fused": _fused_averaged,
        "foreach": _foreach_averaged,
        "single": _single_tensor_averaged,
    }.get(bucket.impl) or compiled(_single_tensor_averaged)
    kernel(bucket, **options)


def _single_tensor_averaged(
    bucket: Bucket, *, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    lr = bucket.step_lr() * (1.0 - beta1)
    keep2 = bucket.decay(beta2)
    unbias = inverse_bias_correction(bucket.average_steps, beta2)
    shrink = 1.0 - lr * weight_decay
    for y, g, v in zip(bucket.params, bucket.masked_grads(), bucket.states["exp_avg_sq"]):
        v.mul_(keep2).addcmul_(g, g, value=1.0 - beta2)
        y.mul_(shrink)
        y.sub_(g / (v.sqrt() * unbias + eps) * lr)


def _foreach_averaged(
    bucket: Bucket, *, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    lr = bucket.step_lr() * (1.0 - beta1)
    grads = bucket.masked_grads()
    exp_avg_sqs = bucket.states["exp_avg_sq"]
    torch._foreach_mul_(exp_avg_sqs, bucket.decay(beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    n = len(grads)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    # (a list of 0-dim tensors: no host read)
    torch._foreach_mul_(denom, [inverse_bias_correction(bucket.average_steps, beta2)] * n)
    torch._foreach_add_(denom, eps)
    direction = torch._foreach_div(grads, denom)
    torch._foreach_mul_(bucket.params, 1.0 - lr * weight_decay)
    torch._foreach_addcmul_(bucket.params, direction, [lr] * n, value=-1.0)


def _blocked_averaged(
    bucket: Bucket, *, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    """The averaged step on large contiguous CPU tensors, in blocks of ``CPU_BLOCK``
    elements (:meth:`Bucket.cpu_blocks`), so each tensor is streamed from memory once."""
    lr = bucket.step_lr() * (1.0 - beta1)
    keep2 = bucket.decay(beta2)
    shrink = 1.0 - lr * weight_decay
    unbias = inverse_bias_correction(bucket.average_steps, beta2)
    for g, scratch, (y, v) in bucket.cpu_blocks(bucket.states["exp_avg_sq"]):
        v.mul_(keep2).addcmul_(g, g, value=1.0 - beta2)
        direction = torch.sqrt(v, out=scratch).mul_(unbias).add_(eps)
        torch.div(g, direction, out=direction)
        y.mul_(shrink)
        y.addcmul_(direction, lr, value=-1.0)


def _fused_averaged(
    bucket: Bucket, *, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    """The averaged step in torch's fused AdamW kernel, at the LR ``lr·(1 − β)`` and with
    the first moment off (``β1 = 0``, the gradient as its own buffer: ``lerp(g, g, 1) = g``;
    bias correction from a step tensor ``max(steps, 1)``; ``found_inf`` on a skipped step):
    one pass, as without averaging."""
    steps = torch.clamp(bucket.average_steps, min=1.0).to(torch.float32)
    lr = bucket.lr * (1.0 - beta1)
    _adamw_step(
        bucket,
        bucket.params,
        bucket.grads,
        [steps] * len(bucket.params),
        0.0,
        beta2,
        eps,
        weight_decay,
        lr=lr,
    )


_step_tensors: dict[torch.device, Tensor] = {}


def _fused_emosens(
    bucket: Bucket, *, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    device = bucket.params[0].device
    if device not in _step_tensors:
        _step_tensors[device] = torch.tensor(
            _NO_BIAS_CORRECTION_STEP, dtype=torch.float32, device=device
        )
    steps = [_step_tensors[device]] * len(bucket.params)
    exp_avgs = bucket.states["exp_avg"]
    _adamw_step(bucket, bucket.params, exp_avgs, steps, beta1, beta2, eps, weight_decay)


def _adamw_step(
    bucket: Bucket,
    params: list[Tensor],
    exp_avgs: list[Tensor],
    steps: list[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    lr: Tensor | None = None,
) -> None:
    """torch's fused AdamW kernel on ``params`` with the bucket's gradients, second moments,
    tensor LR (``lr``: another one) and skipped-step flag (``found_inf``: nothing is
    written on a skipped step)."""
    torch._fused_adamw_(
        params,
        bucket.grads,
        exp_avgs,
        bucket.states["exp_avg_sq"],
        [],
        steps,
        lr=bucket.lr if lr is None else lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=(~bucket.valid).to(torch.float32),
    )
