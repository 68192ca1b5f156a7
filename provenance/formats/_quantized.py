"""What the quantized safetensors readers share: the checkpoint view, unpacking helpers,
config parsing, the reader base class, and the table of registered quantization families.

Each family that Hugging Face's `quantization_config.quant_method` names lives in its own module
(gptq, awq, compressed_tensors, bitsandbytes) and registers its reader here with
`register_reader`; `open_quantized` picks one from the folder's config or, without one, from
the tensor names. MLX folders (their own `quantization` config) reuse the reader base class
and register a sniffer of their own (formats/mlx.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..canonical import to_float32
from ..errors import FormatError, InputFileError
from .base import QuantizedModel, TensorMeta
from .safetensors import FLOAT_DTYPES, Checkpoint, TensorInfo, _parse_json, _show

CONFIG = "config.json"
GPTQ_CONFIG = "quantize_config.json"
CHUNK = 1 << 22  # elements decoded per step: bounds the temporaries of one tensor's decode

INT_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})



def fp8_e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 FP8 E4M3 (fn) codes: bias 7, no infinities, NaN = S.1111.111."""
    codes = np.arange(256, dtype=np.int64)
    exponent = (codes >> 3) & 0xF
    mantissa = codes & 0x7
    magnitude = np.where(
        exponent == 0,
        np.ldexp(mantissa.astype(np.float64), -9),  # subnormal: m/8 * 2^-6
        np.ldexp((8 + mantissa).astype(np.float64), (exponent - 10).astype(np.int32)),
    )
    magnitude[(codes & 0x7F) == 0x7F] = np.nan
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)


def fp8_e5m2_table() -> np.ndarray:
    """float32 value of each FP8 E5M2 code (the high byte of an IEEE half)."""
    return (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float32)


_FP8_TABLES = {"F8_E4M3": fp8_e4m3_table(), "F8_E5M2": fp8_e5m2_table()}


# --------------------------------------------------------------------------------------------
# Source: the checkpoint plus what we know about it, and error helpers naming the right file


@dataclass
class _Source:
    ckpt: Checkpoint
    path: Path
    config_path: Path | None
    qc: dict[str, Any] | None
    metadata: dict[str, str]

    def has(self, name: str) -> bool:
        return name in self.ckpt.tensors

    def file(self, name: str) -> Path:
        entry = self.ckpt.tensors.get(name)
        return entry[0].path if entry is not None else self.path

    def error(self, name: str, problem: str) -> FormatError:
        return FormatError(self.file(name), f"tensor {_show(name, 200)}: {problem}")

    def config_error(self, problem: str) -> FormatError:
        return FormatError(self.config_path or self.path, problem)

    def info(self, name: str) -> TensorInfo:
        return self.ckpt.info(name)

    def raw(self, name: str) -> np.ndarray:
        return self.ckpt.raw(name)

    def need(self, layer: str, name: str) -> TensorInfo:
        if not self.has(name):
            raise self.error(layer, f"companion tensor {_show(name)} is missing")
        return self.info(name)

    def expect(
        self, name: str, dtypes: Iterable[str], ndim: int | None = None, what: str = ""
    ) -> TensorInfo:
        info = self.info(name)
        allowed = frozenset(dtypes)
        if info.dtype not in allowed:
            want = " or ".join(sorted(allowed))
            raise self.error(name, f"{what}dtype {info.dtype} is not {want}")
        if ndim is not None and len(info.shape) != ndim:
            raise self.error(name, f"{what}shape {list(info.shape)} is not {ndim}-D")
        return info

    def small_ints(self, name: str, limit: int = 64) -> list[int]:
        info = self.expect(name, INT_DTYPES)
        if info.numel > limit:
            raise self.error(name, f"holds {info.numel} values, expected at most {limit}")
        return [int(v) for v in self.raw(name).reshape(-1)]


def _float_values(src: _Source, name: str) -> np.ndarray:
    """A scale / zero-point tensor as float32 values (floats, FP8 codes and integers)."""
    info = src.info(name)
    raw = src.raw(name)
    if info.dtype in FLOAT_DTYPES:
        return np.asarray(to_float32(info.dtype, raw), dtype=np.float32)
    if info.dtype in FP8_DTYPES:
        return np.take(_FP8_TABLES[info.dtype], raw)
    if info.dtype in INT_DTYPES:
        return raw.astype(np.float32)
    raise src.error(name, f"dtype {info.dtype} cannot hold scales or zero points")


# --------------------------------------------------------------------------------------------
# Bit unpacking (numpy, vectorised over one block of words at a time)


