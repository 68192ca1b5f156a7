"""What a stamp costs a language model: SmolLM2-135M next-token KL and greedy agreement vs its base.

The float base is SmolLM2-135M-Instruct converted from the packaged GGUF (benchmarks/smollm2.py).
Compared with the base on English passages of 1,024 tokens (text from this machine, see
`weightmark.attacks.finetune.english_documents`):

- a copy stamped by weightmark (a fresh lab, default scheme parameters);
- the base re-quantized by the `gguf` package to Q8_0, the named baseline: the stamp must cost
  at most a quarter of Q8_0's mean KL (PASS/MISS);
- Q4_0, for scale.

Per variant: mean per-token KL(base || variant) of the next-token distributions (nats), greedy
next-token agreement with the base, and the relative change of the 2-D weights. MiniLM's
embedding fidelity comes from benchmarks/bench_fidelity.py (run as a subprocess) and is
reported beside it. Results: benchmarks/results/fidelity_llm.{md,json}.

    .venv-eval/bin/python benchmarks/eval_fidelity_llm.py [--passages 4] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Timer  # noqa: E402
from benchmarks.smollm2 import float_base  # noqa: E402
from weightmark import Lab  # noqa: E402
from weightmark.attacks import requantize  # noqa: E402
from weightmark.attacks.finetune import english_documents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "benchmarks" / "out" / "cache"
PASSAGE_TOKENS = 1024
KL_RATIO_TARGET = 0.25  # stamped KL <= 0.25 x Q8_0 KL


@dataclass
class Row:
    """One variant against the base, over every token of every passage."""

    label: str
    mean_kl: float
    kl_per_passage: list[float]
    greedy_agreement: float
    greedy_changed: float
    weight_rel_change: float
    seconds: float


def passages(tokenizer: Any, count: int) -> list[tuple[str, list[int]]]:
    """The first `count` documents of at least PASSAGE_TOKENS tokens, cut to that length."""
    out = []
    for source, text in english_documents():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= PASSAGE_TOKENS:
            out.append((source, ids[:PASSAGE_TOKENS]))
            if len(out) == count:
                return out
    raise SystemExit(f"only {len(out)} documents of {PASSAGE_TOKENS} tokens on this machine")


def weight_change(base: Path, other: Path) -> float:
    """sqrt(sum ||W' - W||^2 / sum ||W||^2) over the 2-D float tensors."""
    from weightmark.canonical import to_float32
    from weightmark.formats.safetensors import load_file

    a, b = load_file(base / "model.safetensors"), load_file(other / "model.safetensors")
    num = den = 0.0
    for name, (dtype, raw) in a.items():
        if raw.ndim == 2 and dtype in ("F32", "F16", "BF16"):
            w = to_float32(dtype, raw).astype(np.float64)
            w2 = to_float32(b[name][0], b[name][1]).astype(np.float64)
            num += float(np.sum((w2 - w) ** 2))
            den += float(np.sum(w * w))
    return float(np.sqrt(num / den))


def make_variants(work: Path, base: Path, timer: Timer) -> tuple[dict[str, Path], str]:
    """The stamped copy and the re-quantized bases, and the scheme string of the stamp."""
    lab = Lab.init(work / "lab", passphrase=None)
    try:
        timer.run("register", lambda: lab.register_model(base, name="smollm2"))
        lid = lab.add_licensee("Fidelity Research Ltd", "GB").id
        stamped = work / "stamped"
        issued = timer.run("stamp", lambda: lab.stamp("smollm2", lid, stamped))
    finally:
        lab.close()
    return {
        "stamped (weightmark)": stamped,
        "GGUF Q8_0": timer.run("quantize", lambda: requantize(base, work / "q8_0", "Q8_0")),
        "GGUF Q4_0": timer.run("quantize", lambda: requantize(base, work / "q4_0", "Q4_0")),
    }, issued.scheme


def minilm_fidelity() -> dict[str, Any] | None:
    """benchmarks/bench_fidelity.py's result for the stamped F32 MiniLM copy."""
    with tempfile.TemporaryDirectory(prefix="fidelity-minilm-") as tmp:
        out = Path(tmp) / "minilm.json"
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_fidelity.py"),
                               "--json", str(out)], capture_output=True, text=True)
        if not out.is_file():
            print(done.stdout + done.stderr, file=sys.stderr)
            return None
        data = json.loads(out.read_text())
    f32 = next(r for r in data["stamped"] if r["label"] == "F32")
    return {"mean_cos": f32["mean_cos"], "min_cos": f32["min_cos"],
            "target_mean_cos": data["target_mean_cos"], "sentences": data["sentences"],
            "verdict": f32["verdict"], "all_ok": data["ok"]}


