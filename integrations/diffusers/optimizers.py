"""``--optimizer`` choices: one small builder per family, and the LR each one runs at.

A table, not an if-chain: an unknown name is an error listing the choices (argparse
rejects it first), never a silent fallback to AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from emo_core import get_optimizer, unwrap

__all__ = ["DEFAULT_LR", "OPTIMIZERS", "build_optimizer", "effective_lr"]

EMO_NAMES = ("emosens", "emoairy", "emocats")

# Emo optimizers and Prodigy set their own step size (lr is a multiplier, leave it at 1);
# AdamW at diffusers' LoRA default.
DEFAULT_LR = {"emosens": 1.0, "emoairy": 1.0, "emocats": 1.0, "adamw": 1e-4, "prodigy": 1.0}


def _emo(name: str) -> Callable[..., Optimizer]:
    def build(params, *, lr, weight_decay, stochastic_rounding):
        # Stochastic rounding draws from a generator with a fixed seed kept in the optimizer
        # state, so a bf16 run is reproducible and resumes exactly without help from here.
        return get_optimizer(name)(
            params, lr=lr, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding
        )

    return build


def _adamw(params, *, lr, weight_decay, stochastic_rounding):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _prodigy(params, *, lr, weight_decay, stochastic_rounding):
    try:
        from prodigyopt import Prodigy
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--optimizer prodigy needs prodigyopt: pip install 'emo-optim[bench]' "
            "(or pip install prodigyopt)"
        ) from err
    # Bias correction and safeguarded warm-up, as diffusers recommends for Prodigy + LoRA.
    return Prodigy(
        params,
        lr=lr,
        weight_decay=weight_decay,
        use_bias_correction=True,
        safeguard_warmup=True,
    )


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
) -> Optimizer:
    """The optimizer ``name`` over ``params``; ``lr=None`` takes ``DEFAULT_LR[name]``.

    ``stochastic_rounding`` applies to Emo optimizers with bf16 parameters (AdamW and
    Prodigy round to nearest, as torch does).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name](
        list(params),
        lr=DEFAULT_LR[name] if lr is None else lr,
        weight_decay=weight_decay,
        stochastic_rounding=stochastic_rounding,
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
