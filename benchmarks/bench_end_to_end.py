"""End-to-end stamp and scan through the CLI, against `cp` and sha256 of the same files: a synthetic
BF16 checkpoint (`--model synth`, default) or the real SmolLM2-135M as F32 (`--model smollm2`)."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    LAYOUTS,
    MIB,
    OUT_DIR,
    VENV_BIN,
    CpuMeter,
    ProcessRun,
    Stopwatch,
    drop_page_cache,
    machine_info,
    print_table,
    report_others,
    run_measured,
    verdict,
    warn_if_busy,
    write_json,
    write_synthetic_checkpoint,
)

STAMP_TARGET = 2.5  # stamp time <= 2.5 x `cp` of the same files
SCAN_TARGET = 1.5  # non-blind scan time <= 1.5 x sha256 of the same files
RSS_TENSORS = 3  # peak RSS < 3 x largest tensor + 300 MiB
RSS_SLACK = 300 * MIB
WORKER = " [worker thread]"

PY = str(VENV_BIN / "python")
CLI = str(VENV_BIN / "weightmark")
# coreutils: `cp -r` (copy_file_range in the kernel), then `sync FILE...` (fsync of each file,
# what stamp does to its output before it is recorded).
CP = ["cp", "-r"]
CP_SYNC = ["sh", "-c", 'cp -r "$1" "$2" && if [ -d "$2" ]; then sync "$2"/* "$2"; else sync "$2"; fi', "cp+sync"]
SHA_CODE = (
    "import hashlib, sys\n"
    "for path in sys.argv[1:]:\n"
    "    h = hashlib.sha256()\n"
    "    with open(path, 'rb') as f:\n"
    "        while b := f.read(1 << 20):\n"
    "            h.update(b)\n"
    "    print(h.hexdigest(), path)\n"
)


@dataclass
class Measured:
    """Warm runs (after one untimed warm-up) and an optional cold run of one operation."""

    label: str
    warm: list[ProcessRun]
    cold: ProcessRun | None

    @property
    def warm_s(self) -> float:
        return float(np.median([r.seconds for r in self.warm]))

    @property
    def peak_rss(self) -> int:
        runs = [*self.warm, *([self.cold] if self.cold else [])]
        return max(r.max_rss_bytes for r in runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "warm_s": [r.seconds for r in self.warm],
            "warm_median_s": self.warm_s,
            "cold_s": self.cold.seconds if self.cold else None,
            "peak_rss_bytes": self.peak_rss,
            "warm_rss_bytes": [r.max_rss_bytes for r in self.warm],
            "cold_rss_bytes": self.cold.max_rss_bytes if self.cold else None,
        }


class Bench:
    """Runs the CLI and the baselines in fresh subprocesses inside one work folder."""

    def __init__(self, work: Path, repeats: int, cold: bool) -> None:
        self.work = work
        self.repeats = repeats
        self.cold = cold
        self.home = work / "home"
        self.env = dict(os.environ, WEIGHTMARK_HOME=str(self.home))
        self.env.pop("WEIGHTMARK_PASSPHRASE", None)

    def cli(self, *args: str) -> ProcessRun:
        return run_measured([CLI, *args], self.env).check()

    def measure(
        self,
        label: str,
        argv: Callable[[], list[str]],
        before: Callable[[], None] | None = None,
        after: Callable[[ProcessRun], None] | None = None,
    ) -> Measured:
        """One untimed warm-up, `repeats` timed warm runs, then a cold one after drop_caches."""

        def once(cold: bool) -> ProcessRun:
            if before is not None:
                before()
            os.sync()  # earlier writes must not be flushed while we time this one
            if cold and not drop_page_cache():
                raise RuntimeError("drop_caches refused")
            run = run_measured(argv(), self.env).check()
            if after is not None:
                after(run)
            return run

        once(False)
        warm = [once(False) for _ in range(self.repeats)]
        cold_run = once(True) if self.cold else None
        print(f"  {label}: warm {warm[-1].seconds:.2f} s" + (f", cold {cold_run.seconds:.2f} s" if cold_run else ""),
              file=sys.stderr)
        return Measured(label, warm, cold_run)


def remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- in-process profile of where the time goes ---------------------------------------------------


@contextlib.contextmanager
def patched(target: object, name: str, replacement: object) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, replacement)
    try:
        yield
    finally:
        setattr(target, name, original)


def touch_pages(array: np.ndarray | None) -> None:
    """Read one byte per 4 KiB page so an mmap view is faulted in before the kernel runs."""
    if array is None or array.size == 0:
        return
    flat = array.reshape(-1).view(np.uint8)
    int(flat[::4096].sum())


def profile_stamp_and_scan(home: Path, model: str, licensee_id: str, base_files: list[Path], out: Path
                           ) -> dict[str, Any]:
    """Stamp and scan in this process with timers around each phase, then once under cProfile."""
    import weightmark.formats.safetensors as st
    import weightmark.scan as scan_mod
    import weightmark.stamp as stamp_mod
    from weightmark import Lab
    from weightmark.registry.store import Registry

    watch = Stopwatch()

    def lap(label: str) -> Any:
        on_main = threading.current_thread() is threading.main_thread()
        return watch(label if on_main else label + WORKER)

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lap(label):
                return fn(*args, **kwargs)

        return wrapper

    kernel_embed, kernel_extract = stamp_mod.embed, scan_mod.extract

    def embed(weights: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        with lap("read input (page faults of the mmap)"):
            touch_pages(weights)
        with lap("embed kernel"):
            return kernel_embed(weights, *args, **kwargs)

    def extract(suspect: np.ndarray, sk: int, reference: np.ndarray | None, *args: Any) -> None:
        with lap("read input (page faults of the mmap)"):
            touch_pages(suspect)
            touch_pages(reference)
        with lap("extract kernel"):
            kernel_extract(suspect, sk, reference, *args)

    class TimedHash:
        """The writer's sha256, its updates timed (they run on the writer's own threads)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def update(self, data: Any) -> None:
            with lap("sha256 of output (writer)"):
                self.inner.update(data)

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    writer_init = st.SafetensorsWriter.__init__

    def init(self: st.SafetensorsWriter, *args: Any, **kwargs: Any) -> None:
        writer_init(self, *args, **kwargs)
        self._hash = TimedHash(self._hash)

    patches = [
        (stamp_mod, "embed", embed),
        (scan_mod, "extract", extract),
        (st.SafetensorsWriter, "__init__", init),
        (st, "_write_all", timed("write()", st._write_all)),
        (st, "start_writeback", timed("start writeback", st.start_writeback)),
        (st, "_fsync", timed("fsync", st._fsync)),
        (st.SafetensorsFile, "release", timed("release (madvise)", st.SafetensorsFile.release)),
        (stamp_mod, "open_registered_base", timed("open base + checks", stamp_mod.open_registered_base)),
        (Registry, "record_issue", timed("registry", Registry.record_issue)),
        (Registry, "reserve_codeword", timed("registry", Registry.reserve_codeword)),
        (scan_mod, "identify_model", timed("open + identify + reference check", scan_mod.identify_model)),
        (scan_mod, "_same_base", timed("open + identify + reference check", scan_mod._same_base)),
    ]
    for path in base_files:  # the cold runs before us evicted them: warm the cache again
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    phases: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for target, name, repl in patches:
            stack.enter_context(patched(target, name, repl))
        # Pass 0 is an untimed warm-up: a fresh process first-touches its buffers (slow in a VM).
        for op in ("stamp", "scan non-blind", "scan blind") * 2:
            watch.seconds.clear()
            if op == "stamp":
                remove_tree(out)
            os.sync()
            with Lab(home) as lab:
                start = time.perf_counter()
                if op == "stamp":
                    lab.stamp(model, licensee_id, out)
                else:
                    lab.scan(out, blind=op == "scan blind")
                total = time.perf_counter() - start
            parts = dict(watch.seconds)
            main_thread = sum(v for k, v in parts.items() if not k.endswith(WORKER))
            parts["main thread: rest (waits on the worker, python, registry)"] = total - main_thread
            if op in phases:
                phases[op] = {"total_s": total, "phases_s": parts, "first_pass_total_s": phases[op]["total_s"]}
            else:
                phases[op] = {"total_s": total, "phases_s": parts}

    # cProfile (uninstrumented code) for anything the timers above do not name.
    profiles: dict[str, list[tuple[str, float, float]]] = {}
    for op in ("stamp", "scan non-blind"):
        prof = cProfile.Profile()
        with Lab(home) as lab:
            if op == "stamp":
                remove_tree(out)
                prof.runcall(lab.stamp, model, licensee_id, out)
            else:
                prof.runcall(lab.scan, out)
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text).sort_stats("tottime")
        stats.print_stats(12)
        (OUT_DIR / f"profile_{op.replace(' ', '_')}.txt").write_text(text.getvalue())
        top = []
        for (file, line, func), (_cc, _nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            top.append((f"{Path(file).name}:{line}({func})", tt, ct))
        top.sort(key=lambda item: -item[1])
        profiles[op] = top[:5]
    return {"phases": phases, "cprofile_top_tottime": profiles}


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("synth", "smollm2"), default="synth",
                        help="synth: synthetic BF16 checkpoint (default); smollm2: the real SmolLM2-135M as F32")
    parser.add_argument("--size-gb", type=float, default=1.0, help="synthetic checkpoint size in GiB (default 1.0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed warm runs after the warm-up (median)")
    parser.add_argument("--layout", choices=LAYOUTS, default="llama",
                        help="tensor order: llama (default) or interleaved (a bias after every matrix)")
    parser.add_argument("--no-cold", action="store_true", help="skip the drop_caches cold runs")
    parser.add_argument("--no-profile", action="store_true", help="skip the in-process phase profile")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (big files)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    busy = warn_if_busy()
    meter = CpuMeter()
    work = OUT_DIR / f"e2e-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cold = not args.no_cold
    if cold and not drop_page_cache():
        print("drop_caches refused (not root?): cold runs skipped", file=sys.stderr)
        cold = False
    bench = Bench(work, args.repeats, cold)
    try:
        results = run_all(bench, args, busy)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["cpu_used_by_others_during_run"] = report_others(meter)
    write_json(args.json, results)


