"""Numba options for every kernel, in one place."""

import os

# cache=True keeps compiled kernels across runs (first call of a new install compiles once).
CACHE = os.environ.get("WEIGHTMARK_NUMBA_CACHE", "1") != "0"

SERIAL = dict(nogil=True, cache=CACHE)
PARALLEL = dict(nogil=True, cache=CACHE, parallel=True)
# Small helpers: LLVM inlines them into the kernels that call them.
INLINE = dict(nogil=True, cache=CACHE)
