"""Do stamped copies run where licensees run them? SmolLM2-135M in llama.cpp and in transformers.

llama.cpp (the tools benchmarks/llamacpp.py builds; this script never starts a build):
- the float base (benchmarks/smollm2.py `float_base`) is registered in a fresh lab and stamped
  for one licensee as `gguf:Q4_K_M` and `gguf:Q8_0`;
- the unstamped copies are made by llama.cpp itself: the base written as an F32 GGUF by our
  writer with no stamp (same header and tokenizer), then `llama-quantize` to Q4_K_M and Q8_0;
  the unstamped copies of our own writer (same frozen scales, no watermark) are measured too;
- `llama-perplexity` on a fixed English text (weightmark.attacks.finetune.english_text) gives each
  copy's perplexity; the stamped/unstamped ratio should stay within 1%;
- `llama-completion` (or `llama-cli` where that is what is built; greedy: --temp 0, -n 32, one
  chat turn in SmolLM2's chat template) answers 4 fixed prompts with each copy.

transformers (in a child `python -P`, so the repo's kernels/ folder cannot shadow the Hugging
Face package of that name): the base and copies stamped as safetensors (same format), ct:w4a16,
ct:w8a16, bnb:nf4, gptq:4bit-g128 and awq:4bit-g128 are loaded with AutoModelForCausalLM and
answer the same prompts greedily (chat template applied, 32 new tokens; fewer where the
runtime's CPU path is too slow, see NEW_TOKENS_FOR); a folder that does not load is reported with
the one-line reason. GPTQ and AWQ folders load through optimum and gptqmodel, which `make runtimes`
installs into the evaluation environment beside torch's CPU build (--no-deps: their declared
dependencies would replace it with a CUDA build).

Results: benchmarks/results/runtimes.{md,json}. Needs the evaluation environment:

    make runtimes        # = .venv-eval/bin/python benchmarks/check_runtimes.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.llamacpp import SDIST_VERSION, binary_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "benchmarks" / "out" / "cache"
WORK = REPO / "benchmarks" / "out" / "runtimes"
PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three colors.",
    "How many legs does a spider have?",
)
GGUF_FORMATS = ("gguf:Q4_K_M", "gguf:Q8_0")
HF_FORMATS = ("same", "ct:w4a16", "ct:w8a16", "bnb:nf4", "gptq:4bit-g128", "awq:4bit-g128")
NEW_TOKENS = 32
# transformers 5 runs AWQ folders through gptqmodel's CPU kernel (TorchCpuAvx512AwqLinear, a JIT
# extension compiled on first use, about 2 minutes): about twice the float model's time per token
# on the machine of these figures (6.5 s against 3.3 s with the CPUs shared), so 4 answers of 32
# tokens took longer than the 15 minutes a folder is given. It answers with fewer tokens.
NEW_TOKENS_FOR = {"stamped awq:4bit-g128": 8}
FOLDER_TIMEOUT = 1800
CONTEXT = 512
TEXT_CHARS = 12_000
PPL_TARGET = 0.01  # stamped within 1% of unstamped
THREADS = 2
# llama.cpp's CPU weight repacking crashed (SIGSEGV) for every batch of more than one token on
# the machine these figures come from, on the converter-made GGUF as on ours; without it the
# ordinary CPU kernels run. Same flag for every copy, so the comparison is unaffected.
LLAMA_FLAGS = ("--no-repack",)


def _say(message: str) -> None:
    print(f"[runtimes] {message}", file=sys.stderr, flush=True)


def _isolated(code: str, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess[str]:
    """Run python code in a child with the repo off sys.path (benchmarks/ on it for smollm2)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "benchmarks"), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-P", "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)


# ------------------------------------------------------------------------------------ the copies


def make_base() -> Path:
    code = "import sys; from pathlib import Path; from smollm2 import float_base; print(float_base(Path(sys.argv[1])))"
    run = _isolated(code, str(CACHE))
    if run.returncode != 0:
        raise RuntimeError(f"float_base failed:\n{run.stderr[-3000:]}")
    return Path(run.stdout.strip().splitlines()[-1])


def float_gguf(base: Path, out: Path) -> tuple[Path, str]:
    """The unstamped base as an F32 GGUF: the header and tokenizer a stamped copy gets."""
    from weightmark.canonical import to_float32
    from weightmark.formats.gguf import write_gguf
    from weightmark.formats.safetensors import Checkpoint
    from weightmark.quantized_stamp import gguf_metadata

    with Checkpoint.open(base) as ckpt:
        arch, meta, source = gguf_metadata(ckpt, base, None)
        tensors = [(n, to_float32(i.dtype, ckpt.raw(n)).copy()) for n, (_, i) in ckpt.tensors.items()
                   if i.dtype in ("F32", "F16", "BF16")]
    write_gguf(out, arch, tensors, "F32", meta, drop_unmapped=True)
    return out, source


