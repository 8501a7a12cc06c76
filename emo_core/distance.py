"""The ``pulse="distance"`` controller: the step size from a distance-to-init estimate.

The math, with its rationale, is in ``distance.md`` next to this file. In short: on a fixed
sample of coordinates (at most :data:`SAMPLE_SIZE` of them, from at most
:data:`SAMPLE_TENSORS` tensors) the controller keeps the starting point ``x0`` and an EMA
``s`` of weighted gradients, accumulates ``num = Σ λ·<g, x0 − x>`` and estimates the scale
``d̂ = num / ||s||₁`` (a lower bound on the ℓ∞ distance to a solution, as in
D-Adaptation/Prodigy). ``d`` grows towards ``d̂`` (never shrinks) and the loss sensor's
brake multiplies in: ``lr = clamp(d·brake(σ), min_lr, max_lr)``.

Everything is tensor math on 0-dim and sample-sized tensors: no host reads. Under
``torch.distributed`` the sampled values are reduced with the loss in one collective, so
every rank holds the same sample and computes the same ``d`` (DDP replicas and FSDP2
shards alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import local_shard

__all__ = [
    "BETA3",
    "adam_rms",
    "D0",
    "SAMPLE_SIZE",
    "SAMPLE_TENSORS",
    "SamplePlan",
    "brake",
    "distance_update",
    "gather_sample",
    "init_distance_state",
    "plan_sample",
]

SAMPLE_SIZE = 1 << 14
"""Coordinates in the sample (fewer when the model is smaller): ~0 bytes per parameter."""
SAMPLE_TENSORS = 32
"""Tensors the sample reads per step at most (picked in proportion to their size): bounds
the per-step cost on layouts of hundreds of small tensors (LoRA)."""
D0 = 1e-6
"""The starting scale: far below any useful LR, so the first steps cannot overshoot."""
BETA3 = 0.9975
"""EMA factor of the numerator and of ``s`` (√0.995: a ~400-step memory)."""
GROWTH = math.inf
"""Largest factor by which ``d`` may grow in one step."""
ADAM_BETA1, ADAM_BETA2 = 0.9, 0.995
"""EmoSens's default betas, for the reference direction of sign/normalised updates."""
RHO_POWER = 1.0


@dataclass(frozen=True)
class _Piece:
    """One sampled tensor: global flat indices ``0, stride, 2·stride, …`` (``count``)."""

    group: int
    index: int
    stride: int
    count: int
    weight: float  # parameters represented by each sampled coordinate
    share: float  # this rank's contribution factor in the cross-rank sum


@dataclass(frozen=True)
class SamplePlan:
    """Which coordinates are sampled; recomputed from the parameter layout, not saved."""

    pieces: tuple[_Piece, ...]
    size: int
    weights: Tensor  # [size], per-coordinate weight


