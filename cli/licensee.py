"""`weightmark licensee ...`: add, list and show licensees."""

from __future__ import annotations

from typing import Annotated

import typer

from weightmark.cli.common import (
    HomeOption,
    JsonOption,
    name_key,
    open_lab,
    print_json,
    safe,
    warn,
)
from weightmark.registry.store import country_name, validate_jurisdiction

app = typer.Typer(help="Manage licensees (who receives copies, and where).", no_args_is_help=True)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Legal name of the licensee.")],
    jurisdiction: Annotated[str, typer.Option("--jurisdiction", help="ISO 3166-1 alpha-2 country code, e.g. GB.")],
    email: Annotated[str | None, typer.Option("--email", help="Contact address.")] = None,
    home: HomeOption = None,
) -> None:
    """Add a licensee; prints only the new licensee id on stdout.

    Example: ID=$(weightmark licensee add "Acme Research Ltd" --jurisdiction GB)
    """
    validate_jurisdiction(jurisdiction)
    with open_lab(home) as lab:
        same = [lic.id for lic in lab.registry.licensees() if name_key(lic.name) == name_key(name)]
        licensee = lab.add_licensee(name, jurisdiction, email)
    if same:
        warn(f"a licensee with this name already exists ({', '.join(same)}); added {licensee.id} anyway")
    typer.echo(safe(licensee.id))


@app.command("list")
def list_licensees(
    jurisdiction: Annotated[str | None, typer.Option("--jurisdiction", help="Only this country.")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """List licensees.

    Example: weightmark licensee list --json
    """
    if jurisdiction:
        validate_jurisdiction(jurisdiction)
    with open_lab(home) as lab:
        rows = [lic.to_json() for lic in lab.registry.licensees(jurisdiction)]
    if json_out:
        print_json(rows)
        return
    for r in rows:
        typer.echo(f"{safe(r['id'])}\t{safe(r['jurisdiction'])}\t{safe(r['name'])}")


@app.command("show")
def show(
    licensee_id: Annotated[str, typer.Argument(help="Licensee id (lic-...).")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one licensee and the copies issued to them.

    Example: weightmark licensee show lic-1a2b3c4d
    """
    with open_lab(home) as lab:
        lic = lab.registry.licensee(licensee_id)
        copies = [c.to_json() for c, _ in lab.registry.find_issued(licensee_id=licensee_id)]
    if json_out:
        print_json({**lic.to_json(), "issued_copies": copies})
        return
    typer.echo(f"{safe(lic.id)}  {safe(lic.name)}  {safe(lic.jurisdiction)} ({country_name(lic.jurisdiction)})  "
               f"{safe(lic.email or '')}")
    for c in copies:
        typer.echo(f"  entry {c['entry_id']}: {safe(c['variant'])} copy issued {c['issued_at']} -> {safe(c['out_path'])}")