def make_copies(base: Path, work: Path, hf: bool, gguf: bool) -> dict[str, Path]:
    """Stamped copies for one licensee, and the unstamped GGUF copies (ours and llama.cpp's)."""
    from weightmark import Lab
    from weightmark.quantized_stamp import write_reference_copy

    lab = Lab.init(work / "lab", passphrase=None)
    lab.register_model(base, name="smollm2")
    licensee = lab.add_licensee("Northwind Research Ltd", "GB").id
    copies: dict[str, Path] = {}
    formats = (GGUF_FORMATS if gguf else ()) + (HF_FORMATS if hf else ())
    for fmt in formats:
        name = fmt.replace(":", "-") + (".gguf" if fmt.startswith("gguf:") else "")
        out = work / "stamped" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        lab.stamp("smollm2", licensee, out, fmt=fmt)
        _say(f"stamped {fmt} in {time.perf_counter() - start:.0f} s")
        copies[f"stamped {fmt}"] = out
    if gguf:
        for fmt in GGUF_FORMATS:
            out = work / "reference" / (fmt.replace(":", "-") + ".gguf")
            out.parent.mkdir(parents=True, exist_ok=True)
            copies[f"unstamped {fmt} (weightmark writer)"] = write_reference_copy(base, out, fmt)
    lab.close()
    return copies


# ------------------------------------------------------------------------------------ llama.cpp


def llama_tools() -> dict[str, Path] | None:
    """llama-quantize, llama-perplexity and a greedy generator: llama-completion (raw prompts;
    built beside the others when present) or else llama-cli (a chat client that needs
    llama.cpp's server code)."""
    tools = {t: binary_path(SDIST_VERSION, t) for t in ("llama-quantize", "llama-perplexity")}
    for generator in ("llama-completion", "llama-cli"):
        path = binary_path(SDIST_VERSION).parent / generator
        if path.is_file():
            tools["generate"] = path
            break
    ok = all(p.is_file() and os.access(p, os.X_OK) for p in tools.values())
    return tools if ok and "generate" in tools else None


