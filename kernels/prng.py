"""Counter-based keyed hash: the chip and code position of element j of a carrier, no state."""

import numba
import numpy as np

from weightmark.kernels.bits import f64_as_u64, u64_as_f64
from weightmark.kernels.config import INLINE, SERIAL

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_S63 = np.uint64(63)
_ONE = np.uint64(1)
_LOW32 = np.uint64(0xFFFFFFFF)
_ONE_BITS = np.uint64(0x3FF0000000000000)  # 1.0
_LOW31 = np.uint64(0x7FFFFFFF)
_SIGN64 = np.uint64(1) << np.uint64(63)
# 2**-31: bits 32..62 of the hash give the stochastic-rounding uniform in [0, 1).
_U_SCALE = 1.0 / 2147483648.0


@numba.njit(**INLINE)
def mix64(z):
    """SplitMix64 finaliser: a bijection of uint64 with full avalanche."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(**INLINE)
def counter_of(seed, j):
    """The mix64 input of element j (element_hash is its mix64). Element j + 1's counter is
    element j's plus GOLDEN, so a row's hashes need no multiply."""
    return seed + (np.uint64(j) + _ONE) * GOLDEN


@numba.njit(**INLINE)
def element_hash(seed, j):
    """Keyed 64-bit hash of element j (flat index in the canonical [out, in] view)."""
    return mix64(counter_of(seed, j))


@numba.njit(**INLINE)
def chip_of(h):
    """Chip in {-1, +1} from the top bit."""
    return 1.0 - 2.0 * np.float64(h >> _S63)


@numba.njit(**INLINE)
def chip_from_bits(h):
    """chip_of(h) built from its bits (the sign bit of 1.0 set from h's top bit): the same
    +-1.0, with two bit operations in place of a shift, a conversion and a subtraction."""
    return u64_as_f64((h & _SIGN64) | _ONE_BITS)


@numba.njit(**INLINE)
def chip_times(h, value):
    """chip_of(h) * value, as a sign flip (the same float for every value but NaN)."""
    return u64_as_f64(f64_as_u64(value) ^ (h & _SIGN64))


@numba.njit(**INLINE)
def position_of(h, code_length):
    """Code position in [0, code_length) by multiply-high of the low 32 bits (no modulo bias)."""
    return np.int64(((h & _LOW32) * np.uint64(code_length)) >> _S32)


@numba.njit(**INLINE)
def short_position_of(h, code_length):
    """position_of(h, code_length) for code lengths below 2**32.

    Masking the length too lets LLVM see a 32 x 32-bit product (one vpmuludq on x86).
    """
    return np.int64(((h & _LOW32) * (np.uint64(code_length) & _LOW32)) >> _S32)


@numba.njit(**INLINE)
def uniform_of(h):
    """Uniform in [0, 1) from bits 32..62, independent of the chip and position bits."""
    return np.float64(draw_of(h)) * _U_SCALE


@numba.njit(**INLINE)
def draw_of(h):
    """The 31-bit integer behind the uniform: uniform_of(h) == draw_of(h) * 2**-31."""
    return (h >> _S32) & _LOW31


@numba.njit(**SERIAL)
def _element_hashes(seed, start, count, out):
    for i in range(count):
        out[i] = element_hash(seed, start + i)


def element_hashes(seed: int, start: int, count: int) -> np.ndarray:
    """Hashes of elements start..start+count-1 (for tests and diagnostics)."""
    if count < 0 or start < 0:
        raise ValueError("start and count must be non-negative")
    out = np.empty(count, dtype=np.uint64)
    _element_hashes(np.uint64(seed), np.int64(start), np.int64(count), out)
    return out
