"""The speed targets in one table, read from the JSON files `make bench` writes.

Each row is a ratio against a baseline measured in the same run by the script that produced it:
stamp against `cp` of the same files and non-blind scan against sha256 of them
(bench_end_to_end.py, whole CLI processes), the embed kernels against memcpy of the same arrays
(bench_kernels.py), the fused 4-bit load-and-extract against sha256 of the same file, in bytes of
file per second (bench_dequant_extract.py), and `stamp --format gguf:Q4_K_M` against
llama-quantize (bench_llamacpp.py). A missing file is reported as not run.

    .venv/bin/python benchmarks/speed_summary.py [--out benchmarks/out] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MIB, OUT_DIR, print_table, verdict, write_json  # noqa: E402

# file name in the output folder -> what wrote it
SOURCES = {
    "kernels.json": "bench_kernels.py",
    "e2e-synth.json": "bench_end_to_end.py --model synth",
    "e2e-smollm2.json": "bench_end_to_end.py --model smollm2",
    "dequant-extract.json": "bench_dequant_extract.py",
    "llamacpp.json": "bench_llamacpp.py",
}
STAMP_VS_CP = 2.5
SCAN_VS_SHA = 1.5
EMBED_VS_MEMCPY = 0.3
FUSED_VS_SHA = 0.5
Q4_K_M_VS_LLAMA = 2.0


def load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def rows(folder: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, limit: float, at_most: bool, rss: int | None = None,
            note: str = "") -> None:
        ok = None if value is None else (value <= limit if at_most else value >= limit)
        out.append({"what": what, "value": value, "limit": f"{'<=' if at_most else '>='} {limit}",
                    "result": "not run" if ok is None else verdict(ok), "peak_rss_bytes": rss, "note": note})

    for model, label in (("synth", "1 GiB synthetic BF16"), ("smollm2", "SmolLM2-135M F32")):
        e2e = load(folder, f"e2e-{model}.json")
        ratios = (e2e or {}).get("ratios", {})
        meas = (e2e or {}).get("measurements", {})
        rss = meas.get("stamp", {}).get("peak_rss_bytes")
        plus = ratios.get("stamp / cp+sync", {}).get("warm")
        inner = (e2e or {}).get("in_process_ratios") or {}
        stamp_note = [f"{plus:.2f}x cp+sync" if plus is not None else "",
                      f"in-process {inner['stamp / cp']:.2f}x" if "stamp / cp" in inner else ""]
        add(f"stamp {label} / cp", ratios.get("stamp / cp", {}).get("warm"), STAMP_VS_CP, True, rss,
            "; ".join(n for n in stamp_note if n))
        scan_inner = inner.get("scan non-blind / sha256")
        add(f"scan non-blind {label} / sha256", ratios.get("scan non-blind / sha256", {}).get("warm"), SCAN_VS_SHA,
            True, meas.get("scan non-blind", {}).get("peak_rss_bytes"),
            f"in-process {scan_inner:.2f}x" if scan_inner is not None else "")
    kernels = load(folder, "kernels.json")
    embeds = {r["dtype"]: r for r in (kernels or {}).get("results", []) if r["op"] == "embed"}
    for dtype in ("BF16", "F16", "F32"):
        add(f"embed kernel {dtype} / memcpy", embeds.get(dtype, {}).get("ratio_to_memcpy"), EMBED_VS_MEMCPY, False)
    fused = (load(folder, "dequant-extract.json") or {}).get("results", {})
    for fmt in ("gguf-Q4_0", "gguf-Q4_K", "gptq-4bit-g128", "bnb-nf4"):
        entry = fused.get(fmt) or {}
        mbps = entry.get("mb_per_s", {})
        value = mbps["fused"] / mbps["sha256"] if mbps else None
        add(f"load-and-extract {fmt} / sha256 (file bytes/s)", value, FUSED_VS_SHA, False,
            entry.get("peak_rss_bytes", {}).get("fused"))
    llama = (load(folder, "llamacpp.json") or {}).get("stamp_time")
    add("stamp gguf:Q4_K_M SmolLM2 / llama-quantize", (llama or {}).get("ratio"), Q4_K_M_VS_LLAMA, True,
        (llama or {}).get("ours_peak_rss_bytes"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder of the benchmarks' JSON files")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    args = parser.parse_args()
    table = rows(args.out)
    print("Speed targets (each a ratio against a baseline measured in the same run; warm page cache):")
    print_table(["measure", "ratio", "target", "result", "peak RSS MiB", "note"],
                [[r["what"], None if r["value"] is None else f"{r['value']:.2f}x", r["limit"], r["result"],
                  None if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / MIB:.0f}", r["note"]]
                 for r in table])
    missing = [f"{name} ({source})" for name, source in SOURCES.items() if not (args.out / name).is_file()]
    if missing:
        print("not run: " + ", ".join(missing))
    write_json(args.json, {"rows": table})


if __name__ == "__main__":
    main()
