"""The names and values of the metrics an Emo optimizer logs, shared by its ``writer`` and the
framework adapters (``emo_core.log_metrics``). Depends on no optimizer module, so ``_base``
and ``adapters`` both import it without an import cycle."""

from __future__ import annotations

from typing import Any

__all__ = ["METRIC_KEYS", "metric_values"]

# Telemetry entries logged besides the per-group learning rates.
METRIC_KEYS: tuple[str, ...] = ("scalar", "trust", "noise", "pulse", "skipped_steps")


def metric_values(emo: Any, prefix: str = "emo/") -> dict[str, float]:
    """``{prefix}lr`` (``{prefix}lr_group1``, ... for further groups), then ``METRIC_KEYS``.

    ``emo`` is an ``EmoOptimizer``; reading its values syncs the device.
    """
    values = emo.telemetry()
    lrs = emo.get_effective_lr()
    metrics = {f"{prefix}lr": lrs[0]} if lrs else {}
    metrics.update({f"{prefix}lr_group{i}": lr for i, lr in enumerate(lrs[1:], start=1)})
    for key in METRIC_KEYS:
        metrics[f"{prefix}{key}"] = values[key]
    return metrics
