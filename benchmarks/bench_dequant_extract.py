"""Throughput of what a scan does per carrier of a quantized suspect (the reader's `load`, which
dequantizes to canonical float32, then the blind extract kernel) against reading the same file.

For each format a synthetic model of `--matrices` [rows, cols] linear weights is written once:
GGUF Q4_K and Q4_0 (write_gguf, our quantizers), GPTQ 4-bit g128 and bitsandbytes NF4 (the
layer writers of tests/formats/quant_reference.py; those are slow numpy loops, so a few distinct
matrices are quantized and repeated under new layer names, which changes no byte count or
per-tensor work). Then, page cache warm, in the same run and the same process:

- `read`: the file read start to end in 16 MiB chunks into one buffer (the I/O floor);
- `sha256`: hashlib over the same chunks (what verifying a delivered copy costs);
- `load`: open_suspect(path).load(name) for every carrier (dequantize + canonicalise);
- `load+extract`: the same plus extract(values, FLOAT, None, ...) into L = 4096 sums, i.e. the
  per-carrier work of _extract_all in a blind scan before the fused kernels;
- `fused`: the reader's `extract_into` (weightmark.kernels.fused: decode and accumulate row by
  row from the packed blocks, no float32 tensor), what a blind scan does now;
- `core`: the same fused pass on one numba thread, in process CPU seconds, set against sha256's
  CPU seconds: the per-core ratio, which other processes on a shared machine barely move (the
  wall-clock columns they do); two idle cores would give up to twice it.

MB/s is file bytes / median seconds; `x sha256` is that rate over sha256's. Peak RSS is one
child process per pass (python + numba + the pass; `idle` opens the model and does nothing), so
the difference to `idle` is what the pass itself holds.

    .venv/bin/python benchmarks/bench_dequant_extract.py [--matrices 48] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    MIB,
    OUT_DIR,
    CpuMeter,
    machine_info,
    measure,
    print_table,
    report_others,
    warn_if_busy,
    write_json,
)

CODE_LENGTH = 4096
SEED = 0x5EED_0F_DEC0DE
CHUNK = 16 * MIB
FORMATS = ("gguf-Q4_K", "gguf-Q4_0", "gptq-4bit-g128", "bnb-nf4")
PROJECTIONS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj")


def layer_names(matrices: int) -> list[str]:
    """Hugging Face names of `matrices` linear layers (no q/k: no rope permutation to undo)."""
    return [f"model.layers.{i // 4}.{PROJECTIONS[i % 4]}" for i in range(matrices)]


def distinct_weights(count: int, rows: int, cols: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)) for _ in range(count)]


def write_gguf_model(path: Path, qtype: str, names: list[str], weights: list[np.ndarray]) -> None:
    from weightmark.formats.gguf import write_gguf
    from weightmark.kernels.quantize import quantize

    encoded = [quantize(qtype, w) for w in weights]
    lookup = {f"{name}.weight": encoded[i % len(encoded)] for i, name in enumerate(names)}
    tensors = [(f"{name}.weight", weights[i % len(weights)]) for i, name in enumerate(names)]
    write_gguf(path, "llama", tensors, "F32", {"attention.head_count": 16},
               encode=lambda hf_name, _w: (qtype, lookup[hf_name]))  # fmt: skip


def write_folder_model(path: Path, fmt: str, names: list[str], weights: list[np.ndarray]) -> None:
    """GPTQ or NF4 via the reference layer writers, distinct matrices repeated under new names."""
    from tests.formats.quant_reference import bnb4_layer, gptq_layer, write_checkpoint

    if fmt == "gptq-4bit-g128":
        rng = np.random.default_rng(1)
        layers = [gptq_layer("x", w, 4, 128, False, False, True, rng) for w in weights]
        config = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    else:
        layers = [bnb4_layer("x", w, "nf4", 64, False) for w in weights]
        config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
                  "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}  # fmt: skip
    tensors = []
    for i, name in enumerate(names):
        for tname, dtype, array in layers[i % len(layers)].tensors:
            tensors.append((name + tname.removeprefix("x"), dtype, array))
    write_checkpoint(path, tensors, config)


def build(fmt: str, folder: Path, names: list[str], weights: list[np.ndarray]) -> Path:
    if fmt.startswith("gguf-"):
        path = folder / f"{fmt}.gguf"
        write_gguf_model(path, fmt.removeprefix("gguf-"), names, weights)
    else:
        path = folder / fmt
        write_folder_model(path, fmt, names, weights)
    return path


def data_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def read_all(files: list[Path], digest: Callable[[bytes], Any] | None) -> int:
    """Read every file start to end in CHUNK pieces (optionally hashing them); bytes read."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    for file in files:
        h = hashlib.sha256() if digest else None
        with open(file, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
                if h is not None:
                    h.update(view[:n])
    return total


def scan_pass(path: Path, extract_too: bool, fused: bool = False) -> int:
    """One pass of the scan's per-carrier work over every 2-D tensor; returns carriers seen.

    fused: the reader's extract_into where it has one (else load + extract, as the scan does)."""
    from weightmark.canonical import as_2d
    from weightmark.formats import open_suspect
    from weightmark.kernels import FLOAT, extract

    num = np.zeros(CODE_LENGTH)
    den = np.zeros(CODE_LENGTH)
    seen = 0
    suspect = open_suspect(path)
    try:
        for name, meta in suspect.tensors().items():
            if len(meta.shape) != 2:
                continue
            scale = np.ones(meta.shape[0], dtype=np.float32)
            seen += 1
            if fused and suspect.extract_into(name, None, FLOAT, scale, SEED + seen, num, den):
                continue
            values = as_2d(suspect.load(name))
            if extract_too:
                extract(values, FLOAT, None, 0, scale, SEED + seen, num, den)
            del values
    finally:
        suspect.close()
    return seen


def cpu_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Least process CPU seconds of `repeats` calls of fn after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def one_core_ratio(path: Path, files: list[Path], repeats: int) -> tuple[float, float]:
    """sha256's CPU seconds over the fused pass's on one numba thread, and the fused pass's CPU
    seconds (each the least of `repeats` timed calls)."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        fused = cpu_seconds(lambda: scan_pass(path, True, fused=True), repeats)
    finally:
        numba.set_num_threads(threads)
    sha = cpu_seconds(lambda: read_all(files, hashlib.sha256), repeats)
    return sha / fused, fused


def first_call_seconds(fmt: str, folder: Path) -> float:
    """Load + extract on a one-matrix model of this format: JIT compile (or numba cache load)."""
    names = layer_names(1)
    path = build(fmt, folder / "probe", names, distinct_weights(1, 256, 256, seed=9))
    start = time.perf_counter()
    scan_pass(path, True)
    scan_pass(path, True, fused=True)
    return time.perf_counter() - start


PASSES = {"idle": None, "load+extract": (True, False), "fused": (True, True)}


def child_pass(path: Path, which: str) -> None:
    """The body of one peak-RSS child: open the model, then run one pass (or none for idle)."""
    from weightmark.formats import open_suspect

    if PASSES[which] is None:
        open_suspect(path).close()
        return
    extract_too, fused = PASSES[which]
    scan_pass(path, extract_too, fused)


def peak_rss(path: Path) -> dict[str, int]:
    """Peak RSS in bytes of one child process per pass over the model at path."""
    from benchmarks.common import run_measured

    script = str(Path(__file__).resolve())
    return {which: run_measured([sys.executable, script, "--child", str(path), which]).check().max_rss_bytes
            for which in PASSES}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrices", type=int, default=48, help="linear layers in each model")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--distinct", type=int, default=2, help="distinct matrices per model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic models")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_pass(Path(args.child[0]), args.child[1])
        return

    folder = OUT_DIR / "dequant-extract"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "probe").mkdir(parents=True)
    names = layer_names(args.matrices)
    weights = distinct_weights(args.distinct, args.rows, args.cols)
    params = args.matrices * args.rows * args.cols

    compile_s = {}
    paths = {}
    for fmt in args.formats:
        compile_s[fmt] = first_call_seconds(fmt, folder)
        start = time.perf_counter()
        paths[fmt] = build(fmt, folder, names, weights)
        size = sum(f.stat().st_size for f in data_files(paths[fmt]))
        print(f"wrote {fmt}: {size / MIB:.0f} MiB in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    busy = warn_if_busy()
    meter = CpuMeter()
    rows = []
    results: dict[str, Any] = {}
    for fmt in args.formats:
        files = data_files(paths[fmt])
        size = sum(f.stat().st_size for f in files)
        read = measure(lambda files=files: read_all(files, None), args.repeats)
        sha = measure(lambda files=files: read_all(files, hashlib.sha256), args.repeats)
        load = measure(lambda p=paths[fmt]: scan_pass(p, False), args.repeats)
        both = measure(lambda p=paths[fmt]: scan_pass(p, True), args.repeats)
        fused = measure(lambda p=paths[fmt]: scan_pass(p, True, fused=True), args.repeats)
        mbps = {k: size / MIB / t.median for k, t in
                (("read", read), ("sha256", sha), ("load", load), ("load+extract", both),
                 ("fused", fused))}  # fmt: skip
        core_ratio, core_seconds = one_core_ratio(paths[fmt], files, args.repeats)
        rss = peak_rss(paths[fmt])
        rows.append([fmt, size / MIB, mbps["read"], mbps["sha256"], mbps["load"],
                     mbps["load+extract"], mbps["fused"], params / fused.median / 1e6,
                     mbps["load+extract"] / mbps["sha256"], mbps["fused"] / mbps["sha256"],
                     core_seconds / params * 1e9, core_ratio,
                     *(rss[k] / MIB for k in PASSES), compile_s[fmt]])  # fmt: skip
        results[fmt] = {"file_bytes": size, "parameters": params, "first_call_s": compile_s[fmt],
                        "mb_per_s": mbps, "read": read.to_json(), "sha256": sha.to_json(),
                        "load": load.to_json(), "load_extract": both.to_json(), "fused": fused.to_json(),
                        "fused_one_thread_cpu_s": core_seconds, "one_core_x_sha256": core_ratio,
                        "peak_rss_bytes": rss}  # fmt: skip

    print(f"Scan work per carrier on {args.matrices} x [{args.rows}, {args.cols}] weights "
          f"({params / 1e6:.0f} M parameters), median of {args.repeats}, page cache warm:")  # fmt: skip
    print_table(
        ["format", "MiB", "read MB/s", "sha256 MB/s", "load MB/s", "load+extract MB/s", "fused MB/s",
         "fused Mparam/s", "load+extract x sha256", "fused x sha256", "core ns/param",
         "core x sha256", "RSS idle MiB",
         "RSS load+extract MiB", "RSS fused MiB", "1st call s"],
        rows,
    )  # fmt: skip
    print("MB/s = file MiB / median seconds. load = reader .load (dequantize to float32); "
          "load+extract adds the blind extract kernel (L = 4096); fused = the reader's extract_into "
          "(target >= 0.5x sha256). core = the fused pass on one thread in CPU ns per parameter, and "
          "sha256's CPU time over its (per core; 2 idle cores give up to 2x). RSS = peak of one child process per pass. 1st call = a 256x256 "
          "model's first passes in this process (JIT compile or numba cache load).")  # fmt: skip
    others = report_others(meter)
    write_json(args.json, {"machine": machine_info(), "busy_before": busy, "others_during": others,
                           "matrices": args.matrices, "rows": args.rows, "cols": args.cols,
                           "results": results})  # fmt: skip
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
