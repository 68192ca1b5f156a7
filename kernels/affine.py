"""Dequantize MLX's affine group quantization (mlx.core.quantize, mode "affine") to float32 rows.

Layout (MLX's, checked against mlx.core.dequantize): each row of a weight is quantized in
groups of `group_size` consecutive elements; element j of a row is a `bits`-bit unsigned code
q_j, and the codes of a row form one little-endian bit stream (code j occupies stream bits
[j*bits, (j+1)*bits)) stored in uint32 words, so 3-, 5- and 6-bit codes straddle word
boundaries. Each group g has a scale s_g and a bias b_g: w_j = s_g * q_j + b_g.

MLX computes in the dtype of the scales: the product is rounded to that dtype, then the sum
(float32: plain float32 arithmetic, no fused multiply-add). `grid` says which dtype the
scales were stored in (FLOAT, BF16, F16, as in kernels.bits) so results agree bit for bit.
"""

import math

import numba
import numpy as np

from weightmark.kernels.bits import BF16, F16, FLOAT
from weightmark.kernels.config import INLINE, PARALLEL

__all__ = ["AFFINE_BITS", "AFFINE_GROUPS", "dequantize_affine", "packed_words"]

AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)


def packed_words(cols: int, bits: int) -> int:
    """uint32 words per row holding `cols` codes of `bits` bits."""
    return (cols * bits + 31) // 32


@numba.njit(**INLINE)
def _round_to_grid(x, significant, min_exponent, largest):
    """x rounded to nearest-even on a binary grid with `significant` bits, normal exponents
    down to `min_exponent` (subnormals below), overflowing to inf above `largest`."""
    if x == 0.0 or not math.isfinite(x):
        return x
    _m, e = math.frexp(x)  # |x| in [2^(e-1), 2^e)
    exponent = max(e - 1, min_exponent)
    step = math.ldexp(1.0, exponent - (significant - 1))
    r = np.rint(x / step) * step
    if abs(r) > largest:
        return math.copysign(math.inf, x)
    return r


@numba.njit(**INLINE)
def _on_grid(x, grid):
    if grid == BF16:
        return np.float32(_round_to_grid(np.float64(x), 8, -126, 3.3895313892515355e38))
    if grid == F16:
        return np.float32(_round_to_grid(np.float64(x), 11, -14, 65504.0))
    return x


@numba.njit(**PARALLEL)
def _dequantize(words, scales, biases, bits, group_size, grid, out):
    rows, cols = out.shape
    mask = np.uint64((1 << bits) - 1)
    for r in numba.prange(rows):
        for j in range(cols):
            start = j * bits
            w = start >> 5
            shift = np.uint64(start & 31)
            stream = np.uint64(words[r, w])
            if (start & 31) + bits > 32:
                stream |= np.uint64(words[r, w + 1]) << np.uint64(32)
            q = np.float32((stream >> shift) & mask)
            g = j // group_size
            product = _on_grid(np.float32(scales[r, g] * q), grid)
            out[r, j] = _on_grid(np.float32(product + biases[r, g]), grid)


def dequantize_affine(
    words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int, cols: int,
    grid: int = FLOAT,
) -> np.ndarray:
    """float32 [rows, cols] of an affine-quantized weight.

    words: uint32 [rows, packed_words(cols, bits)]; scales, biases: float32 [rows, cols / group_size]
    (values decoded exactly from their stored dtype); grid: FLOAT, BF16 or F16, the stored dtype of
    the scales, which MLX computes in.
    """
    if bits not in AFFINE_BITS:
        raise ValueError(f"bits {bits} is not one of {AFFINE_BITS}")
    if group_size <= 0 or cols <= 0 or cols % group_size:
        raise ValueError(f"{cols} columns are no whole number of groups of {group_size}")
    if grid not in (FLOAT, BF16, F16):
        raise ValueError(f"grid {grid} is not FLOAT, BF16 or F16")
    if words.dtype != np.uint32 or words.ndim != 2:
        raise TypeError(f"words must be a 2-D uint32 array, not {words.ndim}-D {words.dtype}")
    rows = words.shape[0]
    if words.shape[1] != packed_words(cols, bits):
        raise ValueError(f"{words.shape[1]} words per row cannot hold {cols} codes of {bits} bits "
                         f"(need {packed_words(cols, bits)})")
    groups = cols // group_size
    for name, table in (("scales", scales), ("biases", biases)):
        if table.dtype != np.float32 or table.shape != (rows, groups):
            raise ValueError(f"{name} must be float32 [{rows}, {groups}], not {table.dtype} {list(table.shape)}")
    out = np.empty((rows, cols), dtype=np.float32)
    _dequantize(words, scales, biases, bits, group_size, grid, out)
    return out
