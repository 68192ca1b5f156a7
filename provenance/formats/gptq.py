"""GPTQ checkpoints (AutoGPTQ / GPTQModel): qweight [in*bits/32, out] packed along the input,
qzeros packed along the output, per-group scales, optional g_idx (act-order)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._quantized import (
    INT_DTYPES,
    _byte_fields,
    _cfg_int,
    _cfg_str,
    _check_index,
    _float_values,
    _group_size,
    _lookup,
    _QuantizedReader,
    _scale_groups,
    _Source,
    _unpack_cols,
    register_reader,
)
from .awq import _awq_packed
from .safetensors import FLOAT_DTYPES, TensorInfo, _show

__all__ = ["GPTQModel"]


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


@register_reader
class GPTQModel(_QuantizedReader):
    """GPTQ linear layers: w[o, i] = (q[i, o] - z[g(i), o]) * s[g(i), o], g from g_idx or i // G."""

    format = "gptq"
    quant_method = "gptq"
    companions = (".qweight", ".qzeros", ".scales", ".g_idx")

    @classmethod
    def owns(cls, name: str, info: TensorInfo, tensors: Mapping[str, tuple[Any, TensorInfo]]) -> bool:
        return name.endswith(".qweight") and not _awq_packed(name, info, tensors)

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
