"""Throughput of the numba quantizers against gguf's numpy ones, and the K-quant error table."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    MIB,
    CpuMeter,
    Timing,
    machine_info,
    measure,
    print_table,
    report_others,
    warn_if_busy,
    write_json,
)

SIMPLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")
MARK_STEPS = 0.3  # mark amplitude in quantization steps, on MARK_DENSITY of the elements
MARK_DENSITY = 0.25


def make_weights(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """0.02 * N(0, 1) ("normal") or 0.02 * Student t with 5 degrees of freedom ("t5")."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) if kind == "normal" else rng.standard_t(5, (rows, cols))
    return (0.02 * w).astype(np.float32)


def element_steps(qtype: str, raw: np.ndarray, cols: int) -> np.ndarray:
    """|dequantization step| of every element, from the scale bytes (numpy)."""
    from weightmark.kernels.quant import BLOCK_LAYOUTS

    block, type_size = BLOCK_LAYOUTS[qtype]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, cols // block, type_size)

    def f16(offset: int) -> np.ndarray:
        return blocks[:, :, offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)

    if qtype in SIMPLE:
        steps = np.repeat(f16(0), 32, axis=1)
    elif qtype == "Q6_K":
        sc = blocks[:, :, 192:208].view(np.int8).astype(np.float32)
        steps = np.repeat(f16(208)[..., None] * sc, 16, axis=2).reshape(rows, cols)
    else:
        s = blocks[:, :, 4:16].astype(np.int64)
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], 2)
        steps = np.repeat(f16(0)[..., None] * sc, 32, axis=2).reshape(rows, cols)
    return np.abs(steps)


def throughput(rows: int, cols: int, repeats: int) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    import gguf

    from weightmark.kernels.quantize import QUANTIZABLE, nudge_codes, quantize, quantize_frozen

    w = make_weights("normal", rows, cols, seed=0)
    rng = np.random.default_rng(1)
    uniforms = rng.random((rows, cols))
    mb = w.nbytes / 1e6
    results: list[dict[str, Any]] = []
    checks: dict[str, bool] = {}
    for qtype in QUANTIZABLE:
        print(f"  {qtype} ...", file=sys.stderr)
        ref = quantize(qtype, w)
        delta = (0.3 * element_steps(qtype, ref, cols) * rng.choice([-1, 1], w.shape)).astype(
            np.float32
        )
        stamped = (w + delta).astype(np.float32)
        runs: dict[str, Callable[[], object]] = {
            "quantize": lambda q=qtype: quantize(q, w),
            "frozen": lambda q=qtype, r=ref, s=stamped: quantize_frozen(q, s, r),
            "frozen_nearest": lambda q=qtype, r=ref, s=stamped: quantize_frozen(
                q, s, r, nearest=True
            ),
            "nudge": lambda q=qtype, r=ref, d=delta: nudge_codes(q, r, d, uniforms),
        }
        if qtype in SIMPLE:
            gtype = gguf.GGMLQuantizationType[qtype]
            runs["gguf_numpy"] = lambda g=gtype: gguf.quants.quantize(w, g)
            checks[f"{qtype} quantize == gguf.quants.quantize"] = bool(
                np.array_equal(ref, gguf.quants.quantize(w, gtype))
            )
        else:
            runs.pop("frozen_nearest")  # the same kernel as frozen for K-quants
        checks[f"{qtype} frozen(w, quantize(w)) == quantize(w)"] = bool(
            np.array_equal(quantize_frozen(qtype, w, ref), ref)
        )
        timings: dict[str, Timing] = {}
        for name, fn in runs.items():
            timings[name] = measure(fn, repeats)
        row: dict[str, Any] = {"type": qtype, "input_mb": mb}
        for name, t in timings.items():
            row[name] = {**t.to_json(), "mb_per_s": mb / t.median}
        results.append(row)
    return results, checks


