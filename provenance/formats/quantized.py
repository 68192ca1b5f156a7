"""Readers that dequantize GPTQ, AWQ, compressed-tensors and bitsandbytes safetensors checkpoints."""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..canonical import to_float32
from ..errors import FormatError, InputFileError
from .base import QuantizedModel, TensorMeta
from .safetensors import DTYPES, FLOAT_DTYPES, Checkpoint, TensorInfo, _parse_json, _show

__all__ = [
    "AWQModel",
    "BitsAndBytesModel",
    "CompressedTensorsModel",
    "GPTQModel",
    "NF4_CODE",
    "FP4_CODE",
    "fp8_e4m3_table",
    "fp8_e5m2_table",
    "open_quantized",
]

CONFIG = "config.json"
GPTQ_CONFIG = "quantize_config.json"
CHUNK = 1 << 22  # elements decoded per step: bounds the temporaries of one tensor's decode

INT_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})

# AWQ GEMM packs the 8 outputs of a word in the order [0, 2, 4, 6, 1, 3, 5, 7]: nibble k holds
# output AWQ_ORDER[k], so output j sits in nibble AWQ_NIBBLE[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_NIBBLE = tuple(AWQ_ORDER.index(j) for j in range(8))

# The 4-bit code books bitsandbytes dequantizes with (its kernels hard-code them; the stored
# quant_map must agree).
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
FP4_CODE = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
    / np.float32(12)
)
_CODE_BOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_CODE_TOLERANCE = 1e-6
_BNB_DTYPES = frozenset({"float32", "float16", "bfloat16"})
_BNB_STATE = ".weight.quant_state.bitsandbytes__"


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
    # name endings of this family's companion tensors: left over, they mean a broken layer
    companions: tuple[str, ...] = ()

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


def _gptq_is_v2(src: _Source) -> bool:
    cfgs: list[dict[str, Any]] = []
    if src.qc is not None:
        cfgs.append(src.qc)
        meta = src.qc.get("meta")
        if isinstance(meta, dict):
            cfgs.append(meta)
    cfgs.append(dict(src.metadata))
    for cfg in cfgs:
        for key in ("checkpoint_format", "format"):
            value = cfg.get(key)
            if isinstance(value, str) and value.lower() == "gptq_v2":
                return True
    return False


