"""Merkle log speed on 100,000 random 300-byte entries: appends, roots, proofs, against raw SHA-256."""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    CpuMeter,
    machine_info,
    measure,
    print_table,
    report_others,
    warn_if_busy,
    write_json,
)
from weightmark.registry.merkle import (  # noqa: E402
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root,
    verify_consistency,
    verify_inclusion,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leaves", type=int, default=100_000)
    parser.add_argument("--entry-bytes", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    args = parser.parse_args(argv)
    n, reps = args.leaves, args.repeats
    if n < 4:
        parser.error("--leaves must be at least 4")

    busy = warn_if_busy()
    meter = CpuMeter()
    print(f"building {n} entries of {args.entry_bytes} random bytes", file=sys.stderr)
    rng = random.Random(args.seed)
    entries = [rng.randbytes(args.entry_bytes) for _ in range(n)]
    blob = b"".join(entries)
    hashes = [leaf_hash(e) for e in entries]
    tree_root = root(hashes)

    def append_all() -> CompactRange:
        cr = CompactRange()
        for h in hashes:
            cr.append(h)
        return cr

    def hash_and_append_all() -> CompactRange:
        cr = CompactRange()
        for e in entries:
            cr.append(leaf_hash(e))
        return cr

    assert append_all().root() == tree_root
    sha = hashlib.sha256
    timings = {
        "sha256 per entry (baseline)": (measure(lambda: [sha(e).digest() for e in entries], reps), n),
        "sha256 one pass over all bytes": (measure(lambda: sha(blob).digest(), reps), n),
        "leaf_hash per entry": (measure(lambda: [leaf_hash(e) for e in entries], reps), n),
        "CompactRange.append (leaf hashes given)": (measure(append_all, reps), n),
        "leaf_hash + CompactRange.append": (measure(hash_and_append_all, reps), n),
        "root() from scratch": (measure(lambda: root(hashes), reps), n),
    }
    baseline = timings["sha256 per entry (baseline)"][0].median
    rows = []
    results: dict[str, Any] = {"throughput": {}, "inclusion": [], "consistency": []}
    for label, (timing, count) in timings.items():
        rows.append([label, count, timing.median * 1e3, count / timing.median, timing.median / baseline])
        results["throughput"][label] = {"items": count, **timing.to_json()}
    print(f"Merkle tree over {n} entries of {args.entry_bytes} bytes ({len(blob) / 1e6:.0f} MB), "
          f"median of {reps} runs")
    print_table(["operation", "items", "ms", "items/s", "x sha256/entry"], rows)

    proof_rows = []
    for index in sorted({0, 1, n // 2, (n * 7) // 9, n - 1}):
        proof = inclusion_proof(hashes, index, n)
        gen = measure(lambda i=index: inclusion_proof(hashes, i, n), reps)
        ver = measure(lambda i=index, p=proof: verify_inclusion(hashes[i], i, n, p, tree_root), reps * 20)
        proof_rows.append([f"inclusion leaf {index}", len(proof), 32 * len(proof), gen.median * 1e3, ver.median * 1e6])
        results["inclusion"].append(
            {"index": index, "size": n, "nodes": len(proof), "bytes": 32 * len(proof),
             "generate": gen.to_json(), "verify": ver.to_json()}
        )
    for size1 in sorted({1, 1 << (n.bit_length() - 2), n // 2 + 1, n - 1}):
        root1 = root(hashes[:size1])
        proof = consistency_proof(hashes, size1, n)
        gen = measure(lambda s=size1: consistency_proof(hashes, s, n), reps)
        ver = measure(
            lambda s=size1, p=proof, r=root1: verify_consistency(s, n, p, r, tree_root), reps * 20
        )
        proof_rows.append([f"consistency {size1}->{n}", len(proof), 32 * len(proof), gen.median * 1e3, ver.median * 1e6])
        results["consistency"].append(
            {"size1": size1, "size2": n, "nodes": len(proof), "bytes": 32 * len(proof),
             "generate": gen.to_json(), "verify": ver.to_json()}
        )
    print()
    print_table(["proof", "nodes", "bytes", "generate ms", "verify us"], proof_rows)
    others = report_others(meter)
    write_json(
        args.json,
        {"leaves": n, "entry_bytes": args.entry_bytes, "repeats": reps, "seed": args.seed,
         "busy_before": busy, "others_during": others, "machine": machine_info(), **results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
