"""emo_core.checkpoint: folders and files written whole or not at all, damage named (real files)."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from emo_core.checkpoint import (
    MANIFEST_NAME,
    CorruptCheckpointError,
    IncompleteCheckpointWarning,
    atomic_write,
    commit_directory,
    find_latest_checkpoint,
    find_latest_file,
    staging_path,
    verify_checkpoint,
    verify_file,
)


def _safetensors(path: Path, values: list[float]) -> Path:
    """A real safetensors file (the format is simple enough to write by hand)."""
    data = struct.pack(f"<{len(values)}f", *values)
    header = {"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _write_checkpoint(root: Path, step: int) -> Path:
    final = root / f"checkpoint-{step}"
    staging = staging_path(final)
    staging.mkdir(parents=True)
    torch.save({"step": step, "exp_avg": torch.randn(64)}, staging / "optimizer.bin")
    _safetensors(staging / "trainable_0.safetensors", [float(step)] * 8)
    (staging / "state.json").write_text(json.dumps({"step": step}))
    return commit_directory(staging, final)


def _flip_tensor_byte(archive: bytes) -> bytes:
    """Flip one byte inside the stored tensor (``data/0``) of a ``torch.save`` archive."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    name_len, extra_len = struct.unpack(
        "<HH", archive[info.header_offset + 26 : info.header_offset + 30]
    )
    at = info.header_offset + 30 + name_len + extra_len + 5
    return archive[:at] + bytes([archive[at] ^ 0xFF]) + archive[at + 1 :]


