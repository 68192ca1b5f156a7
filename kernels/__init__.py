"""Numba kernels of weightmark: keyed hashing, embedding and extraction over dense weights.

Kernels import numpy and numba only: no I/O, no crypto, no names. Each public function checks
dtype, contiguity and shape, then calls a jitted `_kernel`.
"""

from weightmark.kernels.dense import (
    BF16,
    F16,
    FLOAT,
    embed,
    extract,
)
from weightmark.kernels.prng import element_hashes
from weightmark.kernels.score import score_codewords

__all__ = ["BF16", "F16", "FLOAT", "embed", "extract", "element_hashes", "score_codewords"]
