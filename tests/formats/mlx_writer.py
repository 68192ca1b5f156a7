"""Write mlx-lm style quantized folders without MLX, for the tests.

`quantize_affine` follows MLX's affine scheme (per group of a row: scale = (max - min) / (2^bits - 1),
bias = min, q = round((w - bias) / scale)) and packs each row's codes as MLX does: one
little-endian bit stream in uint32 words. The reader's decoding is pinned to real MLX by the
fixtures in tests/data/mlx/; this writer only has to produce valid MLX files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from weightmark.formats.safetensors import save_file


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [rows, ceil(cols * bits / 32)]: code j of a row at stream bits [j*bits, (j+1)*bits)."""
    rows, cols = codes.shape
    if 32 % bits == 0 and cols % (32 // bits) == 0:  # whole codes per word: shift them in place
        per_word = 32 // bits
        shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))
        return np.bitwise_or.reduce(codes.astype(np.uint32).reshape(rows, -1, per_word) << shifts, axis=-1)
    planes = ((codes[..., None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    stream = planes.reshape(rows, cols * bits)
    words = math.ceil(cols * bits / 32)
    padded = np.zeros((rows, words * 32), np.uint8)
    padded[:, : cols * bits] = stream
    return np.packbits(padded, axis=1, bitorder="little").view("<u4").astype(np.uint32)


def quantize_affine(w: np.ndarray, bits: int, group: int, scale_dtype: str = "F32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed words, scales, biases) of a [rows, cols] float32 weight; scales and biases as
    stored (BF16 as uint16 bit patterns), the codes computed against the stored values."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group).astype(np.float32)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    levels = (1 << bits) - 1
    scale = np.maximum((hi - lo) / levels, np.float32(1e-8)).astype(np.float32)
    bias = lo.astype(np.float32)
    if scale_dtype == "BF16":
        s_store, b_store = _bf16_bits(scale), _bf16_bits(bias)
        scale = (s_store.astype(np.uint32) << 16).view(np.float32)
        bias = (b_store.astype(np.uint32) << 16).view(np.float32)
    else:
        s_store, b_store = scale, bias
    q = np.clip(np.rint((g - bias[..., None]) / scale[..., None]), 0, levels).astype(np.uint32)
    return pack_codes(q.reshape(rows, cols), bits), s_store, b_store


def save_mlx_folder(folder: Path, tensors: dict[str, np.ndarray], bits: int, group: int,
                    scale_dtype: str = "F32", config: dict | None = None) -> Path:
    """An mlx-lm quantized folder: every 2-D `.weight` whose width is a whole number of groups
    is quantized (as mlx-lm does for linear and embedding layers), the rest stays float32."""
    folder.mkdir(parents=True, exist_ok=False)
    items = []
    for name, value in tensors.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if name.endswith(".weight") and value.ndim == 2 and value.shape[1] % group == 0:
            words, scales, biases = quantize_affine(value, bits, group, scale_dtype)
            prefix = name[: -len(".weight")]
            items += [(name, "U32", words), (f"{prefix}.scales", scale_dtype, scales),
                      (f"{prefix}.biases", scale_dtype, biases)]
        else:
            items.append((name, "F32", value))
    save_file(folder / "model.safetensors", items, metadata={"format": "mlx"})
    quantization = {"group_size": group, "bits": bits}
    full = {**(config or {}), "quantization": quantization, "quantization_config": quantization}
    (folder / "config.json").write_text(json.dumps(full, indent=2))
    return folder
