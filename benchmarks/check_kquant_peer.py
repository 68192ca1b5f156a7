"""Our GGUF writer's unstamped quantized copy against llama-quantize's, tensor by tensor.

From one float base: the F32 GGUF (our writer, no stamp: the input llama-quantize gets in
benchmarks/check_runtimes.py) is quantized by llama-quantize, and our unstamped copy is written by
weightmark.quantized_stamp.write_reference_copy. For every tensor: the GGML type each chose, and
for tensors of the same type the share of blocks whose bytes differ and the mean squared error of
each against the float values. Exit 1 when a type or a block differs.

Needs the llama-quantize of `make llamacpp` (never built here) and a float Hugging Face folder
(default: benchmarks/smollm2.py's SmolLM2 base, which needs the evaluation environment):

    .venv/bin/python benchmarks/check_kquant_peer.py [--base FOLDER] [--format gguf:Q4_K_M]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.llamacpp import SDIST_VERSION, binary_path  # noqa: E402


def compare(float_gguf: Path, theirs: Path, ours: Path) -> tuple[list[str], dict[str, list[float]]]:
    """(tensors whose types differ, per type [blocks, differing blocks, their SSE, our SSE, elements])."""
    import gguf

    floats = {t.name: t for t in gguf.GGUFReader(str(float_gguf)).tensors}
    a = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    mismatched = sorted(set(a) ^ set(b))
    stats: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0, 0])
    for name in sorted(set(a) & set(b)):
        qa, qb = a[name].tensor_type, b[name].tensor_type
        if qa != qb:
            mismatched.append(f"{name}: llama-quantize {qa.name}, ours {qb.name}")
            continue
        if qa.name in ("F32", "F16"):
            continue
        size = gguf.GGML_QUANT_SIZES[qa][1]
        ra = np.asarray(a[name].data).reshape(-1, size)
        rb = np.asarray(b[name].data).reshape(-1, size)
        x = np.asarray(floats[name].data, dtype=np.float64).reshape(-1)
        da = gguf.quants.dequantize(a[name].data, qa).reshape(-1)
        db = gguf.quants.dequantize(b[name].data, qb).reshape(-1)
        s = stats[qa.name]
        s[0] += ra.shape[0]
        s[1] += int((ra != rb).any(axis=1).sum())
        s[2] += float(((da - x) ** 2).sum())
        s[3] += float(((db - x) ** 2).sum())
        s[4] += x.size
    return mismatched, dict(stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="float Hugging Face folder (default: SmolLM2's)")
    parser.add_argument("--format", default="gguf:Q4_K_M", help="gguf:Q4_K_M, gguf:Q6_K, gguf:Q8_0, ...")
    parser.add_argument("--work", type=Path, help="folder for the three GGUF files (default: a temporary one)")
    args = parser.parse_args(argv)

    from benchmarks.check_runtimes import float_gguf, llama_quantize, make_base
    from weightmark.quantized_stamp import write_reference_copy

    tool = binary_path(SDIST_VERSION, "llama-quantize")
    if not tool.is_file():
        print(f"llama-quantize is not built in {tool.parent}; run `make llamacpp` first", file=sys.stderr)
        return 2
    base = args.base or make_base()
    ftype = args.format.split(":", 1)[1]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        f32, _ = float_gguf(base, work / "float-F32.gguf")
        theirs = work / f"llama-quantize-{ftype}.gguf"
        llama_quantize(tool, f32, theirs, ftype)
        ours = write_reference_copy(base, work / f"weightmark-{ftype}.gguf", args.format, overwrite=True)
        mismatched, stats = compare(f32, theirs, ours)
    print(f"{base.name}, {args.format}: our unstamped copy against llama-quantize ({SDIST_VERSION})")
    for line in mismatched:
        print(f"  type differs: {line}")
    print("| type | blocks | differing blocks | MSE llama-quantize | MSE ours | ours / theirs |")
    print("|---|---|---|---|---|---|")
    for qtype, (blocks, differ, sse_a, sse_b, n) in sorted(stats.items()):
        print(f"| {qtype} | {int(blocks)} | {differ / blocks:.3%} | {sse_a / n:.4e} | {sse_b / n:.4e} | "
              f"{sse_b / sse_a if sse_a else float('nan'):.4f} |")
    same = not mismatched and all(s[1] == 0 for s in stats.values())
    print("PASS: every tensor has llama-quantize's type and bytes" if same else "FAIL")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
