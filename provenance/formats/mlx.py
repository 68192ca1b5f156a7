"""MLX quantized folders (mlx-lm): affine group quantization in safetensors, dequantized to float32.

mlx-lm stores a quantized linear or embedding layer P as `P.weight` (uint32 words: each row's
`bits`-bit codes as one little-endian bit stream, see weightmark.kernels.affine), `P.scales`
and `P.biases` ([rows, in / group_size], the model's float dtype): w = scale * q + bias per
group. config.json's `quantization` object gives the default `group_size` and `bits` and may
hold per-layer entries keyed by the layer's path (an object with its own `group_size` /
`bits`, or `false` for a layer left in floats); recent mlx-lm repeats the object as
`quantization_config`. Only mode "affine" is read. Tensor names are Hugging Face's already;
MLX float folders are plain safetensors and need no reader of their own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from ..kernels.affine import AFFINE_BITS, AFFINE_GROUPS, dequantize_affine, packed_words
from ..kernels.bits import BF16, F16, FLOAT
from . import register_sniffer
from ._quantized import CONFIG, _float_values, _QuantizedReader, _read_config, _Source
from .safetensors import FLOAT_DTYPES, Checkpoint, _show

__all__ = ["MLXModel", "open_mlx"]

_GRIDS = {"F32": FLOAT, "BF16": BF16, "F16": F16}


class MLXModel(_QuantizedReader):
    """mlx-lm affine-quantized layers (bits 1-8 but 7, group 32/64/128) plus float pass-throughs."""

    format = "mlx"
    companions = (".scales", ".biases")

    def _spec(self, prefix: str) -> tuple[int, int] | None:
        """(bits, group_size) of layer `prefix`: its own entry, else the defaults; None if the
        config leaves it unquantized."""
        src = self._src
        qc = src.qc or {}
        entry = qc.get(prefix, qc)
        if entry is False:
            return None
        if not isinstance(entry, dict):
            raise src.config_error(f"quantization.{_show(prefix, 200)} must be an object or false, not {_show(entry)}")
        where = "quantization" if entry is qc else f"quantization.{_show(prefix, 200)}"
        mode = entry.get("mode", qc.get("mode", "affine"))
        if mode != "affine":
            raise src.config_error(f"{where}.mode {_show(mode)} is not supported (only affine)")
        values = []
        for key, allowed in (("bits", AFFINE_BITS), ("group_size", AFFINE_GROUPS)):
            value = entry.get(key, qc.get(key))
            if type(value) is not int or value not in allowed:
                raise src.config_error(f"{where}.{key} {_show(value)} is not one of {list(allowed)}")
            values.append(value)
        return values[0], values[1]

    def _find_layers(self) -> None:
        src = self._src
        for name, (_shard, info) in src.ckpt.tensors.items():
            if name.endswith(".weight") and info.dtype == "U32" and src.has(name[: -len("weight")] + "scales"):
                self._layer(name[: -len(".weight")])

    def _layer(self, prefix: str) -> None:
        src = self._src
        w_name, s_name, b_name = f"{prefix}.weight", f"{prefix}.scales", f"{prefix}.biases"
        spec = self._spec(prefix)
        if spec is None:
            raise src.error(w_name, "is packed but config.json's quantization marks the layer unquantized")
        bits, group = spec
        src.need(w_name, b_name)
        winfo = src.expect(w_name, {"U32"})
        sinfo = src.expect(s_name, FLOAT_DTYPES - {"F64"})
        binfo = src.expect(b_name, FLOAT_DTYPES - {"F64"})
        if len(winfo.shape) < 2:
            raise src.error(w_name, f"shape {list(winfo.shape)} is not at least 2-D")
        if tuple(sinfo.shape) != tuple(binfo.shape) or sinfo.dtype != binfo.dtype:
            raise src.error(b_name, f"is {binfo.dtype} {list(binfo.shape)} but the scales are "
                                    f"{sinfo.dtype} {list(sinfo.shape)}")
        if tuple(sinfo.shape[:-1]) != tuple(winfo.shape[:-1]):
            raise src.error(s_name, f"shape {list(sinfo.shape)} does not match the weight's {list(winfo.shape)}")
        cols = sinfo.shape[-1] * group
        words = winfo.shape[-1]
        if cols == 0 or words != packed_words(cols, bits):
            raise src.error(w_name, f"holds {words} words per row, but {sinfo.shape[-1]} groups of {group} "
                                    f"at {bits} bits need {packed_words(cols, bits)}")
        shape = (*winfo.shape[:-1], cols)
        rows = math.prod(winfo.shape[:-1])
        grid = _GRIDS[sinfo.dtype]

        def decode() -> np.ndarray:
            packed = src.raw(w_name).reshape(rows, words)
            scales = _float_values(src, s_name).reshape(rows, -1)
            biases = _float_values(src, b_name).reshape(rows, -1)
            out = dequantize_affine(packed, np.ascontiguousarray(scales), np.ascontiguousarray(biases),
                                    bits, group, cols, grid)
            return out.reshape(shape)

        self._add_layer(w_name, shape, f"mlx-int{bits}-g{group}", (w_name, s_name, b_name), decode)


def open_mlx(path: str | Path) -> MLXModel | None:
    """An mlx-lm quantized folder as a suspect reader; None if `path` is not one."""
    path = Path(path)
    config_path = path / CONFIG
    if not path.is_dir() or not config_path.is_file():
        return None
    config = _read_config(config_path)
    qc = config.get("quantization") if isinstance(config, dict) else None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise FormatError(config_path, f"quantization must be an object, not {_show(qc)}")
    ckpt = Checkpoint.open(path, partial=True)  # suspects may be partly published shards
    try:
        if all(info.dtype in FLOAT_DTYPES for _shard, info in ckpt.tensors.values()):
            ckpt.close()
            return None  # an MLX config over float weights: plain safetensors
        metadata: dict[str, Any] = {}
        for shard in ckpt.shards:
            metadata.update(shard.metadata or {})
        return MLXModel(_Source(ckpt, path, config_path, qc, metadata))
    except BaseException:
        ckpt.close()
        raise


@register_sniffer("mlx", 40)
def _sniff(path: Path) -> MLXModel | None:
    return open_mlx(path)
