"""Throughput of the embed and extract kernels against np.copyto (memcpy) and a numpy twin."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    MIB,
    CpuMeter,
    f32_to_bf16_bits,
    machine_info,
    measure,
    print_table,
    report_others,
    verdict,
    warn_if_busy,
    write_json,
)

EMBED_TARGET = 0.3  # embed bandwidth must be at least this fraction of memcpy's
CODE_LENGTH = 4096
ALPHA = 0.002
SEED = 0x1234_5678_9ABC_DEF0

# -- numpy twin (speed baseline; same arithmetic as kernels/prng.py, dense.py, bits.py) -------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_LOW31 = np.uint64(0x7FFFFFFF)
_BF16_MAX_BITS = np.uint32(0x7F7F)


def twin_hashes(seed: int, start: int, count: int) -> np.ndarray:
    """mix64(seed + (j + 1) * GOLDEN) for j in [start, start + count), wrapping uint64 arithmetic."""
    z = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    z *= _GOLDEN
    z += np.uint64(seed)
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def twin_chip_pos(h: np.ndarray, code_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Chip (+-1.0 from the top bit) and code position (multiply-high of the low 32 bits)."""
    chip = 1.0 - 2.0 * (h >> np.uint64(63)).astype(np.float64)
    pos = (((h & _LOW32) * np.uint64(code_length)) >> np.uint64(32)).astype(np.intp)
    return chip, pos


def _bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def _bf16_stochastic_round(bits: np.ndarray, delta: np.ndarray, u: np.ndarray) -> np.ndarray:
    w = _bf16_value(bits)
    x = w + delta
    a = np.abs(x)
    t = a.astype(np.float32)
    mag = t.view(np.uint32) - (t.astype(np.float64) > a).astype(np.uint32)
    mag = np.minimum(mag >> np.uint32(16), _BF16_MAX_BITS)
    lo = _bf16_value(mag)
    hi = _bf16_value(mag + np.uint32(1))
    step_up = (u * (hi - lo) < a - lo) & (hi < np.inf)
    rounded = (mag + step_up.astype(np.uint32)) | ((x < 0.0).astype(np.uint32) << np.uint32(15))
    return np.where(np.isfinite(w), rounded.astype(np.uint16), bits)


_F16_MAX_BITS = np.uint32(0x7BFF)


def _f16_value(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint16).view(np.float16).astype(np.float64)


def _f16_stochastic_round(bits: np.ndarray, delta: np.ndarray, u: np.ndarray) -> np.ndarray:
    w = _f16_value(bits)
    x = w + delta
    a = np.abs(x)
    clamped = np.minimum(a, 65504.0)
    mag = clamped.astype(np.float16).view(np.uint16).astype(np.uint32)
    mag -= (_f16_value(mag) > clamped).astype(np.uint32)  # nearest went up: one step down
    lo = _f16_value(mag)
    hi = _f16_value(mag + np.uint32(1))
    step_up = (u * (hi - lo) < a - lo) & (hi < np.inf)
    rounded = (mag + step_up.astype(np.uint32)) | ((x < 0.0).astype(np.uint32) << np.uint32(15))
    return np.where(np.isfinite(w), rounded.astype(np.uint16), bits)


def twin_embed(
    weights: np.ndarray,
    grid: str,
    row_scale: np.ndarray,
    codeword: np.ndarray,
    seed: int,
    alpha: float,
    out: np.ndarray,
    block_rows: int = 128,
) -> np.ndarray:
    """numpy embed in row blocks: float32 adds the perturbation, "bf16"/"f16" round stochastically."""
    rows, cols = weights.shape
    code = codeword.astype(np.float64)
    for r0 in range(0, rows, block_rows):
        r1 = min(rows, r0 + block_rows)
        h = twin_hashes(seed, r0 * cols, (r1 - r0) * cols).reshape(r1 - r0, cols)
        chip, pos = twin_chip_pos(h, code.shape[0])
        amplitude = alpha * row_scale[r0:r1].astype(np.float64)
        delta = (amplitude[:, None] * chip) * code[pos]
        if grid != "f32":
            u = ((h >> np.uint64(32)) & _LOW31).astype(np.float64) * (1.0 / 2147483648.0)
            rounding = _bf16_stochastic_round if grid == "bf16" else _f16_stochastic_round
            out[r0:r1] = rounding(weights[r0:r1], delta, u)
        else:
            out[r0:r1] = weights[r0:r1].astype(np.float64) + delta
    return out


