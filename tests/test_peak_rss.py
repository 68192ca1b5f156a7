"""Peak memory is bounded by the largest tensor, not by the model (docs/scale.md, "Memory").

Each command runs through the real CLI in a fresh process, forked by a small launcher whose
wait4() gives the command's own peak RSS (a child forked straight from pytest would report
pytest's size). The same command on a tiny model of the same layout gives the import baseline
(Python, numpy, numba's cached kernels, the registry); what a command may add to it is a
multiple of T, the largest tensor's size in float32, stated per command in docs/scale.md.

The model: a Llama layout whose token embedding and head (16 MB each in BF16) are the largest
tensors, and 16 layers of smaller ones: 104 MB of BF16, 6.5 T as float32, so a command that
held the whole model (in any dtype) would break its bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.synth import Preset, write_checkpoint
from weightmark.formats.gguf import write_gguf

BIG = Preset("llama", 512, 1024, 16, 8, 4, 16384)
TINY = Preset("llama", 64, 128, 2, 2, 1, 256)
MIB = 1 << 20

# What each command may add to its import baseline, in units of T (docs/scale.md, "Memory").
BOUNDS = {
    "register": 2.0,
    "stamp": 2.0,
    "stamp gguf:Q4_0": 4.0,
    "scan non-blind": 2.0,
    "scan blind": 2.0,
    "scan Q4_0 GGUF": 1.6,
}

_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    try:\n"
    "        os.execv(sys.argv[2], sys.argv[2:])\n"
    "    finally:\n"
    "        os._exit(127)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as fh:\n"
    "    fh.write(str(usage.ru_maxrss * 1024))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _peak(tmp: Path, home: Path, *args: str) -> tuple[int, str]:
    """(peak RSS in bytes of `weightmark ARGS` alone, its stdout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTMARK_")}
    env["WEIGHTMARK_HOME"] = str(home)
    record = tmp / "rusage"
    run = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(record), sys.executable, "-m", "weightmark",
                          *args], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"weightmark {' '.join(args)}: {run.stderr[-2000:]}"
    return int(record.read_text()), run.stdout


def _model(folder: Path, preset: Preset) -> tuple[Path, int]:
    written = write_checkpoint(folder, preset)
    # llama.cpp needs a tokenizer in a GGUF copy: a converter-style donor file beside the base
    write_gguf(folder / "tokenizer.gguf", "llama", [("model.norm.weight", np.ones(8, np.float32))], "F32",
               {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(preset.vocab)],
                "tokenizer.ggml.token_type": [1] * preset.vocab, "tokenizer.ggml.merges": ["t 1"]})
    return written.path, written.largest_tensor_bytes // 2 * 4  # BF16 -> float32 bytes


def _measure(work: Path, preset: Preset, check: bool) -> tuple[dict[str, int], int, int]:
    work.mkdir()
    base, largest = _model(work / "base", preset)
    home = work / "home"
    peaks: dict[str, int] = {}
    _peak(work, home, "init", "--insecure-no-passphrase")
    peaks["register"], _ = _peak(work, home, "model", "register", str(base), "--name", "m")
    _, lid = _peak(work, home, "licensee", "add", "Northwind", "--jurisdiction", "GB")
    lid = lid.strip()
    peaks["stamp"], _ = _peak(work, home, "stamp", "m", "--licensee", lid, "--out", str(work / "copy"),
                              "--collusion", "1")
    peaks["stamp gguf:Q4_0"], _ = _peak(work, home, "stamp", "m", "--licensee", lid, "--out",
                                        str(work / "copy.gguf"), "--format", "gguf:Q4_0", "--collusion", "1")
    accused = {}
    for label, args in (("scan non-blind", [str(work / "copy")]), ("scan blind", [str(work / "copy"), "--blind"]),
                        ("scan Q4_0 GGUF", [str(work / "copy.gguf")])):
        peaks[label], out = _peak(work, home, "scan", *args, "--json")
        accused[label] = [a["licensee_id"] for a in json.loads(out)["accused"]]
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    # the copies are real: the non-blind scans of the full-size model find their licensee
    assert not check or accused["scan non-blind"] == [lid] and accused["scan Q4_0 GGUF"] == [lid]
    return peaks, largest, model_bytes


@pytest.fixture(scope="module")
def peaks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, int, int, int]]:
    work = tmp_path_factory.mktemp("rss")
    baseline, _, _ = _measure(work / "tiny", TINY, check=False)
    big, largest, model_bytes = _measure(work / "big", BIG, check=True)
    return {label: (big[label], baseline[label], largest, model_bytes) for label in BOUNDS}


@pytest.mark.parametrize("label", list(BOUNDS))
def test_peak_rss_is_bounded_by_the_largest_tensor(peaks, label: str) -> None:
    peak, baseline, largest, model_bytes = peaks[label]
    added = peak - baseline
    bound = BOUNDS[label] * largest
    assert model_bytes * 2 > 1.5 * bound  # the model as float32 is well above the bound: it can fail
    assert added <= bound, (f"{label}: peak RSS {peak / MIB:.0f} MiB is {added / MIB:.0f} MiB over the "
                            f"import baseline ({baseline / MIB:.0f} MiB); bound {BOUNDS[label]} x T = "
                            f"{bound / MIB:.0f} MiB (T = {largest / MIB:.0f} MiB, the largest tensor as float32)")


def test_report_figures(peaks, capsys: pytest.CaptureFixture[str]) -> None:
    """The measured multiples of T, printed with -s (the figures docs/scale.md quotes)."""
    for label, (peak, baseline, largest, _) in peaks.items():
        ratio = (peak - baseline) / largest
        print(f"{label}: peak {peak / MIB:.0f} MiB, baseline {baseline / MIB:.0f} MiB, +{ratio:.2f} T")
        assert ratio <= BOUNDS[label]
