"""Write torch.save-style zip checkpoints without torch, opcode by opcode, for the tests.

`save_state_dict` writes what torch.save writes for a state dict of float tensors (protocol 2
pickle, `torch._utils._rebuild_tensor_v2`, legacy storage classes, stored
members); `write_archive` wraps any hand-made pickle (hostile ones included) in the same zip
layout. The real-torch fixtures under tests/data/torch/ and the peer test check that our
reader agrees with torch itself; this writer lets the default suite build large cases.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

STORAGES = {"F32": "FloatStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage", "F64": "DoubleStorage",
            "I64": "LongStorage"}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}


def global_op(module: str, name: str) -> bytes:
    """GLOBAL: push module.name (looked up by the unpickler's find_class)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(value: int) -> bytes:
    if 0 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def int_tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(integer(v) for v in values) + b"t"


def tensor_op(key: str, dtype: str, numel: int, offset: int, shape: tuple[int, ...],
              stride: tuple[int, ...]) -> bytes:
    """The opcodes torch writes for one tensor: _rebuild_tensor_v2(persistent storage, ...)."""
    pid = b"(" + unicode("storage") + global_op("torch", STORAGES[dtype]) + unicode(key) + unicode("cpu") + integer(numel) + b"t"
    return (global_op("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"Q" + integer(offset) + int_tuple(shape)
            + int_tuple(stride) + b"\x89" + global_op("collections", "OrderedDict") + b")R" + b"t" + b"R")


def state_dict_pickle(entries: list[tuple[str, bytes]]) -> bytes:
    """OrderedDict(name -> the object that `op` pushes), protocol 2."""
    body = b"".join(unicode(name) + op for name, op in entries)
    return b"\x80\x02" + global_op("collections", "OrderedDict") + b")R" + b"(" + body + b"u."


def write_archive(path: Path, pickle_bytes: bytes, storages: dict[str, bytes], prefix: str = "archive",
                  compress: bool = False) -> Path:
    """A torch.save zip: PREFIX/data.pkl, PREFIX/data/KEY, byteorder and version members."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", pickle_bytes)
        archive.writestr(f"{prefix}/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(zipfile.ZipInfo(f"{prefix}/data/{key}"), data, compress_type=method)
        archive.writestr(f"{prefix}/version", "3\n")
    return path


def _storage_bytes(dtype: str, values: np.ndarray) -> bytes:
    if dtype in ("F16", "BF16"):
        if values.dtype != np.uint16:
            raise ValueError(f"{dtype} tensors are given as uint16 bit patterns")
        return values.astype("<u2").tobytes()
    return values.astype({"F32": "<f4", "F64": "<f8", "I64": "<i8"}[dtype]).tobytes()


def save_state_dict(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    """torch.save(state_dict) for name -> (dtype, array): contiguous tensors, one storage each
    (F16/BF16 arrays are their uint16 bit patterns)."""
    entries, storages = [], {}
    for key, (name, (dtype, values)) in enumerate(tensors.items()):
        shape = tuple(int(n) for n in values.shape)
        stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        entries.append((name, tensor_op(str(key), dtype, int(values.size), 0, shape, stride)))
        storages[str(key)] = _storage_bytes(dtype, np.ascontiguousarray(values))
    return write_archive(path, state_dict_pickle(entries), storages, prefix=path.stem)