# Each kind of damage a killed write or a disk leaves, and the file the error must name.
DAMAGE = {
    "truncated torch archive": ("optimizer.bin", lambda b: b[: len(b) // 2]),
    "random bytes": ("optimizer.bin", lambda b: bytes(torch.randint(0, 256, (len(b),), dtype=torch.uint8).tolist())),
    "flipped byte in tensor data": ("optimizer.bin", _flip_tensor_byte),
    "truncated safetensors": ("trainable_0.safetensors", lambda b: b[:-4]),
    "empty safetensors": ("trainable_0.safetensors", lambda b: b""),
    "half a json": ("state.json", lambda b: b[:5]),
}  # fmt: skip


def test_committed_checkpoint_verifies_and_leaves_no_staging(tmp_path: Path) -> None:
    final = _write_checkpoint(tmp_path, 10)
    assert verify_checkpoint(final) is True
    manifest = json.loads((final / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"optimizer.bin", "trainable_0.safetensors", "state.json"}
    assert not staging_path(final).exists()
    assert torch.load(final / "optimizer.bin", weights_only=True)["step"] == 10


def test_recommit_replaces_the_old_folder(tmp_path: Path) -> None:
    _write_checkpoint(tmp_path, 10)
    staging = staging_path(tmp_path / "checkpoint-10")
    staging.mkdir()
    torch.save({"step": 11}, staging / "optimizer.bin")
    commit_directory(staging, tmp_path / "checkpoint-10")
    assert sorted(p.name for p in (tmp_path / "checkpoint-10").iterdir()) == [
        MANIFEST_NAME,
        "optimizer.bin",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-10"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_file_is_named(tmp_path: Path, damage: str) -> None:
    final = _write_checkpoint(tmp_path, 10)
    name, corrupt = DAMAGE[damage]
    path = final / name
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=name):
        verify_checkpoint(final)
    if damage != "truncated safetensors":  # also caught without the manifest's sizes
        with pytest.raises(CorruptCheckpointError, match=name):
            verify_file(path)


def _flip_header_bit(archive: bytes, signature: bytes, offset: int) -> bytes:
    """Flip the lowest bit of the byte ``offset`` bytes into the first zip record that starts
    with ``signature`` (a header field: no CRC covers it)."""
    at = archive.index(signature) + offset
    return archive[:at] + bytes([archive[at] ^ 0x01]) + archive[at + 1 :]


# One bit of a header field: zipfile raised RuntimeError ("encrypted"), NotImplementedError
# (compression method) or BadZipFile from is_zipfile (disk number), which verify_file let
# through bare (find_latest_file crashed instead of skipping the file); the compressed-size
# byte passed zipfile's check and failed in torch.load (torch's reader checks it).
HEADER_DAMAGE = {
    "encryption flag": (b"PK\x01\x02", 8),
    "compression method": (b"PK\x01\x02", 10),
    "compressed size": (b"PK\x01\x02", 22),
    "zip64 disk number": (b"PK\x06\x07", 4),
}


@pytest.mark.parametrize("field", list(HEADER_DAMAGE))
def test_damaged_zip_header_is_named_and_latest_skips_it(tmp_path: Path, field: str) -> None:
    older, newer = tmp_path / "epoch=0.ckpt", tmp_path / "epoch=1.ckpt"
    torch.save({"step": 1, "exp_avg": torch.randn(64)}, older)
    signature, offset = HEADER_DAMAGE[field]
    whole = older.read_bytes()
    if signature not in whole:
        pytest.skip(f"this torch writes no {signature!r} record")
    newer.write_bytes(_flip_header_bit(whole, signature, offset))
    with pytest.raises(CorruptCheckpointError, match="epoch=1.ckpt"):
        verify_file(newer)
    with pytest.warns(IncompleteCheckpointWarning, match="epoch=1.ckpt"):
        assert find_latest_file(tmp_path) == older.resolve()


def test_missing_file_and_missing_manifest(tmp_path: Path) -> None:
    final = _write_checkpoint(tmp_path, 10)
    (final / "state.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="state.json is missing"):
        verify_checkpoint(final)
    (final / MANIFEST_NAME).unlink()
    with pytest.raises(CorruptCheckpointError, match="no checkpoint_complete.json"):
        verify_checkpoint(final)
    assert verify_checkpoint(final, require_complete=False) is False  # the files are whole


def test_latest_skips_interrupted_writes_with_a_warning_naming_them(tmp_path: Path) -> None:
    _write_checkpoint(tmp_path, 10)
    _write_checkpoint(tmp_path, 20)
    # A write interrupted the old way: the final folder, half its files, no manifest.
    half = tmp_path / "checkpoint-30"
    half.mkdir()
    _safetensors(half / "trainable_0.safetensors", [1.0])
    # A write interrupted the new way: only the staging folder.
    staging_path(tmp_path / "checkpoint-40").mkdir()
    # A complete one damaged afterwards.
    damaged = _write_checkpoint(tmp_path, 25)
    (damaged / "optimizer.bin").write_bytes(b"\0" * 100)

    with pytest.warns(IncompleteCheckpointWarning) as caught:
        assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "checkpoint-30" in messages[0] and "no checkpoint_complete.json" in messages[0]
    assert "checkpoint-25" in messages[1] and "optimizer.bin" in messages[1]


def test_latest_of_nothing_complete_is_none(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "absent") is None
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.warns(IncompleteCheckpointWarning, match="checkpoint-5"):
        assert find_latest_checkpoint(tmp_path) is None


def test_atomic_write_interrupted_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "epoch=0.ckpt"
    atomic_write(path, lambda f: torch.save({"epoch": 0}, f))

    def interrupted(handle) -> None:
        handle.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt  # what a signal does in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_latest_file_is_the_newest_whole_one(tmp_path: Path) -> None:
    older, newer = tmp_path / "a" / "epoch=0.ckpt", tmp_path / "b" / "epoch=1.ckpt"
    for path in (older, newer):
        path.parent.mkdir()
        atomic_write(path, lambda f, p=path: torch.save({"name": p.name}, f))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_latest_file(tmp_path) == newer.resolve()
    newer.write_bytes(newer.read_bytes()[:100])
    with pytest.warns(IncompleteCheckpointWarning, match="epoch=1.ckpt"):
        assert find_latest_file([tmp_path / "a", tmp_path / "b"]) == older.resolve()
