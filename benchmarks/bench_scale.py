"""Real-size figures: an 8B-shaped BF16 checkpoint, a Mixtral slice, and a sweep, through the CLI.

Not part of `make test` or `make bench` (at --scale 1 it writes about 16 GB several times and
runs for tens of minutes). Every step is a fresh `weightmark` process measured for wall time and
its own peak RSS (benchmarks.common.run_measured), against baselines measured in the same run:

1. Llama-3-8B-shaped BF16 checkpoint (benchmarks/synth.py; ~16 GB in 4 shards at --scale 1):
   `cp -r` and sha256 of the same files, then `model register`, `stamp`, `scan` serially and
   with `--workers N` (peak RSS of the coordinator process; workers are separate processes);
2. the stamped copy converted to a Q4_0 GGUF (the leak) and scanned (accused or not);
3. a Mixtral-8x7B-shaped slice: stamped, experts permuted with their routers (permute_experts),
   converted to Q4_0 GGUF with fused experts, scanned: what re-alignment reported, accused or not;
4. a sweep of `--sweep` small suspects (a tiny llama's copies and a few corrupt files):
   suspects per second serially and with `--workers N`.

    .venv/bin/python benchmarks/bench_scale.py --scale 0.05 --json benchmarks/out/scale-0.05.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    MIB,
    OUT_DIR,
    VENV_BIN,
    CpuMeter,
    ProcessRun,
    machine_info,
    print_table,
    report_others,
    run_measured,
    warn_if_busy,
    write_json,
)
from benchmarks.synth import PRESETS, STORAGE, scaled, tensor_specs, write_checkpoint  # noqa: E402

CLI = str(VENV_BIN / "weightmark")
PY = str(VENV_BIN / "python")
SHA_CODE = (
    "import hashlib, sys\n"
    "for p in sys.argv[1:]:\n"
    "    h = hashlib.sha256()\n"
    "    with open(p, 'rb') as f:\n"
    "        while chunk := f.read(1 << 24):\n"
    "            h.update(chunk)\n"
)


class Runner:
    """Runs the CLI in fresh processes against one lab home; keeps every measured step."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.home = work / "home"
        self.env = dict(os.environ, WEIGHTMARK_HOME=str(self.home))
        self.env.pop("WEIGHTMARK_PASSPHRASE", None)
        self.steps: dict[str, dict[str, Any]] = {}

    def run(self, label: str, argv: list[str], nbytes: int = 0, ok: tuple[int, ...] = (0,)) -> ProcessRun:
        os.sync()
        run = run_measured(argv, self.env)
        if run.returncode not in ok:
            raise RuntimeError(f"{label}: {' '.join(argv)} exited {run.returncode}\n{run.stderr}")
        self.steps[label] = {"seconds": round(run.seconds, 3), "peak_rss_mib": round(run.max_rss_bytes / MIB, 1),
                             "gb_per_s": round(nbytes / 1e9 / run.seconds, 3) if nbytes else None}
        print(f"  {label}: {run.seconds:.2f} s, peak RSS {run.max_rss_bytes / MIB:.0f} MiB", file=sys.stderr)
        return run

    def cli(self, label: str, *args: str, nbytes: int = 0, ok: tuple[int, ...] = (0,)) -> ProcessRun:
        return self.run(label, [CLI, *args], nbytes, ok)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _to_gguf_q4_0(src: Path, out: Path, arch: str, fuse: bool) -> None:
    """The stamped copy as a Q4_0 GGUF, the way a leaker would convert it: tensor by tensor
    (streamed, any size) or, with fused experts, stacked in memory (small MoE slices only)."""
    import numpy as np

    from weightmark.canonical import to_float32
    from weightmark.formats.gguf import LazyTensor, write_gguf
    from weightmark.formats.safetensors import Checkpoint
    from weightmark.moe import fuse_experts

    config = json.loads((src / "config.json").read_text())
    meta = {"attention.head_count": config["num_attention_heads"]}
    if "num_local_experts" in config:
        meta.update(expert_count=config["num_local_experts"], expert_used_count=config["num_experts_per_tok"])
    with Checkpoint.open(src) as ckpt:
        def reader(name: str, dtype: str) -> Any:
            def load() -> np.ndarray:
                values = to_float32(dtype, np.asarray(ckpt.raw(name)))
                ckpt.release(name)
                return values
            return load

        tensors: list[tuple[str, Any]] = [(n, LazyTensor(tuple(i.shape), reader(n, i.dtype)))
                                          for n, (_, i) in ckpt.tensors.items()]
        if fuse:
            tensors = fuse_experts([(n, t.load()) for n, t in tensors])
        write_gguf(out, arch, tensors, "Q4_0", meta, drop_unmapped=True)


