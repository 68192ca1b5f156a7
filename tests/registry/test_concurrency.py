"""Concurrent appenders and SIGKILLed writers: the log stays contiguous, complete and verifiable."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from weightmark import Lab
from weightmark.registry.store import DB_FILE

PROCESSES = 8
APPENDS = 50

# A writer: unlock the keys, say "ready", wait for "go" on stdin, then append licensees and
# print each returned id (flushed) -- COUNT of them, or forever when COUNT is 0.
WRITER = """
import sys
from weightmark import Lab

home, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
lab = Lab(home, passphrase=lambda: None)
lab.keys
lab.registry
print("ready", flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(1)
n = 0
while count == 0 or n < count:
    lic = lab.add_licensee(f"{tag} licensee {n}", "GB" if n % 2 else "DE")
    print(lic.id, flush=True)
    n += 1
lab.close()
"""


def start_writer(home: Path, tag: str, count: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTMARK_")}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(home), tag, str(count)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        raise AssertionError(f"writer did not start: {line!r} {proc.communicate()[1]}")
    return proc


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def stored(home: Path) -> tuple[list[int], list[str], set[str]]:
    """(entry indices in order, entry kinds, licensee ids) straight from the database."""
    db = sqlite3.connect(home / DB_FILE)
    try:
        rows = db.execute("SELECT idx, kind FROM entries ORDER BY idx").fetchall()
        ids = {r[0] for r in db.execute("SELECT id FROM licensees")}
    finally:
        db.close()
    return [r[0] for r in rows], [r[1] for r in rows], ids


def test_parallel_appenders_give_a_contiguous_verifiable_log(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Lab.init(home, passphrase=None).close()
    procs = [start_writer(home, f"p{i}", APPENDS) for i in range(PROCESSES)]
    for proc in procs:  # every writer is up; release them together
        go(proc)
    printed: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        ids = out.split()
        assert len(ids) == APPENDS
        printed.extend(ids)
    assert len(set(printed)) == PROCESSES * APPENDS  # no id handed out twice
    indices, kinds, ids = stored(home)
    assert indices == list(range(PROCESSES * APPENDS + 1))  # no gap, no duplicate
    assert kinds[0] == "log-genesis" and kinds.count("licensee") == PROCESSES * APPENDS
    assert ids == set(printed)
    with Lab(home) as lab:
        result = lab.verify_log()
        by_writer: dict[str, list[int]] = {}
        for lic in lab.registry.licensees():
            by_writer.setdefault(lic.name.split()[0], []).append(lic.entry_idx)
    assert result.size == PROCESSES * APPENDS + 1 and result.checkpoints == result.size
    assert sorted(by_writer) == sorted(f"p{i}" for i in range(PROCESSES))
    assert all(len(v) == APPENDS for v in by_writer.values())
    # (How much the writers interleave is up to SQLite's busy handler: often in long runs.)


def kill_loop(home: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    printed: set[str] = set()
    appended_per_kill: list[int] = []
    for n in range(kills):
        proc = start_writer(home, f"k{n}", 0)
        go(proc)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(proc.pid, signal.SIGKILL)
        out, _err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        ids = out.split()
        appended_per_kill.append(len(ids))
        printed.update(ids)
        if n % 10 == 9:
            with Lab(home) as lab:
                lab.verify_log()
    indices, _kinds, ids = stored(home)
    assert indices == list(range(len(indices)))
    with Lab(home) as lab:
        result = lab.verify_log()
    assert result.size == len(indices) and result.checkpoints == result.size
    assert printed <= ids, f"{len(printed - ids)} acknowledged ids are missing"
    # At most one append per kill can be committed without its id having been printed.
    assert len(ids - printed) <= kills
    assert sum(appended_per_kill) > kills  # the kills did land in the middle of appending


def test_sigkill_during_appends_loses_nothing_acknowledged(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Lab.init(home, passphrase=None).close()
    kill_loop(home, kills=50, seed=50)