def twin_extract(
    suspect: np.ndarray,
    reference: np.ndarray | None,
    bf16: bool,
    row_scale: np.ndarray,
    seed: int,
    num: np.ndarray,
    den: np.ndarray,
    block_rows: int = 128,
) -> None:
    """numpy extract in row blocks: num[p] += chip * d / s, den[p] += (d / s)^2."""
    rows, cols = suspect.shape
    decode = _bf16_value if bf16 else (lambda a: a.astype(np.float64))
    length = num.shape[0]
    for r0 in range(0, rows, block_rows):
        r1 = min(rows, r0 + block_rows)
        d = decode(suspect[r0:r1])
        if reference is not None:
            d -= decode(reference[r0:r1])
        scale = row_scale[r0:r1].astype(np.float64)
        ok = (scale > 0.0) & np.isfinite(scale)
        inv = np.where(ok, 1.0 / np.where(ok, scale, 1.0), 0.0)
        e = np.where(np.isfinite(d), d * inv[:, None], 0.0)
        h = twin_hashes(seed, r0 * cols, (r1 - r0) * cols)
        chip, pos = twin_chip_pos(h, length)
        e = e.reshape(-1)
        num += np.bincount(pos, weights=chip * e, minlength=length)
        den += np.bincount(pos, weights=e * e, minlength=length)


# -- kernels under test --------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    dtype: str
    mode: str
    inputs: list[np.ndarray]
    kernel: Callable[[], object]
    twin: Callable[[], object]
    is_embed: bool


def row_rms32(values: np.ndarray) -> np.ndarray:
    """Per-row RMS as float32, computed in float64 row blocks."""
    out = np.empty(values.shape[0], dtype=np.float32)
    for r0 in range(0, values.shape[0], 256):
        block = values[r0 : r0 + 256].astype(np.float64)
        out[r0 : r0 + 256] = np.sqrt(np.mean(block * block, axis=1))
    return out


def compile_probe() -> dict[str, Any]:
    """First-call times on tiny arrays: JIT compile (or cache load) of every kernel signature."""
    start = time.perf_counter()
    from weightmark.kernels import BF16, F16, FLOAT, dense, embed, extract

    import_s = time.perf_counter() - start
    rng = np.random.default_rng(1)
    w32 = (0.02 * rng.standard_normal((64, 64))).astype(np.float32)
    w16 = f32_to_bf16_bits(w32)
    scale = np.ones(64, dtype=np.float32)
    code = np.ones(CODE_LENGTH, dtype=np.int8)
    num, den = np.zeros(CODE_LENGTH), np.zeros(CODE_LENGTH)
    calls: dict[str, Callable[[], object]] = {
        "embed F32": lambda: embed(w32, FLOAT, scale, code, 1, ALPHA),
        "embed BF16": lambda: embed(w16, BF16, scale, code, 1, ALPHA),
        "embed F16": lambda: embed(w16, F16, scale, code, 1, ALPHA),
        "extract F32": lambda: extract(w32, FLOAT, w32, FLOAT, scale, 1, num, den),
        "extract BF16": lambda: extract(w16, BF16, w16, BF16, scale, 1, num, den),
    }
    first: dict[str, float] = {}
    for label, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        first[label] = time.perf_counter() - t0
    hits = sum(
        sum(getattr(dense, k).stats.cache_hits.values())
        for k in ("_embed_float", "_embed_bf16", "_embed_f16", "_extract")
    )
    return {"import_s": import_s, "first_call_s": first, "cache_hits": hits}


