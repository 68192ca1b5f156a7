"""Numba options for every kernel, in one place, and the upkeep of their on-disk cache."""

import hashlib
import os
import sys
from pathlib import Path

# cache=True keeps compiled kernels across runs (first call of a new install compiles once).
CACHE = os.environ.get("WEIGHTMARK_NUMBA_CACHE", "1") != "0"

# Between two parallel kernels the OpenMP workers sleep instead of spinning (unless the user
# chose otherwise): a copy is made tensor by tensor, with Python reading, hashing and writing
# between the kernels, and spinning workers would take the cores that work needs (and other
# processes' on a shared machine). Read when the threading layer starts, at the first parallel
# kernel, so it is set here, before any kernel runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _wide_vectors() -> None:
    """On a CPU with AVX-512, let LLVM vectorise the kernels' loops 512 bits wide.

    LLVM's tuning for recent Intel cores prefers 256-bit vectors ("prefer-256-bit"), and the
    kernels' loops are compiled to 4 lanes there, although their 64-bit multiplies cost the
    same per 512-bit vector: measured on a 2-core Sapphire Rapids, embed BF16 runs 1.4x and
    F16 1.5x faster with the preference off (benchmarks/bench_kernels.py). Only the choice of
    vector width changes: each lane does the same integer and IEEE operations, so every output
    bit is the same. Numba reads NUMBA_CPU_FEATURES when it builds its code generator, so this
    runs before any kernel. Where the user set NUMBA_CPU_NAME, NUMBA_CPU_FEATURES or
    NUMBA_ENABLE_AVX, numba's choice stands; WEIGHTMARK_WIDE_VECTORS=0 turns this off.
    """
    if os.environ.get("WEIGHTMARK_WIDE_VECTORS", "1") == "0" or any(
        name in os.environ for name in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_ENABLE_AVX")
    ):
        return
    import llvmlite.binding as llvm

    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # a host LLVM cannot describe: numba's own default applies
        return
    if not features.get("avx512f"):
        return
    os.environ["NUMBA_CPU_FEATURES"] = features.flatten() + ",-prefer-256-bit"
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None:  # numba was imported first: it reads its settings again
        numba_config.reload_config()


_wide_vectors()


def targets_host_with(feature: str) -> bool:
    """Whether numba compiles for this very machine (no NUMBA_CPU_NAME: its cache is keyed by
    the CPU, so such code is not loaded on another) with `feature` on, as the features it uses
    say (NUMBA_CPU_FEATURES where set, else the host's)."""
    from numba.core import config as numba_config

    if numba_config.CPU_NAME is not None:
        return False
    if numba_config.CPU_FEATURES is not None:
        return f"+{feature}" in numba_config.CPU_FEATURES.split(",")
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().get(feature))


SERIAL = dict(nogil=True, cache=CACHE)
PARALLEL = dict(nogil=True, cache=CACHE, parallel=True)
# Small helpers: LLVM inlines them into the kernels that call them.
INLINE = dict(nogil=True, cache=CACHE)


# numba keys a cached kernel by the source of its own module only: a kernel that inlines a
# helper from another module (every kernel inlines prng.py and bits.py) would keep running the
# old machine code after that helper changed. So the cache also records a digest of every
# kernel module's source, and is emptied when it differs.
CACHE_STAMP = "weightmark-kernels.sha256"
_KERNELS = Path(__file__).resolve().parent


def sources_digest(folder: Path = _KERNELS) -> str:
    """SHA-256 over the numba version and every kernel module's name and source."""
    import numba

    digest = hashlib.sha256(f"numba {numba.__version__}\n".encode())
    for path in sorted(folder.glob("*.py")):
        digest.update(f"{path.name} {path.stat().st_size}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def drop_stale_cache(cache_dir: Path, digest: str, modules: set[str]) -> bool:
    """Remove the cached kernels of `modules` from `cache_dir` unless its stamp says `digest`,
    then record `digest`. Returns whether anything was removed. Best effort: a folder that
    cannot be read or written is left as it is (numba does not cache there either)."""
    stamp = cache_dir / CACHE_STAMP
    try:
        if stamp.read_text() == digest:
            return False
    except OSError:
        pass
    removed = False
    try:
        for entry in cache_dir.iterdir():
            if entry.suffix in (".nbi", ".nbc") and entry.name.split(".", 1)[0] in modules:
                try:
                    entry.unlink()
                    removed = True
                except FileNotFoundError:  # another process got there first
                    pass
        temp = cache_dir / f".{CACHE_STAMP}.{os.getpid()}"
        temp.write_text(digest)
        os.replace(temp, stamp)
    except OSError:
        pass
    return removed


def check_cache(cache_dir: Path | None) -> None:
    """Empty a stale kernel cache (see drop_stale_cache) before any kernel is loaded from it."""
    if CACHE and cache_dir is not None and cache_dir.is_dir():
        drop_stale_cache(cache_dir, sources_digest(), {p.stem for p in _KERNELS.glob("*.py")})
