"""Crash-safe checkpoints: written whole or not at all, checked before they are loaded.

A process killed while it writes a checkpoint must never leave something that a later
``--resume_from_checkpoint latest`` picks up, and a damaged file must fail with one error
that names it (not a ``pickle``/``zipfile`` traceback from deep inside a loader). The
training CLIs of ``emo_hf``, ``emo_diffusers`` and ``emo_lightning`` share this module.

* Folders (HF, accelerate): write into ``staging_path(final)``, then ``commit_directory``
  records every file and its size in a manifest (``checkpoint_complete.json``), fsyncs the
  files, the manifest and the folder, and renames the folder into place. Where a framework
  writes the final folder itself, ``mark_complete`` adds the manifest, written last.
* Files (Lightning ``.ckpt``): ``atomic_write`` writes a temporary file in the same folder,
  fsyncs it and ``os.replace``-s it over the target.
* ``verify_checkpoint`` / ``verify_file``: the manifest's files are all there with their
  sizes, and each file is structurally whole: a ``torch.save`` archive passes its CRC check,
  a safetensors header matches the file size, JSON parses. Otherwise ``CorruptCheckpointError``
  (a ``ValueError``) names the file.
* ``find_latest_checkpoint`` / ``find_latest_file``: the newest checkpoint that verifies;
  each newer one that does not is skipped with an ``IncompleteCheckpointWarning`` naming it.

Only the standard library (and no framework): ``emo_core`` imports no framework.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "MANIFEST_NAME",
    "CorruptCheckpointError",
    "IncompleteCheckpointWarning",
    "atomic_write",
    "commit_directory",
    "find_latest_checkpoint",
    "find_latest_file",
    "mark_complete",
    "saved_optimizer_name",
    "staging_path",
    "NO_MANIFEST_WARNING",
    "verify_checkpoint",
    "verify_file",
    "verify_resume_checkpoint",
]

MANIFEST_NAME = "checkpoint_complete.json"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
_MANIFEST_FORMAT = 1


class CorruptCheckpointError(ValueError):
    """A checkpoint (or one of its files) is incomplete or damaged; the message names it."""


class IncompleteCheckpointWarning(UserWarning):
    """A newer checkpoint was skipped because it is incomplete or damaged."""


# ------------------------------------------------------------------------------ writing
def _fsync_path(path: Path) -> None:
    """Flush a file's or a folder's metadata to disk (folders: where the OS allows it)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _temporary_sibling(path: Path, tag: str) -> Path:
    """A hidden name next to ``path`` that no checkpoint pattern matches."""
    return path.with_name(f".{path.name}.{tag}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file whole or not at all: ``write(f)`` into a temporary sibling, then rename.

    A process killed inside ``write`` leaves only the hidden ``.<name>.<pid>.tmp``; the
    previous ``path``, if any, stays as it was until the rename replaces it.
    """
    path = Path(path)
    temporary = _temporary_sibling(path, f"{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


def staging_path(final: str | Path) -> Path:
    """Where the checkpoint folder ``final`` is written before ``commit_directory``.

    The same on every rank (all ranks of a run write their files into it).
    """
    return _temporary_sibling(Path(final), "partial")


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def mark_complete(directory: str | Path) -> Path:
    """Record ``directory`` as complete: fsync its files, then write the manifest last.

    The manifest lists every file with its size, so a file lost or cut short later is
    noticed too. Call it once every rank has finished writing into ``directory``.
    """
    directory = Path(directory)
    files = _files(directory)
    for file in files:
        _fsync_path(file)
    manifest = {
        "format": _MANIFEST_FORMAT,
        "files": {p.relative_to(directory).as_posix(): p.stat().st_size for p in files},
    }
    payload = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write(directory / MANIFEST_NAME, lambda handle: handle.write(payload))
    for folder in {p.parent for p in files}:
        _fsync_path(folder)
    return directory / MANIFEST_NAME


def commit_directory(staging: str | Path, final: str | Path) -> Path:
    """Mark ``staging`` complete and rename it to ``final`` (replacing an older ``final``)."""
    staging, final = Path(staging), Path(final)
    mark_complete(staging)
    if final.exists():  # a rename cannot replace a non-empty folder: move the old one aside
        replaced = _temporary_sibling(final, "replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_path(final.parent)
    return final


# ----------------------------------------------------------------------------- checking
def _check_torch_archive(path: Path) -> str | None:
    """Why ``path`` is not a whole ``torch.save`` zip archive, or None if it is.

    Damaged zip headers make :mod:`zipfile` raise more than ``BadZipFile`` (a flipped flag
    bit reads as "encrypted": RuntimeError; a flipped method as NotImplementedError; a
    flipped disk number: BadZipFile from ``is_zipfile`` itself): any error reading the
    archive is damage. The headers torch's own reader parses are checked by it too (it
    refuses some that :mod:`zipfile` accepts)."""
    try:
        if not zipfile.is_zipfile(path):
            return "not a torch.save archive (cut short, or other bytes)"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except Exception as error:  # noqa: BLE001 - whatever zipfile raises on damaged headers
        return f"damaged torch.save archive ({type(error).__name__}: {error})"
    if damaged is not None:
        return f"damaged torch.save archive (CRC mismatch in {damaged})"
    if not any(name.endswith("data.pkl") for name in names):
        return "a zip archive without data.pkl, not a torch.save archive"
    return _torch_reader_problem(path)


def _torch_reader_problem(path: Path) -> str | None:
    """Why torch's zip reader (what ``torch.load`` uses) refuses ``path``'s directory, or None."""
    try:
        import torch  # (this module reads files; torch only for this check)

        torch._C.PyTorchFileReader(str(path))  # parses the central directory, reads no data
    except ImportError:  # pragma: no cover - emo_core always has torch
        return None
    except Exception as error:  # noqa: BLE001 - the reader raises RuntimeError with its reason
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"damaged torch.save archive (torch cannot read it: {reason})"
    return None


def _check_safetensors(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (header vs size), or None if it is."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            return f"header of {header_size} bytes does not fit in {size} bytes (cut short?)"
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, ValueError):
            return "unreadable safetensors header"
    if not isinstance(header, dict):
        return "unreadable safetensors header"
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    expected = 8 + header_size + max(ends, default=0)
    if expected != size:
        return f"{size} bytes, but its header describes {expected} (cut short?)"
    return None


def _check_json(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as error:
        return f"invalid JSON ({error})"
    return None


def _problem(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in _TORCH_SUFFIXES:
        return _check_torch_archive(path)
    if suffix == ".safetensors":
        return _check_safetensors(path)
    if suffix == ".json":
        return _check_json(path)
    return None  # other formats: the manifest's size check only


def verify_file(path: str | Path) -> None:
    """Raise ``CorruptCheckpointError`` naming ``path`` unless it is a whole file.

    Checked by suffix: ``.pt/.pth/.bin/.pkl/.ckpt`` as ``torch.save`` archives (every
    member's CRC), ``.safetensors`` (header against the file size), ``.json`` (parses).
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpointError(f"Corrupt checkpoint: {path} is missing")
    problem = _problem(path)
    if problem is not None:
        raise CorruptCheckpointError(f"Corrupt checkpoint file {path}: {problem}")


def _manifest(directory: Path) -> dict[str, int] | None:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        return {str(name): int(size) for name, size in files.items()}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptCheckpointError(
            f"Corrupt checkpoint file {path}: unreadable manifest ({error})"
        ) from error


def verify_checkpoint(directory: str | Path, require_complete: bool = True) -> bool:
    """Check a checkpoint folder; ``CorruptCheckpointError`` names the first bad file.

    With a manifest: every file it lists must exist with its recorded size, and every file
    must pass ``verify_file``. Without one (written by an older version, or interrupted)
    it raises if ``require_complete``, else checks the files present. Returns whether the
    folder had a manifest.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CorruptCheckpointError(f"Corrupt checkpoint: {directory} is not a directory")
    manifest = _manifest(directory)
    if manifest is None and require_complete:
        raise CorruptCheckpointError(
            f"Incomplete checkpoint {directory}: no {MANIFEST_NAME} (the write was "
            "interrupted, or an older version wrote it)"
        )
    for name, size in (manifest or {}).items():
        file = directory / name
        if not file.is_file():
            raise CorruptCheckpointError(f"Corrupt checkpoint: {file} is missing")
        if file.stat().st_size != size:
            raise CorruptCheckpointError(
                f"Corrupt checkpoint file {file}: {file.stat().st_size} bytes, "
                f"{size} when it was written"
            )
    for file in _files(directory):
        verify_file(file)
    return manifest is not None


NO_MANIFEST_WARNING = (
    "%s has no completion manifest (written by an older version, or its write was "
    "interrupted); its files look whole, loading it."
)
"""Logged by the adapters (``logger.warning(NO_MANIFEST_WARNING, path)``) when an explicit
resume path passes :func:`verify_resume_checkpoint` without a manifest."""


def verify_resume_checkpoint(directory: str | Path) -> bool:
    """:func:`verify_checkpoint` for a folder the user asked to resume from.

    A damaged file raises ``CorruptCheckpointError`` naming it and the fix; a folder without
    a manifest is accepted when its files are whole. Returns whether it had a manifest.
    """
    try:
        return verify_checkpoint(directory, require_complete=False)
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(
            f"Invalid resume_from_checkpoint: {error}. Resume from an earlier checkpoint "
            "(or 'latest', which skips damaged ones)."
        ) from None


# ------------------------------------------------------------------------------ finding
def _newest_valid(candidates: Iterable[Path], check: Callable[[Path], object]) -> Path | None:
    for candidate in candidates:
        try:
            check(candidate)
        except CorruptCheckpointError as error:
            warnings.warn(
                f"Skipping checkpoint {candidate}: {error}. Resuming from the newest "
                "complete one instead.",
                IncompleteCheckpointWarning,
                stacklevel=3,
            )
            continue
        return candidate
    return None


def find_latest_checkpoint(root: str | Path, prefix: str = "checkpoint-") -> Path | None:
    """The ``<prefix><step>`` folder in ``root`` with the highest step that verifies.

    Newer folders that are incomplete or damaged are skipped, each with an
    ``IncompleteCheckpointWarning`` naming it and why. None if no folder verifies.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    steps = {
        int(p.name[len(prefix) :]): p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(prefix) and p.name[len(prefix) :].isdigit()
    }
    ordered = [steps[step] for step in sorted(steps, reverse=True)]
    return _newest_valid(ordered, verify_checkpoint)


def find_latest_file(
    roots: str | Path | Iterable[str | Path], pattern: str = "*.ckpt"
) -> Path | None:
    """The most recently written file matching ``pattern`` under ``roots`` that verifies.

    Newer files that are damaged are skipped with an ``IncompleteCheckpointWarning``.
    """
    roots = [roots] if isinstance(roots, str | Path) else list(roots)
    files = {
        p.resolve()
        for root in map(Path, roots)
        if root.is_dir()
        for p in root.rglob(pattern)
        if p.is_file() and not p.name.startswith(".")
    }
    ordered = sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    return _newest_valid(ordered, verify_file)


def saved_optimizer_name(path: str | Path) -> str | None:
    """The Emo optimizer whose ``state_dict()`` the file ``path`` holds (``"EmoSens"``), or
    None for any other file: an adapter resuming with another optimizer names it in its
    error instead of that optimizer's bare ``KeyError``."""
    import torch  # (this module reads files; torch only for this one)

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return str(saved["param_groups"][0]["emo_state"]["optimizer"])
    except Exception:  # noqa: BLE001 - unreadable, or not an Emo optimizer's state
        return None
