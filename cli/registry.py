"""`weightmark registry ...`: look up signed entries and issued copies."""

from __future__ import annotations

from typing import Annotated

import typer
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from weightmark.cli.common import HomeOption, JsonOption, open_lab, print_json
from weightmark.keys import PUBLIC_KEY_FILE, key_id
from weightmark.registry.envelope import envelope, verify
from weightmark.registry.store import validate_jurisdiction

app = typer.Typer(help="Look up the signed registry.", no_args_is_help=True)


@app.command("show")
def show(
    entry_id: Annotated[int, typer.Argument(help="Registry entry number.")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one signed entry (licensee, model or issued copy) and check its signature.

    Example: weightmark registry show 4 --json
    """
    with open_lab(home) as lab:
        entry = lab.registry.entry(entry_id)
        public_key = load_pem_public_key((lab.home / PUBLIC_KEY_FILE).read_bytes())
    status = "valid"
    if entry.key_id != key_id(public_key):
        status = f"signed by key {entry.key_id}, not the lab's current key"
    else:
        try:
            verify(entry.payload, entry.signature, public_key)
        except InvalidSignature:
            status = "INVALID"
    doc = {"entry_id": entry.idx, "kind": entry.kind, "created_at": entry.created_at,
           "key_id": entry.key_id, "signature": status, "statement": entry.statement,
           "envelope": envelope(entry.payload, entry.key_id, entry.signature)}
    if json_out:
        print_json(doc)
        return
    st = entry.statement
    typer.echo(f"entry {entry.idx}: {entry.kind}, {entry.created_at}, key {entry.key_id}, signature {status}")
    typer.echo(f"subject: {st['subject'][0]['name']} sha256:{st['subject'][0]['digest']['sha256']}")
    for k, v in st["predicate"].items():
        if k != "files":
            typer.echo(f"  {k}: {v}")


@app.command("find")
def find(
    licensee: Annotated[str | None, typer.Option("--licensee", help="Licensee id.")] = None,
    jurisdiction: Annotated[str | None, typer.Option("--jurisdiction", help="ISO 3166-1 alpha-2 code.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name.")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Find issued copies by licensee, jurisdiction or model.

    Example: weightmark registry find --jurisdiction DE --json
    """
    if jurisdiction:
        validate_jurisdiction(jurisdiction)
    with open_lab(home) as lab:
        model_id = lab.registry.model(model).model_id if model else None
        names = {m.model_id: m.name for m in lab.registry.models()}
        hits = lab.registry.find_issued(licensee, jurisdiction, model_id)
    rows = [{**copy.to_json(), "model": names.get(copy.model_id), "licensee_name": lic.name,
             "jurisdiction": lic.jurisdiction} for copy, lic in hits]
    if json_out:
        print_json(rows)
        return
    for r in rows:
        typer.echo(f"entry {r['entry_id']}\t{r['model']}\t{r['licensee_id']}\t{r['jurisdiction']}\t"
                   f"{r['licensee_name']}\t{r['issued_at']}")
