"""`weightmark model ...`: register base models and list them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightmark.cli.common import BarProgress, HomeOption, JsonOption, open_lab, print_json, safe

app = typer.Typer(help="Register and list base models.", no_args_is_help=True)


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
