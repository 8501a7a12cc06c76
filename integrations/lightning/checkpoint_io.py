"""``CrashSafeCheckpointIO`` and ``resolve_ckpt_path``: ``.ckpt`` files written whole, checked.

Lightning's ``TorchCheckpointIO`` stages a checkpoint in the system temp folder and moves
it into place; across filesystems that move is a copy, and nothing is fsynced. This
``CheckpointIO`` writes next to the target and renames (``emo_core.checkpoint``), so a
``.ckpt`` file is whole or absent, and checks a file before loading it, so a damaged one
fails with one error that names it. ``resolve_ckpt_path("latest", trainer)`` is the
newest ``.ckpt`` that is whole, warning about each newer damaged one it skips.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from emo_core.checkpoint import (
    CorruptCheckpointError,
    atomic_write,
    find_latest_file,
    verify_file,
)

__all__ = ["CrashSafeCheckpointIO", "check_ckpt_file", "resolve_ckpt_path"]


def _is_local(path: Any) -> bool:
    return get_filesystem(str(path)).protocol in ("file", ("file", "local"), "local")


class CrashSafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes atomically and checks files before loading them.

    Remote paths (``s3://``...) fall back to Lightning's own handling.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda handle: torch.save(checkpoint, handle))

    @override
    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        check_ckpt_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def check_ckpt_file(path: Any) -> None:
    """``CorruptCheckpointError`` naming ``path`` if it is a local file that is not whole."""
    if path is None or not _is_local(path) or not Path(path).is_file():
        return  # remote, or missing: Lightning's own errors apply
    try:
        verify_file(path)
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(
            f"Invalid ckpt_path: {error}. Resume from an earlier checkpoint (or "
            "ckpt_path='latest' in emo_lightning.example, which skips damaged ones)."
        ) from None


def resolve_ckpt_path(ckpt_path: Any, trainer: Any) -> Any:
    """``"latest"``: the newest whole ``.ckpt`` under ``default_root_dir`` and the
    checkpoint folders; anything else is returned as given.

    Newer damaged files are skipped, each with a warning naming it; None (with a warning,
    the run starts fresh) if there is no whole one.
    """
    if ckpt_path != "latest":
        return ckpt_path
    roots = {Path(trainer.default_root_dir)}
    roots |= {
        Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint) and cb.dirpath
    }  # fmt: skip
    path = find_latest_file(roots, "*.ckpt")
    if path is None:
        rank_zero_warn(f"ckpt_path='latest': no checkpoint in {sorted(map(str, roots))}; "
                       "starting a new run.")  # fmt: skip
        return None
    return str(path)
