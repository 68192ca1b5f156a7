"""ONNX models: the float initializers of the graph, read without the onnx package.

An ONNX file is a protobuf `ModelProto`; its `graph` (field 7) lists `initializer` tensors
(field 5, `TensorProto`): `dims` (1), `data_type` (2), `name` (8) and the values in `raw_data`
(9, little-endian), `float_data` (4), `double_data` (10), `int32_data` (5, float16/bfloat16 bit
patterns) or, for models over 2 GB, in an external file (`external_data` (13) with `location`,
`offset`, `length`; `data_location` (14) = EXTERNAL). Only the fields needed are parsed, every
length is checked against its enclosing message and the file, and nothing is copied until a
tensor is loaded. External files must lie in the model's folder.

Initializers are offered under their own names and shapes. Exporters that turn linear layers
into MatMul store their weights transposed ([in, out]) and often under generated names
(`onnx::MatMul_123`); those are not mapped back to Hugging Face names here.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..canonical import to_float32
from ..errors import FormatError, InputFileError
from . import looks_like_safetensors, register_sniffer
from .base import TensorMeta

__all__ = ["ONNXModel", "open_onnx"]

# onnx.TensorProto.DataType -> (our dtype name, numpy storage dtype)
DATA_TYPES = {
    1: ("F32", np.dtype("<f4")),
    10: ("F16", np.dtype("<u2")),
    11: ("F64", np.dtype("<f8")),
    16: ("BF16", np.dtype("<u2")),
}
_MAX_DIMS = 64
_MAX_NAME = 1 << 16
_MAX_EXTERNAL_KEYS = 16

_SECOND_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72})

# wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class _Reader:
    """Bounds-checked protobuf field reads over a byte span of the mapped file."""

    def __init__(self, path: Path, data: mmap.mmap | bytes, start: int, end: int) -> None:
        self.path, self.data, self.pos, self.end = path, data, start, end

    def error(self, problem: str) -> FormatError:
        return FormatError(self.path, f"ONNX protobuf: {problem}")

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= self.end:
                raise self.error(f"varint runs past its message at byte {self.pos}")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift >= 70:
                raise self.error(f"varint longer than 10 bytes at byte {self.pos}")

    def fields(self):  # noqa: ANN201 - a generator of (field, wire type, value or (start, end))
        """(field number, wire type, value): varints and fixed values as ints, length-delimited
        fields as their (start, end) span, checked against the enclosing message."""
        while self.pos < self.end:
            key = self.varint()
            field, wire = key >> 3, key & 7
            if field == 0:
                raise self.error(f"field number 0 at byte {self.pos}")
            if wire == _VARINT:
                yield field, wire, self.varint()
            elif wire == _LEN:
                length = self.varint()
                if length > self.end - self.pos:
                    raise self.error(f"field {field} of {length} bytes at byte {self.pos} runs past its "
                                     f"message (ends at {self.end})")
                yield field, wire, (self.pos, self.pos + length)
                self.pos += length
            elif wire in (_I64, _I32):
                size = 8 if wire == _I64 else 4
                if size > self.end - self.pos:
                    raise self.error(f"fixed field {field} runs past its message at byte {self.pos}")
                value = int.from_bytes(self.data[self.pos : self.pos + size], "little")
                self.pos += size
                yield field, wire, value
            else:
                raise self.error(f"wire type {wire} (field {field}) is not supported")


@dataclass(frozen=True)
class _Initializer:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str  # "raw", "float_data", "double_data", "int32_data", "external"
    span: tuple[int, int]  # byte span in the model file (or in the external file)
    external: Path | None = None


def _packed_varints(reader: _Reader, span: tuple[int, int]) -> list[int]:
    sub = _Reader(reader.path, reader.data, *span)
    out = []
    while sub.pos < sub.end:
        out.append(sub.varint())
    return out


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class ONNXModel:
    """The float initializers of an ONNX model as canonical float32 tensors."""

    format = "onnx"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size == 0:
                    raise FormatError(path, "file is empty")
                self._map = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise InputFileError(path, f"cannot read: {exc.strerror}") from None
        self._size = size
        try:
            self._inits = self._parse()
        except BaseException:
            self._map.close()
            raise
        self._metas = {i.name: TensorMeta(i.name, i.shape, i.dtype, i.name) for i in self._inits.values()}

    def _parse(self) -> dict[str, _Initializer]:
        top = _Reader(self.path, self._map, 0, self._size)
        graph = None
        for field, wire, value in top.fields():
            if field == 7 and wire == _LEN:
                graph = value
        if graph is None:
            raise FormatError(self.path, "ONNX model has no graph")
        out: dict[str, _Initializer] = {}
        for field, wire, value in _Reader(self.path, self._map, *graph).fields():
            if field == 5 and wire == _LEN:
                init = self._tensor(value)
                if init is None:
                    continue
                if init.name in out:
                    raise FormatError(self.path, f"initializer {init.name!r} appears twice")
                out[init.name] = init
        return out

    def _tensor(self, span: tuple[int, int]) -> _Initializer | None:
        reader = _Reader(self.path, self._map, *span)
        dims: list[int] = []
        data_type, name, location = 0, None, 0
        sources: dict[str, tuple[int, int]] = {}
        external: dict[str, str] = {}
        for field, wire, value in reader.fields():
            if field == 1:
                dims += _packed_varints(reader, value) if wire == _LEN else [value]
                if len(dims) > _MAX_DIMS:
                    raise reader.error(f"tensor has more than {_MAX_DIMS} dims")
            elif field == 2 and wire == _VARINT:
                data_type = value
            elif field == 8 and wire == _LEN:
                if value[1] - value[0] > _MAX_NAME:
                    raise reader.error(f"tensor name of {value[1] - value[0]} bytes")
                try:
                    name = bytes(self._map[value[0] : value[1]]).decode("utf-8")
                except UnicodeDecodeError:
                    raise reader.error(f"tensor name at byte {value[0]} is not UTF-8") from None
            elif field in (4, 5, 9, 10) and wire == _LEN:
                sources[{4: "float_data", 5: "int32_data", 9: "raw", 10: "double_data"}[field]] = value
            elif field == 13 and wire == _LEN:
                key = val = None
                for f, w, v in _Reader(self.path, self._map, *value).fields():
                    if w == _LEN and f in (1, 2) and v[1] - v[0] <= _MAX_NAME:
                        text = bytes(self._map[v[0] : v[1]]).decode("utf-8", "replace")
                        key, val = (text, val) if f == 1 else (key, text)
                if key is not None and val is not None:
                    external[key] = val
                if len(external) > _MAX_EXTERNAL_KEYS:
                    raise reader.error("tensor has too many external_data entries")
            elif field == 14 and wire == _VARINT:
                location = value
        if name is None:
            raise reader.error(f"initializer at byte {span[0]} has no name")
        if data_type not in DATA_TYPES:
            return None  # integer, boolean, string and 8-bit tensors are no carriers
        dims = [_signed64(d) for d in dims]
        if any(d < 0 for d in dims):
            raise FormatError(self.path, f"initializer {name!r}: negative dims {dims}")
        dtype, storage = DATA_TYPES[data_type]
        shape = tuple(dims)
        numel = math.prod(shape)
        if location == 1 or external:
            return self._external(name, dtype, shape, numel * storage.itemsize, external)
        for source in ("raw", "float_data", "double_data", "int32_data"):
            if source in sources:
                start, end = sources[source]
                if source == "int32_data":
                    if dtype not in ("F16", "BF16"):
                        raise FormatError(self.path, f"initializer {name!r}: int32_data holds no {dtype}")
                    return _Initializer(name, dtype, shape, source, (start, end))
                want = numel * (4 if source == "float_data" else 8 if source == "double_data" else storage.itemsize)
                if (source, dtype) not in (("raw", dtype), ("float_data", "F32"), ("double_data", "F64")):
                    raise FormatError(self.path, f"initializer {name!r}: {source} holds no {dtype}")
                if end - start != want:
                    raise FormatError(self.path, f"initializer {name!r}: {source} is {end - start} bytes, "
                                                 f"shape {list(shape)} of {dtype} needs {want}")
                return _Initializer(name, dtype, shape, source, (start, end))
        if numel == 0:
            return _Initializer(name, dtype, shape, "raw", (span[0], span[0]))
        raise FormatError(self.path, f"initializer {name!r} holds no data")

    def _external(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int,
                  external: dict[str, str]) -> _Initializer:
        where = external.get("location")
        if not where:
            raise FormatError(self.path, f"initializer {name!r}: external data without a location")
        rel = Path(where)
        if rel.is_absolute() or any(part in ("..", "") for part in rel.parts) or len(rel.parts) != 1:
            raise FormatError(self.path, f"initializer {name!r}: external location {where!r} is not a "
                                         "file name in the model's folder")
        file = self.path.parent / rel
        try:
            offset = int(external.get("offset", "0"))
            length = int(external.get("length", str(nbytes)))
        except ValueError:
            raise FormatError(self.path, f"initializer {name!r}: external offset/length are not integers") from None
        if length != nbytes or offset < 0:
            raise FormatError(self.path, f"initializer {name!r}: external length {length} at offset {offset}, "
                                         f"but shape {list(shape)} of {dtype} needs {nbytes} bytes")
        try:
            size = file.stat().st_size
        except OSError:
            raise FormatError(self.path, f"initializer {name!r}: external file {where!r} is missing") from None
        if offset + length > size:
            raise FormatError(file, f"initializer {name!r}: {length} bytes at offset {offset} run past the "
                                    f"end of the file ({size} bytes)")
        return _Initializer(name, dtype, shape, "external", (offset, offset + length), file)

    # ---------------------------------------------------------------------- reader protocol

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def load(self, name: str) -> np.ndarray:
        try:
            init = self._inits[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        start, end = init.span
        if init.source == "external":
            assert init.external is not None
            with open(init.external, "rb") as fh:
                fh.seek(start)
                buf = fh.read(end - start)
            if len(buf) != end - start:
                raise FormatError(init.external, f"initializer {name!r}: external data is truncated")
        else:
            buf = bytes(self._map[start:end])
        storage = DATA_TYPES[{"F32": 1, "F16": 10, "F64": 11, "BF16": 16}[init.dtype]][1]
        if init.source == "float_data":
            raw = np.frombuffer(buf, "<f4")
        elif init.source == "double_data":
            raw = np.frombuffer(buf, "<f8")
        elif init.source == "int32_data":
            values = _packed_varints(_Reader(self.path, buf, 0, len(buf)), (0, len(buf)))
            if len(values) != math.prod(init.shape) or any(v >> 16 for v in values):
                raise FormatError(self.path, f"initializer {name!r}: int32_data does not hold "
                                             f"{math.prod(init.shape)} 16-bit patterns")
            raw = np.array(values, dtype=np.uint16)
        else:
            raw = np.frombuffer(buf, storage)
        values32 = to_float32(init.dtype, raw.reshape(init.shape))
        return np.array(values32, dtype=np.float32, order="C", copy=True)

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> ONNXModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _looks_like_onnx(path: Path) -> bool:
    """ModelProto opens with ir_version (field 1, varint) = 1..30, then another of its fields
    (producer_name 2, producer_version 3, domain 4, model_version 5, doc_string 6, graph 7,
    opset_import 8, metadata_props 14)."""
    if looks_like_safetensors(path):
        return False  # a header length can start with the same bytes
    with open(path, "rb") as fh:
        head = fh.read(4)
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in _SECOND_TAGS


def open_onnx(path: str | Path) -> ONNXModel | None:
    """An ONNX model file (or a folder holding exactly one and no safetensors); None otherwise."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*.safetensors")):
            return None
        models = sorted(p for p in path.glob("*.onnx") if p.is_file())
        if not models:
            return None
        if len(models) > 1:
            raise FormatError(path, f"holds {len(models)} ONNX models ({', '.join(p.name for p in models[:4])}); "
                                    "scan one file")
        path = models[0]
    if not path.is_file() or not _looks_like_onnx(path):
        return None
    return ONNXModel(path)


@register_sniffer("onnx", 14)
def _sniff(path: Path) -> ONNXModel | None:
    return open_onnx(path)
