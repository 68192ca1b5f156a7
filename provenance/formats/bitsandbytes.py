"""bitsandbytes checkpoints: NF4 / FP4 (optionally double quantized) and LLM.int8 weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._quantized import (
    CHUNK,
    _float_values,
    _lookup,
    _QuantizedReader,
    _Source,
    register_reader,
)
from .safetensors import DTYPES, TensorInfo, _parse_json, _show

__all__ = ["FP4_CODE", "NF4_CODE", "BitsAndBytesModel"]

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


@register_reader
class BitsAndBytesModel(_QuantizedReader):
    """bitsandbytes layers: 4-bit w = code[q] * absmax[block]; int8 w = q * SCB[row] / 127."""

    quant_method = "bitsandbytes"
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

    @classmethod
    def owns(cls, name: str, info: TensorInfo, tensors: Mapping[str, tuple[Any, TensorInfo]]) -> bool:
        return _BNB_STATE in name or name.endswith(".SCB")

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