def run_compile_probe_subprocess() -> dict[str, Any] | None:
    """The probe in a fresh interpreter with the numba cache off: true compile times."""
    env = dict(os.environ, WEIGHTMARK_NUMBA_CACHE="0")
    proc = subprocess.run(
        [sys.executable, __file__, "--compile-probe"], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        print(f"compile probe failed:\n{proc.stderr}", file=sys.stderr)
        return None
    return json.loads(proc.stdout)


def build_cases(rows: int, cols: int) -> tuple[list[Case], dict[str, bool]]:
    """Data, kernel calls and twin calls for every row of the table; checks twin == kernel."""
    from weightmark.kernels import BF16, F16, FLOAT, embed, extract

    rng = np.random.default_rng(7)
    w32 = rng.standard_normal((rows, cols), dtype=np.float32)
    w32 *= np.float32(0.02)
    w16 = f32_to_bf16_bits(w32)
    wf16 = w32.astype(np.float16).view(np.uint16)
    scale32 = row_rms32(w32)
    scale16 = row_rms32(_bf16_value(w16))
    scalef16 = row_rms32(_f16_value(wf16))
    code = (rng.integers(0, 2, CODE_LENGTH, dtype=np.int8) * 2 - 1).astype(np.int8)
    out32, out16, outf16 = np.empty_like(w32), np.empty_like(w16), np.empty_like(wf16)
    twin32, twin16, twinf16 = np.empty_like(w32), np.empty_like(w16), np.empty_like(wf16)

    # Stamped copies to extract from (computed once, outside any timing).
    sus32 = embed(w32, FLOAT, scale32, code, SEED, ALPHA)
    sus16 = embed(w16, BF16, scale16, code, SEED, ALPHA)

    def sums() -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(CODE_LENGTH), np.zeros(CODE_LENGTH)

    k_num, k_den = sums()
    t_num, t_den = sums()

    cases = [
        Case("embed", "F32", "-", [w32],
             lambda: embed(w32, FLOAT, scale32, code, SEED, ALPHA, out=out32),
             lambda: twin_embed(w32, "f32", scale32, code, SEED, ALPHA, twin32), True),
        Case("embed", "BF16", "-", [w16],
             lambda: embed(w16, BF16, scale16, code, SEED, ALPHA, out=out16),
             lambda: twin_embed(w16, "bf16", scale16, code, SEED, ALPHA, twin16), True),
        Case("embed", "F16", "-", [wf16],
             lambda: embed(wf16, F16, scalef16, code, SEED, ALPHA, out=outf16),
             lambda: twin_embed(wf16, "f16", scalef16, code, SEED, ALPHA, twinf16), True),
    ]
    for dtype, kind, sus, ref, scale in (
        ("F32", FLOAT, sus32, w32, scale32),
        ("BF16", BF16, sus16, w16, scale16),
    ):
        bf16 = kind == BF16
        cases.append(Case(
            "extract", dtype, "non-blind", [sus, ref],
            lambda s=sus, r=ref, k=kind, sc=scale: extract(s, k, r, k, sc, SEED, k_num, k_den),
            lambda s=sus, r=ref, b=bf16, sc=scale: twin_extract(s, r, b, sc, SEED, t_num, t_den),
            False,
        ))
        cases.append(Case(
            "extract", dtype, "blind", [sus],
            lambda s=sus, k=kind, sc=scale: extract(s, k, None, k, sc, SEED, k_num, k_den),
            lambda s=sus, b=bf16, sc=scale: twin_extract(s, None, b, sc, SEED, t_num, t_den),
            False,
        ))

    # Honesty check: the twin computes what the kernel computes.
    checks: dict[str, bool] = {}
    embed(w32, FLOAT, scale32, code, SEED, ALPHA, out=out32)
    twin_embed(w32, "f32", scale32, code, SEED, ALPHA, twin32)
    checks["embed F32 twin == kernel (bitwise)"] = bool(np.array_equal(out32.view(np.uint32), twin32.view(np.uint32)))
    embed(w16, BF16, scale16, code, SEED, ALPHA, out=out16)
    twin_embed(w16, "bf16", scale16, code, SEED, ALPHA, twin16)
    checks["embed BF16 twin == kernel (bitwise)"] = bool(np.array_equal(out16, twin16))
    embed(wf16, F16, scalef16, code, SEED, ALPHA, out=outf16)
    twin_embed(wf16, "f16", scalef16, code, SEED, ALPHA, twinf16)
    checks["embed F16 twin == kernel (bitwise)"] = bool(np.array_equal(outf16, twinf16))
    for label, sus, ref, kind, scale in (
        ("extract F32 non-blind", sus32, w32, FLOAT, scale32),
        ("extract F32 blind", sus32, None, FLOAT, scale32),
        ("extract BF16 non-blind", sus16, w16, BF16, scale16),
        ("extract BF16 blind", sus16, None, BF16, scale16),
    ):
        kn, kd = sums()
        tn, td = sums()
        extract(sus, kind, ref, kind, scale, SEED, kn, kd)
        twin_extract(sus, ref, kind == BF16, scale, SEED, tn, td)
        checks[f"{label} twin ~= kernel (rtol 1e-9)"] = bool(
            np.allclose(kn, tn, rtol=1e-9, atol=1e-12 * np.abs(tn).max())
            and np.allclose(kd, td, rtol=1e-9, atol=0.0)
        )
    return cases, checks


def thread_scaling(cases: list[Case], repeats: int, threads: int) -> dict[str, dict[str, float]]:
    """Median kernel time with one numba thread and with all of them, per table row."""
    import numba

    out: dict[str, dict[str, float]] = {}
    for case in cases:
        label = f"{case.name} {case.dtype} {case.mode}".replace(" -", "")
        numba.set_num_threads(1)
        try:
            single = measure(case.kernel, repeats).median
        finally:
            numba.set_num_threads(threads)
        out[label] = {"1": single, "n": measure(case.kernel, repeats).median}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each kernel and memcpy")
    parser.add_argument("--twin-repeats", type=int, default=2, help="timed runs of each numpy twin")
    parser.add_argument("--no-compile-probe", action="store_true", help="skip the cache-off compile timing")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.compile_probe:
        print(json.dumps(compile_probe()))
        return

    busy = warn_if_busy()
    meter = CpuMeter()
    cold = None if args.no_compile_probe else run_compile_probe_subprocess()
    first = compile_probe()  # this process: the on-disk numba cache is used when present

    import numba

    cases, checks = build_cases(args.rows, args.cols)
    threads = numba.get_num_threads()
    layer = numba.threading_layer()

    results: list[dict[str, Any]] = []
    table = []
    for case in cases:
        dsts = [np.empty_like(a) for a in case.inputs]

        def memcpy(inputs: list[np.ndarray] = case.inputs, dsts: list[np.ndarray] = dsts) -> None:
            for src, dst in zip(inputs, dsts, strict=True):
                np.copyto(dst, src)

        copy_t = measure(memcpy, args.repeats)
        kern_t = measure(case.kernel, args.repeats)
        twin_t = measure(case.twin, args.twin_repeats, warmup=0)
        del dsts
        nbytes = sum(a.nbytes for a in case.inputs)
        elems = case.inputs[0].size
        gbps = nbytes / kern_t.median / 1e9
        copy_gbps = nbytes / copy_t.median / 1e9
        ratio = gbps / copy_gbps
        speedup = twin_t.median / kern_t.median
        target = verdict(ratio >= EMBED_TARGET) if case.is_embed else ""
        table.append([case.name, case.dtype, case.mode, f"{nbytes / MIB:.0f}", kern_t.median * 1e3,
                      kern_t.best * 1e3, gbps, elems / kern_t.median / 1e6, copy_gbps, ratio,
                      twin_t.median, speedup, target])
        results.append({
            "op": case.name, "dtype": case.dtype, "mode": case.mode, "input_bytes": nbytes,
            "elements": elems, "kernel": kern_t.to_json(), "memcpy": copy_t.to_json(),
            "numpy_twin": twin_t.to_json(), "gb_per_s": gbps, "melem_per_s": elems / kern_t.median / 1e6,
            "memcpy_gb_per_s": copy_gbps, "ratio_to_memcpy": ratio, "speedup_vs_twin": speedup,
            "target": (f">= {EMBED_TARGET} x memcpy", target) if case.is_embed else None,
        })

    print(f"Kernels on [{args.rows}, {args.cols}]: numba threads {threads} (layer {layer}), "
          f"{os.cpu_count()} CPUs; median of {args.repeats} runs after 1 warm-up "
          f"(numpy twin: median of {args.twin_repeats}).")
    print("GB/s = input bytes read / median time (non-blind reads suspect + reference); memcpy = "
          "np.copyto of the same input arrays; x memcpy = kernel GB/s / memcpy GB/s.")
    print_table(
        ["kernel", "dtype", "mode", "in MiB", "med ms", "best ms", "GB/s", "Melem/s", "memcpy GB/s",
         "x memcpy", "twin s", "x twin", "target>=0.3"],
        table,
    )
    print()
    scaling = thread_scaling(cases, args.repeats, threads)
    print(f"Thread scaling (median ms with 1 thread vs {threads}):")
    print_table(["kernel", "1 thread ms", f"{threads} threads ms", "speed-up"],
                [[k, v["1"] * 1e3, v["n"] * 1e3, v["1"] / v["n"]] for k, v in scaling.items()])
    print()
    print("Compile (first call on 64x64 arrays, seconds):")
    labels = list(first["first_call_s"])
    rows = [["this process (numba cache on)", f"{first['import_s']:.2f}",
             *[f"{first['first_call_s'][k]:.3f}" for k in labels], first["cache_hits"]]]
    if cold is not None:
        rows.append(["fresh process, cache off", f"{cold['import_s']:.2f}",
                     *[f"{cold['first_call_s'][k]:.3f}" for k in labels], cold["cache_hits"]])
    print_table(["", "import", *labels, "cache hits"], rows)
    print()
    for label, ok in checks.items():
        print(f"check: {label}: {'OK' if ok else 'MISMATCH'}")
    others = report_others(meter)

    write_json(args.json, {
        "benchmark": "kernels",
        "shape": [args.rows, args.cols],
        "machine": {**machine_info(), "numba_threading_layer": layer},
        "cpu_busy_before_start": busy,
        "cpu_used_by_others_during_run": others,
        "repeats": args.repeats,
        "twin_repeats": args.twin_repeats,
        "results": results,
        "compile": {"this_process": first, "fresh_process_cache_off": cold},
        "twin_checks": checks,
        "thread_scaling_median_s": scaling,
    })


if __name__ == "__main__":
    main()
