"""`weightmark policy ...`: show, check and install the jurisdiction policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightmark.cli.common import (
    HomeOption,
    JsonOption,
    info,
    open_lab,
    print_json,
    safe,
    safe_lines,
)
from weightmark.registry import policy as policy_module
from weightmark.roles import Role

app = typer.Typer(help="The jurisdiction policy stamping obeys.", no_args_is_help=True)


@app.command("show")
def show(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """Show the installed policy: version, date, tiers and what each may receive.

    Example: weightmark policy show --json
    """
    with open_lab(home) as lab:
        current = policy_module.current(lab.home)
    if current is None:
        if json_out:
            print_json(None)
        else:
            typer.echo("No jurisdiction policy installed: every jurisdiction may receive every variant.")
        return
    if json_out:
        print_json(current.to_json())
    else:
        typer.echo(safe_lines(current.describe()))


@app.command("set")
def set_policy(
    file: Annotated[Path, typer.Argument(help="Policy TOML file (see examples/policy.toml).")],
    home: HomeOption = None,
) -> None:
    """Validate and install a policy; its version must be higher than the installed one.

    Example: weightmark policy set ./policy-v4.toml
    """
    with open_lab(home) as lab:
        lab.require("installing a jurisdiction policy", Role.SIGNER, Role.STAMPER)
        installed = policy_module.install(lab.home, file)
    info(f"Installed {installed.label}.")


@app.command("check")
def check(
    file: Annotated[Path, typer.Argument(help="Policy TOML file to check (not installed).")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Validate a policy against the registered models before installing it: for each model, the
    control classes it trips and which countries' outcomes change; and every copy already issued
    to a jurisdiction the new policy would deny.

    Example: weightmark policy check ./policy-v4.toml --json
    """
    with open_lab(home) as lab:
        report = lab.check_policy(file)
    if json_out:
        print_json(report)
        return
    before = report["installed"] or "no installed policy"
    typer.echo(f"{safe(report['policy'])} against {safe(before)}"
               + ("" if report["installable"] else " (not installable: its version is not newer)"))
    for model in report["models"]:
        classes = safe(", ".join(model["classes_after"]) or "none")
        typer.echo(f"model {safe(model['model'])}: control classes {classes}")
        if model["refused_for_missing_facts"]:
            typer.echo(f"  no copy until declared: {safe(', '.join(model['refused_for_missing_facts']))}")
        if not model["changes"]:
            typer.echo("  no country's outcome changes")
        for change in model["changes"]:
            typer.echo(f"  {safe(change['before'])} -> {safe(change['after'])}: {safe(_countries_text(change['countries']))}")
    denied = report["issued_now_denied"]
    if denied:
        info(f"{len(denied)} {'copy was' if len(denied) == 1 else 'copies were'} already issued to "
             "jurisdictions this policy would deny:")
        for row in denied:
            typer.echo(f"issued entry {row['entry_id']}\t{safe(row['model'])}\t{safe(row['jurisdiction'])}\t"
                       f"{safe(row['legal_name'])}\t{safe(row['variant'])}\t{safe(row['rule'])}")
    else:
        typer.echo("No copy already issued would be denied.")


def _countries_text(codes: list[str]) -> str:
    """A country list, or 'N countries: every country except ...' when that is shorter."""
    import pycountry

    everything = {c.alpha_2 for c in pycountry.countries}
    rest = sorted(everything - set(codes))
    if len(codes) > 40 and len(rest) < len(codes):
        return f"{len(codes)} countries: every country except {' '.join(rest)} (--json lists them)"
    return " ".join(codes)
