"""AWQ GEMM checkpoints: qweight [in, out*4/32] packed along the output in the nibble order
[0, 2, 4, 6, 1, 3, 5, 7], qzeros packed the same way, per-group scales."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._quantized import (
    _byte_fields,
    _cfg_bool,
    _cfg_int,
    _cfg_str,
    _float_values,
    _group_size,
    _lookup,
    _QuantizedReader,
    _scale_groups,
    _unpack_cols,
    register_reader,
)
from .safetensors import FLOAT_DTYPES, TensorInfo, _show

__all__ = ["AWQ_NIBBLE", "AWQ_ORDER", "AWQModel"]

# AWQ GEMM packs the 8 outputs of a word in the order [0, 2, 4, 6, 1, 3, 5, 7]: nibble k holds
# output AWQ_ORDER[k], so output j sits in nibble AWQ_NIBBLE[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_NIBBLE = tuple(AWQ_ORDER.index(j) for j in range(8))


def _awq_packed(name: str, info: TensorInfo, tensors: Mapping[str, tuple[Any, TensorInfo]]) -> bool:
    """Whether a `.qweight` packs along the output (AWQ) rather than along the input (GPTQ)."""
    prefix = name[: -len(".qweight")]
    scales = tensors.get(f"{prefix}.scales")
    return (
        f"{prefix}.g_idx" not in tensors
        and scales is not None
        and len(info.shape) == 2
        and len(scales[1].shape) == 2
        and info.shape[1] * 8 == scales[1].shape[1]
        and info.shape[1] != scales[1].shape[1]
    )


@register_reader
class AWQModel(_QuantizedReader):
    """AWQ GEMM linear layers: w[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o]."""

    format = "awq"
    quant_method = "awq"
    companions = (".qweight", ".qzeros", ".scales")

    @classmethod
    def owns(cls, name: str, info: TensorInfo, tensors: Mapping[str, tuple[Any, TensorInfo]]) -> bool:
        return name.endswith(".qweight") and _awq_packed(name, info, tensors)

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
