"""The names and values of the metrics an Emo optimizer logs, shared by its ``writer`` and the
framework adapters (``emo_core.log_metrics``). Depends on no optimizer module, so ``_base``
and ``adapters`` both import it without an import cycle."""

from __future__ import annotations

from typing import Any

__all__ = ["METRIC_KEYS", "metric_values"]

# Telemetry entries logged besides the per-group learning rates.
METRIC_KEYS: tuple[str, ...] = ("scalar", "trust", "noise", "pulse", "skipped_steps")


def metric_values(emo: Any, prefix: str = "emo/") -> dict[str, float]:
    """``{prefix}lr`` (``{prefix}lr_group1``, ... for further groups; groups without
    parameters are left out), then ``METRIC_KEYS``.

    ``emo`` is an ``EmoOptimizer``; reading its values syncs the device.
    """
    values = emo.telemetry()
    lrs = list(enumerate(emo.get_effective_lr()))
    # A group without parameters applies its LR to nothing: the Trainer's no-decay group of a
    # LoRA, its decay group when only biases and norms train. Under pulse="distance" each
    # group finds its own scale and an empty one's stays at its start (1e-6), which as the
    # first group's `lr` read as a run that never warms up. `lr` is the first group with
    # parameters; groups keep their index in the `lr_group{i}` names.
    used = [(i, lr) for i, lr in lrs if emo.param_groups[i]["params"]] or lrs[:1]
    metrics = {f"{prefix}lr": used[0][1]} if used else {}
    metrics.update({f"{prefix}lr_group{i}": lr for i, lr in used[1:]})
    for key in METRIC_KEYS:
        metrics[f"{prefix}{key}"] = values[key]
    return metrics
