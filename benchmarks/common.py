"""Shared benchmark helpers: timing, peak RSS of subprocesses, tables, JSON and synthetic checkpoints."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "benchmarks" / "out"
VENV_BIN = REPO / ".venv" / "bin"
GNU_TIME = "/usr/bin/time"
MIB = 1 << 20
GIB = 1 << 30


# -- timing -------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock seconds of repeated runs (warm-up runs excluded)."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "best_s": self.best, "runs_s": self.times}


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Call fn `warmup` times untimed, then `repeats` times timed with perf_counter."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timing.times.append(time.perf_counter() - start)
    return timing


class Stopwatch:
    """Accumulates seconds per label; use `with watch("label"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds
        self.calls[label] = self.calls.get(label, 0) + 1

    def __call__(self, label: str) -> _Lap:
        return _Lap(self, label)


class _Lap:
    def __init__(self, watch: Stopwatch, label: str) -> None:
        self._watch = watch
        self._label = label
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._watch.add(self._label, time.perf_counter() - self._start)


# -- subprocesses and peak RSS --------------------------------------------------------------------


@dataclass
class ProcessRun:
    """One child process: wall time, its own peak RSS (from wait4) and captured output."""

    argv: list[str]
    seconds: float
    max_rss_bytes: int
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> ProcessRun:
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.argv)} exited {self.returncode}\n{self.stdout}\n{self.stderr}"
            )
        return self


# A launcher that forks the command and reports that child's rusage. We cannot wait4 the command
# directly: Linux carries the spawning process's RSS high-water mark into a child across
# fork/vfork + exec, so every child of a 200 MiB benchmark process would report >= 200 MiB.
_LAUNCHER = (
    "import os, sys, time\n"
    "t = time.perf_counter()\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    try:\n"
    "        os.execvp(sys.argv[2], sys.argv[2:])\n"
    "    finally:\n"
    "        os._exit(127)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "seconds = time.perf_counter() - t\n"
    "with open(sys.argv[1], 'w') as fh:\n"
    "    fh.write(f'{usage.ru_maxrss} {seconds}')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(argv: Sequence[str], env: dict[str, str] | None = None) -> ProcessRun:
    """Run argv to completion and return its wall time and its own peak RSS.

    The command is forked by a small launcher (GNU time when installed, else a python -S one),
    whose wait4 rusage gives the peak RSS of the command alone. Output goes to temp files.
    """
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}"
    out_path, err_path, rss_path = (OUT_DIR / f".{kind}-{tag}" for kind in ("stdout", "stderr", "rusage"))
    if os.path.exists(GNU_TIME):
        launcher = [GNU_TIME, "-f", "%M %e", "-o", str(rss_path)]
    else:
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(rss_path)]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.run([*launcher, *argv], stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        seconds = time.perf_counter() - start
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    usage = rss_path.read_text().split()
    for path in (out_path, err_path, rss_path):
        path.unlink()
    # GNU time prefixes "Command exited with non-zero status N" lines; the numbers come last.
    return ProcessRun(list(argv), seconds, int(usage[-2]) * 1024, proc.returncode, stdout, stderr)


def drop_page_cache() -> bool:
    """sync and drop the page cache (needs root); False when the kernel refuses."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        return False
    return True


def _proc_stat() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:8]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / hz, sum(fields) / hz


class CpuMeter:
    """How much CPU other processes used while we ran: busy time not ours or our children's."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        t = os.times()
        busy, _total = _proc_stat()
        return busy, t.user + t.system + t.children_user + t.children_system, time.perf_counter()

    def others(self) -> float:
        """Fraction of all CPUs that other processes kept busy since this meter was made."""
        busy0, own0, wall0 = self._start
        busy1, own1, wall1 = self._sample()
        capacity = (wall1 - wall0) * (os.cpu_count() or 1)
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / capacity if capacity > 0 else 0.0


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat); other load skews timings."""
    try:
        busy0, total0 = _proc_stat()
        time.sleep(seconds)
        busy1, total1 = _proc_stat()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = total1 - total0
    return 0.0 if total <= 0 else (busy1 - busy0) / total


def warn_if_busy(threshold: float = 0.15) -> float:
    """Print a warning on stdout when the machine is already busy before we start."""
    busy = cpu_busy_fraction()
    if busy > threshold:
        print(f"WARNING: CPUs {busy:.0%} busy before the benchmark started; timings will be skewed.")
    return busy


def report_others(meter: CpuMeter, threshold: float = 0.05) -> float:
    """Print how much CPU other processes took during the run (a warning when above threshold)."""
    others = meter.others()
    note = "  WARNING: timings are skewed" if others > threshold else ""
    print(f"Other processes used {others:.0%} of the CPUs during this run.{note}")
    return others


# -- output ---------------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain fixed-width table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numba

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for text in fh:
                if text.startswith("model name"):
                    cpu = text.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "platform": platform.platform(),
    }


def write_json(path: str | os.PathLike[str] | None, data: dict[str, Any]) -> None:
    """Write the results as indented JSON when a path was given."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    print(f"JSON written to {path}", file=sys.stderr)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- synthetic weights ----------------------------------------------------------------------------


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 bit patterns (nearest-even; inputs must be finite)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).copy()
    carry = (bits >> np.uint32(16)) & np.uint32(1)
    bits += np.uint32(0x7FFF)
    bits += carry
    bits >>= np.uint32(16)
    return bits.astype(np.uint16)


def normal_bf16(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 0.02) -> np.ndarray:
    """N(0, sigma) weights as bfloat16 bit patterns."""
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(sigma)
    return f32_to_bf16_bits(values)


@dataclass(frozen=True)
class SyntheticCheckpoint:
    path: Path
    file_bytes: int
    tensor_bytes: int
    largest_tensor_bytes: int
    largest_tensor: str
    carriers: int
    specs: list[tuple[str, str, tuple[int, ...]]]


LAYOUTS = ("llama", "interleaved")


def synthetic_specs(
    size_gb: float, layout: str = "llama", cols: int = 8192, matrices: int = 16
) -> list[tuple[str, str, tuple[int, ...]]]:
    """`matrices` BF16 [rows, cols] tensors adding up to about size_gb GiB, plus rank-1 tensors.

    At 1.0 that is 16 x [4096, 8192] (64 MiB each); smaller sizes shrink the rows (multiple of 64).
    "llama": 4 layers in name order as Hugging Face writes them, each input_layernorm, 3 MLP
    matrices, post_attention_layernorm, o_proj (a norm after every 3rd or 4th matrix);
    "interleaved": a small bias after every matrix (worst case for a one-deep write pipeline).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    rows = max(64, int(round(size_gb * (1 << 30) / (matrices * cols * 2) / 64)) * 64)
    big: tuple[int, ...] = (rows, cols)
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    if layout == "interleaved":
        for i in range(matrices):
            specs.append((f"model.layers.{i:02d}.mlp.proj.weight", "BF16", big))
            specs.append((f"model.layers.{i:02d}.mlp.proj.bias", "BF16", (rows,)))
    else:
        for layer in range(matrices // 4):
            p = f"model.layers.{layer}."
            specs.append((p + "input_layernorm.weight", "BF16", (cols,)))
            for m in ("down_proj", "gate_proj", "up_proj"):
                specs.append((p + f"mlp.{m}.weight", "BF16", big))
            specs.append((p + "post_attention_layernorm.weight", "BF16", (cols,)))
            specs.append((p + "self_attn.o_proj.weight", "BF16", big))
    specs.append(("model.norm.weight", "BF16", (cols,)))
    return specs


def write_synthetic_checkpoint(
    path: Path, size_gb: float, layout: str = "llama", seed: int = 0
) -> SyntheticCheckpoint:
    """Stream a BF16 safetensors file to `path`, one tensor in memory at a time, and fsync it."""
    from weightmark.formats.safetensors import SafetensorsWriter

    rng = np.random.default_rng(seed)
    specs = synthetic_specs(size_gb, layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        writer = SafetensorsWriter(fh, specs, {"format": "pt", "generator": "weightmark-bench"})
        for name, _dtype, shape in specs:
            if len(shape) == 1:
                array = f32_to_bf16_bits(1.0 + 0.01 * rng.standard_normal(shape, dtype=np.float32))
            else:
                array = normal_bf16(rng, shape)
            writer.write(name, array)
            del array
        writer.finish()
        fh.flush()
        os.fsync(fh.fileno())
    sizes = {name: int(np.prod(shape)) * 2 for name, _dtype, shape in specs}
    largest = max(sizes, key=lambda n: sizes[n])
    return SyntheticCheckpoint(
        path=path,
        file_bytes=path.stat().st_size,
        tensor_bytes=sum(sizes.values()),
        largest_tensor_bytes=sizes[largest],
        largest_tensor=largest,
        carriers=sum(1 for _n, _d, shape in specs if len(shape) == 2),
        specs=specs,
    )


_T = TypeVar("_T")


class Timer:
    """Wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], _T]) -> _T:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start