def _mask(bits: int) -> np.uint32:
    return np.uint32((1 << bits) - 1)


def _unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """Words packed along axis 0 ([R, C] int32, low bits first) -> fields [R * 32//bits, C]."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits))[:, None]
    u = np.ascontiguousarray(words).view(np.uint32)
    fields = (u[:, None, :] >> shifts) & _mask(bits)
    return fields.reshape(u.shape[0] * per, u.shape[1])


def _unpack_cols(words: np.ndarray, bits: int, order: Iterable[int] | None = None) -> np.ndarray:
    """Words packed along the last axis -> fields [..., C * 32//bits].

    Field j of each word is taken from slot `order[j]` (slot k = bits k*b .. k*b+b-1); the
    default order is low bits first.
    """
    per = 32 // bits
    slots = np.arange(per, dtype=np.uint32) if order is None else np.array(order, np.uint32)
    shifts = slots * np.uint32(bits)
    u = np.ascontiguousarray(words).view(np.uint32)
    fields = (u[..., None] >> shifts) & _mask(bits)
    return fields.reshape(*u.shape[:-1], u.shape[-1] * per)


@functools.cache
def _byte_fields(bits: int, offset: int = 0) -> np.ndarray:
    """[256, 8 // bits] float32: the fields of each byte value, low bits first, minus offset."""
    per = 8 // bits
    byte = np.arange(256, dtype=np.int64)[:, None]
    fields = (byte >> (np.arange(per) * bits)) & ((1 << bits) - 1)
    table = (fields - offset).astype(np.float32)
    table.flags.writeable = False
    return table


def _lookup(table: np.ndarray, index: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[...] = table[index] along table's first axis, in row blocks.

    np.take is several times faster than fancy indexing, but copies its indices to intp
    (8 bytes each); blocks keep that copy small.
    """
    rows = index.shape[0]
    step = max(1, CHUNK // max(1, index[:1].size))
    for r0 in range(0, rows, step):
        np.take(table, index[r0 : r0 + step], axis=0, out=out[r0 : r0 + step])
    return out


def _scale_groups(
    out: np.ndarray, zeros: np.ndarray | None, scales: np.ndarray, g_idx: np.ndarray | None
) -> None:
    """In place: out[o, i] = (out[o, i] - zeros[o, g(i)]) * scales[o, g(i)].

    g(i) is g_idx[i], or i // (in / G) for groups in input order. zeros and scales are
    [out, G], or [1, G] to broadcast over rows.
    """
    rows, cols = out.shape
    groups = scales.shape[1]
    if g_idx is None:
        view = out.reshape(rows, groups, cols // groups)
        if zeros is not None:
            view -= zeros[:, :, None]
        view *= scales[:, :, None]
        return
    step = max(1, CHUNK // max(1, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = out[r0:r1]
        # np.take along an axis is many times faster than fancy indexing [:, g_idx]
        if zeros is not None:
            block -= np.take(zeros if zeros.shape[0] == 1 else zeros[r0:r1], g_idx, axis=1)
        block *= np.take(scales if scales.shape[0] == 1 else scales[r0:r1], g_idx, axis=1)


def _gather(table: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """table[rows][:, cols], skipping a gather along any axis of length 1 (it broadcasts)."""
    sub = np.take(table, rows, axis=0) if table.shape[0] > 1 else table
    return np.take(sub, cols, axis=1) if sub.shape[1] > 1 else sub


def _check_index(src: _Source, name: str, index: np.ndarray, count: int, what: str) -> None:
    if index.size and (int(index.min()) < 0 or int(index.max()) >= count):
        bad = index[(index < 0) | (index >= count)][0]
        raise src.error(name, f"{what} value {int(bad)} is outside [0, {count})")


# --------------------------------------------------------------------------------------------
# Config helpers


def _cfg_int(
    src: _Source, cfg: dict[str, Any], keys: Iterable[str], where: str = "quantization_config"
) -> int | None:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            value = cfg[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise src.config_error(f"{where}.{key} must be an integer, not {_show(value)}")
            return value
    return None


def _cfg_str(src: _Source, cfg: dict[str, Any], key: str, where: str) -> str | None:
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise src.config_error(f"{where}.{key} must be a string, not {_show(value)}")
    return value


def _cfg_bool(src: _Source, cfg: dict[str, Any], key: str, where: str) -> bool | None:
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise src.config_error(f"{where}.{key} must be true or false, not {_show(value)}")
    return value


def _group_size(
    src: _Source, anchor: str, in_features: int, groups: int, configured: int | None
) -> int:
    """Group size along the input dimension, checked against the number of groups stored."""
    if groups < 1:
        raise src.error(anchor, "has no quantization groups")
    if configured is None:
        if in_features % groups:
            raise src.error(
                anchor, f"{groups} groups do not divide in_features {in_features} evenly"
            )
        return in_features // groups
    size = in_features if configured == -1 else configured
    if size <= 0:
        raise src.config_error(f"group_size {configured} is not positive")
    if in_features % size:
        raise src.error(anchor, f"group size {size} does not divide in_features {in_features}")
    if groups != in_features // size:
        raise src.error(
            anchor,
            f"holds {groups} groups but in_features {in_features} / group size {size} "
            f"needs {in_features // size}",
        )
    return size


# --------------------------------------------------------------------------------------------
# The reader protocol, shared by every format


@dataclass
class _Entry:
    meta: TensorMeta
    parts: tuple[str, ...]
    decode: Callable[[], np.ndarray]
    # (reference, reference_kind, row_scale, seed, num, den) -> None: extraction sums straight
    # from the packed storage, equal to `extract` on decode(); None where there is no kernel
    fused: Callable[..., None] | None = None


class _QuantizedReader:
    """A quantized checkpoint in canonical float32: quantized layers plus float pass-throughs."""

    format: str = "quantized"
    # quantization_config.quant_method naming this family (the key of the reader table)
    quant_method: ClassVar[str] = ""
    # name endings of this family's companion tensors: left over, they mean a broken layer
    companions: tuple[str, ...] = ()

    @classmethod
    def owns(cls, name: str, info: TensorInfo, tensors: Mapping[str, tuple[Any, TensorInfo]]) -> bool:
        """Whether tensor `name` marks a checkpoint of this family (used without a config)."""
        return False

    def __init__(self, src: _Source) -> None:
        self.path = src.path
        self._src = src
        self._entries: dict[str, _Entry] = {}
        self._consumed: set[str] = set()
        self._find_layers()
        self._pass_through()

    # subclasses add their layers here through _add_layer
    def _find_layers(self) -> None:
        raise NotImplementedError

    def _add_layer(
        self,
        name: str,
        shape: tuple[int, ...],
        source_dtype: str,
        parts: Iterable[str],
        decode: Callable[[], np.ndarray],
        fused: Callable[..., None] | None = None,
    ) -> None:
        parts = tuple(parts)
        src = self._src
        if name in self._entries:
            raise src.error(parts[0], f"is a second quantized form of {_show(name)}")
        if not shape or min(shape) <= 0:
            raise src.error(parts[0], f"describes an empty weight of shape {list(shape)}")
        if src.has(name) and name not in parts:
            raise src.error(name, f"is stored as well as its quantized form {_show(parts[0])}")
        self._entries[name] = _Entry(TensorMeta(name, shape, source_dtype, parts[0]), parts, decode, fused)
        self._consumed.update(parts)

    def _pass_through(self) -> None:
        src = self._src
        for name, (_shard, info) in src.ckpt.tensors.items():
            if name in self._consumed:
                continue
            if any(name.endswith(end) for end in self.companions):
                raise src.error(name, f"belongs to no complete {self.format} layer")
            if info.dtype in FLOAT_DTYPES:
                if name in self._entries:
                    raise src.error(name, "is stored as well as its quantized form")
                self._entries[name] = _Entry(
                    TensorMeta(name, tuple(info.shape), info.dtype, name),
                    (name,),
                    self._float_decoder(name, info.dtype),
                )
            elif name.endswith(".weight"):
                raise src.error(
                    name, f"is a {info.dtype} weight that is no {self.format} layer this reader knows"
                )
            # other integer buffers (position ids and the like) are not weights: not listed

    def _float_decoder(self, name: str, dtype: str) -> Callable[[], np.ndarray]:
        def decode() -> np.ndarray:
            values = to_float32(dtype, self._src.raw(name))
            if dtype == "F32":  # a read-only view of the file
                return np.array(values, dtype=np.float32, order="C", copy=True)
            return np.ascontiguousarray(values, dtype=np.float32)

        return decode

    def tensors(self) -> dict[str, TensorMeta]:
        return {name: entry.meta for name, entry in self._entries.items()}

    def load(self, name: str) -> np.ndarray:
        try:
            entry = self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        try:
            out = entry.decode()
        finally:
            for part in entry.parts:
                self._src.ckpt.release(part)
        return out

    def extract_into(
        self,
        name: str,
        reference: np.ndarray | None,
        reference_kind: int,
        row_scale: np.ndarray,
        seed: int,
        num: np.ndarray,
        den: np.ndarray,
    ) -> bool:
        """Add a carrier's extraction sums straight from its packed storage, as `extract` on
        `load` would (no float32 copy of the tensor); False when its layout has no fused kernel."""
        entry = self._entries.get(name)
        if entry is None or entry.fused is None or len(entry.meta.shape) != 2:
            return False
        try:
            entry.fused(reference, reference_kind, row_scale, seed, num, den)
        finally:
            for part in entry.parts:
                self._src.ckpt.release(part)
        return True

    def close(self) -> None:
        self._src.ckpt.close()

    def __enter__(self) -> _QuantizedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self._entries)} tensors)"


# --------------------------------------------------------------------------------------------
# GPTQ (AutoGPTQ / GPTQModel): qweight [in*bits/32, out] packed along in, qzeros along out


# --------------------------------------------------------------------------------------------
# The families, registered by their modules


_READERS: dict[str, type[_QuantizedReader]] = {}

_R = Any  # a reader class


def register_reader(cls: _R) -> _R:
    """Class decorator: make a quantized family known to `open_quantized` by its quant_method."""
    if not cls.quant_method or cls.quant_method in _READERS:
        raise ValueError(f"quantized reader {cls.__name__} needs a new quant_method, not {cls.quant_method!r}")
    _READERS[cls.quant_method] = cls
    return cls


def _read_config(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(path, f"cannot read: {exc.strerror}") from None
    return _parse_json(path, raw, "config")


def _folder_config(root: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """(file, quantization config) from config.json, else AutoGPTQ's quantize_config.json."""
    config_path = root / CONFIG
    if config_path.is_file():
        config = _read_config(config_path)
        if not isinstance(config, dict):
            raise FormatError(config_path, f"config must be a JSON object, not {type(config).__name__}")
        qc = config.get("quantization_config")
        if qc is not None:
            if not isinstance(qc, dict):
                raise FormatError(config_path, "quantization_config must be an object")
            return config_path, qc
    gptq_path = root / GPTQ_CONFIG
    if gptq_path.is_file():
        qc = _read_config(gptq_path)
        if not isinstance(qc, dict):
            raise FormatError(gptq_path, f"quantize config must be a JSON object, not {type(qc).__name__}")
        return gptq_path, {"quant_method": "gptq", **qc}
    return (config_path if config_path.is_file() else None), None


def _method_from_names(src: _Source) -> str | None:
    """The quantization family that the tensor names show, or None for plain weights."""
    found: dict[str, str] = {}
    tensors = src.ckpt.tensors
    for name, (_shard, info) in tensors.items():
        for method, reader in _READERS.items():
            if reader.owns(name, info, tensors):
                found.setdefault(method, name)
                break
    if len(found) > 1:
        (a, a_name), (b, b_name) = list(found.items())[:2]
        raise FormatError(
            src.file(b_name),
            f"tensor {_show(b_name, 200)}: {b} layer in a checkpoint that also has {a} layers "
            f"({_show(a_name, 200)})",
        )
    return next(iter(found), None)


def open_quantized(path: str | os.PathLike[str], partial: bool = False) -> QuantizedModel | None:
    """Open a quantized safetensors checkpoint (file or folder); None if its weights are plain floats.

    A folder's config.json `quantization_config.quant_method` picks the reader; without one
    (and always for a lone file) the tensor names do. `partial`: see Checkpoint.open.
    """
    from . import load_formats

    load_formats()
    path = Path(path)
    ckpt = Checkpoint.open(path, partial=partial)
    try:
        reader = _open(ckpt, path)
    except BaseException:
        ckpt.close()
        raise
    if reader is None:
        ckpt.close()
    return reader


def _open(ckpt: Checkpoint, path: Path) -> QuantizedModel | None:
    config_path, qc = _folder_config(ckpt.root) if ckpt.is_folder else (None, None)
    metadata: dict[str, str] = {}
    for shard in ckpt.shards:
        metadata.update(shard.metadata or {})
    src = _Source(ckpt, path, config_path, qc, metadata)
    if all(info.dtype in FLOAT_DTYPES for _shard, info in ckpt.tensors.values()):
        return None  # nothing quantized, whatever the config claims
    by_names = _method_from_names(src)
    if qc is None:
        return None if by_names is None else _READERS[by_names](src)
    method = qc.get("quant_method")
    if not isinstance(method, str):
        raise src.config_error(f"quantization_config.quant_method {_show(method)} is not a string")
    reader = _READERS.get(method.lower())
    if reader is None:
        raise src.config_error(
            f"quantization_config.quant_method {_show(method)} is not supported "
            f"(supported: {', '.join(_READERS)})"
        )
    return reader(src)