class GPTQModel(_QuantizedReader):
    """GPTQ linear layers: w[o, i] = (q[i, o] - z[g(i), o]) * s[g(i), o], g from g_idx or i // G."""

    format = "gptq"
    companions = (".qweight", ".qzeros", ".scales", ".g_idx")

    def _find_layers(self) -> None:
        src = self._src
        qc = src.qc or {}
        fmt = _cfg_str(src, qc, "checkpoint_format", "quantization_config")
        if fmt is not None and fmt.lower() not in ("gptq", "gptq_v2"):
            raise src.config_error(
                f"GPTQ checkpoint_format {_show(fmt)} is not supported (only gptq and gptq_v2)"
            )
        if qc.get("is_marlin_format") is True:
            raise src.config_error("GPTQ Marlin-format checkpoints are not supported")
        bits = _cfg_int(src, qc, ("bits", "w_bit"))
        if bits is not None and bits not in (2, 4, 8):
            raise src.config_error(f"GPTQ bits {bits} is not supported (only 2, 4 and 8)")
        group = _cfg_int(src, qc, ("group_size",))
        v2 = _gptq_is_v2(src)
        for name in src.ckpt.tensors:
            if name.endswith(".qweight"):
                self._layer(name[: -len(".qweight")], bits, group, v2)

    def _layer(self, prefix: str, bits: int | None, group: int | None, v2: bool) -> None:
        src = self._src
        qw_name, qz_name, s_name, g_name = (
            f"{prefix}.{part}" for part in ("qweight", "qzeros", "scales", "g_idx")
        )
        qw = src.expect(qw_name, {"I32"}, 2)
        src.need(qw_name, qz_name)
        src.need(qw_name, s_name)
        qz = src.expect(qz_name, {"I32"}, 2)
        sc = src.expect(s_name, FLOAT_DTYPES, 2)
        packed_rows, out_features = qw.shape
        groups = sc.shape[0]
        if sc.shape[1] != out_features:
            raise src.error(
                s_name, f"has {sc.shape[1]} columns but qweight has out_features {out_features}"
            )
        if qz.shape[0] != groups:
            raise src.error(qz_name, f"has {qz.shape[0]} groups but scales has {groups}")
        if bits is None:  # no config: the zero points tell the width
            if out_features == 0 or (qz.shape[1] * 32) % out_features:
                raise src.error(qz_name, "packed width does not give a bit width for out_features")
            bits = qz.shape[1] * 32 // out_features
            if bits not in (2, 4, 8):
                raise src.error(qz_name, f"packs {bits}-bit zero points; only 2, 4, 8 are supported")
        per = 32 // bits
        if out_features % per or qz.shape[1] != out_features // per:
            raise src.error(
                qz_name,
                f"has {qz.shape[1]} packed columns but out_features {out_features} at {bits} bits "
                f"needs {out_features * bits / 32:g}",
            )
        in_features = packed_rows * per
        has_gidx = src.has(g_name)
        if has_gidx:
            gi = src.expect(g_name, INT_DTYPES, 1)
            if gi.shape[0] != in_features:
                raise src.error(
                    qw_name,
                    f"packs {packed_rows} rows of {per} = {in_features} inputs but g_idx has "
                    f"{gi.shape[0]} entries",
                )
        size = _group_size(src, qw_name, in_features, groups, group)
        parts = (qw_name, qz_name, s_name) + ((g_name,) if has_gidx else ())
        dtype = f"gptq-int{bits}-g{size}" + ("-gidx" if has_gidx else "") + ("-v2" if v2 else "")

        def decode() -> np.ndarray:
            zeros = _unpack_cols(src.raw(qz_name), bits).astype(np.float32)
            if not v2:
                zeros += 1  # v1 stores zero - 1
            scales = _float_values(src, s_name)
            g_idx: np.ndarray | None
            if has_gidx:
                g_idx = src.raw(g_name).astype(np.int64)
                _check_index(src, g_name, g_idx, groups, "group index")
            else:
                g_idx = None
            # bytes [rows, out, 4] -> [out, rows, 4]: byte b of word r holds inputs
            # r*per + b*(8/bits) ..., low bits first, so a byte table lands them in place
            data = src.raw(qw_name).view(np.uint8).reshape(packed_rows, out_features, 4)
            data = np.ascontiguousarray(data.transpose(1, 0, 2))
            out = np.empty((out_features, in_features), dtype=np.float32)
            _lookup(_byte_fields(bits), data, out.reshape(*data.shape, 8 // bits))
            del data
            _scale_groups(out, zeros.T, scales.T, g_idx)
            return out

        def fused(*args: Any) -> None:
            from weightmark.kernels.fused import extract_gptq

            zeros = _unpack_cols(src.raw(qz_name), bits).astype(np.float32)
            if not v2:
                zeros += 1
            if has_gidx:
                g_idx = src.raw(g_name).astype(np.int64)
                _check_index(src, g_name, g_idx, groups, "group index")
            else:
                g_idx = np.arange(in_features, dtype=np.int64) // (in_features // groups)
            qweight = np.ascontiguousarray(src.raw(qw_name)).view(np.uint32)
            scales = np.ascontiguousarray(_float_values(src, s_name).T, dtype=np.float32)
            extract_gptq(qweight, bits, np.ascontiguousarray(zeros.T), scales, g_idx, *args)

        self._add_layer(f"{prefix}.weight", (out_features, in_features), dtype, parts, decode, fused)


# --------------------------------------------------------------------------------------------
# AWQ GEMM: qweight [in, out/8] packed along out in AWQ's interleaved order


class AWQModel(_QuantizedReader):
    """AWQ GEMM linear layers: w[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o]."""

    format = "awq"
    companions = (".qweight", ".qzeros", ".scales")

    def _find_layers(self) -> None:
        src = self._src
        qc = src.qc or {}
        bits = _cfg_int(src, qc, ("bits", "w_bit"))
        if bits is not None and bits != 4:
            raise src.config_error(f"AWQ bits {bits} is not supported (only 4)")
        version = _cfg_str(src, qc, "version", "quantization_config")
        if version is not None and version.lower() not in ("gemm", "exllama", "ipex"):
            raise src.config_error(
                f"AWQ version {_show(version)} is not supported (only the GEMM layout)"
            )
        if _cfg_bool(src, qc, "zero_point", "quantization_config") is False:
            raise src.config_error("AWQ without zero points is not supported")
        group = _cfg_int(src, qc, ("group_size", "q_group_size"))
        for name in src.ckpt.tensors:
            if name.endswith(".qweight"):
                self._layer(name[: -len(".qweight")], group)

    def _layer(self, prefix: str, group: int | None) -> None:
        src = self._src
        qw_name, qz_name, s_name = (f"{prefix}.{p}" for p in ("qweight", "qzeros", "scales"))
        qw = src.expect(qw_name, {"I32"}, 2)
        src.need(qw_name, qz_name)
        src.need(qw_name, s_name)
        qz = src.expect(qz_name, {"I32"}, 2)
        sc = src.expect(s_name, FLOAT_DTYPES, 2)
        in_features, packed_cols = qw.shape
        groups, out_features = sc.shape
        if packed_cols * 8 != out_features:
            raise src.error(
                qw_name,
                f"has {packed_cols} packed columns but scales has out_features {out_features} "
                f"(needs {out_features / 8:g})",
            )
        if qz.shape != (groups, packed_cols):
            raise src.error(
                qz_name, f"shape {list(qz.shape)} is not [{groups}, {packed_cols}] (groups, out/8)"
            )
        size = _group_size(src, qw_name, in_features, groups, group)
        parts = (qw_name, qz_name, s_name)

        def decode() -> np.ndarray:
            zeros = _unpack_cols(src.raw(qz_name), 4, AWQ_NIBBLE).astype(np.float32)
            scales = _float_values(src, s_name)
            # bytes [in, out/8, 4] -> [out/8, 4, in]; nibble slot 2b + h of a word is output
            # AWQ_ORDER[2b + h] of its eight, written row by row into the [out, in] result
            data = src.raw(qw_name).view(np.uint8).reshape(in_features, packed_cols, 4)
            data = np.ascontiguousarray(data.transpose(1, 2, 0))
            low, high = (np.ascontiguousarray(column) for column in _byte_fields(4).T)
            out = np.empty((out_features, in_features), dtype=np.float32)
            slots = out.reshape(packed_cols, 8, in_features)
            for byte in range(4):
                for half in range(2):
                    _lookup((low, high)[half], data[:, byte, :], slots[:, AWQ_ORDER[2 * byte + half], :])
            del data
            _scale_groups(out, zeros.T, scales.T, None)
            return out

        self._add_layer(f"{prefix}.weight", (out_features, in_features), f"awq-int4-g{size}", parts, decode)


# --------------------------------------------------------------------------------------------
# compressed-tensors: pack-quantized, int-quantized, float-quantized (and naive-quantized)

_CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
_CT_STRATEGIES = ("tensor", "channel", "group", "block")


@dataclass(frozen=True)
class _CTArgs:
    num_bits: int | None
    type: str | None  # "int" or "float"
    symmetric: bool | None
    strategy: str | None
    group_size: int | None
    block: tuple[int, int] | None
    format: str | None  # the group's own format (mixed-precision configs)


def _ct_args(src: _Source, group_name: str, group: Any, default_format: str | None) -> _CTArgs | None:
    where = f"quantization_config.config_groups.{group_name}"
    if not isinstance(group, dict):
        raise src.config_error(f"{where} must be an object")
    weights = group.get("weights")
    if weights is None:
        return None
    if not isinstance(weights, dict):
        raise src.config_error(f"{where}.weights must be an object")
    w_where = f"{where}.weights"
    bits = _cfg_int(src, weights, ("num_bits",), w_where)
    kind = _cfg_str(src, weights, "type", w_where)
    if kind is not None and kind not in ("int", "float"):
        raise src.config_error(f"{w_where}.type {_show(kind)} is not supported (int or float)")
    if bits is not None and not (1 <= bits <= 8):
        raise src.config_error(f"{w_where}.num_bits {bits} is not supported (1 to 8)")
    if kind == "float" and bits not in (None, 8):
        raise src.config_error(f"{w_where}: float weights of {bits} bits are not supported")
    strategy = _cfg_str(src, weights, "strategy", w_where)
    if strategy is not None and strategy not in _CT_STRATEGIES:
        raise src.config_error(f"{w_where}.strategy {_show(strategy)} is not supported")
    group_size = _cfg_int(src, weights, ("group_size",), w_where)
    if strategy == "group" and (group_size is None or group_size <= 0):
        raise src.config_error(f"{w_where}: group strategy needs a positive group_size")
    block: tuple[int, int] | None = None
    structure = weights.get("block_structure")
    if strategy == "block":
        if isinstance(structure, str) and re.fullmatch(r"\d{1,9}x\d{1,9}", structure):
            b0, b1 = (int(part) for part in structure.split("x"))
        elif (
            isinstance(structure, list)
            and len(structure) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in structure)
        ):
            b0, b1 = structure
        else:
            raise src.config_error(f"{w_where}.block_structure {_show(structure)} is not [rows, cols]")
        if b0 <= 0 or b1 <= 0:
            raise src.config_error(f"{w_where}.block_structure {_show(structure)} is not positive")
        block = (b0, b1)
    fmt = _cfg_str(src, group, "format", where) or default_format
    return _CTArgs(
        bits, kind, _cfg_bool(src, weights, "symmetric", w_where), strategy, group_size, block, fmt
    )


class CompressedTensorsModel(_QuantizedReader):
    """compressed-tensors layers: w = (q - zero_point) * scale with tensor/channel/group/block scales."""

    companions = (".weight_packed", ".weight_shape", ".weight_zero_point", ".weight_g_idx")

    def __init__(self, src: _Source) -> None:
        qc = src.qc or {}
        fmt = _cfg_str(src, qc, "format", "quantization_config")
        self._fmt = fmt
        self.format = f"compressed-tensors:{fmt}" if fmt else "compressed-tensors"
        self._groups: list[tuple[list[str], _CTArgs]] = []
        if src.qc is not None:
            groups = qc.get("config_groups") or {}
            if not isinstance(groups, dict):
                raise src.config_error("quantization_config.config_groups must be an object")
            for key, group in groups.items():
                args = _ct_args(src, key, group, fmt)
                if args is None:
                    continue
                targets = group.get("targets") or []
                if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                    raise src.config_error(
                        f"quantization_config.config_groups.{key}.targets must be a list of strings"
                    )
                self._groups.append((targets, args))
        super().__init__(src)

    def _args_for(self, prefix: str) -> _CTArgs | None:
        if self._src.qc is None:
            return None
        distinct = {args for _targets, args in self._groups}
        if len(distinct) == 1:
            return next(iter(distinct))
        if not distinct:
            raise self._src.config_error("quantization_config has no config group with weights")
        named: set[_CTArgs] = set()
        by_class: set[_CTArgs] = set()
        for targets, args in self._groups:
            for target in targets:
                if target.startswith("re:"):
                    try:
                        if re.match(target[3:], prefix):
                            named.add(args)
                    except re.error:
                        raise self._src.config_error(f"target {_show(target)} is not a valid regex") from None
                elif target == prefix:
                    named.add(args)
                elif "." not in target:
                    by_class.add(args)
        chosen = named or by_class
        if len(chosen) != 1:
            raise self._src.config_error(
                f"cannot tell which config group quantized {_show(prefix)} "
                f"({len(chosen)} groups match)"
            )
        return next(iter(chosen))

    def _find_layers(self) -> None:
        src = self._src
        if self._fmt is not None and self._fmt not in (*_CT_FORMATS, "mixed-precision"):
            raise src.config_error(
                f"compressed-tensors format {_show(self._fmt)} is not supported "
                f"(only {', '.join(_CT_FORMATS)})"
            )
        kinds: set[str] = set()
        for name, (_shard, info) in src.ckpt.tensors.items():
            if name.endswith(".weight_packed"):
                prefix = name[: -len(".weight_packed")]
                kinds.add(self._layer(prefix, "pack-quantized"))
            elif name.endswith(".weight") and info.dtype not in FLOAT_DTYPES:
                prefix = name[: -len(".weight")]
                if src.has(f"{prefix}.weight_scale"):
                    kind = "float-quantized" if info.dtype in FP8_DTYPES else "int-quantized"
                    kinds.add(self._layer(prefix, kind))
        if self._fmt is None and len(kinds) == 1:
            self.format = f"compressed-tensors:{kinds.pop()}"

    def _layer(self, prefix: str, kind: str) -> str:
        src = self._src
        args = self._args_for(prefix)
        fmt = args.format if args is not None else None
        packed = kind == "pack-quantized"
        w_name = f"{prefix}.weight_packed" if packed else f"{prefix}.weight"
        if fmt is not None and fmt != "mixed-precision":
            allowed = {fmt} | ({"int-quantized", "float-quantized"} if fmt == "naive-quantized" else set())
            if kind not in allowed:
                raise src.error(w_name, f"is stored as {kind} but the config says {fmt}")
        s_name, z_name, g_name = (
            f"{prefix}.{p}" for p in ("weight_scale", "weight_zero_point", "weight_g_idx")
        )
        src.need(w_name, s_name)
        parts = [w_name, s_name]
        if packed:
            winfo = src.expect(w_name, {"I32"}, 2)
            shape_name = f"{prefix}.weight_shape"
            src.need(w_name, shape_name)
            dims = src.small_ints(shape_name, 2)
            if len(dims) != 2 or min(dims) <= 0:
                raise src.error(shape_name, f"{dims} is not a 2-D shape [out, in]")
            out_features, in_features = dims
            if winfo.shape[0] != out_features:
                raise src.error(
                    w_name, f"has {winfo.shape[0]} rows but weight_shape says {out_features}"
                )
            bits = args.num_bits if args is not None else None
            if args is not None and args.type == "float":
                raise src.error(w_name, "packs float weights; only integer packing is supported")
            if bits is None:
                bits = next(
                    (b for b in (4, 8, 2) if winfo.shape[1] == -(-in_features // (32 // b))), None
                )
                if bits is None:
                    raise src.error(w_name, "packed width fits no 2-, 4- or 8-bit packing")
            if bits not in (1, 2, 4, 8):
                # widths that do not divide 32 are packed differently by different versions
                raise src.error(w_name, f"{bits}-bit packing is not supported (1, 2, 4 or 8 bits)")
            per = 32 // bits
            if winfo.shape[1] != -(-in_features // per):
                raise src.error(
                    w_name,
                    f"has {winfo.shape[1]} packed columns but in_features {in_features} at "
                    f"{bits} bits needs {-(-in_features // per)}",
                )
            parts.append(shape_name)
        else:
            winfo = src.expect(w_name, {"I8", *FP8_DTYPES}, 2)
            out_features, in_features = winfo.shape
            bits = 8
            if args is not None:
                if args.type == "float" and winfo.dtype not in FP8_DTYPES:
                    raise src.error(w_name, f"dtype {winfo.dtype} but the config says float weights")
                if args.type == "int" and winfo.dtype != "I8":
                    raise src.error(w_name, f"dtype {winfo.dtype} but the config says int weights")
                if args.num_bits is not None:
                    bits = args.num_bits
        is_float = winfo.dtype in FP8_DTYPES
        sinfo = src.expect(s_name, FLOAT_DTYPES | FP8_DTYPES)
        strategy, size, block = self._scale_layout(src, args, s_name, sinfo, out_features, in_features)
        scale_shape = _scale_2d(sinfo.shape)
        has_zp = src.has(z_name)
        zp_packed = False
        if has_zp:
            zinfo = src.info(z_name)
            if packed and zinfo.dtype == "I32" and len(zinfo.shape) == 2 and strategy in ("group", "channel"):
                zp_packed = True
                want = (-(-out_features // (32 // bits)), scale_shape[1])
                if tuple(zinfo.shape) != want:
                    raise src.error(
                        z_name, f"packed shape {list(zinfo.shape)} is not {list(want)} for scales {list(scale_shape)}"
                    )
            else:
                src.expect(z_name, INT_DTYPES | FLOAT_DTYPES | FP8_DTYPES)
                if _scale_2d(zinfo.shape) != scale_shape:
                    raise src.error(
                        z_name, f"shape {list(zinfo.shape)} does not match weight_scale {list(sinfo.shape)}"
                    )
            parts.append(z_name)
        elif args is not None and args.symmetric is False:
            raise src.error(w_name, "is asymmetric by the config but has no weight_zero_point")
        has_gidx = src.has(g_name)
        if has_gidx:
            if strategy != "group":
                raise src.error(g_name, f"is given but the scales are per {strategy}")
            gi = src.expect(g_name, INT_DTYPES, 1)
            if gi.shape[0] != in_features:
                raise src.error(g_name, f"has {gi.shape[0]} entries, not in_features {in_features}")
            parts.append(g_name)
        offset = 1 << (bits - 1)

        def decode() -> np.ndarray:
            scales = _float_values(src, s_name).reshape(scale_shape)
            zeros: np.ndarray | None = None
            if has_zp:
                if zp_packed:
                    zeros = _unpack_rows(src.raw(z_name), bits)[:out_features].astype(np.float32)
                    zeros -= offset
                else:
                    zeros = _float_values(src, z_name).reshape(scale_shape)
            weight = src.raw(w_name)
            if packed:
                table = _byte_fields(bits, offset)
                data = weight.view(np.uint8)
                out = np.empty((out_features, data.shape[1] * (8 // bits)), dtype=np.float32)
                _lookup(table, data, out.reshape(*data.shape, 8 // bits))
                if out.shape[1] != in_features:  # the last word of each row is padded
                    out = np.ascontiguousarray(out[:, :in_features])
            elif is_float:
                out = np.empty((out_features, in_features), dtype=np.float32)
                _lookup(_FP8_TABLES[winfo.dtype], weight, out)
            else:
                out = weight.astype(np.float32)
            if strategy != "block":
                g_idx: np.ndarray | None = None
                if has_gidx:
                    g_idx = src.raw(g_name).astype(np.int64)
                    _check_index(src, g_name, g_idx, scale_shape[1], "group index")
                _scale_groups(out, zeros, scales, g_idx)
                return out
            assert block is not None
            rows_of = np.arange(out_features) // block[0]
            cols = np.arange(in_features) // block[1]
            step = max(1, CHUNK // max(1, in_features))
            for r0 in range(0, out_features, step):
                r1 = min(out_features, r0 + step)
                part = out[r0:r1]
                if zeros is not None:
                    part -= _gather(zeros, rows_of[r0:r1], cols)
                part *= _gather(scales, rows_of[r0:r1], cols)
            return out

        if is_float:
            dtype = f"ct-{winfo.dtype.lower().replace('_', '-')}-{strategy}"
        else:
            dtype = f"ct-int{bits}-{strategy}"
        if strategy == "group":
            dtype += str(size)
        if block is not None:
            dtype += f"{block[0]}x{block[1]}"
        dtype += "-asym" if has_zp else "-sym"
        self._add_layer(f"{prefix}.weight", (out_features, in_features), dtype, parts, decode)
        return kind

    @staticmethod
    def _scale_layout(
        src: _Source,
        args: _CTArgs | None,
        s_name: str,
        sinfo: TensorInfo,
        out_features: int,
        in_features: int,
    ) -> tuple[str, int, tuple[int, int] | None]:
        """(strategy, group size along in, block) for a weight_scale, checked against its shape."""
        rows, cols = _scale_2d(sinfo.shape)
        strategy = args.strategy if args is not None else None
        if strategy is None:  # infer from the shape
            if rows * cols == 1:
                strategy = "tensor"
            elif rows == out_features and cols == 1:
                strategy = "channel"
            elif rows == out_features:
                strategy = "group"
            else:
                raise src.error(s_name, f"shape {list(sinfo.shape)} fits no scale layout")
        if strategy == "tensor":
            if rows * cols != 1:
                raise src.error(s_name, f"shape {list(sinfo.shape)} is not one per-tensor scale")
            return strategy, in_features, None
        if strategy == "channel":
            if (rows, cols) != (out_features, 1):
                raise src.error(
                    s_name, f"shape {list(sinfo.shape)} is not [{out_features}, 1] per channel"
                )
            return strategy, in_features, None
        if strategy == "group":
            if rows != out_features:
                raise src.error(
                    s_name, f"has {rows} rows but the weight has out_features {out_features}"
                )
            configured = args.group_size if args is not None else None
            return strategy, _group_size(src, s_name, in_features, cols, configured), None
        assert args is not None and args.block is not None
        b0, b1 = args.block
        want = (-(-out_features // b0), -(-in_features // b1))
        if (rows, cols) != want:
            raise src.error(
                s_name, f"shape {list(sinfo.shape)} is not {list(want)} for {b0}x{b1} blocks"
            )
        return strategy, in_features, args.block


def _scale_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """A scale or zero-point tensor's shape as [rows, cols] (scalars and 1-D as one column)."""
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (shape[0], 1)
    return (shape[0], math.prod(shape[1:]))


# --------------------------------------------------------------------------------------------
# bitsandbytes: NF4 / FP4 (optionally double quantized) and LLM.int8


class BitsAndBytesModel(_QuantizedReader):
    """bitsandbytes layers: 4-bit w = code[q] * absmax[block]; int8 w = q * SCB[row] / 127."""

    companions = (
        ".weight.absmax",
        ".weight.quant_map",
        ".weight.nested_absmax",
        ".weight.nested_quant_map",
        ".SCB",
        ".weight_format",
        ".weight.quant_state.bitsandbytes__nf4",
        ".weight.quant_state.bitsandbytes__fp4",
    )

    def __init__(self, src: _Source) -> None:
        self.format = "bitsandbytes"
        self._kinds: set[str] = set()
        super().__init__(src)
        if len(self._kinds) == 1:
            self.format = f"bitsandbytes-{self._kinds.pop()}"

    def _find_layers(self) -> None:
        src = self._src
        for name in list(src.ckpt.tensors):
            if _BNB_STATE in name:
                prefix, _, kind = name.partition(_BNB_STATE)
                if kind not in _CODE_BOOKS:
                    raise src.error(name, f"quant type {_show(kind)} is not nf4 or fp4")
                self._four_bit(prefix, kind, name)
            elif name.endswith(".SCB"):
                self._int8(name[: -len(".SCB")])

    def _blob(self, name: str) -> dict[str, Any]:
        src = self._src
        info = src.expect(name, {"U8", "I8"}, 1, "quant_state blob ")
        if info.numel > 1 << 16:
            raise src.error(name, f"quant_state blob of {info.numel} bytes is implausibly large")
        blob = _parse_json(
            src.file(name), src.raw(name).tobytes(), f"tensor {_show(name, 200)}: quant_state"
        )
        if not isinstance(blob, dict):
            raise src.error(name, f"quant_state must be a JSON object, not {type(blob).__name__}")
        return blob

    def _four_bit(self, prefix: str, kind: str, state_name: str) -> None:
        src = self._src
        w_name = f"{prefix}.weight"
        blob = self._blob(state_name)

        def field(key: str, check: Callable[[Any], bool], what: str) -> Any:
            if key not in blob:
                raise src.error(state_name, f"quant_state has no {key!r}")
            value = blob[key]
            if not check(value):
                raise src.error(state_name, f"quant_state {key!r} = {_show(value)} is not {what}")
            return value

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        field("quant_type", lambda v: v == kind, f"{kind!r} as its key says")
        blocksize = field("blocksize", lambda v: is_int(v) and 0 < v <= 1 << 24, "a positive integer")
        field("dtype", lambda v: v in _BNB_DTYPES, "float32, float16 or bfloat16")
        shape = tuple(
            field(
                "shape",
                lambda v: isinstance(v, list) and 1 <= len(v) <= 8 and all(is_int(d) and d > 0 for d in v),
                "a list of positive dimensions",
            )
        )
        numel = math.prod(shape)
        nblocks = -(-numel // blocksize)
        nested_keys = ("nested_blocksize", "nested_offset")
        nested = any(key in blob for key in nested_keys) or src.has(f"{prefix}.weight.nested_absmax")
        winfo = src.need(state_name, w_name)
        itemsize = DTYPES[winfo.dtype].itemsize
        if winfo.dtype == "BOOL" or winfo.numel != (numel + 1) // (2 * itemsize) or winfo.nbytes * 2 < numel:
            raise src.error(
                w_name,
                f"holds {winfo.nbytes} packed bytes but shape {list(shape)} at 4 bits needs "
                f"{-(-numel // 2)}",
            )
        a_name, m_name = f"{prefix}.weight.absmax", f"{prefix}.weight.quant_map"
        src.need(state_name, a_name)
        src.need(state_name, m_name)
        src.expect(m_name, {"F32"}, 1)
        if src.info(m_name).numel != 16:
            raise src.error(m_name, f"has {src.info(m_name).numel} entries, not 16")
        code = src.raw(m_name).astype(np.float32)
        if not np.all(np.abs(code - _CODE_BOOKS[kind]) <= _CODE_TOLERANCE):
            raise src.error(m_name, f"is not the bitsandbytes {kind} code book")
        parts = [w_name, a_name, m_name, state_name]
        if nested:
            nbs = field("nested_blocksize", lambda v: is_int(v) and 0 < v <= 1 << 24, "a positive integer")
            offset = field(
                "nested_offset",
                lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
                "a finite number",
            )
            if "nested_dtype" in blob and blob["nested_dtype"] != "float32":
                raise src.error(state_name, f"quant_state nested_dtype {_show(blob['nested_dtype'])} is not float32")
            na_name, nm_name = f"{prefix}.weight.nested_absmax", f"{prefix}.weight.nested_quant_map"
            src.need(state_name, na_name)
            src.need(state_name, nm_name)
            ainfo = src.expect(a_name, {"U8"}, 1, "double-quantized absmax ")
            na = src.expect(na_name, {"F32"}, 1)
            nm = src.expect(nm_name, {"F32"}, 1)
            if nm.shape[0] != 256:
                raise src.error(nm_name, f"has {nm.shape[0]} entries, not 256")
            if na.shape[0] != -(-nblocks // nbs):
                raise src.error(
                    na_name,
                    f"has {na.shape[0]} entries but {nblocks} blocks in groups of {nbs} need "
                    f"{-(-nblocks // nbs)}",
                )
            parts += [na_name, nm_name]
        else:
            nbs, offset = 0, 0.0
            ainfo = src.expect(a_name, {"F32"}, 1, "absmax ")
        if ainfo.shape[0] != nblocks:
            raise src.error(
                a_name,
                f"has {ainfo.shape[0]} blocks but {numel} values in blocks of {blocksize} need {nblocks}",
            )

        def absmax() -> np.ndarray:
            if not nested:
                return src.raw(a_name).astype(np.float32)
            # as bitsandbytes does it, in float32: code2[a] * absmax2[block] + offset
            per_block = np.repeat(src.raw(na_name).astype(np.float32), nbs)[:nblocks]
            values = src.raw(nm_name).astype(np.float32)[src.raw(a_name)] * per_block
            values += np.float32(offset)
            return values

        def decode() -> np.ndarray:
            scales = absmax()
            data = src.raw(w_name).reshape(-1).view(np.uint8)[: (numel + 1) // 2]
            # byte b holds two values, the first in the high nibble: (code[b >> 4], code[b & 15])
            pairs = np.stack([np.repeat(code, 16), np.tile(code, 16)], axis=1)
            out = _lookup(pairs, data, np.empty((data.size, 2), np.float32)).reshape(-1)[:numel]
            whole = numel // blocksize
            out[: whole * blocksize].reshape(whole, blocksize)[...] *= scales[:whole, None]
            if whole < nblocks:
                out[whole * blocksize :] *= scales[whole]
            return out.reshape(shape)

        def fused(*args: Any) -> None:
            from weightmark.kernels.fused import extract_bnb4

            data = src.raw(w_name).reshape(-1).view(np.uint8)[: (numel + 1) // 2]
            scales = np.ascontiguousarray(absmax(), dtype=np.float32)
            extract_bnb4(data, code, scales, blocksize, shape[0], numel // shape[0], *args)

        self._kinds.add(kind)
        self._add_layer(w_name, shape, kind + ("-dq" if nested else ""), parts, decode, fused)

    def _int8(self, prefix: str) -> None:
        src = self._src
        w_name, scb_name, f_name = f"{prefix}.weight", f"{prefix}.SCB", f"{prefix}.weight_format"
        src.need(scb_name, w_name)
        winfo = src.expect(w_name, {"I8"}, 2)
        sinfo = src.expect(scb_name, {"F32", "F16", "BF16"}, 1)
        out_features, in_features = winfo.shape
        if sinfo.shape[0] != out_features:
            raise src.error(scb_name, f"has {sinfo.shape[0]} row scales but the weight has {out_features} rows")
        parts = [w_name, scb_name]
        if src.has(f_name):
            layout = src.small_ints(f_name, 1)
            if layout != [0]:
                raise src.error(f_name, f"weight layout {layout} is not 0 (row-major); tiled layouts are not supported")
            parts.append(f_name)

        def decode() -> np.ndarray:
            row_scale = _float_values(src, scb_name).astype(np.float64)
            weight = src.raw(w_name)
            out = np.empty((out_features, in_features), dtype=np.float32)
            step = max(1, CHUNK // max(1, in_features))
            for r0 in range(0, out_features, step):
                r1 = min(out_features, r0 + step)
                values = weight[r0:r1].astype(np.float64)
                values *= row_scale[r0:r1, None]
                values /= 127.0
                out[r0:r1] = values
            return out

        self._kinds.add("int8")
        self._add_layer(w_name, (out_features, in_features), "int8-rowwise", parts, decode)


# --------------------------------------------------------------------------------------------
# Recognising the format


_READERS: dict[str, type[_QuantizedReader]] = {
    "gptq": GPTQModel,
    "awq": AWQModel,
    "compressed-tensors": CompressedTensorsModel,
    "bitsandbytes": BitsAndBytesModel,
}


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
        if _BNB_STATE in name or name.endswith(".SCB"):
            found.setdefault("bitsandbytes", name)
        elif name.endswith((".weight_packed", ".weight_shape")):
            found.setdefault("compressed-tensors", name)
        elif name.endswith(".weight_scale") and name[: -len("_scale")] in tensors:
            if tensors[name[: -len("_scale")]][1].dtype not in FLOAT_DTYPES:
                found.setdefault("compressed-tensors", name)
        elif name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            scales = tensors.get(f"{prefix}.scales")
            awq = (
                f"{prefix}.g_idx" not in tensors
                and scales is not None
                and len(info.shape) == 2
                and len(scales[1].shape) == 2
                and info.shape[1] * 8 == scales[1].shape[1]
                and info.shape[1] != scales[1].shape[1]
            )
            found.setdefault("awq" if awq else "gptq", name)
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
