"""Numba kernels of weightmark: keyed hashing, embedding and extraction over dense weights.

Kernels import numpy and numba only: no I/O, no crypto, no names. Each public function checks
dtype, contiguity and shape, then calls a jitted `_kernel`. The one file access is upkeep of
numba's on-disk cache, on import (config.check_cache).
"""

from pathlib import Path

# First: config sets numba's options (threads' wait policy, vector width) before numba is used.
from weightmark.kernels.config import check_cache  # isort: skip
from weightmark.kernels import dense as _dense  # isort: skip
from weightmark.kernels.dense import (
    BF16,
    F16,
    FLOAT,
    embed,
    extract,
)
from weightmark.kernels.prng import element_hashes
from weightmark.kernels.score import score_codewords


def _cache_dir() -> Path | None:
    # Where numba keeps this package's kernels (the same folder for every kernel module).
    path = getattr(getattr(_dense._embed_float, "_cache", None), "_cache_path", None)
    return Path(path) if path else None


# Runs on the first import of any kernel module (the package comes first), before any kernel
# is called, so nothing is ever loaded from a cache built from other sources.
check_cache(_cache_dir())

__all__ = ["BF16", "F16", "FLOAT", "embed", "extract", "element_hashes", "score_codewords"]
