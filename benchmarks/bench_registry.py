"""Signed-registry speed: licensee appends (entry + checkpoint, fsynced), full verification and proofs, against raw SQLite and Ed25519."""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    OUT_DIR,
    CpuMeter,
    machine_info,
    measure,
    print_table,
    report_others,
    warn_if_busy,
    write_json,
)
from weightmark.lab import Lab  # noqa: E402
from weightmark.registry.envelope import PAYLOAD_TYPE, pae  # noqa: E402
from weightmark.registry.log import entry_bytes  # noqa: E402
from weightmark.registry.merkle import (  # noqa: E402
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from weightmark.registry.store import DB_FILE  # noqa: E402

COUNTRIES = ("GB", "DE", "FR", "JP", "US", "NL", "SE", "CA")
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL")


def windows(n: int) -> list[tuple[str, int, int]]:
    """Ranges of append numbers to report: the first 1,000, each tenth, the last 1,000."""
    out = [("first 1,000", 0, min(1000, n))]
    if n >= 20:
        tenth = n // 10
        out += [(f"{i * 10}-{(i + 1) * 10}%", i * tenth, (i + 1) * tenth if i < 9 else n) for i in range(10)]
    out.append(("last 1,000", max(0, n - 1000), n))
    return out


def append_all(lab: Lab, n: int) -> tuple[list[float], int]:
    """n licensees through Registry.add_licensee; the wall time of each append, and id collisions.

    Licensee ids are 32 random bits, so over 100,000 appends a repeated id is likely; the library
    then raises sqlite3.IntegrityError (its transaction rolled back). We count it and retry, and
    the failed attempt's time stays in that append's time.
    """
    reg, keys = lab.registry, lab.keys
    times = []
    collisions = 0
    clock = time.perf_counter
    step = max(1, n // 10)
    start = clock()
    for i in range(n):
        t0 = clock()
        while True:
            try:
                reg.add_licensee(f"Licensee {i:06d} Ltd", COUNTRIES[i % len(COUNTRIES)], None, keys)
                break
            except sqlite3.IntegrityError:
                collisions += 1
                print(f"  licensee id collision at append {i}; retrying", file=sys.stderr)
        times.append(clock() - t0)
        if (i + 1) % step == 0:
            done = i + 1
            print(f"  {done:>7} appends, {done / (clock() - start):7.0f}/s", file=sys.stderr)
    return times, collisions


def raw_sqlite(path: Path, rows: list[tuple[Any, ...]], sql_schema: str, sql_insert: list[str]) -> float:
    """Seconds to insert rows with the registry's pragmas, one BEGIN IMMEDIATE/COMMIT per row."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in PRAGMAS:
        db.execute(pragma)
    db.executescript(sql_schema)
    start = time.perf_counter()
    for row in rows:
        db.execute("BEGIN IMMEDIATE")
        offset = 0
        for stmt in sql_insert:
            k = stmt.count("?")
            db.execute(stmt, row[offset:offset + k])
            offset += k
        db.execute("COMMIT")
    seconds = time.perf_counter() - start
    db.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000, help="licensee appends (default 100000)")
    parser.add_argument("--baseline-count", type=int, default=20_000,
                        help="rows / signatures for the raw SQLite and Ed25519 baselines (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each proof operation")
    parser.add_argument("--workdir", type=Path, default=OUT_DIR / "registry-bench")
    parser.add_argument("--keep", action="store_true", help="keep the lab home and baseline databases")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    args = parser.parse_args(argv)
    n, reps = args.count, args.repeats
    if n < 10:
        parser.error("--count must be at least 10")

    busy = warn_if_busy()
    meter = CpuMeter()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    home = args.workdir / "lab"
    lab = Lab.init(home, passphrase=None)

    # -- appends -----------------------------------------------------------------------------
    print(f"appending {n} licensees (each: sign entry, sign checkpoint, fsynced commit)", file=sys.stderr)
    t0 = time.perf_counter()
    times, collisions = append_all(lab, n)
    total = time.perf_counter() - t0
    db_bytes = sum(p.stat().st_size for p in home.glob(DB_FILE + "*"))
    append_rows = []
    results: dict[str, Any] = {"appends": {"count": n, "seconds": total, "per_s": n / total,
                                           "db_bytes": db_bytes, "id_collisions_retried": collisions,
                                           "windows": []}}
    for label, lo, hi in windows(n):
        chunk = times[lo:hi]
        per_s = len(chunk) / sum(chunk)
        median_ms = statistics.median(chunk) * 1e3
        p99_ms = sorted(chunk)[int(0.99 * (len(chunk) - 1))] * 1e3
        append_rows.append([f"appends {label}", len(chunk), per_s, median_ms, p99_ms])
        results["appends"]["windows"].append({"window": label, "appends": len(chunk), "per_s": per_s,
                                              "median_ms": median_ms, "p99_ms": p99_ms})
    append_rows.append(["appends, all", n, n / total, statistics.median(times) * 1e3,
                        sorted(times)[int(0.99 * (n - 1))] * 1e3])

    # -- full verification --------------------------------------------------------------------
    print("verifying the whole log", file=sys.stderr)
    t0 = time.perf_counter()
    verified = lab.verify_log()
    verify_s = time.perf_counter() - t0
    size = verified.size
    assert size == n + 1
    results["verify_log"] = {"entries": size, "checkpoints": verified.checkpoints, "seconds": verify_s,
                             "entries_per_s": size / verify_s}

    # -- baselines on the same bytes ------------------------------------------------------------
    m = min(args.baseline_count, n)
    reg, keys = lab.registry, lab.keys
    sample = reg.log_entries(1, m + 1)
    notes = dict(reg.checkpoints()[1:m + 1])
    frontiers = dict(reg._db.execute("SELECT size, frontier FROM checkpoints WHERE size BETWEEN 2 AND ?",
                                     (m + 1,)).fetchall())
    print(f"baselines on {m} of the same entries", file=sys.stderr)
    payload_rows = [(e.payload,) for e in sample]
    full_rows = [(e.idx, e.payload, e.key_id, e.signature, e.stored_leaf, e.idx + 1, notes[e.idx + 1],
                  frontiers[e.idx + 1]) for e in sample]
    raw1_runs, raw2_runs = [], []
    for _ in range(3):  # fsync timings are noisy: alternate the two, report medians
        raw1_runs.append(raw_sqlite(args.workdir / "raw1.db", payload_rows,
                                    "CREATE TABLE t (idx INTEGER PRIMARY KEY, payload BLOB NOT NULL);",
                                    ["INSERT INTO t (payload) VALUES (?)"]))
        raw2_runs.append(raw_sqlite(
            args.workdir / "raw2.db", full_rows,
            "CREATE TABLE e (idx INTEGER PRIMARY KEY, payload BLOB, key_id TEXT, signature BLOB, leaf BLOB);"
            "CREATE TABLE c (size INTEGER PRIMARY KEY, note BLOB, frontier TEXT);",
            ["INSERT INTO e VALUES (?, ?, ?, ?, ?)", "INSERT INTO c VALUES (?, ?, ?)"]))
    raw1, raw2 = statistics.median(raw1_runs), statistics.median(raw2_runs)
    messages = [pae(PAYLOAD_TYPE, e.payload) for e in sample]
    t0 = time.perf_counter()
    sigs = [keys.sign(msg) for msg in messages]
    sign_s = time.perf_counter() - t0
    public = keys.public_key
    t0 = time.perf_counter()
    for msg, sig in zip(messages, sigs, strict=True):
        public.verify(sig, msg)
    verify_sig_s = time.perf_counter() - t0
    results["baselines"] = {
        "rows": m,
        "sqlite_payload_only": {"seconds": raw1, "per_s": m / raw1, "runs_s": raw1_runs},
        "sqlite_entry_and_checkpoint_rows": {"seconds": raw2, "per_s": m / raw2, "runs_s": raw2_runs},
        "ed25519_sign": {"seconds": sign_s, "per_s": m / sign_s},
        "ed25519_verify": {"seconds": verify_sig_s, "per_s": m / verify_sig_s},
    }
    base_rows = [
        ["sqlite: payload row, 1 txn each", m, m / raw1, raw1 / m * 1e3],
        ["sqlite: entry+checkpoint rows, 1 txn each", m, m / raw2, raw2 / m * 1e3],
        ["ed25519 sign alone (2 per append)", m, m / sign_s, sign_s / m * 1e3],
        ["ed25519 verify alone (2 per entry)", m, m / verify_sig_s, verify_sig_s / m * 1e3],
        ["verify_log (whole log)", size, size / verify_s, verify_s / size * 1e3],
    ]

    # -- proofs -------------------------------------------------------------------------------
    print("proofs", file=sys.stderr)
    _latest, root, _note = reg.latest_checkpoint()
    fetch = measure(lambda: reg.leaf_hashes(size), max(1, reps // 2))
    leaves = reg.leaf_hashes(size)
    proof_rows = []
    results["inclusion"], results["consistency"] = [], []
    for index in sorted({0, 1, size // 2, (size * 7) // 9, size - 1}):
        (entry,) = reg.log_entries(index, index + 1)
        leaf = leaf_hash(entry_bytes(entry.payload, entry.key_id, entry.signature))
        proof = inclusion_proof(leaves, index, size)
        gen = measure(lambda i=index: inclusion_proof(leaves, i, size), reps)
        ver = measure(lambda p=proof, h=leaf, i=index: verify_inclusion(h, i, size, p, root), reps * 20)
        proof_rows.append([f"inclusion of entry {index}", len(proof), 32 * len(proof), gen.median * 1e3,
                           (fetch.median + gen.median) * 1e3, ver.median * 1e6])
        results["inclusion"].append({"index": index, "size": size, "nodes": len(proof), "bytes": 32 * len(proof),
                                     "generate": gen.to_json(), "verify": ver.to_json()})
    for old in sorted({1, 1000, size // 2, size - 1}):
        if not 0 < old < size:
            continue
        old_root = reg.checkpoint(old)[0]
        proof = consistency_proof(leaves, old, size)
        gen = measure(lambda s=old: consistency_proof(leaves, s, size), reps)
        ver = measure(lambda s=old, p=proof, r=old_root: verify_consistency(s, size, p, r, root), reps * 20)
        proof_rows.append([f"consistency {old} -> {size}", len(proof), 32 * len(proof), gen.median * 1e3,
                           (fetch.median + gen.median) * 1e3, ver.median * 1e6])
        results["consistency"].append({"size1": old, "size2": size, "nodes": len(proof), "bytes": 32 * len(proof),
                                       "generate": gen.to_json(), "verify": ver.to_json()})
    results["leaf_hash_fetch"] = fetch.to_json()
    lab.close()

    # -- report ---------------------------------------------------------------------------------
    print(f"Registry appends: {n} licensees, {total:.0f} s, database {db_bytes / 1e6:.0f} MB "
          f"({db_bytes / n:.0f} bytes/append); licensee id collisions retried: {collisions}")
    print_table(["operation", "items", "items/s", "median ms", "p99 ms"], append_rows)
    print()
    print(f"Baselines on the first {m} entries' bytes, and full verification")
    print_table(["operation", "items", "items/s", "ms each"], base_rows)
    print()
    print(f"Proofs against the latest checkpoint ({size} entries); reading the {size} leaf hashes "
          f"from SQLite takes {fetch.median * 1e3:.0f} ms")
    print_table(["proof", "nodes", "bytes", "generate ms", "+ leaf fetch ms", "verify us"], proof_rows)
    others = report_others(meter)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    write_json(args.json, {"count": n, "busy_before": busy, "others_during": others, "machine": machine_info(),
                           **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
