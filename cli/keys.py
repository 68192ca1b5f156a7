"""`weightmark keys ...`: export the public key and trust file, rotate the signing key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightmark.cli.common import HomeOption, info, open_lab, safe

app = typer.Typer(help="The lab's signing keys.", no_args_is_help=True)


@app.command("export-public")
def export_public(
    out: Annotated[Path, typer.Option("--out", help="Where to write the PEM public key (must not exist).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier exported public key (a PEM Ed25519 "
                                        "public key) at --out; nothing else, and nothing in the lab home.")] = False,
    home: HomeOption = None,
) -> None:
    """Write the lab's current public signing key as PEM (for courts, regulators, licensees).

    Example: weightmark keys export-public --out LAB.pub
    """
    with open_lab(home) as lab:
        lab.write_public_key(out, overwrite=force)
    typer.echo(safe(out))


@app.command("trust")
def trust(
    out: Annotated[Path, typer.Option("--out", help="Where to write the trust file (JSON; must not exist).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier trust file at --out; nothing else, and "
                                        "nothing in the lab home.")] = False,
    home: HomeOption = None,
) -> None:
    """Write every signing key the log has used, with the log indices each is valid for.

    Example: weightmark keys trust --out trust.json
    """
    with open_lab(home) as lab:
        lab.write_trust(out, overwrite=force)
    typer.echo(safe(out))


@app.command("rotate")
def rotate(home: HomeOption = None) -> None:
    """Replace the signing key; the watermark secret stays. Old entries keep verifying.

    The rotation is a log entry signed by the old key, and its checkpoint is signed by both.

    Example: weightmark keys rotate && weightmark keys export-public --out LAB.pub
    """
    with open_lab(home) as lab:
        old = lab.keys.key_id
        new = lab.rotate_keys().key_id
    info(f"Signing key rotated: {old} -> {new}. Hand out the new public key and trust file.")
    typer.echo(new)
