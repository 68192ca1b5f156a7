"""compressed-tensors checkpoints (llm-compressor): pack-quantized, int-quantized,
float-quantized (FP8) and naive-quantized weights, per tensor, channel, group or block."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._quantized import (
    _FP8_TABLES,
    CHUNK,
    FP8_DTYPES,
    INT_DTYPES,
    _byte_fields,
    _cfg_bool,
    _cfg_int,
    _cfg_str,
    _check_index,
    _float_values,
    _gather,
    _group_size,
    _lookup,
    _QuantizedReader,
    _scale_groups,
    _Source,
    _unpack_rows,
    register_reader,
)
from .safetensors import FLOAT_DTYPES, TensorInfo, _show

__all__ = ["CompressedTensorsModel"]


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


@register_reader
class CompressedTensorsModel(_QuantizedReader):
    """compressed-tensors layers: w = (q - zero_point) * scale with tensor/channel/group/block scales."""

    quant_method = "compressed-tensors"
    companions = (".weight_packed", ".weight_shape", ".weight_zero_point", ".weight_g_idx")

    @classmethod
    def owns(cls, name: str, info: TensorInfo, tensors: Mapping[str, tuple[Any, TensorInfo]]) -> bool:
        if name.endswith((".weight_packed", ".weight_shape")):
            return True
        base = tensors.get(name[: -len("_scale")]) if name.endswith(".weight_scale") else None
        return base is not None and base[1].dtype not in FLOAT_DTYPES

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
