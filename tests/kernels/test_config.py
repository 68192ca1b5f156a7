"""The settings every kernel shares (weightmark.kernels.config), as a fresh process sees them."""

from __future__ import annotations

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