def render(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# SmolLM2-135M fidelity: stamped copy vs 8-bit and 4-bit quantization",
        "",
        f"{meta['passages']} English passages of {PASSAGE_TOKENS} tokens "
        f"({meta['tokens']} next-token predictions), CPU float32, transformers "
        f"{meta['transformers']}, torch {meta['torch']}. Base: {meta['base']}.",
        f"Scheme of the stamped copy: `{meta['scheme']}`.",
        "",
        "| variant | mean KL (nats/token) | greedy agreement | greedy changed | weight rel. change |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.label} | {r.mean_kl:.3e} | {r.greedy_agreement:.4f} | "
                     f"{100 * r.greedy_changed:.2f}% | {r.weight_rel_change:.2e} |")
    lines += [
        "",
        f"Stamped KL / Q8_0 KL = {meta['kl_ratio']:.3f} (target <= {KL_RATIO_TARGET}): "
        f"**{meta['verdict']}**",
    ]
    m = meta.get("minilm")
    if m:
        lines += ["", f"all-MiniLM-L6-v2, stamped F32 copy (benchmarks/bench_fidelity.py, "
                  f"{m['sentences']} sentences): mean embedding cosine vs base {m['mean_cos']:.7f}, "
                  f"min {m['min_cos']:.7f} (target >= {m['target_mean_cos']}): {m['verdict']}"]
    lines += ["", "Passages: " + "; ".join(meta["sources"]), "",
              "Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in meta["seconds"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=4, help="number of 1,024-token passages")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the float base is kept")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for fidelity_llm.md/.json")
    parser.add_argument("--skip-minilm", action="store_true", help="do not run bench_fidelity.py")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timer = Timer()
    base = timer.run("float base", lambda: float_base(args.cache))
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = timer.run("passages", lambda: passages(tokenizer, args.passages))

    with tempfile.TemporaryDirectory(prefix="fidelity-llm-", dir=args.cache) as tmp:
        variants, scheme = make_variants(Path(tmp), base, timer)

        def load(path: Path) -> Any:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        base_model = timer.run("load", lambda: load(base))
        models = {label: timer.run("load", lambda p=path: load(p)) for label, path in variants.items()}
        kl: dict[str, list[float]] = {label: [] for label in models}
        agree: dict[str, int] = {label: 0 for label in models}
        seconds: dict[str, float] = {label: 0.0 for label in models}
        with torch.inference_mode():
            for i, (source, ids) in enumerate(texts):
                batch = torch.tensor([ids])
                ref = timer.run("forward", lambda b=batch: base_model(input_ids=b).logits[0])
                ref_logp = torch.log_softmax(ref.double(), dim=-1)
                ref_p = ref_logp.exp()
                ref_top = ref.argmax(-1)
                for label, model in models.items():
                    t0 = time.perf_counter()
                    logits = timer.run("forward", lambda m=model, b=batch: m(input_ids=b).logits[0])
                    logp = torch.log_softmax(logits.double(), dim=-1)
                    kl[label].append(float((ref_p * (ref_logp - logp)).sum(-1).mean()))
                    agree[label] += int((logits.argmax(-1) == ref_top).sum())
                    seconds[label] += time.perf_counter() - t0
                print(f"passage {i + 1}/{len(texts)} ({Path(source).name}): " + ", ".join(
                    f"{k} KL {v[-1]:.2e}" for k, v in kl.items()), file=sys.stderr)
        tokens = len(texts) * PASSAGE_TOKENS
        rows = [Row(label, float(np.mean(kl[label])), kl[label], agree[label] / tokens,
                    1 - agree[label] / tokens,
                    timer.run("weight change", lambda p=variants[label]: weight_change(base, p)),
                    seconds[label]) for label in models]

    minilm = None if args.skip_minilm else timer.run("minilm", minilm_fidelity)
    by_label = {r.label: r for r in rows}
    ratio = by_label["stamped (weightmark)"].mean_kl / by_label["GGUF Q8_0"].mean_kl
    verdict = "PASS" if ratio <= KL_RATIO_TARGET else "MISS"
    meta: dict[str, Any] = {
        "passages": len(texts), "tokens": tokens, "base": base.name, "scheme": scheme,
        "sources": [Path(s).name for s, _ in texts], "kl_ratio": ratio, "verdict": verdict,
        "kl_ratio_target": KL_RATIO_TARGET, "minilm": minilm, "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0], "seconds": timer.stages,
    }
    report = render(rows, meta)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity_llm.md").write_text(report)
    (args.out / "fidelity_llm.json").write_text(json.dumps(
        {**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0 if verdict == "PASS" and (minilm is None or minilm["verdict"] == "PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
