"""Score many licensees' codewords against one vector of z statistics at once."""

import numba
import numpy as np

from weightmark.kernels.config import PARALLEL


@numba.njit(**PARALLEL)
def _score_packed(packed, z, out):
    count, nbytes = packed.shape
    total = 0.0
    for i in range(z.shape[0]):
        total += z[i]
    for k in numba.prange(count):
        plus = 0.0
        for b in range(nbytes):
            byte = packed[k, b]
            base = b * 8
            for bit in range(8):
                # np.packbits order: the first position is the most significant bit.
                if (byte >> (7 - bit)) & 1:
                    plus += z[base + bit]
        out[k] = 2.0 * plus - total


def score_codewords(packed: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Return sum_i c_k[i] * z[i] for each row k of packed codewords (bit 1 = +1, bit 0 = -1).

    `packed` is uint8 [N, L/8] in np.packbits order; z is float64 of length L.
    """
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise ValueError("packed codewords must be a 2-D uint8 array")
    if z.ndim != 1 or z.dtype != np.float64 or z.shape[0] != packed.shape[1] * 8:
        raise ValueError(f"z must be float64 of length {packed.shape[1] * 8}")
    out = np.empty(packed.shape[0], dtype=np.float64)
    if packed.shape[0]:
        _score_packed(np.ascontiguousarray(packed), np.ascontiguousarray(z), out)
    return out