def _next_prime(n: int) -> int:
    """Smallest prime ≥ n (n ≥ 2): a prime stride does not align with row lengths."""
    n = max(2, n)
    while any(n % k == 0 for k in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _stride_for(numel: int, coords: float) -> int:
    if coords >= numel:
        return 1
    return _next_prime(math.ceil(numel / coords))


def plan_sample(
    param_groups: list[dict], device: torch.device, dtype: torch.dtype, world: int
) -> SamplePlan:
    """The sample for these groups: tensors picked with probability ∝ size, then strided."""
    tensors = [
        (gi, pi, _real_numel(p), _share(p, world))
        for gi, group in enumerate(param_groups)
        for pi, p in enumerate(group["params"])
        if p.requires_grad and p.numel() > 0
    ]
    tensors = [t for t in tensors if t[3] is not None]
    total = sum(t[2] for t in tensors)
    budget = min(SAMPLE_SIZE, total)
    pieces = []
    if len(tensors) <= SAMPLE_TENSORS:
        for gi, pi, numel, share in tensors:
            stride = _stride_for(numel, max(1.0, budget * numel / total))
            count = math.ceil(numel / stride)
            pieces.append(_Piece(gi, pi, stride, count, numel / count, share))
    else:  # systematic sampling: the tensors under SAMPLE_TENSORS evenly spaced positions
        hits = [0] * len(tensors)
        position, j = 0, 0
        for k, (_, _, numel, _) in enumerate(tensors):
            while j < SAMPLE_TENSORS and (j + 0.5) * total / SAMPLE_TENSORS < position + numel:
                hits[k] += 1
                j += 1
            position += numel
        for (gi, pi, numel, share), hit in zip(tensors, hits):
            if hit:
                stride = _stride_for(numel, hit * budget / SAMPLE_TENSORS)
                count = math.ceil(numel / stride)
                weight = hit * total / SAMPLE_TENSORS / count
                pieces.append(_Piece(gi, pi, stride, count, weight, share))
    size = sum(piece.count for piece in pieces)
    weights = torch.cat(
        [torch.full((piece.count,), piece.weight, dtype=dtype) for piece in pieces]
        or [torch.zeros(0, dtype=dtype)]
    ).to(device)
    return SamplePlan(tuple(pieces), size, weights)


def _real_numel(p: Tensor) -> int:
    return p.numel() * (2 if p.is_complex() else 1)


def _share(p: Tensor, world: int) -> float | None:
    """Factor on this rank's sampled values so that their sum over ranks is the value.

    Plain tensors are replicas (DDP): 1/world each. A DTensor sharded on dim 0 (FSDP2)
    contributes its own rows once (its placements' replicas share them). Other layouts are
    left out of the sample (None).
    """
    placements = getattr(p, "placements", None)
    if placements is None:
        return 1.0 / world
    from torch.distributed.tensor import Replicate, Shard

    replicas = 1
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            replicas *= p.device_mesh.size(mesh_dim)
        elif not (isinstance(placement, Shard) and placement.dim == 0):
            return None
    return 1.0 / replicas if world > 1 else 1.0


def _flat(t: Tensor) -> Tensor:
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def _local_range(p: Tensor) -> tuple[int, int]:
    """The global flat index range ``[lo, hi)`` this rank holds of ``p``."""
    local = local_shard(p)
    if local is p:
        return 0, _real_numel(p)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = _real_numel(local) // max(1, local.shape[0]) if local.dim() else 1
    lo = offset[0] * row if local.dim() else 0
    return lo, lo + _real_numel(local)


def gather_sample(
    plan: SamplePlan, param_groups: list[dict], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(x, g)``: the sampled parameter and gradient values, each ``[plan.size]``, scaled
    by this rank's share (so that a cross-rank sum gives the values). Zero gradient where a
    sampled parameter has none this step."""
    xs, gs = [], []
    for piece in plan.pieces:
        p = param_groups[piece.group]["params"][piece.index]
        lo, hi = _local_range(p)
        first = -(-lo // piece.stride)  # the first sampled global index ≥ lo
        last = -(-hi // piece.stride)  # one past the last < hi
        start = first * piece.stride - lo
        x_part = _flat(local_shard(p))[start :: piece.stride][: max(0, last - first)]
        grad = p.grad
        g_part = (
            torch.zeros_like(x_part)
            if grad is None
            else _flat(local_shard(grad))[start :: piece.stride][: max(0, last - first)]
        )
        for parts, part in ((xs, x_part), (gs, g_part)):
            part = part.to(device=device, dtype=dtype)
            if first > 0 or last < piece.count:  # a shard: zeros around its own part
                part = torch.nn.functional.pad(part, (first, piece.count - last))
            parts.append(part * piece.share if piece.share != 1.0 else part)
    if not xs:
        empty = torch.zeros(0, dtype=dtype, device=device)
        return empty, empty
    return torch.cat(xs), torch.cat(gs)


def init_distance_state(size: int, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Fresh controller state: scale ``D0``, nothing accumulated, no starting point yet."""
    return {
        "d": torch.tensor(D0, dtype=dtype, device=device),
        "num": torch.zeros((), dtype=dtype, device=device),
        "started": torch.zeros((), dtype=torch.bool, device=device),
        "x0": torch.zeros(size, dtype=dtype, device=device),
        "s": torch.zeros(size, dtype=dtype, device=device),
        "m": torch.zeros(size, dtype=dtype, device=device),
        "v": torch.zeros(size, dtype=dtype, device=device),
        "k": torch.zeros((), dtype=dtype, device=device),
    }


def adam_rms(m: Tensor, v: Tensor, k: Tensor, weights: Tensor) -> Tensor:
    """Weighted RMS over the sample of the bias-corrected Adam direction ``m̂/√v̂`` (≤ ~1;
    1 while the gradient is consistent, ~√((1−β1)/(1+β1)) ≈ 0.23 in pure noise)."""
    k = torch.clamp(k, min=1.0)
    m_hat = m / (1 - ADAM_BETA1**k)
    v_hat = v / (1 - ADAM_BETA2**k)
    tiny = torch.finfo(m.dtype).tiny
    u2 = torch.where(v_hat > 0, m_hat * m_hat / torch.clamp(v_hat, min=tiny), 0.0)
    total = torch.clamp(weights.sum(), min=tiny)
    return torch.sqrt(torch.clamp(torch.sum(weights * u2) / total, max=1.0))


def brake(sensor: dict[str, Tensor]) -> Tensor:
    """The loss sensor's brake, in (0, 1]: ``1 − |σ|`` for the more negative of

    * the emotion scalar σ (short EMA against the long one: a rise over ~100 steps), and
    * ``σ_f = tanh((ema_medium − ema_short) / |ema_medium|)`` (short against medium: a rise
      over ~20 steps, which a long fall earlier in training cannot mask),

    and 1 while both say the loss falls. A one-step 10x spike on a settled loss gives σ_f ≈ −0.91
    (the LR drops ~10x on that step); the brake fades as the short EMA forgets the spike (a few
    steps). A falling loss is never braked.
    """
    es, em = sensor["ema_short"], sensor["ema_medium"]
    fast = torch.tanh((em - es) / torch.clamp(em.abs(), min=1e-5))
    worst = torch.minimum(torch.minimum(sensor["scalar"], fast), torch.zeros_like(fast))
    return 1.0 + worst


def distance_update(
    state: dict[str, Tensor],
    x: Tensor,
    g: Tensor,
    weights: Tensor,
    sensor: dict[str, Tensor],
    valid: Tensor,
    *,
    min_lr: float,
    max_lr: float,
    unit_direction: bool,
) -> tuple[dict[str, Tensor], Tensor]:
    """Advance the controller one step; returns the new state and the base LR.

    Args:
        state: see :func:`init_distance_state`; not modified.
        x, g: the sampled parameter and gradient values of this step (before the update).
        weights: parameters represented by each sampled coordinate.
        sensor: the loss sensor's state after this step (for :func:`brake`).
        valid: where False (skipped step) the state is returned unchanged.
        min_lr, max_lr: clamp of the base LR.
        unit_direction: the update direction has unit size per coordinate whatever the
            gradient noise (sign, RMS-normalised): the LR is ``d·ρ`` with ``ρ`` the RMS of
            the Adam direction ``m̂/√v̂`` on the sample, so the step moves a coordinate as
            far as EmoSens's would at the same ``d``. Adam-type (False): ``ρ = 1``.
    """
    x0 = torch.where(state["started"], state["x0"], x)
    d = state["d"]
    lam = d * (d / D0)  # weights ∝ d²: later steps (at the found scale) dominate
    num = BETA3 * state["num"] + lam * torch.sum(weights * g * (x0 - x))
    s = BETA3 * state["s"] + lam * g
    den = torch.sum(weights * s.abs())
    tiny = torch.finfo(den.dtype).tiny
    d_hat = torch.where(den > 0, num / torch.clamp(den, min=tiny), torch.zeros_like(num))
    d_new = torch.clamp(torch.maximum(d, torch.minimum(d_hat, GROWTH * d)), max=max_lr)
    k = state["k"] + 1
    m = ADAM_BETA1 * state["m"] + (1 - ADAM_BETA1) * g
    v = ADAM_BETA2 * state["v"] + (1 - ADAM_BETA2) * g * g
    new = {
        "d": d_new,
        "num": num,
        "started": torch.ones_like(state["started"]),
        "x0": x0,
        "s": s,
        "m": m,
        "v": v,
        "k": k,
    }
    out = {key: torch.where(valid, value, state[key]) for key, value in new.items()}
    scale = out["d"]
    if unit_direction:
        scale = scale * adam_rms(out["m"], out["v"], out["k"], weights) ** RHO_POWER
    lr = torch.clamp(scale * brake(sensor), min=min_lr, max=max_lr)
    return out, lr
