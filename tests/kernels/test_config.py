"""The settings every kernel shares (weightmark.kernels.config), as a fresh process sees them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _wait_policy_after_import(tmp_path: Path, preset: str | None) -> str:
    """OMP_WAIT_POLICY in a fresh interpreter once weightmark.kernels is imported."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os, weightmark.kernels; print(os.environ.get('OMP_WAIT_POLICY'))"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


@pytest.mark.parametrize(("preset", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_workers_sleep_between_kernels_unless_the_user_chose(tmp_path: Path, preset: str | None,
                                                                     seen: str) -> None:
    """Parallel kernels run back to back with Python work between them (a GGUF copy: two per
    tensor); spinning workers would take that work's cores. A policy the user set is kept."""
    assert _wait_policy_after_import(tmp_path, preset) == seen


_NUMBA_TARGET = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_ENABLE_AVX", "WEIGHTMARK_WIDE_VECTORS")

# Prints what numba's code generator will use once weightmark.kernels is imported (numba first
# when asked: its settings were read before weightmark's), then whether a fresh 64-bit multiply
# loop is compiled to 512-bit vectors.
_PROBE = """
import json, sys
if sys.argv[1] == "numba-first":
    import numba
import weightmark.kernels
import numba, numpy as np
from numba.core import config

@numba.njit(cache=False)
def mix(a, out):
    for i in range(a.shape[0]):
        out[i] = a[i] * np.uint64(0x9E3779B97F4A7C15) + np.uint64(7)

a = np.arange(64, dtype=np.uint64)
mix(a, np.empty_like(a))
print(json.dumps(config.CPU_FEATURES))
print(json.dumps("zmm" in mix.inspect_asm(mix.signatures[0])))
"""


def _target_after_import(tmp_path: Path, env_set: dict[str, str],
                         order: str = "kernels-first") -> tuple[str | None, bool]:
    env = {k: v for k, v in os.environ.items() if k not in _NUMBA_TARGET}
    env.update(env_set)
    run = subprocess.run([sys.executable, "-c", _PROBE, order], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    features, wide = map(json.loads, run.stdout.splitlines())
    return features, wide


def _host_has_avx512() -> bool:
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().get("avx512f"))


@pytest.mark.parametrize("order", ["kernels-first", "numba-first"])
def test_kernels_are_vectorised_512_bits_wide_where_the_cpu_has_avx512(tmp_path: Path, order: str) -> None:
    """LLVM's tuning prefers 256-bit vectors on recent Intel cores; weightmark turns that
    preference off for numba (all else as the host is), whichever of the two is imported first."""
    import llvmlite.binding as llvm

    features, wide = _target_after_import(tmp_path, {}, order)
    if not _host_has_avx512():
        assert features is None and not wide
        return
    assert features == llvm.get_host_cpu_features().flatten() + ",-prefer-256-bit"
    assert wide


@pytest.mark.parametrize("preset", [{"WEIGHTMARK_WIDE_VECTORS": "0"}, {"NUMBA_CPU_NAME": "generic"},
                                    {"NUMBA_ENABLE_AVX": "1"}, {"NUMBA_CPU_FEATURES": "+sse2"}])
def test_a_numba_target_the_user_chose_is_kept(tmp_path: Path, preset: dict[str, str]) -> None:
    features, wide = _target_after_import(tmp_path, preset)
    assert features == preset.get("NUMBA_CPU_FEATURES", "" if "NUMBA_CPU_NAME" in preset else None)
    if _host_has_avx512() and "NUMBA_CPU_FEATURES" not in preset:
        assert not wide  # numba's own default: LLVM's 256-bit preference stands
