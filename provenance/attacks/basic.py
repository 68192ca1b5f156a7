"""What leakers do to weights, as functions from one checkpoint to another (tests, demo, eval).

Each attack reads a safetensors file or folder and writes the attacked copy beside the
original's layout (config and tokenizer files included), one tensor at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from weightmark.canonical import from_float32, to_float32
from weightmark.formats.safetensors import Checkpoint, TensorInfo, write_like
from weightmark.fsutil import staged_output

TensorFn = Callable[[str, np.ndarray], np.ndarray]


def _is_weight_matrix(info: TensorInfo) -> bool:
    return info.dtype in ("F32", "F64", "F16", "BF16") and len(info.shape) >= 2


def map_floats(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    fn: TensorFn,
    out_dtype: str | None = None,
    only_matrices: bool = True,
) -> Path:
    """Write dst = src with fn(name, float32 values) applied to its float tensors.

    `out_dtype` re-encodes every float tensor to that dtype (e.g. "F16"); by default each
    tensor keeps its own.
    """
    dst = Path(dst)

    def target_dtype(info: TensorInfo) -> str:
        if out_dtype and info.dtype in ("F32", "F64", "F16", "BF16"):
            return out_dtype
        return info.dtype

    def transform(name: str, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
        if info.dtype not in ("F32", "F64", "F16", "BF16"):
            return raw
        values = to_float32(info.dtype, np.asarray(raw))
        if not only_matrices or _is_weight_matrix(info):
            values = np.asarray(fn(name, values), dtype=np.float32).reshape(info.shape)
        return from_float32(target_dtype(info), values)

    with Checkpoint.open(src) as ckpt, staged_output(dst, is_dir=ckpt.is_folder) as staging:
        write_like(ckpt, staging.path, transform, out_dtype=target_dtype)
        staging.publish()
    return dst


def cast(src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str = "F16") -> Path:
    """Re-encode every float tensor as `dtype` (round to nearest)."""
    return map_floats(src, dst, lambda name, w: w, out_dtype=dtype, only_matrices=False)


def requantize_array(values: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize with the `gguf` package's reference quantizer and dequantize back to float32.

    Rows whose length is not a multiple of the block size are left as they are (llama.cpp
    keeps such tensors in a float type too).
    """
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType[qtype]
    block = GGML_QUANT_SIZES[kind][0]
    rows = values.reshape(values.shape[0], -1)
    if rows.shape[1] % block:
        return values
    out = dequantize(quantize(np.ascontiguousarray(rows, dtype=np.float32), kind), kind)
    return out.reshape(values.shape).astype(np.float32)


def requantize(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: str = "Q4_0", out_dtype: str | None = None
) -> Path:
    """A third party's re-quantization (gguf's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), saved back as floats."""
    return map_floats(src, dst, lambda name, w: requantize_array(w, qtype), out_dtype=out_dtype)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||a|| in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(a64), 1e-30))


def quantization_error(src: str | os.PathLike[str], qtype: str = "Q4_0") -> float:
    """RMS over weight matrices of the per-tensor relative error that `qtype` introduces."""
    errors = []
    with Checkpoint.open(src) as ckpt:
        for name, (_, info) in ckpt.tensors.items():
            if _is_weight_matrix(info) and math.prod(info.shape) >= 4096:
                w = to_float32(info.dtype, ckpt.raw(name))
                errors.append(relative_error(w, requantize_array(w, qtype)))
                ckpt.release(name)
    return float(np.sqrt(np.mean(np.square(errors))))


def add_noise(src: str | os.PathLike[str], dst: str | os.PathLike[str], relative: float, seed: int = 0) -> Path:
    """Add Gaussian noise of std `relative` x each row's RMS to every weight matrix."""
    rng = np.random.default_rng(seed)

    def noisy(name: str, w: np.ndarray) -> np.ndarray:
        rows = w.reshape(w.shape[0], -1).astype(np.float64)
        rms = np.sqrt(np.mean(rows * rows, axis=1, keepdims=True))
        return (rows + rng.standard_normal(rows.shape) * relative * rms).astype(np.float32)

    return map_floats(src, dst, noisy)
