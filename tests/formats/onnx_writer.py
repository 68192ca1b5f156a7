"""Write minimal ONNX models without the onnx package, for the tests: a ModelProto whose graph
holds the given float initializers as raw_data (the real onnx package writes the fixtures
under tests/data/onnx/; this writer lets the default suite build large and broken cases)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA_TYPES = {"F32": 1, "F16": 10, "F64": 11, "BF16": 16}


def varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes | int) -> bytes:
    """A varint field (int) or a length-delimited one (bytes)."""
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def tensor_proto(name: str, dtype: str, values: np.ndarray, raw: bytes | None = None,
                 extra: bytes = b"") -> bytes:
    """A TensorProto with raw_data (F16/BF16 values given as uint16 bit patterns)."""
    dims = b"".join(varint(int(d)) for d in values.shape)
    data = raw if raw is not None else np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<")).tobytes()
    return field(1, dims) + field(2, DATA_TYPES[dtype]) + field(8, name.encode()) + field(9, data) + extra


def model_proto(initializers: list[bytes], graph_extra: bytes = b"") -> bytes:
    graph = field(2, b"leak") + b"".join(field(5, t) for t in initializers) + graph_extra
    return field(1, 8) + field(2, b"weightmark-tests") + field(7, graph) + field(8, field(2, 17))


def save_onnx(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    path.write_bytes(model_proto([tensor_proto(name, dtype, values) for name, (dtype, values) in tensors.items()]))
    return path
