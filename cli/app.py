"""The root typer app: wires the sub-apps together and holds the options of every command."""

from __future__ import annotations

from typing import Annotated

import typer

from weightmark.cli import evidence, init, keys, licensee, model, policy, registry, scan, stamp
from weightmark.cli.common import Settings
from weightmark.cli.report import report

app = typer.Typer(
    name="weightmark",
    help=(
        "Stamp per-licensee watermarks into model weights, keep a signed registry of who got "
        "which copy, and trace leaked checkpoints back to the licensee.\n\n"
        "Example: weightmark init --home ./lab && weightmark model register ./my-model --name m1"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from weightmark import __version__

        typer.echo(f"weightmark {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no informational messages on stderr; errors are still printed.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False,
) -> None:
    """Options every command obeys (the app's help text is the Typer's `help`)."""
    Settings.quiet = quiet


app.command("init")(init.init)
app.command("stamp")(stamp.stamp)
app.command("scan")(scan.scan)
app.command("report")(report)
app.add_typer(model.app, name="model")
app.add_typer(licensee.app, name="licensee")
app.add_typer(registry.app, name="registry")
app.add_typer(keys.app, name="keys")
app.add_typer(policy.app, name="policy")
app.add_typer(evidence.app, name="evidence")
