"""``emo_configs``: the ready-to-run configs, shipped in the wheel, and how the CLIs find them.

In a clone this is the repository's ``configs/`` folder; installed, it is the ``emo_configs``
package. ``resolve_config`` lets every CLI take an existing path, or a shipped config by name:
``tiny_sd3_lora``, ``diffusers/tiny_sd3_lora.yaml`` and ``configs/diffusers/tiny_sd3_lora.yaml``
all name the same file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["ConfigNotFoundError", "resolve_config", "shipped_configs"]

_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigNotFoundError(FileNotFoundError):
    """Neither a file nor a shipped config; the message lists the shipped names."""


def shipped_configs(kind: str | None = None) -> dict[str, Path]:
    """``{"diffusers/tiny_sd3_lora.yaml": path, ...}``; only ``kind``'s folder when given."""
    root = resources.files(__name__)
    found: dict[str, Path] = {}
    for folder in sorted(root.iterdir(), key=lambda f: f.name):
        if not folder.is_dir() or (kind is not None and folder.name != kind):
            continue
        for entry in sorted(folder.iterdir(), key=lambda f: f.name):
            if entry.name.endswith(_SUFFIXES):
                found[f"{folder.name}/{entry.name}"] = Path(str(entry))
    return found


def resolve_config(value: str | Path, kind: str) -> Path:
    """The config file ``value`` names: an existing path, else a shipped config of ``kind``.

    ``kind`` is the CLI's folder (``"diffusers"``, ``"hf"``, ``"lightning"``). A name may omit
    the folder, the suffix and a leading ``configs/``.

    Raises:
        ConfigNotFoundError: no such file and no such shipped config (lists the shipped names).
    """
    path = Path(value)
    if path.is_file():
        return path
    shipped = shipped_configs(kind)
    name = path.as_posix().removeprefix("./").removeprefix("configs/")
    for candidate in (name, f"{kind}/{name}"):
        for suffix in ("", *_SUFFIXES):
            if candidate + suffix in shipped:
                return shipped[candidate + suffix]
    names = ", ".join(Path(n).stem for n in shipped) or "none"
    raise ConfigNotFoundError(
        f"{str(value)!r} is neither a file nor a shipped {kind} config (shipped: {names}; "
        "pass a path or one of these names)"
    )