def llama_quantize(tool: Path, src: Path, dst: Path, ftype: str) -> None:
    run = subprocess.run([str(tool), str(src), str(dst), ftype, str(THREADS)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"llama-quantize {ftype} exited {run.returncode}: {run.stderr[-2000:]}")


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def perplexity(tool: Path, model: Path, text: Path) -> dict[str, Any]:
    start = time.perf_counter()
    run = subprocess.run([str(tool), "-m", str(model), "-f", str(text), "-c", str(CONTEXT), "-b", str(CONTEXT),
                          "-t", str(THREADS), *LLAMA_FLAGS], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = _PPL.search(run.stdout + run.stderr)
    if run.returncode != 0 or found is None:
        tail = (run.stdout + run.stderr).strip().splitlines()[-3:]
        return {"error": f"exit {run.returncode}: " + " | ".join(tail), "seconds": seconds}
    chunks = re.search(r"calculating perplexity over (\d+) chunks", run.stdout + run.stderr)
    return {"ppl": float(found.group(1)), "ppl_err": float(found.group(2)), "seconds": round(seconds, 1),
            "chunks": int(chunks.group(1)) if chunks else None}


# SmolLM2's chat template rendered for one user turn, as transformers' apply_chat_template
# renders it (with the default system line the template adds): the same input both runtimes see
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")


def greedy_answer(tool: Path, model: Path, prompt: str) -> str:
    """llama.cpp's greedy answer (--temp 0, NEW_TOKENS tokens) to one chat turn."""
    common = ["-m", str(model), "-n", str(NEW_TOKENS), "--temp", "0", "--seed", "0", "-t", str(THREADS),
              "-c", "1024", "--no-warmup", *LLAMA_FLAGS]
    if tool.name == "llama-completion":
        run = subprocess.run([str(tool), *common, "-p", CHATML.format(prompt=prompt), "-no-cnv",
                              "--no-display-prompt"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=600)
        said = run.stdout.replace("[end of text]", "")
    else:  # llama-cli: one chat turn, transcript read from --output-file
        with tempfile.TemporaryDirectory() as tmp:
            transcript = Path(tmp) / "chat.txt"
            run = subprocess.run([str(tool), *common, "-p", prompt, "-st", "--simple-io", "-o", str(transcript)],
                                 capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
            said = transcript.read_text(errors="replace") if transcript.is_file() else ""
            said = said.split("Assistant:", 1)[1] if "Assistant:" in said else ""
    if run.returncode != 0 or not said.strip():
        tail = (run.stdout + run.stderr).strip().splitlines()[-2:]
        return f"<error: exit {run.returncode}: {' | '.join(tail)}>"
    return " ".join(said.split())


def run_llamacpp(base: Path, copies: dict[str, Path], work: Path, tools: dict[str, Path], text: Path,
                 source: list[str]) -> dict[str, Any]:
    f32, where = float_gguf(base, work / "unstamped-f32.gguf")
    source.append(where)
    models = {k: v for k, v in copies.items() if "gguf:" in k}
    for fmt in GGUF_FORMATS:
        ftype = fmt.split(":")[1]
        dst = work / f"llama-quantize-{ftype}.gguf"
        llama_quantize(tools["llama-quantize"], f32, dst, ftype)
        models[f"unstamped {fmt} (llama-quantize)"] = dst
    out: dict[str, Any] = {}
    for label, path in models.items():
        _say(f"llama-perplexity {label}")
        row = {"file": path.name, "perplexity": perplexity(tools["llama-perplexity"], path, text), "answers": {}}
        for prompt in PROMPTS:
            row["answers"][prompt] = greedy_answer(tools["generate"], path, prompt)
        out[label] = row
        _say(f"  {row['perplexity']}")
    for fmt in GGUF_FORMATS:
        stamped = out[f"stamped {fmt}"]["perplexity"].get("ppl")
        for ref in ("llama-quantize", "weightmark writer"):
            unstamped = out.get(f"unstamped {fmt} ({ref})", {}).get("perplexity", {}).get("ppl")
            if stamped and unstamped:
                out[f"stamped {fmt}"].setdefault("ratio", {})[ref] = round(stamped / unstamped, 5)
    return out


# ---------------------------------------------------------------------------------- transformers

_HF_GREEDY = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
try:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    model.eval()
    out = {}
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=int(sys.argv[3]), do_sample=False)
        out[p] = " ".join(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split())
    print(json.dumps({"answers": out}))
except Exception as exc:
    msg = " ".join(str(exc).split())[:400]
    print(json.dumps({"error": f"{type(exc).__name__}: {msg}"}))
"""


def run_transformers(base: Path, copies: dict[str, Path]) -> dict[str, Any]:
    folders = {"base (unstamped float)": base}
    folders.update({k: v for k, v in copies.items() if "gguf:" not in k})
    out: dict[str, Any] = {}
    for label, folder in folders.items():
        _say(f"transformers {label}")
        start = time.perf_counter()
        tokens = NEW_TOKENS_FOR.get(label, NEW_TOKENS)
        try:
            run = _isolated(_HF_GREEDY, str(folder), json.dumps(PROMPTS), str(tokens), timeout=FOLDER_TIMEOUT)
        except subprocess.TimeoutExpired:
            run = subprocess.CompletedProcess([], -15, "", f"stopped after {FOLDER_TIMEOUT} s")
        lines = run.stdout.strip().splitlines()
        try:
            row = json.loads(lines[-1])
        except (IndexError, ValueError):
            tail = " | ".join(run.stderr.strip().splitlines()[-2:])
            row = {"error": f"exit {run.returncode}: {tail}"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["new_tokens"] = tokens
        out[label] = row
        _say(f"  {row.get('error', 'loaded')}")
    return out


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "compressed-tensors", "bitsandbytes", "optimum", "gptqmodel",
                 "auto-gptq", "autoawq", "gguf", "weightmark"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


# ---------------------------------------------------------------------------------------- report


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtimes.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    lines = ["# Stamped copies in their runtimes (SmolLM2-135M-Instruct)", "",
             f"Generated by `benchmarks/check_runtimes.py` on {result['date']} ({result['machine']}).",
             f"Tokenizer of the GGUF copies from: {', '.join(sorted(set(result.get('tokenizer_source', []))))}.", ""]
    llama = result.get("llamacpp")
    if isinstance(llama, dict) and llama:
        lines += [f"## llama.cpp ({result['llamacpp_version']}, measured {result.get('llamacpp_date')})", "",
                  f"Perplexity over {result['text_chars']} characters of English text, -c {CONTEXT}.", "",
                  "| copy | perplexity | stamped / unstamped (llama-quantize) | stamped / unstamped (same scales) |",
                  "|---|---|---|---|"]
        for label, row in llama.items():
            ppl = row["perplexity"]
            shown = f"{ppl['ppl']:.4f} +/- {ppl['ppl_err']:.4f}" if "ppl" in ppl else f"error: {ppl['error']}"
            ratio = row.get("ratio", {})
            lines.append(f"| {label} | {shown} | {ratio.get('llama-quantize', '')} | {ratio.get('weightmark writer', '')} |")
        lines += ["", f"Greedy answers ({result.get('llamacpp_generator')}, --temp 0, -n 32, one chat turn "
                      "in SmolLM2's chat template):", ""]
        for prompt in PROMPTS:
            lines += [f"**{prompt}**", ""]
            lines += [f"- {label}: {row['answers'][prompt]}" for label, row in llama.items()]
            lines.append("")
    elif llama is not None:
        lines += ["## llama.cpp", "", str(llama), ""]
    hf = result.get("transformers")
    if hf:
        lines += [f"## transformers (measured {result.get('transformers_date')})", "",
                  "Greedy answers (chat template, do_sample=False; new tokens per folder in the table; "
                  "seconds: load and 4 answers):", ""]
        lines += ["| folder | loads | new tokens | seconds |", "|---|---|---|---|"]
        for label, row in hf.items():
            loads = "yes" if "answers" in row else "no: " + row["error"]
            lines.append(f"| {label} | {loads} | {row.get('new_tokens', NEW_TOKENS)} | {row['seconds']} |")
        lines.append("")
        lines += [f"- {label}: {row['note']}" for label, row in hf.items() if row.get("note")]
        lines.append("")
        for prompt in PROMPTS:
            lines += [f"**{prompt}**", ""]
            lines += [f"- {label}: {row['answers'][prompt]}" for label, row in hf.items() if "answers" in row]
            lines.append("")
        packages = result.get("transformers_packages", result["packages"])
        lines += ["Packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()), ""]
    (RESULTS / "runtimes.md").write_text("\n".join(lines))


def _earlier_results() -> dict[str, Any]:
    try:
        return json.loads((RESULTS / "runtimes.json").read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-llamacpp", action="store_true",
                        help="keep the llama.cpp figures of the last run (results/runtimes.json)")
    parser.add_argument("--skip-transformers", action="store_true",
                        help="keep the transformers figures of the last run (results/runtimes.json)")
    parser.add_argument("--text-chars", type=int, default=TEXT_CHARS)
    args = parser.parse_args(argv)

    from weightmark.attacks.finetune import english_text

    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    tools = None if args.skip_llamacpp else llama_tools()
    if not args.skip_llamacpp and tools is None:
        _say(f"llama-quantize, llama-perplexity and llama-completion (or llama-cli) are not all built in "
             f"{binary_path(SDIST_VERSION).parent}; "
             "run `make llamacpp` first (llama.cpp part skipped)")
    base = make_base()
    _say(f"float base: {base}")
    copies = make_copies(base, work, hf=not args.skip_transformers, gguf=tools is not None)
    text = work / "english.txt"
    text.write_text(english_text(args.text_chars))
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {THREADS} threads",
        "text_chars": len(text.read_text()), "prompts": list(PROMPTS), "packages": package_versions(),
        "llamacpp_version": f"llama-cpp-python {SDIST_VERSION} sdist", "tokenizer_source": [],
    }
    if tools is not None:
        result["llamacpp"] = run_llamacpp(base, copies, work, tools, text, result["tokenizer_source"])
        result["llamacpp_date"] = result["date"]
        result["llamacpp_generator"] = tools["generate"].name
    elif not args.skip_llamacpp:
        result["llamacpp"] = "not run: llama.cpp tools not built"
    if not args.skip_transformers:
        result["transformers"] = run_transformers(base, copies)
        result["transformers_date"] = result["date"]
        result["transformers_packages"] = result["packages"]
    # a part skipped keeps the figures of the last run that measured it, with their date
    earlier = _earlier_results()
    if args.skip_llamacpp:
        for key in ("llamacpp", "llamacpp_date", "llamacpp_generator", "tokenizer_source"):
            if key in earlier:
                result[key] = earlier[key]
    if args.skip_transformers:
        for key in ("transformers", "transformers_date", "transformers_packages"):
            if key in earlier:
                result[key] = earlier[key]
    write_report(result)
    _say(f"wrote {RESULTS / 'runtimes.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
