"""The ``pulse="distance"`` controller: the step size from a distance-to-init estimate.

The math, with its rationale, is in ``distance.md`` next to this file. In short: on a fixed
sample of coordinates (at most :data:`SAMPLE_SIZE` of them, from at most
:data:`SAMPLE_TENSORS` tensors) the controller keeps the starting point ``x0`` and an EMA
``s`` of weighted gradients, accumulates ``num = Σ λ·<g, x0 − x>`` and estimates the scale
``d̂ = num / ||s||₁`` (a lower bound on the ℓ∞ distance to a solution, as in
D-Adaptation/Prodigy). ``d`` grows towards ``d̂`` (never shrinks, at most :data:`GROWTH`
per step); the loss sensor's brake and the settling factor (``settle.py``: anneals while the
loss is not significantly falling) multiply in: ``lr = clamp(d·brake(σ)·a, min_lr, max_lr)``.

Everything is tensor math on 0-dim and sample-sized tensors: no host reads. Under
``torch.distributed`` the sampled values are reduced with the loss in one collective, so
every rank holds the same sample and computes the same ``d`` (DDP replicas and FSDP2
shards alike).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import local_shard
from .pulse import emotion
from .settle import init_settle_state, settle_update

__all__ = [
    "BETA3",
    "BRAKE_FLOOR",
    "adam_rms",
    "D0",
    "GROWTH",
    "SAMPLE_SIZE",
    "SAMPLE_TENSORS",
    "SamplePlan",
    "brake",
    "distance_update",
    "outlier_brake",
    "gather_sample",
    "init_distance_state",
    "plan_sample",
]

SAMPLE_SIZE = 1 << 12
"""Coordinates in the sample per param group (fewer when the group is smaller): ~0 bytes per
parameter."""
SAMPLE_TENSORS = 256
"""Tensors the sample reads per step and param group at most (picked in proportion to their
size beyond that): bounds the per-step cost (one view per tensor) on layouts of thousands of
tensors. Fewer is not cheaper in quality: the terms of ``Σ g·(x0 − x)`` are heavy-tailed
across tensors, and in sd-scripts' LoRA of a small SD1.x (240 UNet tensors) 16 or 32 of them
left the UNet's scale 100x short after 200 steps (64: 1e-2 by step 160; all: by step 130,
as Prodigy + Schedule-Free's per-group d)."""
SAMPLE_READS = 64
"""Sampled tensors read per step on average: a sample of more tensors is read in full every
``period = ⌈tensors / SAMPLE_READS⌉`` steps (:attr:`SamplePlan.period`), each read counting
for the ``period`` steps it stands for. On a layout of hundreds of small tensors the views
per tensor are the sample's whole cost (a LoRA's 400 tensors: ~1.5 ms a step, about a fifth
of the step); a model of up to 64 tensors is read every step."""
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
D0 = 1e-6
"""The starting scale: far below any useful LR, so the first steps cannot overshoot."""
BETA3 = 0.9975
"""EMA factor of the numerator and of ``s`` (√0.995: a ~400-step memory)."""
SAMPLE_DTYPE = torch.float32
"""dtype of the sampled vectors (the scalars use the sensor's dtype)."""
ADAM_BETA1, ADAM_BETA2 = 0.9, 0.995
"""EmoSens's default betas, for the reference direction of sign/normalised updates."""
GROWTH = 1.2
"""``d`` grows by at most this factor per step (~x10 per 13 steps): the first estimates come
from steps whose Adam moments are still stale and coherent, and a jump straight to them moves
every coordinate the same way for several steps at full scale."""
OUTLIER_Z = 6.0
"""A loss this many noise standard deviations above its recent level is an outlier."""
BRAKE_FLOOR = 0.1
"""The brake never cuts the LR by more than 10x: the sensor is relative to the loss level,
so a loss near zero makes ordinary batch noise look like a spike."""


@dataclass(frozen=True)
class _Piece:
    """One sampled tensor: global flat indices ``0, stride, 2·stride, …`` (``count``)."""

    group: int
    index: int
    stride: int
    count: int
    weight: float  # parameters represented by each sampled coordinate
    share: float  # this rank's contribution factor in the cross-rank sum
    start: int = 0  # first sampled index in this rank's flat part of the tensor
    length: int = 0  # sampled coordinates this rank holds ...
    pad: tuple[int, int] = (0, 0)  # ... and the zeros around them (a shard)
    plain: bool = True  # a real, unsharded tensor (the fast path)


