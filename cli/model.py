"""`weightmark model ...`: register base models, list them, and record and classify their facts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightmark.cli.common import BarProgress, HomeOption, JsonOption, open_lab, print_json, safe

app = typer.Typer(help="Register and list base models; measure, declare and classify their facts.",
                  no_args_is_help=True)


@app.command("register")
def register(
    path: Annotated[Path, typer.Argument(
        help="The base weights: a float .safetensors file or model folder, a quantized .gguf "
             "file or a GPTQ folder.")],
    name: Annotated[str, typer.Option("--name", help="Name to stamp and scan by.")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Register a base model: its manifest id, carrier tensors and per-row RMS table.

    A GGUF or GPTQ base (a lab with no float master) is stamped by moving its integer codes;
    its copies are in the same format and types, with every scale byte kept.

    Example: weightmark model register ./all-MiniLM-L6-v2 --name minilm

    Example: weightmark model register ./smollm2-135m.Q4_1.gguf --name smollm2-q4
    """
    with open_lab(home) as lab:
        model = lab.register_model(path, name, progress=BarProgress())
        carriers = lab.registry.carriers(model.model_id)
    if json_out:
        print_json({"name": model.name, "model_id": model.model_id, "base_path": model.base_path,
                    "format": model.format, "carriers": len(carriers), "entry_id": model.entry_idx})
    else:
        typer.echo(f"Registered {safe(model.name)} ({model.format}): model id {model.model_id}, {len(carriers)} "
                   f"carrier tensors (entry {model.entry_idx}).")


@app.command("list")
def list_models(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """List registered models.

    Example: weightmark model list --json
    """
    with open_lab(home) as lab:
        models = lab.registry.models()
    rows = [{"name": m.name, "model_id": m.model_id, "base_path": m.base_path, "format": m.format,
             "registered_at": m.created_at, "entry_id": m.entry_idx} for m in models]
    if json_out:
        print_json(rows)
        return
    for r in rows:
        typer.echo(f"{safe(r['name'])}\t{r['model_id'][:16]}\t{safe(r['base_path'])}")


@app.command("relocate")
def relocate(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    path: Annotated[Path, typer.Argument(help="Where the model's base files are now.")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Point a model at its moved base files, after checking they are the registered weights.

    The manifest id is recomputed from the files at PATH; different weights are refused
    (exit 3). The new location goes into a signed registry entry.

    Example: weightmark model relocate minilm /data/models/all-MiniLM-L6-v2
    """
    with open_lab(home) as lab:
        model = lab.relocate_model(name, path, progress=BarProgress())
    if json_out:
        print_json({"name": model.name, "model_id": model.model_id, "base_path": model.base_path})
    else:
        typer.echo(f"Relocated {safe(model.name)} to {safe(model.base_path)}.")


def _fact_text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return safe(value)


@app.command("measure")
def measure(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Measure a registered model's base (parameters, experts, architecture, context, dtypes) and
    record the facts in a signed model-facts entry; for models registered before facts were measured.

    Example: weightmark model measure minilm --json
    """
    with open_lab(home) as lab:
        entry = lab.measure_model(name)
        facts = lab.model_facts(name)
    _print_facts(name, entry, facts, json_out)


def _print_facts(name: str, entry: int, facts: dict, json_out: bool) -> None:
    if json_out:
        print_json({"model": name, "entry_id": entry, "facts": {k: f.to_json() for k, f in sorted(facts.items())}})
        return
    typer.echo(f"Recorded facts of {safe(name)} in entry {entry}. Facts in force:")
    for key, fact in sorted(facts.items()):
        who = f" by {safe(fact.by)}" if fact.by else ""
        typer.echo(f"  {safe(key)}: {_fact_text(fact.value)} ({safe(fact.source)}{who}, entry {fact.entry}, {safe(fact.at)})")


@app.command("declare")
def declare(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    training_flops: Annotated[float | None, typer.Option("--training-flops", help="Training compute, operations.")] = None,
    training_tokens: Annotated[float | None, typer.Option(
        "--training-tokens", help="Training tokens; without --training-flops, compute is estimated as "
                                  "6 x active parameters x tokens and marked as an estimate.")] = None,
    benchmark: Annotated[list[str] | None, typer.Option(
        "--benchmark", help="NAME=SCORE with the score as a fraction (mmlu=0.862); repeatable.")] = None,
    capability: Annotated[list[str] | None, typer.Option("--capability", help="A declared capability; repeatable.")] = None,
    source: Annotated[str | None, typer.Option("--source", help="Where the facts come from (\"model card v2\").")] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who declares them (recorded with the signing key id).")] = None,
    from_file: Annotated[Path | None, typer.Option(
        "--from", help="A facts TOML file (training_flops, training_tokens, [benchmarks], capabilities, "
                       "source, by); options given as well take precedence.")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Declare facts the weights cannot show, in a signed model-facts entry; later declarations
    amend earlier ones for later decisions only.

    Example: weightmark model declare frontier-1 --training-flops 3.1e25 --benchmark mmlu=0.862
    --benchmark gpqa-diamond=0.51 --capability agentic --source "model card v2" --by "J. Doe"
    """
    from weightmark.facts import load_declaration_file, parse_benchmark

    doc = load_declaration_file(from_file) if from_file is not None else {}
    benchmarks = dict(doc.get("benchmarks", {}))
    benchmarks.update(parse_benchmark(text) for text in benchmark or [])
    with open_lab(home) as lab:
        entry = lab.declare_facts(
            name,
            training_flops if training_flops is not None else doc.get("training_flops"),
            training_tokens if training_tokens is not None else doc.get("training_tokens"),
            benchmarks, list(doc.get("capabilities", [])) + list(capability or []),
            source if source is not None else doc.get("source"), by if by is not None else doc.get("by"))
        facts = lab.model_facts(name)
    _print_facts(name, entry, facts, json_out)


@app.command("classify")
def classify(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Which control classes of the installed policy the model trips, rule by rule, with the facts
    used (value, measured or declared, by whom and when).

    Example: weightmark model classify frontier-1 --json
    """
    with open_lab(home) as lab:
        result = lab.classify(name)
    if json_out:
        print_json({"model": name, **result.to_json()})
        return
    typer.echo(f"{safe(name)} under {safe(result.label)}: "
               + (f"control classes {safe(', '.join(result.tripped))}" if result.tripped else "no control class tripped"))
    for klass in result.results:
        extra = f", missing facts {safe(', '.join(klass.missing_facts))} count as {safe(klass.missing)}" \
            if klass.status == "missing" else ""
        typer.echo(f"class {safe(klass.name)}: {safe(klass.status)}{extra}")
        for t in klass.trace:
            who = f" by {safe(t['by'])}" if t.get("by") else ""
            fact = "not known" if t["source"] is None else \
                f"{safe(t['fact'])} = {_fact_text(t['value'])} ({safe(t['source'])}{who}, entry {t['entry']}, {safe(t['at'])})"
            typer.echo(f"  {safe(t['rule'])}: {safe(t['result'])}; {fact}")
