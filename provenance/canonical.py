"""The canonical view of a tensor: its [out, in] 2-D shape and how to read its elements."""

from __future__ import annotations

import numpy as np

from weightmark.kernels import BF16, F16, FLOAT
from weightmark.scheme import canonical_2d

# safetensors dtype name -> how the kernels read the storage array
KINDS = {"F32": FLOAT, "F64": FLOAT, "BF16": BF16, "F16": F16}


def kind_of(dtype: str) -> int:
    try:
        return KINDS[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not a floating carrier dtype") from None


def as_2d(raw: np.ndarray) -> np.ndarray:
    """The [out, in] view of a storage array (no copy for contiguous input)."""
    return np.ascontiguousarray(raw).reshape(canonical_2d(tuple(raw.shape)))


def to_float32(dtype: str, raw: np.ndarray) -> np.ndarray:
    """Decode a storage array (bf16/f16 as uint16 bits) into float32 values."""
    if dtype == "F32":
        return np.asarray(raw)
    if dtype == "F64":
        return raw.astype(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"dtype {dtype} is not a floating dtype")


def from_float32(dtype: str, values: np.ndarray) -> np.ndarray:
    """Encode float32 values into a storage array, rounding to nearest-even."""
    if dtype == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F64":
        return values.astype(np.float64)
    if dtype == "F16":
        return values.astype(np.float16).view(np.uint16)
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = np.isnan(values)
        out = rounded.astype(np.uint16)
        out[nan] = 0x7FC0
        return out
    raise ValueError(f"dtype {dtype} is not a floating dtype")