@dataclass(frozen=True)
class SamplePlan:
    """Which coordinates are sampled; recomputed from the parameter layout, not saved.

    The coordinates come group by group (param group order): group ``j`` holds
    ``counts[j]`` of them, and ``groups`` is each coordinate's group index."""

    pieces: tuple[_Piece, ...]
    size: int
    weights: Tensor  # [size], per-coordinate weight
    shares: Tensor | None  # [size], this rank's factor; None where all are 1
    groups: Tensor  # [size] int64, the param group of each coordinate
    counts: tuple[int, ...]  # coordinates per group

    @property
    def n_groups(self) -> int:
        return len(self.counts)

    @property
    def period(self) -> int:
        """Steps between reads of the sample (1 up to :data:`SAMPLE_READS` tensors)."""
        return max(1, -(-len(self.pieces) // SAMPLE_READS))

    def group_sums(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """``[n_groups]``: the sum of ``values`` (``[size]``) over each group's coordinates,
        summed in the values' own dtype (fp32, as a dot product would: in fp64 the GRU of
        emo-bench quality found a 3.6x larger scale, +65% against -51% on seed 0; the
        numerator cancels heavily) and returned in ``dtype``. A fixed order per group, the
        same on every rank and run (atomics-based scatters are not, on CUDA)."""
        if len(self.counts) == 1 and not torch.compiler.is_compiling():  # (eager: the same
            # sum, without a slice and a stack; a compiled graph is kept as it was)
            return values.sum(0, keepdim=True).to(dtype)
        sums, start = [], 0
        for count in self.counts:  # (slices, not split: a tuple result breaks a compiled graph)
            sums.append(values[start : start + count].sum())
            start += count
        return torch.stack(sums).to(dtype)

    def spread(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """Per-group ``values`` (``[n_groups]``) at each coordinate, in ``dtype``: ``[size]``,
        or ``[1]`` to broadcast when there is one group in eager mode (the same values,
        without a gather of ``size`` elements)."""
        if len(self.counts) == 1 and not torch.compiler.is_compiling():  # (as group_sums)
            return values.to(dtype)
        return values[self.groups].to(dtype)


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


def plan_sample(param_groups: list[dict], device: torch.device, world: int) -> SamplePlan:
    """The sample for these groups, group by group (each has its own scale, from its own
    sample, drawn as if the group were alone): in a group, tensors picked with probability
    ∝ size, then strided; :data:`SAMPLE_SIZE` coordinates from :data:`SAMPLE_TENSORS`
    tensors at most per group."""
    tensors = [
        (gi, pi, _real_numel(p), _share(p, world))
        for gi, group in enumerate(param_groups)
        for pi, p in enumerate(group["params"])
        if p.requires_grad and p.numel() > 0
    ]
    tensors = [t for t in tensors if t[3] is not None]
    pieces: list[_Piece] = []
    for gi in range(len(param_groups)):
        mine = [t for t in tensors if t[0] == gi]
        numel = sum(t[2] for t in mine)
        if numel:
            pieces += _sample_group(mine, min(SAMPLE_SIZE, numel), SAMPLE_TENSORS)
    pieces = [_locate(piece, param_groups[piece.group]["params"][piece.index]) for piece in pieces]
    size = sum(piece.count for piece in pieces)

    def per_coordinate(field: str) -> Tensor:
        parts = [torch.full((p.count,), getattr(p, field), dtype=SAMPLE_DTYPE) for p in pieces]
        return torch.cat(parts or [torch.zeros(0, dtype=SAMPLE_DTYPE)]).to(device)

    counts = [0] * len(param_groups)
    for piece in pieces:
        counts[piece.group] += piece.count
    groups = [torch.full((p.count,), p.group, dtype=torch.int64) for p in pieces]
    groups = torch.cat(groups or [torch.zeros(0, dtype=torch.int64)])
    shares = None if all(p.share == 1.0 for p in pieces) else per_coordinate("share")
    return SamplePlan(
        tuple(pieces), size, per_coordinate("weight"), shares, groups.to(device), tuple(counts)
    )


def _sample_group(
    tensors: list[tuple[int, int, int, float]], budget: float, cap: int
) -> list[_Piece]:
    """Pieces for one group's ``(group, index, numel, share)`` tensors: every tensor if
    there are at most ``cap``, else the tensors under ``cap`` evenly spaced positions of the
    cumulative element count (systematic sampling); ``budget`` coordinates in all."""
    total = sum(t[2] for t in tensors)
    pieces = []
    if len(tensors) <= cap:
        for gi, pi, numel, share in tensors:
            stride = _stride_for(numel, max(1.0, budget * numel / total))
            count = math.ceil(numel / stride)
            pieces.append(_Piece(gi, pi, stride, count, numel / count, share))
        return pieces
    # Positions are spaced evenly over the tensors in a scrambled order (by the fractional
    # part of i·φ), not their own: layers repeat, and evenly spaced positions over a
    # repeating layout can land on one kind of tensor only (every LoRA down-projection,
    # which has no gradient while the zero-initialised up-projections have not moved).
    order = sorted(range(len(tensors)), key=lambda i: (i * _GOLDEN) % 1.0)
    tensors = [tensors[i] for i in order]
    hits = [0] * len(tensors)
    position, j = 0, 0
    for k, (_, _, numel, _) in enumerate(tensors):
        while j < cap and (j + 0.5) * total / cap < position + numel:
            hits[k] += 1
            j += 1
        position += numel
    for (gi, pi, numel, share), hit in zip(tensors, hits):
        if hit:
            stride = _stride_for(numel, hit * budget / cap)
            count = math.ceil(numel / stride)
            pieces.append(_Piece(gi, pi, stride, count, hit * total / cap / count, share))
    return sorted(pieces, key=lambda piece: piece.index)  # (reads in the layout's order)


def _locate(piece: _Piece, p: Tensor) -> _Piece:
    """Where this rank's sampled coordinates of ``p`` are (all of them, or a shard's)."""
    lo, hi = _local_range(p)
    first = -(-lo // piece.stride)  # the first sampled global index ≥ lo
    last = max(first, -(-hi // piece.stride))  # one past the last < hi
    return dataclasses.replace(
        piece,
        start=first * piece.stride - lo,
        length=last - first,
        pad=(first, piece.count - last),
        plain=local_shard(p) is p and not p.is_complex(),
    )


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
    plan: SamplePlan,
    param_groups: list[dict],
    device: torch.device,
    source: Callable[[Tensor], Tensor] | None = None,
    views: list[_View | None] | None = None,
    grads: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(x, g)``: the sampled parameter and gradient values, each ``[plan.size]`` fp32,
    scaled by this rank's share (so that a cross-rank sum gives the values). Zero gradient
    where a sampled parameter has none this step. ``source(p)``: the tensor whose values
    stand for ``p``'s (same layout; a complex one as its real view), default ``p``.
    ``grads=False``: the parameter side only (``g`` is None).

    ``views``: the caller's cache of the parameter side's strided views, one slot per piece
    (``[None] * len(plan.pieces)`` to start), kept from step to step: a view per tensor is most
    of the sample's cost on a layout of many small tensors, and a parameter's storage does
    not move. Each slot holds its tensor's data pointer and is read afresh when that changes
    (``p.data`` replaced; the cached view keeps the old storage alive until then, so an equal
    pointer is the same memory; a view of the detached tensor, so autograd's view checks do
    not follow it). Gradients are viewed afresh every step: they are new tensors.
    """
    eager = not torch.compiler.is_compiling()
    cache = views is not None and eager
    params = [group["params"] for group in param_groups]
    count = len(plan.pieces)
    xs: list[Tensor | None] = [None] * count
    gs: list[Tensor | None] = [None] * count
    rest: Iterable[int] = range(count)
    if cache and source is None and grads and not torch.is_grad_enabled():
        rest = []
        # The common case first, with nothing but the checks its views need (per tensor,
        # every call counts): the cached view is still p's (the same memory, so also on the
        # device it was made on) with p's dtype and layout, and the gradient is dense. Its
        # gradient views are made in inference mode (no autograd view tracking: ~20% less
        # per view; only under no_grad, where nothing records them anyway).
        with torch.inference_mode():
            for i, piece in enumerate(plan.pieces):
                p = params[piece.group][piece.index]
                grad, slot = p.grad, views[i]
                if (
                    slot is not None
                    and grad is not None
                    and slot.pointer == p.data_ptr()
                    and slot.dtype is p.dtype
                    and p.is_contiguous()
                    and grad.is_contiguous()
                ):
                    xs[i] = slot.view
                    offset = grad.storage_offset() + piece.start
                    gs[i] = grad.as_strided(slot.size, slot.stride, offset)
                else:
                    rest.append(i)
    for i in rest:
        piece = plan.pieces[i]
        p = params[piece.group][piece.index]
        x = p if source is None else source(p)
        grad = p.grad
        if piece.plain and grad is not None and p.device == device:  # plain: the views
            if cache and x.is_contiguous():
                slot = views[i]
                if slot is None or slot.pointer != x.data_ptr() or slot.dtype is not x.dtype:
                    slot = views[i] = _View.of(x, piece, eager)
                xs[i] = slot.view
            else:
                xs[i] = _strided(x, piece, eager)
            if grads:
                gs[i] = _strided(grad, piece, eager)
            continue
        if cache:
            views[i] = None  # (a cached view must not keep a moved tensor's old storage)
        window = slice(piece.start, piece.start + piece.stride * piece.length, piece.stride)
        x_part = _flat(local_shard(x))[window]
        g_part = None
        if grads:
            g_part = torch.zeros_like(x_part) if grad is None else _flat(local_shard(grad))[window]
        for into, part in ((xs, x_part), (gs, g_part)):
            if part is None:
                continue
            if part.device != device:
                part = part.to(device)
            if piece.pad != (0, 0):  # a shard: zeros around its own part
                part = torch.nn.functional.pad(part, piece.pad)
            into[i] = part
    if not xs:
        empty = torch.zeros(0, dtype=SAMPLE_DTYPE, device=device)
        return empty, (empty if grads else None)
    # one copy each (cat reads the strided views and promotes mixed dtypes)
    x = torch.cat(xs).to(SAMPLE_DTYPE)
    g = torch.cat(gs).to(SAMPLE_DTYPE) if grads else None
    if plan.shares is not None:
        x = x * plan.shares
        g = None if g is None else g * plan.shares
    return x, g


@dataclass(frozen=True)
class _View:
    """A cached strided view of a plain tensor's sampled coordinates (``gather_sample``),
    with what the next call checks it against and the gradient's view shape."""

    pointer: int  # the tensor's data_ptr() when viewed
    dtype: torch.dtype
    view: Tensor
    size: tuple[int]  # (piece.length,)
    stride: tuple[int]  # (piece.stride,)

    @staticmethod
    def of(x: Tensor, piece: _Piece, eager: bool) -> _View:
        view = _strided(x.detach(), piece, eager)
        return _View(x.data_ptr(), x.dtype, view, (piece.length,), (piece.stride,))


def _strided(t: Tensor, piece: _Piece, eager: bool) -> Tensor:
    """The sampled coordinates of a plain tensor as one view (one op per tensor: with
    every tensor of a LoRA sampled, the per-tensor overhead is the sample's cost).
    ``eager``: not under torch.compile (checked once per sample by the caller)."""
    if eager and t.is_contiguous():  # (storage_offset breaks a compiled graph)
        return t.as_strided((piece.length,), (piece.stride,), t.storage_offset() + piece.start)
    end = piece.start + piece.stride * piece.length
    if eager and t.device.type in ("cpu", "cuda"):  # channels_last, transposed, gaps:
        # gather the coordinates, not a copy of all (other backends: the portable copy)
        return torch.take(t, torch.arange(piece.start, end, piece.stride, device=t.device))
    return t.reshape(-1)[piece.start : end : piece.stride]


MAX_LR_UNITS = 100.0
"""The most a step's displacement is scaled up to count it in ``lr = 1`` units (step 3)."""


def init_distance_state(
    size: int,
    n_groups: int,
    device: torch.device,
    dtype: torch.dtype,
    direction: bool,
    lr: float = D0,
) -> dict[str, Tensor]:
    """Fresh controller state: scale ``D0`` in every param group, nothing accumulated, no
    starting point yet, base LR ``lr`` (the LR before the first loss).

    ``dtype`` is the scalars' (the sensor's); per-group values are ``[n_groups]``, the
    sampled vectors ``[size]`` fp32. ``direction``: also the sampled Adam moments (for
    ``direction_power > 0``).
    """

    def vector() -> Tensor:
        return torch.zeros(size, dtype=SAMPLE_DTYPE, device=device)

    state = {
        "d": torch.full((n_groups,), D0, dtype=dtype, device=device),
        # the last read's estimate, which d grows towards between reads (0: no growth yet)
        "d_hat": torch.zeros(n_groups, dtype=dtype, device=device),
        "num": torch.zeros(n_groups, dtype=dtype, device=device),
        "lr": torch.full((n_groups,), lr, dtype=dtype, device=device),
        "started": torch.zeros((), dtype=torch.bool, device=device),
        "x0": vector(),
        "s": vector(),  # kept multiplied by the sample weights
        # the sample and each group's lr multiplier at the last step: the displacement is
        # measured as if lr were 1 (step 3), so lr and schedulers stay plain multipliers
        "x_prev": vector(),
        "m_prev": torch.ones(n_groups, dtype=dtype, device=device),
    }
    if direction:
        state.update(m=vector(), v=vector(), k=torch.zeros((), dtype=dtype, device=device))
    state.update(init_settle_state(device, dtype))
    return state


def adam_rms(m: Tensor, v: Tensor, k: Tensor, plan: SamplePlan) -> Tensor:
    """Per param group (``[n_groups]``), the weighted RMS over its sample of the
    bias-corrected Adam direction ``m̂/√v̂`` (≤ ~1; 1 while the gradient is consistent,
    ~√((1−β1)/(1+β1)) ≈ 0.23 in pure noise)."""
    k = torch.clamp(k, min=1.0)
    correction = (1 - ADAM_BETA2**k) / (1 - ADAM_BETA1**k) ** 2  # m̂²/v̂ = m²/v · this
    tiny = torch.finfo(m.dtype).tiny
    u2 = m * m / torch.clamp(v, min=tiny)  # 0 where g has been 0
    total = torch.clamp(plan.group_sums(plan.weights, k.dtype), min=tiny)
    mean = plan.group_sums(plan.weights * u2, k.dtype) / total
    return torch.sqrt(torch.clamp(mean * correction, max=1.0))


def brake(sensor: dict[str, Tensor]) -> Tensor:
    """The loss sensor's brake, in [BRAKE_FLOOR, 1]: ``1 − |σ|`` for the more negative of

    * the emotion scalar σ (short EMA against the long one: a rise over ~100 steps), and
    * ``σ_f = tanh((ema_medium − ema_short) / |ema_medium|)`` (short against medium: a rise
      over ~20 steps, which a long fall earlier in training cannot mask),

    and 1 while both say the loss falls. A one-step 10x spike on a settled loss gives σ_f ≈ −0.91
    (the LR drops ~10x on that step); the brake fades as the short EMA forgets the spike (a few
    steps). A falling loss is never braked.
    """
    es, em, el = sensor["ema_short"], sensor["ema_medium"], sensor["ema_long"]
    # σ as the sensor computes it (SPEC §2.3), but relative to the loss's own size down to
    # the dtype's smallest normal, not to SPEC's absolute 1e-5 floor: the same for losses
    # above 1e-5, and the trajectory stays unchanged when a small loss is scaled
    tiny = torch.finfo(el.dtype).tiny
    slow, fast = emotion(el, es, floor=tiny), emotion(em, es, floor=tiny)
    return torch.clamp(1.0 + torch.minimum(slow, fast), min=BRAKE_FLOOR, max=1.0)


def outlier_brake(state: dict[str, Tensor], loss: Tensor) -> Tensor:
    """A brake in [BRAKE_FLOOR, 1] for a loss far outside its recent noise, whatever the
    trend: where the rise over settling's fast average exceeds :data:`OUTLIER_Z` noise
    standard deviations, ``|level| / (|level| + rise)`` (a 10x spike: 0.1); 1 otherwise.

    :func:`brake` compares EMAs, so on a loss that is still falling fast (its medium EMA far
    above the current level) a one-step spike can hide inside the lag; this reads the step's
    loss against the level just before it (settling's ``l_fast``, ``l_var``, not yet updated).
    Only clear outliers count: braking ordinary high-loss batches would weight the easy
    batches more than the hard ones (measured: a BatchNorm conv net then ends unstable).
    """
    level = state["l_fast"]
    rise = loss - level
    outlier = (state["n"] >= 10) & (rise > OUTLIER_Z * torch.sqrt(state["l_var"]))
    magnitude = level.abs()
    b = torch.clamp(magnitude / torch.clamp(magnitude + rise, min=1e-300), min=BRAKE_FLOOR, max=1.0)
    # (clamped: finite unless nan, so b == b is isfinite(b) in one op instead of four)
    return torch.where(outlier & (b == b), b, torch.ones_like(b))


_READ_KEYS = ("d", "d_hat", "num", "started", "x0", "s", "x_prev", "m_prev", "k", "m", "v")
"""The controller entries that a read of the sample changes (``d`` and ``m_prev`` also
between reads: ``d`` grows towards the last estimate, ``m_prev`` is the last step's)."""


def _grown(d: Tensor, d_hat: Tensor, growth: float, max_lr: float) -> Tensor:
    """``d`` moved towards the estimate ``d_hat``: never down, at most ``growth`` per step."""
    return torch.clamp(torch.maximum(d, torch.minimum(d_hat, d * growth)), max=max_lr)


def distance_update(
    state: dict[str, Tensor],
    x: Tensor | None,
    g: Tensor | None,
    plan: SamplePlan,
    sensor: dict[str, Tensor],
    loss: Tensor,
    valid: Tensor,
    *,
    min_lr: float,
    max_lr: float,
    direction_power: float,
    settle: bool = True,
    growth: float = GROWTH,
    multipliers: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Advance the controller one step; returns the new state and the base LR of each
    param group (``[n_groups]``; also ``state["lr"]``). Each group has its own scale from
    its own coordinates (a text encoder's LoRA beside a UNet's needs another); the brakes and
    settling, which read the one loss, are shared.

    Args:
        state: see :func:`init_distance_state`; not modified.
        x, g: the sampled parameter and gradient values of this step (before the update);
            None on a step between reads (``plan.period > 1``): ``d`` grows towards the
            estimate of the last read (at most ``growth`` per step, as on a read), the
            sampled moments keep their values, and the loss-driven factors move as on every
            step. A read stands for the ``plan.period`` steps since the last (the EMAs decay
            by ``β3^period``).
        plan: the sample (per-coordinate weights, i.e. parameters represented, and groups).
        sensor: the loss sensor's state after this step (for :func:`brake`).
        loss: the sensed loss of this step (for settling, ``settle.py``).
        valid: where False (skipped step) the state is returned unchanged.
        min_lr, max_lr: clamp of the base LR.
        direction_power: ``p`` in ``lr = d·ρ^p``, with ``ρ`` the RMS over the sample of the
            Adam direction ``m̂/√v̂`` (1 for a consistent gradient, ~0.23 in pure noise).
            An Adam-type update (EmoSens) moves ``d·ρ`` per coordinate by itself: p = 0.
            A sign update (EmoCats) moves ``d`` whatever the noise: p = 1 moves it as far as
            EmoSens would. EmoAiry's unclipped ``g/√v̂`` lies between them: p = 0.5.
        settle: apply settling's factor (off under iterate averaging, which replaces the
            annealing; then only the loss averages the outlier brake reads advance).
        growth: the most ``d`` may grow per step (:data:`GROWTH`; ``math.inf`` under iterate
            averaging, whose bias-corrected moments are not stale early, ``averaging.md``).
        multipliers: each group's ``lr`` this step (``[n_groups]``; default 1): the applied
            LR is ``base · lr``, so the parameters moved ``lr`` times as far as the scale
            alone would have moved them; the displacement is counted in ``lr = 1`` units.
    """
    jolt = outlier_brake(state, loss)
    if x is None or g is None:  # between reads: the scale stands, the multiplier moves on
        out = {key: state[key] for key in _READ_KEYS if key in state}
        if multipliers is not None:
            out["m_prev"] = torch.where(valid, multipliers, state["m_prev"])
        out["d"] = torch.where(
            valid, _grown(state["d"], state["d_hat"], growth, max_lr), state["d"]
        )
        scale = out["d"]
        if direction_power:
            scale = scale * adam_rms(out["m"], out["v"], out["k"], plan) ** direction_power
    else:
        out, scale = _read_update(
            state, x, g, plan, jolt, valid, max_lr, direction_power, growth, multipliers
        )
    out.update(settle_update(state, loss, valid, test=settle))
    slow = torch.minimum(brake(sensor), jolt)
    lr = scale * slow * out["settle"] if settle else scale * slow
    lr = torch.clamp(lr, min=min_lr, max=max_lr)
    out["lr"] = torch.where(valid, lr, state["lr"])
    return out, out["lr"]


def _read_update(
    state: dict[str, Tensor],
    x: Tensor,
    g: Tensor,
    plan: SamplePlan,
    jolt: Tensor,
    valid: Tensor,
    max_lr: float,
    direction_power: float,
    growth: float,
    multipliers: Tensor | None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Steps 1-6 of ``distance.md`` on a read of the sample: the new entries and the scale
    ``d·ρ^p``. A read every ``plan.period`` steps stands for that many steps: the EMAs decay
    by ``β3^period`` (the same memory in steps; a factor ``period`` on each new term would
    cancel in ``num/den``), and the estimate ``d_hat`` is kept for ``d`` to grow towards
    between reads."""
    period = plan.period
    decay = BETA3**period  # (period 1: BETA3 exactly)
    m_prev = state["m_prev"]
    # The last read moved the sample by (x_prev − x), lr_prev times what lr = 1 would have:
    # the starting point moves by (1/lr_prev − 1)·(x_prev − x), so x0 − x is the distance
    # at lr = 1 (exactly x0 while lr is 1: the factor is 0; a frozen group, lr 0, moved not).
    # At most 100x: below lr = 0.01 the step is within rounding of the parameters, and
    # amplifying it further would count their rounding as distance.
    # (reciprocal: 1.0 / m_prev is reciprocal · 1.0, one op more)
    factor = torch.where(m_prev > 0, torch.clamp(m_prev.reciprocal(), max=MAX_LR_UNITS) - 1.0, 0.0)
    shift = (state["x_prev"] - x) * plan.spread(factor, x.dtype)
    x0 = torch.where(state["started"], state["x0"] + shift, x)
    d = state["d"]
    lam = d * d * (1.0 / D0)  # weights ∝ d²: later steps (at the found scale) dominate
    weighted_g = plan.weights * g
    progress = plan.group_sums(weighted_g * (x0 - x), d.dtype)  # Σ w·g·(x0 − x) per group
    # While d has not left D0, a step that went against the gradient adds nothing: early on
    # that is noise, and letting it pull num below 0 delays the first growth.
    progress = torch.where((d > D0) | (progress > 0), progress, torch.zeros_like(progress))
    num = torch.addcmul(decay * state["num"], lam, progress)
    s = torch.addcmul(decay * state["s"], weighted_g, plan.spread(lam, g.dtype))  # weighted
    den = plan.group_sums(s.abs(), d.dtype)  # ||s||₁ per group
    d_hat = num / torch.clamp(den, min=torch.finfo(den.dtype).tiny)  # 0 while den = 0
    out = {
        "d": torch.where(valid, _grown(d, d_hat, growth, max_lr), d),
        "d_hat": torch.where(valid, d_hat, state["d_hat"]),
        "num": torch.where(valid, num, state["num"]),
        "started": state["started"] | valid,
        "x0": torch.where(valid, x0, state["x0"]),
        "s": torch.where(valid, s, state["s"]),
        "x_prev": torch.where(valid, x, state["x_prev"]),
        "m_prev": m_prev if multipliers is None else torch.where(valid, multipliers, m_prev),
    }
    scale = out["d"]
    if direction_power:
        out["k"] = state["k"] + valid.to(state["k"].dtype)
        g = g * jolt.to(g.dtype)  # an outlier step's gradient counts at a normal size
        keep = {"m": (g, ADAM_BETA1), "v": (g * g, ADAM_BETA2)}
        for key, (value, beta) in keep.items():  # no step on a skipped step
            out[key] = torch.lerp(state[key], value, (valid * (1 - beta)).to(g.dtype))
            out[key] = torch.where(valid, out[key], state[key])  # (nan-safe)
        scale = scale * adam_rms(out["m"], out["v"], out["k"], plan) ** direction_power
    return out, scale
