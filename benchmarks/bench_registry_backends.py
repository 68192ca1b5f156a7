"""The registry on SQLite and on PostgreSQL: appends per second (1 and 8 writers), full verification
of a large log, and inclusion / consistency proofs from stored nodes at 10^6 entries, each
against today's baseline of rehashing every leaf.

PostgreSQL is a throwaway cluster (tests/registry/pgcluster.py) with fsync on, on a Unix socket,
so both backends make every commit durable. Not part of `make test`: `make bench-registry`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.registry.pgcluster import PgCluster, bindir, throwaway_cluster  # noqa: E402
from weightmark.lab import Lab  # noqa: E402
from weightmark.registry import merkle  # noqa: E402
from weightmark.registry.envelope import canonical_json, statement  # noqa: E402
from weightmark.registry.log import entry_bytes  # noqa: E402
from weightmark.registry.store import Registry, _nodes_of, now  # noqa: E402

WRITER = """
import sys, time
from weightmark import Lab
lab = Lab(sys.argv[1], passphrase=lambda: None)
lab.keys
lab.registry
print("ready", flush=True)
sys.stdin.readline()
for n in range(int(sys.argv[2])):
    lab.add_licensee(f"{sys.argv[3]} {n}", "DE")
lab.close()
"""


@contextmanager
def backend_location(kind: str, cluster: PgCluster | None) -> Iterator[str | None]:
    if kind == "sqlite":
        yield None
        return
    assert cluster is not None
    name = "bench_" + uuid.uuid4().hex[:10]
    assert cluster.psql("postgres", f"CREATE DATABASE {name}").returncode == 0
    yield cluster.url(name)


def new_home(work: Path, location: str | None) -> Path:
    home = work / uuid.uuid4().hex[:8]
    Lab.init(home, passphrase=None, registry=location).close()
    return home


def appends_one_writer(home: Path, n: int) -> float:
    with Lab(home, passphrase=None) as lab:
        _ = lab.keys  # unlocked before the clock starts
        lab.add_licensee("warm-up", "DE")
        t = time.perf_counter()
        for i in range(n):
            lab.add_licensee(f"one {i}", "DE")
        return n / (time.perf_counter() - t)


def appends_writers(home: Path, writers: int, each: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTMARK_")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(home), str(each), f"w{w}"], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for w in range(writers)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    t = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        p.wait()
        assert p.returncode == 0
    return writers * each / (time.perf_counter() - t)


def bulk_licensees(home: Path, n: int, batch: int = 1000) -> None:
    """n signed licensee entries, each with its checkpoint and nodes (the real append path),
    committed `batch` entries at a time to keep the build short."""
    with Lab(home, passphrase=None) as lab:
        reg, keys = lab.registry, lab.keys
        done = 0
        while done < n:
            with reg._write() as db:
                for i in range(done, min(n, done + batch)):
                    lid = f"lic-{i:08x}"
                    predicate = {"licensee_id": lid, "legal_name": f"bulk {i}", "jurisdiction": "DE", "email": None,
                                 "created_at": now()}
                    digest = hashlib.sha256(canonical_json(predicate)).hexdigest()
                    idx = reg._append(db, "licensee", statement("licensee", lid, digest, predicate), keys)
                    db.execute("INSERT INTO licensees VALUES (?, ?, ?, ?, ?, ?)",
                               (lid, f"bulk {i}", "DE", None, predicate["created_at"], idx))
            done = min(n, done + batch)


def synthetic_tree(reg: Registry, n: int) -> None:
    """n unsigned entries, their interior nodes and one checkpoint row with the true root: enough
    for proof generation, which reads only leaves, nodes and the checkpoint."""
    leaves = []
    rows = []
    at = now()
    for i in range(n):
        payload = b'{"bench":%d}' % i
        leaf = merkle.leaf_hash(entry_bytes(payload, "bench", b""))
        leaves.append(leaf)
        rows.append((i, "bench", "application/vnd.in-toto+json", payload, "bench", b"", at, leaf))
    nodes = list(_nodes_of(leaves))
    root = merkle.CompactRange()
    root.extend(leaves)
    db = reg._db
    db.execute("BEGIN")
    if reg.backend == "postgresql":
        raw = db._db  # COPY: the fast bulk path of PostgreSQL
        with raw.cursor() as cur:
            with cur.copy("COPY entries (idx, kind, payload_type, payload, key_id, signature, created_at, leaf_hash)"
                          " FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
            with cur.copy("COPY merkle_nodes (level, idx, hash) FROM STDIN") as copy:
                for r in nodes:
                    copy.write_row(r)
    else:
        db.executemany("INSERT INTO entries (idx, kind, payload_type, payload, key_id, signature, created_at, leaf_hash)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.executemany("INSERT INTO merkle_nodes VALUES (?, ?, ?)", nodes)
    db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)", (n, root.root(), b"", "[]", at))
    db.commit()


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def proofs(reg: Registry, n: int, samples: int, rng: random.Random) -> dict[str, Any]:
    idx = [rng.randrange(n) for _ in range(samples)]
    t = time.perf_counter()
    sizes = [len(reg.inclusion_proof(i, n)) for i in idx]
    inc = (time.perf_counter() - t) / samples
    olds = [rng.randrange(1, n) for _ in range(samples)]
    t = time.perf_counter()  # (no checkpoint rows of the older sizes here: the proofs are not checked)
    csizes = [len(merkle.consistency_proof_by(reg.subtree_hash, m, n)) for m in olds]
    con = (time.perf_counter() - t) / samples
    # Baseline: today's path, every leaf read and the proof rehashed from them.
    base_t, base = timed(lambda: merkle.inclusion_proof(reg.leaf_hashes(n), idx[0], n), 1)
    assert base == reg.inclusion_proof(idx[0], n)
    return {"inclusion_ms": inc * 1e3, "inclusion_hashes_max": max(sizes), "inclusion_bytes_max": 32 * max(sizes),
            "consistency_ms": con * 1e3, "consistency_hashes_max": max(csizes),
            "consistency_bytes_max": 32 * max(csizes), "baseline_rehash_all_ms": base_t * 1e3,
            "speedup": base_t / inc}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--appends", type=int, default=400, help="appends by 1 writer, and by 8 writers together")
    parser.add_argument("--verify-count", type=int, default=100_000, help="entries in the log verified")
    parser.add_argument("--proof-size", type=int, default=1_000_000, help="entries in the proof tree")
    parser.add_argument("--samples", type=int, default=200, help="proofs timed")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    kinds = args.backends.split(",")
    rng = random.Random(5)
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="wm-bench-"))
    bin_dir = bindir()
    try:
        cm = throwaway_cluster(bin_dir, fsync=True) if "postgresql" in kinds and bin_dir else None
        cluster = cm.__enter__() if cm else None
        try:
            for kind in kinds:
                out: dict[str, Any] = {}
                with backend_location(kind, cluster) as loc:
                    out["appends_per_s_1_writer"] = appends_one_writer(new_home(work, loc), args.appends)
                with backend_location(kind, cluster) as loc:
                    out["appends_per_s_8_writers"] = appends_writers(new_home(work, loc), 8, args.appends // 8)
                print(kind, out, file=sys.stderr, flush=True)
                with backend_location(kind, cluster) as loc:
                    home = new_home(work, loc)
                    t = time.perf_counter()
                    bulk_licensees(home, args.verify_count)
                    out["build_s"] = time.perf_counter() - t
                    with Lab(home, passphrase=None) as lab:
                        t = time.perf_counter()
                        size = lab.verify_log().size
                        out["verify_s"] = time.perf_counter() - t
                        out["verify_entries"] = size
                print(kind, out, file=sys.stderr, flush=True)
                with backend_location(kind, cluster) as loc:
                    home = work / uuid.uuid4().hex[:8]
                    home.mkdir()
                    reg = Registry.create(home, loc)
                    t = time.perf_counter()
                    synthetic_tree(reg, args.proof_size)
                    out["proof_tree_build_s"] = time.perf_counter() - t
                    out["proofs_at"] = args.proof_size
                    out.update(proofs(reg, args.proof_size, args.samples, rng))
                    reg.close()
                results[kind] = out
                print(kind, json.dumps(out, indent=1), flush=True)
        finally:
            if cm:
                cm.__exit__(None, None, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
