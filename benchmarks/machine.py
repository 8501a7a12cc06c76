"""Where a benchmark ran: CPU model, threads, device, versions (printed with every table)."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["describe_machine", "machine_line", "set_threads"]


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (default: all cores) so runs are comparable."""
    count = threads or os.cpu_count() or 1
    if count < 1:
        raise ValueError(f"Invalid --threads: {threads} (expected >= 1)")
    torch.set_num_threads(count)
    return count


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, str | int]:
    """A small dict that names the hardware and software a result was measured on."""
    info: dict[str, str | int] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict[str, str | int]) -> str:
    """One markdown line for the report header."""
    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores"
    return (
        f"{where}; device `{info['device']}`, torch {info['torch']} "
        f"({info['torch_threads']} threads), Python {info['python']}, {info['os']}"
    )
