"""Several operators' homes on one PostgreSQL registry: concurrent appends and SIGKILLed writers.

Four homes (copies of one lab home, as four operators' machines would hold) record the same
database. Writers append licensees (cheap entries: unencrypted test keys, no scrypt in the loop)
and reserve a codeword of one model per entry; `registry verify` runs while they append.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.registry.test_concurrency import go
from weightmark import Lab
from weightmark.registry.backend import LOCATION_FILE
from weightmark.registry.store import Carrier

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'weightmark[postgres]')")

HOMES = 4
PER_HOME = 8
APPENDS = 50
MODEL = "shared-model"

# A writer: open the home, say "ready", wait for "go", then per round append a licensee and
# reserve a codeword, printing "licensee-id codeword" (flushed) once both are committed --
# COUNT rounds, or forever when COUNT is 0.
WRITER = """
import sys
from weightmark import Lab

home, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
lab = Lab(home, passphrase=lambda: None)
lab.keys
model_id = lab.registry.model(sys.argv[4]).model_id
print("ready", flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(1)
n = 0
while count == 0 or n < count:
    lic = lab.add_licensee(f"{tag} licensee {n}", "GB" if n % 2 else "DE")
    codeword = lab.registry.reserve_codeword(model_id)
    print(lic.id, codeword, flush=True)
    n += 1
lab.close()
"""


def spawn_writer(home: Path, tag: str, count: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTMARK_")}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(home), tag, str(count), MODEL], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_writers(specs: list[tuple[Path, str, int]]) -> list[subprocess.Popen[str]]:
    """Start writers side by side (their start-up is most of the cost); return them once all
    are ready."""
    procs = [spawn_writer(*spec) for spec in specs]
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line != "ready\n":
            for p in procs:
                p.kill()
            raise AssertionError(f"writer did not start: {line!r} {proc.communicate()[1]}")
    return procs


def lab_homes(root: Path, url: str, count: int) -> list[Path]:
    """One home on the database, with a registered model, and count - 1 copies of it."""
    first = root / "home0"
    with Lab.init(first, passphrase=None, registry=url) as lab:
        rng = np.random.default_rng(1)
        carriers = [Carrier("w", "F32", (4, 4), rng.random(4, dtype=np.float32) + 0.5)]
        lab.registry.add_model("id-shared", MODEL, "/nowhere", "safetensors", {}, carriers, lab.keys)
    homes = [first]
    for i in range(1, count):
        homes.append(root / f"home{i}")
        shutil.copytree(first, homes[-1])
        assert (homes[-1] / LOCATION_FILE).read_text().strip() == url
    return homes


def stored(url: str) -> tuple[list[int], set[str], list[int]]:
    """(entry indices in order, licensee ids, codewords reserved) straight from the database."""
    with psycopg.connect(url) as db:
        idx = [r[0] for r in db.execute("SELECT idx FROM entries ORDER BY idx")]
        ids = {r[0] for r in db.execute("SELECT id FROM licensees")}
        codewords = [r[0] for r in db.execute("SELECT codeword_index FROM codeword_reservations")]
    return idx, ids, codewords


def test_four_homes_thirty_two_writers_one_log(tmp_path: Path, pg_url: str) -> None:
    homes = lab_homes(tmp_path, pg_url, HOMES)
    procs = start_writers([(home, f"h{h}p{p}", APPENDS) for h, home in enumerate(homes) for p in range(PER_HOME)])
    for proc in procs:  # every writer is up; release them together
        go(proc)
    # Verify from another home while they append: each run sees one committed prefix, whole.
    r = run_cli("registry", "verify", "--json", home=homes[-1])
    assert r.returncode == 0, r.stderr
    sizes = [int(r.stdout.split('"entries": ')[1].split(",")[0])]
    while any(p.poll() is None for p in procs):
        with Lab(homes[-1], passphrase=None) as lab:  # a fresh reader each time
            sizes.append(lab.verify_log().size)
        time.sleep(0.5)
    printed: list[tuple[str, int]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        printed += [(line.split()[0], int(line.split()[1])) for line in out.splitlines()]
    total = HOMES * PER_HOME * APPENDS
    assert len(printed) == total
    idx, ids, codewords = stored(pg_url)
    assert idx == list(range(total + 2))  # genesis, the model, then every licensee: no gap
    assert ids == {lid for lid, _ in printed}
    assert sorted(c for _, c in printed) == list(range(total))  # no codeword given twice
    assert sorted(codewords) == list(range(total))
    assert sizes == sorted(sizes) and sizes[0] >= 2, sizes
    with Lab(homes[0], passphrase=None) as lab:
        assert lab.verify_log().size == total + 2
    print(f"\nverify runs during the appends: {len(sizes)}, sizes {sizes[0]}..{sizes[-1]}", file=sys.stderr)


def test_sigkilled_writers_lose_nothing_acknowledged(tmp_path: Path, pg_url: str) -> None:
    homes = lab_homes(tmp_path, pg_url, 2)
    rng = random.Random(12)
    acknowledged: set[str] = set()
    kills = 0
    while kills < 30:
        batch = start_writers([(homes[i % 2], f"k{kills + i}", 0) for i in range(6)])
        for proc in batch:
            go(proc)
        for proc in batch:
            time.sleep(rng.uniform(0.02, 0.25))
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL
            kills += 1
            # A line printed whole was acknowledged: its entry was committed before the print.
            acknowledged |= {line.split()[0] for line in out.splitlines(keepends=True) if line.endswith("\n")}
    idx, ids, codewords = stored(pg_url)
    assert acknowledged and acknowledged <= ids
    assert idx == list(range(len(idx))) and len(idx) == len(ids) + 2
    assert len(set(codewords)) == len(codewords)
    with Lab(homes[1], passphrase=None) as lab:
        assert lab.verify_log().size == len(idx)
    # The next writer after all those kills appends where the log ends.
    with Lab(homes[0], passphrase=None) as lab:
        assert lab.add_licensee("after the kills", "DE").entry_idx == len(idx)
        assert lab.verify_log().size == len(idx) + 1


@pytest.fixture(autouse=True)
def _pg_only(pg_cluster: object) -> None:
    """These tests need the PostgreSQL cluster (they skip, saying why, without its binaries)."""