@dataclass
class Subject:
    """What is stamped and scanned: the base (file or folder), its files, and what it is."""

    base: Path
    files: list[Path]
    description: str
    largest_tensor_bytes: int
    carriers: int
    checkpoint: dict[str, Any]

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def make_subject(work: Path, args: argparse.Namespace) -> Subject:
    start = time.perf_counter()
    if args.model == "smollm2":
        from benchmarks.bench_llamacpp import smollm2_base
        from weightmark.formats.safetensors import Checkpoint

        folder = smollm2_base(work)
        with Checkpoint.open(folder) as ckpt:
            infos = [info for _, info in ckpt.tensors.values()]
        files = sorted(p for p in folder.iterdir() if p.is_file())
        largest = max(info.nbytes for info in infos)
        carriers = sum(1 for info in infos if len(info.shape) >= 2 and info.numel >= 4096)
        subject = Subject(folder, files, "SmolLM2-135M F32 safetensors folder (decoded from the packaged GGUF)",
                          largest, carriers, {"tensors": len(infos), "largest_tensor_bytes": largest})
    else:
        base = work / "base" / "model.safetensors"
        ckpt = write_synthetic_checkpoint(base, args.size_gb, args.layout)
        subject = Subject(base, [base], f"BF16 safetensors file ({args.layout} layout)", ckpt.largest_tensor_bytes,
                          ckpt.carriers, {"tensors": len(ckpt.specs), "largest_tensor": ckpt.largest_tensor,
                                          "largest_tensor_bytes": ckpt.largest_tensor_bytes})
    print(f"wrote {subject.file_bytes / MIB:.0f} MiB base in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return subject


def run_all(bench: Bench, args: argparse.Namespace, busy: float) -> dict[str, Any]:
    work = bench.work
    subject = make_subject(work, args)
    base, model = subject.base, args.model

    bench.cli("init", "--insecure-no-passphrase")
    os.sync()
    register = run_measured([CLI, "model", "register", str(base), "--name", model], bench.env).check()
    out = work / ("stamped.safetensors" if base.is_file() else "stamped")
    copy = work / ("copy.safetensors" if base.is_file() else "copy")
    licensees: list[str] = []

    def new_licensee() -> None:
        lid = bench.cli("licensee", "add", f"Bench {len(licensees)}", "--jurisdiction", "GB").stdout.strip()
        licensees.append(lid)
        remove_tree(out)

    m: dict[str, Measured] = {}
    m["cli startup (--help)"] = bench.measure("cli startup (--help)", lambda: [CLI, "--help"])
    m["import stamp+scan"] = bench.measure(
        "import stamp+scan", lambda: [PY, "-c", "import weightmark.stamp, weightmark.scan"])
    m["cp"] = bench.measure("cp", lambda: [*CP, str(base), str(copy)], before=lambda: remove_tree(copy))
    m["cp+sync"] = bench.measure("cp+sync", lambda: [*CP_SYNC, str(base), str(copy)],
                                 before=lambda: remove_tree(copy))
    remove_tree(copy)
    m["sha256"] = bench.measure("sha256", lambda: [PY, "-c", SHA_CODE, *map(str, subject.files)])
    m["stamp"] = bench.measure(
        "stamp", lambda: [CLI, "stamp", model, "--licensee", licensees[-1], "--out", str(out)],
        before=new_licensee)
    scans: dict[str, list[dict[str, Any]]] = {"scan non-blind": [], "scan blind": []}
    m["scan non-blind"] = bench.measure(
        "scan non-blind", lambda: [CLI, "scan", str(out), "--json"],
        after=lambda run: scans["scan non-blind"].append(json.loads(run.stdout)))
    m["scan blind"] = bench.measure(
        "scan blind", lambda: [CLI, "scan", str(out), "--blind", "--json"],
        after=lambda run: scans["scan blind"].append(json.loads(run.stdout)))

    expected = licensees[-1]
    sanity: dict[str, Any] = {}
    for label, reports in scans.items():
        accused = [c["licensee_id"] for r in reports for c in r["accused"]]
        ok = all([c["licensee_id"] for c in r["accused"]] == [expected] for r in reports)
        top = reports[-1]["candidates"][0]
        sanity[label] = {"ok": ok, "accused": sorted(set(accused)), "expected": expected,
                         "score": top["score"], "log10_family_wise_p": top["log10_family_wise_p_value"],
                         "mode": reports[-1]["mode"]}

    profile = None
    if not args.no_profile:
        new_licensee()
        profile = profile_stamp_and_scan(bench.home, model, licensees[-1], subject.files, out)
    report(subject, m, register, sanity, profile, bench.cold, args, busy)
    return {
        "benchmark": "end_to_end",
        "machine": machine_info(),
        "cpu_busy_before_start": busy,
        "model": model,
        "size_gb": args.size_gb if model == "synth" else None,
        "layout": args.layout if model == "synth" else None,
        "checkpoint": {"file_bytes": subject.file_bytes, "carriers": subject.carriers, **subject.checkpoint},
        "register": {"seconds": register.seconds, "peak_rss_bytes": register.max_rss_bytes},
        "measurements": {k: v.to_json() for k, v in m.items()},
        "ratios": ratios(m, bench.cold),
        "targets": targets(subject.largest_tensor_bytes, m, bench.cold),
        "sanity": sanity,
        "profile": profile,
        "in_process_ratios": in_process_ratios(m, profile),
    }


def ratios(m: dict[str, Measured], cold: bool) -> dict[str, dict[str, float | None]]:
    pairs = {"stamp / cp": ("stamp", "cp"), "stamp / cp+sync": ("stamp", "cp+sync"),
             "scan non-blind / sha256": ("scan non-blind", "sha256"), "scan blind / sha256": ("scan blind", "sha256")}
    out: dict[str, dict[str, float | None]] = {}
    for label, (a, b) in pairs.items():
        ca, cb = m[a].cold, m[b].cold
        out[label] = {"warm": m[a].warm_s / m[b].warm_s,
                      "cold": ca.seconds / cb.seconds if cold and ca and cb else None}
    return out


def in_process_ratios(m: dict[str, Measured], profile: dict[str, Any] | None) -> dict[str, float] | None:
    """Stamp and scans run inside one process (the profile's second pass, no interpreter start,
    imports or numba cache loads) against the same baselines: what the per-byte work costs, the
    part that grows with the model."""
    if profile is None:
        return None
    phases = profile["phases"]
    return {"stamp / cp": phases["stamp"]["total_s"] / m["cp"].warm_s,
            "stamp / cp+sync": phases["stamp"]["total_s"] / m["cp+sync"].warm_s,
            "scan non-blind / sha256": phases["scan non-blind"]["total_s"] / m["sha256"].warm_s,
            "scan blind / sha256": phases["scan blind"]["total_s"] / m["sha256"].warm_s}


def targets(largest: int, m: dict[str, Measured], cold: bool) -> dict[str, dict[str, Any]]:
    r = ratios(m, cold)
    limit = RSS_TENSORS * largest + RSS_SLACK
    out: dict[str, dict[str, Any]] = {}
    for label, key, bound in ((f"stamp <= {STAMP_TARGET}x cp", "stamp / cp", STAMP_TARGET),
                              (f"scan non-blind <= {SCAN_TARGET}x sha256", "scan non-blind / sha256", SCAN_TARGET)):
        for temp in ("warm", "cold"):
            value = r[key][temp]
            if value is not None:
                out[f"{label} ({temp})"] = {"value": value, "limit": bound, "result": verdict(value <= bound)}
    for op in ("stamp", "scan non-blind", "scan blind"):
        out[f"peak RSS {op} < 3 x largest + 300 MiB"] = {
            "value": m[op].peak_rss, "limit": limit, "result": verdict(m[op].peak_rss < limit)}
    return out


def report(subject: Subject, m: dict[str, Measured], register: ProcessRun, sanity: dict[str, Any],
           profile: dict[str, Any] | None, cold: bool, args: argparse.Namespace, busy: float) -> None:
    gib = subject.file_bytes / (1 << 30)
    print(f"End to end on a {subject.file_bytes / MIB:.0f} MiB {subject.description}: "
          f"{subject.carriers} carriers, "
          f"largest tensor {subject.largest_tensor_bytes / MIB:.0f} MiB; CPUs {busy:.0%} busy before start.")
    print(f"Each operation is a fresh subprocess. warm = page cache warm: one untimed warm-up, then the "
          f"median of {args.repeats} timed run(s); cold = after sync + drop_caches"
          f"{'' if cold else ' (not run)'}. Peak RSS from wait4 (max over runs).")
    rows = []
    for label, meas in m.items():
        fixed = label.startswith(("cli", "import"))
        rows.append([label, meas.warm_s, "-" if fixed else f"{gib / meas.warm_s:.2f}",
                     meas.cold.seconds if meas.cold else None, f"{meas.peak_rss / MIB:.0f}"])
    rows.append(["(model register, once)", register.seconds, f"{gib / register.seconds:.2f}", None,
                 f"{register.max_rss_bytes / MIB:.0f}"])
    print_table(["operation", "warm s", "GiB/s", "cold s", "peak RSS MiB"], rows)
    print()
    r = ratios(m, cold)
    print_table(["ratio", "warm", "cold"], [[k, v["warm"], v["cold"]] for k, v in r.items()])
    print()
    t = targets(subject.largest_tensor_bytes, m, cold)
    trows = []
    for label, v in t.items():
        is_rss = "RSS" in label
        value = f"{v['value'] / MIB:.0f} MiB" if is_rss else f"{v['value']:.2f}x"
        limit = f"{v['limit'] / MIB:.0f} MiB" if is_rss else f"{v['limit']:.1f}x"
        trows.append([label, value, limit, v["result"]])
    print_table(["target", "value", "limit", "result"], trows)
    print()
    for label, s in sanity.items():
        print(f"sanity {label} ({s['mode']}): accused {s['accused']} expected [{s['expected']}] -> "
              f"{'OK' if s['ok'] else 'WRONG'}; top score {s['score']:.1f}, "
              f"log10 family-wise p {s['log10_family_wise_p']:.1f}")
    if profile is None:
        return
    print()
    print("Where the time goes (in-process, warm cache and memory, second pass; timers around library calls;")
    print(f"rows marked{WORKER} overlap the main thread's):")
    ops = list(profile["phases"])
    labels: list[str] = []
    for op in ops:
        for label in profile["phases"][op]["phases_s"]:
            if label not in labels:
                labels.append(label)
    prow = []
    for label in labels:
        values = [profile["phases"][op]["phases_s"].get(label) for op in ops]
        if max(abs(v) for v in values if v is not None) >= 0.001:  # hide sub-millisecond rows
            prow.append([label, *[None if v is None else f"{v:.3f}" for v in values]])
    prow.append(["total", *[f"{profile['phases'][op]['total_s']:.3f}" for op in ops]])
    prow.append(["(first pass in the process: total)",
                 *[f"{profile['phases'][op]['first_pass_total_s']:.3f}" for op in ops]])
    print_table(["phase (s)", *ops], prow)
    inner = in_process_ratios(m, profile) or {}
    print("In-process ratios (no interpreter start-up, imports or numba cache loads): "
          + ", ".join(f"{k} {v:.2f}" for k, v in inner.items()))
    for op, top in profile["cprofile_top_tottime"].items():
        shown = ", ".join(f"{name} {tt:.2f}s" for name, tt, _ct in top[:3])
        print(f"cProfile {op}, top tottime: {shown}")


if __name__ == "__main__":
    main()
