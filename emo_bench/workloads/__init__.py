"""The ten offline quality workloads, by name."""

from __future__ import annotations

from .autoencoder import AUTOENCODER
from .base import Task, Workload
from .charlm import CHARLM
from .conv import CONV
from .digits import DIGITS
from .finetune import FINETUNE
from .flow import FLOW
from .lora import LORA
from .quadratic import QUADRATIC
from .regression import REGRESSION
from .rnn import RNN

__all__ = ["WORKLOADS", "Task", "Workload", "get_workloads"]

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (DIGITS, CHARLM, FLOW, QUADRATIC, FINETUNE, LORA, CONV, AUTOENCODER, REGRESSION, RNN)
}


def get_workloads(names: list[str] | None = None) -> list[Workload]:
    """The named workloads (all when ``names`` is empty); unknown names raise ``ValueError``."""
    if not names:
        return list(WORKLOADS.values())
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(
            f"Invalid --workloads: {', '.join(unknown)} (choose from {', '.join(WORKLOADS)})"
        )
    return [WORKLOADS[n] for n in names]