def error_table(rows: int, cols: int) -> list[dict[str, Any]]:
    """Relative RMS error ||w - deq(q(w))|| / ||w|| per K-quant and weight distribution."""
    from weightmark.kernels.quant import dequantize
    from weightmark.kernels.quantize import quantize, quantize_frozen

    def rel(qtype: str, w: np.ndarray, raw: np.ndarray) -> float:
        return float(np.linalg.norm(dequantize(qtype, raw, rows, cols) - w) / np.linalg.norm(w))

    out = []
    for kind in ("normal", "t5"):
        w = make_weights(kind, rows, cols, seed=2)
        rng = np.random.default_rng(3)
        for qtype in KQUANTS:
            ref = quantize(qtype, w)
            naive = quantize(qtype, w, search=False)
            marked = rng.random(w.shape) < MARK_DENSITY
            step = element_steps(qtype, ref, cols)
            delta = marked * MARK_STEPS * step * rng.choice([-1.0, 1.0], w.shape)
            stamped = (w + delta).astype(np.float32)
            frozen = rel(qtype, stamped, quantize_frozen(qtype, stamped, ref))
            fresh = rel(qtype, stamped, quantize(qtype, stamped))
            searched = rel(qtype, w, ref)
            out.append({
                "weights": kind, "type": qtype, "search": searched, "naive": rel(qtype, w, naive),
                "search_vs_naive": searched / rel(qtype, w, naive),
                "stamped_frozen": frozen, "stamped_fresh": fresh, "frozen_vs_fresh": frozen / fresh,
            })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=4096, help="a multiple of 256")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each quantizer")
    parser.add_argument("--error-rows", type=int, default=512, help="rows of the error table")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    busy = warn_if_busy()
    meter = CpuMeter()
    import numba

    threads = numba.get_num_threads()
    results, checks = throughput(args.rows, args.cols, args.repeats)
    errors = error_table(args.error_rows, args.cols)

    mib = args.rows * args.cols * 4 / MIB
    print(f"Quantizers on float32 [{args.rows}, {args.cols}] ({mib:.0f} MiB) of 0.02 * N(0, 1): "
          f"numba threads {threads}, {os.cpu_count()} CPUs; median of {args.repeats} runs after "
          "1 warm-up, gguf's numpy quantizer included.")  # fmt: skip
    print("MB/s = float32 input bytes / median time. frozen: quantize_frozen of w + a 0.3-step "
          "mark; nudge: nudge_codes of the quantized bytes. x gguf = quantize MB/s / gguf's.")  # fmt: skip
    table = []
    for row in results:
        gguf_rate = row.get("gguf_numpy", {}).get("mb_per_s")
        table.append([
            row["type"], row["quantize"]["mb_per_s"], row["frozen"]["mb_per_s"],
            row.get("frozen_nearest", {}).get("mb_per_s"), row["nudge"]["mb_per_s"], gguf_rate,
            row["quantize"]["mb_per_s"] / gguf_rate if gguf_rate else None,
        ])  # fmt: skip
    print_table(
        ["type", "quantize MB/s", "frozen MB/s", "frozen nearest", "nudge MB/s", "gguf MB/s", "x gguf"],
        table,
    )  # fmt: skip
    print()
    print(f"K-quant relative RMS error ||w - deq(q(w))|| / ||w|| on [{args.error_rows}, {args.cols}]"
          f"; stamped = w + {MARK_STEPS} step on {MARK_DENSITY:.0%} of the elements, quantized "
          "with frozen scales vs a fresh quantize:")  # fmt: skip
    print_table(
        ["weights", "type", "search", "naive", "search/naive", "stamped frozen", "stamped fresh",
         "frozen/fresh"],
        [[e["weights"], e["type"], f"{e['search']:.5f}", f"{e['naive']:.5f}",
          f"{e['search_vs_naive']:.3f}", f"{e['stamped_frozen']:.5f}", f"{e['stamped_fresh']:.5f}",
          f"{e['frozen_vs_fresh']:.3f}"] for e in errors],
    )  # fmt: skip
    print()
    for label, ok in checks.items():
        print(f"check: {label}: {'OK' if ok else 'MISMATCH'}")
    others = report_others(meter)
    write_json(args.json, {
        "benchmark": "quantize",
        "shape": [args.rows, args.cols],
        "machine": machine_info(),
        "cpu_busy_before_start": busy,
        "cpu_used_by_others_during_run": others,
        "repeats": args.repeats,
        "throughput": results,
        "k_quant_error": {"shape": [args.error_rows, args.cols], "rows": errors},
        "checks": checks,
    })  # fmt: skip


if __name__ == "__main__":
    main()
