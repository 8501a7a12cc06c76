"""Where a benchmark ran: CPU model, threads, device, versions (printed with every table)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

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


_PACKAGE_DIR = Path(__file__).resolve().parent
# A clone keeps its results next to the code (the committed tables); an installed package
# must not write into site-packages, so it writes to the working directory instead.
RUNNING_FROM_CLONE = (_PACKAGE_DIR.parent / "pyproject.toml").is_file()
RESULTS_DIR = _PACKAGE_DIR / "results" if RUNNING_FROM_CLONE else Path("emo-bench-results")


def _source_revision() -> str:
    """``git`` commit of the checkout the benchmark runs from, ``+dirty`` if edited; an
    installed package is no checkout ("installed"; a virtualenv inside the user's own
    repository would otherwise report that repository's commit)."""
    root = _PACKAGE_DIR.parent
    if not RUNNING_FROM_CLONE:
        return "installed"

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "emo_core")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def describe_machine(device: torch.device) -> dict[str, str | int | float]:
    """A small dict that names the hardware and software a result was measured on.

    ``load_avg`` is the 1-minute load average when the benchmark finished: on a shared
    machine it says how much other work competed for the cores.
    """
    import emo_core

    info: dict[str, str | int | float] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "device": str(device),
        "emo": f"{emo_core.__version__} ({_source_revision()})",
        "load_avg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else -1.0,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict[str, str | int]) -> str:
    """One markdown line for the report header."""
    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores"
    return (
        f"{where}; device `{info['device']}`, torch {info['torch']} "
        f"({info['torch_threads']} thread{'s' if info['torch_threads'] != 1 else ''}), Python {info['python']}, {info['os']}; "
        f"emo {info['emo']}; 1-min load average {info['load_avg']} at the end"
    )
