"""The kernel cache is emptied when any kernel module's source changes, not only the module
that defines a kernel: every kernel inlines helpers from prng.py and bits.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from weightmark.kernels.config import CACHE_STAMP, drop_stale_cache, sources_digest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"x")


def test_stale_entries_of_our_modules_are_removed_and_the_stamp_written(tmp_path: Path) -> None:
    ours = ["dense._extract-84.py311.nbi", "dense._extract-84.py311.1.nbc", "bits.f16_to_f64-9.py311.nbi"]
    kept = ["other._f-1.py311.nbi", "dense.cpython-311.pyc"]
    _touch(tmp_path, *ours, *kept)
    assert drop_stale_cache(tmp_path, "digest-1", {"dense", "bits"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, CACHE_STAMP])
    assert (tmp_path / CACHE_STAMP).read_text() == "digest-1"
    # Same sources: the cache is trusted and kept.
    _touch(tmp_path, *ours)
    assert not drop_stale_cache(tmp_path, "digest-1", {"dense", "bits"})
    assert all((tmp_path / name).exists() for name in ours)
    # Other sources: emptied again.
    assert drop_stale_cache(tmp_path, "digest-2", {"dense", "bits"})
    assert not any((tmp_path / name).exists() for name in ours)
    assert (tmp_path / CACHE_STAMP).read_text() == "digest-2"


def test_a_change_to_an_inlined_helper_changes_the_digest(tmp_path: Path) -> None:
    copy = tmp_path / "kernels"
    shutil.copytree(KERNELS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = sources_digest(copy)
    assert sources_digest(copy) == before
    bits = copy / "bits.py"
    bits.write_text(bits.read_text().replace("_BF16_MAX_BITS = 0x7F7F", "_BF16_MAX_BITS = 0x7F7E"))
    assert sources_digest(copy) != before


def test_import_empties_a_cache_stamped_for_other_sources(tmp_path: Path) -> None:
    """Through numba's own cache: compile into a fresh cache folder, pretend it was built from
    other sources, and import again: nothing of it may survive to be loaded."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "WEIGHTMARK_NUMBA_CACHE": "1"}
    call = ("import numpy as np; from weightmark.kernels import element_hashes; "
            "print(int(element_hashes(1, 0, 4)[0]))")
    first = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True, check=True)
    entries = [p for p in tmp_path.rglob("*.nbi")]
    assert entries, "numba wrote no cache into NUMBA_CACHE_DIR"
    stamps = list(tmp_path.rglob(CACHE_STAMP))
    assert len(stamps) == 1 and stamps[0].read_text() == sources_digest()
    stamps[0].write_text("built from other sources")
    listing = ("import weightmark.kernels, pathlib, sys; "
               "print(len(list(pathlib.Path(sys.argv[1]).rglob('*.nbi'))))")
    after = subprocess.run([sys.executable, "-c", listing, str(tmp_path)], env=env, capture_output=True, text=True,
                           check=True)
    assert after.stdout.strip() == "0"
    assert stamps[0].read_text() == sources_digest()
    again = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True, check=True)
    assert again.stdout == first.stdout
