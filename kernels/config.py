"""Numba options for every kernel, in one place, and the upkeep of their on-disk cache."""

import hashlib
import os
from pathlib import Path

# cache=True keeps compiled kernels across runs (first call of a new install compiles once).
CACHE = os.environ.get("WEIGHTMARK_NUMBA_CACHE", "1") != "0"

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
