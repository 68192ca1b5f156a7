"""`weightmark policy ...`: show and install the jurisdiction policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightmark.cli.common import HomeOption, JsonOption, info, open_lab, print_json, safe_lines
from weightmark.registry import policy as policy_module

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
        installed = policy_module.install(lab.home, file)
    info(f"Installed {installed.label}.")