def _accused(run: ProcessRun) -> list[str]:
    return [a["licensee_id"] for a in json.loads(run.stdout)["accused"]]


def dense(r: Runner, args: argparse.Namespace) -> dict[str, Any]:
    """Steps 1 and 2: the 8B-shaped checkpoint."""
    print("8B-shaped checkpoint", file=sys.stderr)
    specs = tensor_specs(scaled(PRESETS["llama-3-8b"], args.scale))
    shard_bytes = math.ceil(sum(math.prod(shape) for _, shape in specs) * STORAGE["BF16"] / args.shards) + 1
    started = time.perf_counter()
    probe = write_checkpoint(r.work / "base", "llama-3-8b", scale=args.scale, shard_bytes=shard_bytes)
    base = probe.path
    print(f"  synthetic checkpoint written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    size = _folder_bytes(base)
    shards = sorted(str(p) for p in base.glob("*.safetensors"))
    out: dict[str, Any] = {"bytes": size, "shards": len(shards), "parameters": probe.parameters,
                           "largest_tensor_bytes": probe.largest_tensor_bytes}
    r.run("cp -r", ["cp", "-r", str(base), str(r.work / "cp-copy")], size)
    r.run("sha256", [PY, "-c", SHA_CODE, *shards], size)
    shutil.rmtree(r.work / "cp-copy")
    r.cli("init", "init", "--insecure-no-passphrase")
    r.cli("register", "model", "register", str(base), "--name", "llama8b", nbytes=size)
    lic = [r.cli(f"licensee {i}", "licensee", "add", f"Licensee {i}", "--jurisdiction", cc).stdout.strip()
           for i, cc in enumerate(("US", "DE"))]
    # The cluster's copy first, deleted once timed: at most base + one copy + the leak on disk.
    r.cli(f"stamp --workers {args.workers}", "stamp", "llama8b", "--licensee", lic[1], "--out",
          str(r.work / "copy-cluster"), "--workers", str(args.workers), nbytes=size)
    shutil.rmtree(r.work / "copy-cluster")
    r.cli("stamp serial", "stamp", "llama8b", "--licensee", lic[0], "--out", str(r.work / "copy-serial"),
          "--collusion", "1", nbytes=size)
    scan = r.cli("scan serial", "scan", str(r.work / "copy-serial"), "--json", nbytes=size)
    out["scan_serial_accused"] = _accused(scan) == [lic[0]]
    scan = r.cli(f"scan --workers {args.workers}", "scan", str(r.work / "copy-serial"), "--json", "--workers",
                 str(args.workers), nbytes=size)
    out["scan_cluster_accused"] = _accused(scan) == [lic[0]]
    started = time.perf_counter()
    _to_gguf_q4_0(r.work / "copy-serial", r.work / "leak-q4_0.gguf", "llama", fuse=False)
    out["q4_0_conversion_seconds"] = round(time.perf_counter() - started, 1)
    out["q4_0_leak_bytes"] = (r.work / "leak-q4_0.gguf").stat().st_size
    leak = r.cli("scan Q4_0 GGUF leak", "scan", str(r.work / "leak-q4_0.gguf"), "--json")
    out["q4_0_leak_accused"] = _accused(leak) == [lic[0]]
    out["q4_0_leak_score"] = json.loads(leak.stdout)["candidates"][0]["score"]
    (r.work / "leak-q4_0.gguf").unlink()
    for folder in ("copy-serial", "copy-cluster", "base"):
        shutil.rmtree(r.work / folder, ignore_errors=True)
    return out


def mixtral(r: Runner, args: argparse.Namespace) -> dict[str, Any]:
    """Step 3: a Mixtral slice, experts permuted, Q4_0 GGUF."""
    from weightmark.attacks import permute_experts

    print("Mixtral slice", file=sys.stderr)
    base = write_checkpoint(r.work / "mixtral", "mixtral-8x7b", scale=args.scale, layers=args.moe_layers).path
    r.cli("register mixtral", "model", "register", str(base), "--name", "mixtral")
    lic = r.cli("licensee mixtral", "licensee", "add", "Mixtral Licensee", "--jurisdiction", "FR").stdout.strip()
    r.cli("stamp mixtral", "stamp", "mixtral", "--licensee", lic, "--out", str(r.work / "mixtral-copy"),
          "--collusion", "1", nbytes=_folder_bytes(base))
    permute_experts(r.work / "mixtral-copy", r.work / "mixtral-permuted", seed=1)
    _to_gguf_q4_0(r.work / "mixtral-permuted", r.work / "mixtral-leak.gguf", "llama", fuse=True)
    leak = r.cli("scan mixtral permuted Q4_0", "scan", str(r.work / "mixtral-leak.gguf"), "--json")
    report = json.loads(leak.stdout)
    return {"accused": _accused(leak) == [lic], "aligned": report["aligned"],
            "score": report["candidates"][0]["score"] if report["candidates"] else None}


def sweep(r: Runner, args: argparse.Namespace) -> dict[str, Any]:
    """Step 4: suspects per second over a folder of small uploads."""
    print(f"sweep of {args.sweep} suspects", file=sys.stderr)
    base = write_checkpoint(r.work / "tiny", "llama-3.2-1b", scale=0.05, layers=2).path
    r.cli("register tiny", "model", "register", str(base), "--name", "tiny")
    lic = r.cli("licensee tiny", "licensee", "add", "Tiny Licensee", "--jurisdiction", "JP").stdout.strip()
    r.cli("stamp tiny", "stamp", "tiny", "--licensee", lic, "--out", str(r.work / "tiny-copy"), "--collusion", "1")
    uploads = r.work / "uploads"
    uploads.mkdir()
    corrupt = max(1, args.sweep // 20)
    for i in range(args.sweep - corrupt):
        (uploads / f"u{i:04d}").mkdir()
        for f in (r.work / "tiny-copy").iterdir():
            os.link(f, uploads / f"u{i:04d}" / f.name)
    for i in range(corrupt):
        (uploads / f"bad{i:03d}.safetensors").write_bytes(hashlib.sha256(str(i).encode()).digest())
    out: dict[str, Any] = {"suspects": args.sweep, "corrupt": corrupt}
    for label, extra in (("serial", []), (f"workers {args.workers}", ["--workers", str(args.workers)])):
        run = r.cli(f"sweep {label}", "scan", str(uploads), "--json", *extra, ok=(0, 3))
        lines = [json.loads(line) for line in run.stdout.splitlines()]
        out[label] = {"suspects_per_s": round(len(lines) / run.seconds, 2), "reported": len(lines),
                      "errors": sum("error" in line for line in lines),
                      "accused": sum(bool(line.get("accused")) for line in lines)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the models (1.0: Llama-3-8B, 16 GB)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--moe-layers", type=int, default=2, help="layers of the Mixtral slice")
    parser.add_argument("--sweep", type=int, default=200, help="suspects in the sweep")
    parser.add_argument("--only", choices=("dense", "mixtral", "sweep"), action="append",
                        help="run only these parts (repeatable; default all)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    busy = warn_if_busy()
    meter = CpuMeter()
    work = OUT_DIR / f"scale-{os.getpid()}"
    work.mkdir(parents=True)
    r = Runner(work)
    try:
        results: dict[str, Any] = {"scale": args.scale, "workers": args.workers, "machine": machine_info(),
                                   "cpu_busy_before": busy}
        parts = args.only or ["dense", "mixtral", "sweep"]
        if "dense" not in parts:
            r.cli("init", "init", "--insecure-no-passphrase")
        for name, part in (("dense", dense), ("mixtral", mixtral), ("sweep", sweep)):
            if name in parts:
                results[name] = part(r, args)
        results["steps"] = r.steps
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = [[label, s["seconds"], s["peak_rss_mib"], s["gb_per_s"] or ""] for label, s in r.steps.items()]
    print_table(["step", "seconds", "peak RSS MiB", "GB/s"], rows)
    print(json.dumps({k: v for k, v in results.items() if k not in ("steps", "machine")}, indent=2))
    results["cpu_used_by_others_during_run"] = report_others(meter)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
