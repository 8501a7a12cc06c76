"""Count host reads of tensor values (the calls that make the host wait for the device).

``count_host_reads()`` wraps ``Tensor.item``, ``__bool__``, ``__float__``, ``__int__``,
``__index__``, ``tolist``, ``numpy`` and a device-to-host ``cpu()`` for the duration of a
``with`` block, and restores them afterwards. It is a measuring instrument for the benchmark
harness only: library code never patches torch.

Two numbers come out. ``reads`` counts every such call. ``syncs`` leaves out reads of the
0-dim ``state["step"]`` counters that ``torch.optim`` deliberately keeps on the host (the
"special device hosting for step" note in ``torch/optim/adam.py``): reading those never
waits for a GPU. On CUDA the block also turns on ``torch.cuda.set_sync_debug_mode`` so that
syncs made inside C++ kernels (``nonzero``, ``masked_select``...) are counted too.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["HostReads", "count_host_reads", "host_step_counters"]

_READERS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


@dataclass
class HostReads:
    """What one ``count_host_reads`` block saw."""

    reads: int = 0
    syncs: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, is_sync: bool) -> None:
        self.reads += 1
        self.syncs += int(is_sync)
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


def host_step_counters(optimizer: torch.optim.Optimizer) -> set[int]:
    """Ids of the host-side step counters of a ``torch.optim`` optimizer (empty otherwise)."""
    if not type(optimizer).__module__.startswith("torch.optim"):
        return set()
    ids = set()
    for state in optimizer.state.values():
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, Tensor) and step.dim() == 0 and step.device.type == "cpu":
            ids.add(id(step))
    return ids


@contextlib.contextmanager
def count_host_reads(exempt: set[int] | None = None) -> Iterator[HostReads]:
    """Count host reads inside the block; tensors whose id is in ``exempt`` are not syncs."""
    exempt = exempt or set()
    seen = HostReads()
    device_reads = 0  # Python-level reads of accelerator tensors (the debug mode sees them too)
    originals = {name: getattr(Tensor, name) for name in (*_READERS, "cpu")}

    def wrap(name: str):
        original = originals[name]

        def reader(self: Tensor, *args, **kwargs):
            nonlocal device_reads
            device_reads += self.device.type != "cpu"
            seen.record(name, id(self) not in exempt)
            return original(self, *args, **kwargs)

        return reader

    def cpu(self: Tensor, *args, **kwargs):
        nonlocal device_reads
        if self.device.type != "cpu":
            device_reads += 1
            seen.record("cpu", True)
        return originals["cpu"](self, *args, **kwargs)

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else 0
    try:
        for name in _READERS:
            setattr(Tensor, name, wrap(name))
        Tensor.cpu = cpu
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            yield seen
            if cuda:
                torch.cuda.set_sync_debug_mode(previous_mode)
        kernel_syncs = sum("synchroniz" in str(w.message) for w in caught)
        for _ in range(max(0, kernel_syncs - device_reads)):  # syncs made inside kernels
            seen.record("kernel", True)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)
        for name, original in originals.items():
            setattr(Tensor, name, original)
