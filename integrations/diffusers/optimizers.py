"""``--optimizer`` choices: one small builder per family, and the LR each one runs at.

A table, not an if-chain: an unknown name is an error listing the choices (argparse
rejects it first), never a silent fallback to AdamW. ``--optimizer_args`` (kohya style,
``"max_lr=3e-3" "use_shadow=True"``) become further constructor keywords of any of them,
parsed and type-checked by ``emo_core.optim_args`` (errors name the key).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from emo_core import get_optimizer, unwrap
from emo_core.optim_args import parse_optim_args

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "build_optimizer",
    "effective_lr",
    "optimizer_class",
    "optimizer_state_bytes",
    "parse_optimizer_args",
]

EMO_NAMES = ("emosens", "emoairy", "emocats")

# Emo optimizers and Prodigy set their own step size (lr is a multiplier, leave it at 1);
# AdamW at diffusers' LoRA default.
DEFAULT_LR = {"emosens": 1.0, "emoairy": 1.0, "emocats": 1.0, "adamw": 1e-4, "prodigy": 1.0}


# Set by the script's own flags; optimizer_args may not set them too.
_RESERVED = {
    "lr": "use --learning_rate",
    "weight_decay": "use --weight_decay",
    "stochastic_rounding": "use --stochastic_rounding / --no-stochastic_rounding",
    "process_group": "not expressible as text; the default (WORLD) is used",
    "writer": "use --report_to (the script logs loss and LR)",
}


def _prodigy_class() -> type[Optimizer]:
    try:
        from prodigyopt import Prodigy
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--optimizer prodigy needs prodigyopt: pip install 'emo-optim[bench]' "
            "(or pip install prodigyopt)"
        ) from err
    return Prodigy


def optimizer_class(name: str) -> type[Optimizer]:
    """The class behind ``--optimizer name`` (its signature types ``optimizer_args``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    if name in EMO_NAMES:
        return get_optimizer(name)
    return torch.optim.AdamW if name == "adamw" else _prodigy_class()


def parse_optimizer_args(name: str, entries) -> dict:
    """Checked keyword arguments for ``--optimizer name`` from ``--optimizer_args`` entries.

    ``entries``: ``key=value`` strings (one each), a mapping (YAML) or None.
    """
    return parse_optim_args(
        entries, optimizer_class(name), reserved=_RESERVED, option="optimizer_args"
    )


def _emo(name: str) -> Callable[..., Optimizer]:
    def build(params, *, lr, weight_decay, stochastic_rounding, **extra):
        # Stochastic rounding draws from a generator with a fixed seed kept in the optimizer
        # state, so a bf16 run is reproducible and resumes exactly without help from here.
        return get_optimizer(name)(
            params,
            lr=lr,
            weight_decay=weight_decay,
            stochastic_rounding=stochastic_rounding,
            **extra,
        )

    return build


def _adamw(params, *, lr, weight_decay, stochastic_rounding, **extra):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **extra)


def _prodigy(params, *, lr, weight_decay, stochastic_rounding, **extra):
    # Bias correction and safeguarded warm-up, as diffusers recommends for Prodigy + LoRA
    # (optimizer_args may say otherwise).
    options = {"use_bias_correction": True, "safeguard_warmup": True, **extra}
    return _prodigy_class()(params, lr=lr, weight_decay=weight_decay, **options)


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    **{name: _emo(name) for name in EMO_NAMES},
    "adamw": _adamw,
    "prodigy": _prodigy,
}


def build_optimizer(
    name: str,
    params: Iterable[Tensor],
    *,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    stochastic_rounding: bool = True,
    optimizer_args=None,
) -> Optimizer:
    """The optimizer ``name`` over ``params``; ``lr=None`` takes ``DEFAULT_LR[name]``.

    ``stochastic_rounding`` applies to Emo optimizers with bf16 parameters (AdamW and
    Prodigy round to nearest, as torch does). ``optimizer_args``: see
    ``parse_optimizer_args``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name](
        list(params),
        lr=DEFAULT_LR[name] if lr is None else lr,
        weight_decay=weight_decay,
        stochastic_rounding=stochastic_rounding,
        **parse_optimizer_args(name, optimizer_args),
    )


def effective_lr(optimizer: Optimizer) -> float:
    """The step size of the first param group: emoPulse for Emo, ``d * lr`` for Prodigy.

    Reads a device value for Emo optimizers (a sync): call it at logging cadence.
    """
    emo = unwrap(optimizer)
    if emo is not None:
        return emo.get_effective_lr()[0]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    group = inner.param_groups[0]
    return float(group.get("d", 1.0)) * float(group["lr"])


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in ``state`` (moments, shadows, sensors)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    seen: set[int] = set()

    def walk(value) -> int:
        if isinstance(value, Tensor):
            if value.data_ptr() in seen:
                return 0
            seen.add(value.data_ptr())
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(walk(v) for v in value)
        return 0

    return sum(walk(v) for v in inner.state.values())
