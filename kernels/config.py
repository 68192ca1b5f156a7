"""Numba options for every kernel, in one place."""

import os

# cache=True keeps compiled kernels across runs (first call of a new install compiles once).
CACHE = os.environ.get("WEIGHTMARK_NUMBA_CACHE", "1") != "0"

# Between two parallel kernels the OpenMP workers sleep instead of spinning (unless the user
# chose otherwise): a copy is made tensor by tensor, with Python reading, hashing and writing
# between the kernels, and spinning workers would take the cores that work needs (and other
# processes' on a shared machine). Read when the threading layer starts, at the first parallel
# kernel, so it is set here, before any kernel runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SERIAL = dict(nogil=True, cache=CACHE)
PARALLEL = dict(nogil=True, cache=CACHE, parallel=True)
# Small helpers: LLVM inlines them into the kernels that call them.
INLINE = dict(nogil=True, cache=CACHE)
