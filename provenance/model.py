"""Registering a base model: its canonical manifest id, carriers and per-row RMS table."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from weightmark.canonical import as_2d, to_float32
from weightmark.errors import InputFileError
from weightmark.formats.safetensors import Checkpoint
from weightmark.registry.store import Carrier
from weightmark.scheme import is_carrier, row_rms

Progress = Callable[[int], None]


def file_stats(ckpt: Checkpoint) -> dict[str, dict[str, int]]:
    """Size and mtime of each weight file: a cheap check that the base has not changed."""
    stats = {}
    for shard in ckpt.shards:
        st = shard.path.stat()
        stats[str(shard.path.relative_to(ckpt.root))] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return stats


def manifest_id(ckpt: Checkpoint, progress: Progress | None = None) -> str:
    """SHA-256 over the sorted (name, dtype, shape, SHA-256 of bytes) of every tensor.

    The same weights give the same id whatever the file layout or sharding.
    """
    lines = []
    for name in sorted(ckpt.tensors):
        info = ckpt.info(name)
        digest = hashlib.sha256(ckpt.raw(name).data if info.nbytes else b"").hexdigest()
        ckpt.release(name)
        lines.append([name, info.dtype, list(info.shape), digest])
        if progress:
            progress(info.nbytes)
    return hashlib.sha256(json.dumps(lines, separators=(",", ":")).encode()).hexdigest()


def carriers_of(ckpt: Checkpoint, progress: Progress | None = None) -> list[Carrier]:
    """Every carrier tensor with its base row-RMS table, in the checkpoint's order."""
    out = []
    for name, (_, info) in ckpt.tensors.items():
        if not is_carrier(info.dtype, info.shape):
            continue
        rms = row_rms(as_2d(ckpt.raw(name)), lambda block, dtype=info.dtype: to_float32(dtype, block))
        out.append(Carrier(name, info.dtype, tuple(info.shape), rms))
        ckpt.release(name)
        if progress:
            progress(info.nbytes)
    return out


def open_base(path: str | Path) -> Checkpoint:
    ckpt = Checkpoint.open(path)
    if not any(is_carrier(i.dtype, i.shape) for _, i in ckpt.tensors.values()):
        ckpt.close()
        raise InputFileError(path, "no tensor can carry a watermark (need float tensors of rank >= 2 with >= 4096 elements)")
    return ckpt
