"""`weightmark evidence verify`: check an evidence bundle offline with the lab's public key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from weightmark.bounded import MAX_PEM_BYTES, read_bounded
from weightmark.cli.common import HomeOption, JsonOption, print_json, safe
from weightmark.errors import InputFileError

app = typer.Typer(help="Evidence bundles from scans.", no_args_is_help=True)


def _read(path: Path, limit: int, what: str) -> bytes:
    return read_bounded(path, limit, what)


@app.command("verify")
def verify(
    bundle: Annotated[Path, typer.Argument(help="The evidence bundle (JSON) written by scan --evidence.")],
    pubkey: Annotated[Path, typer.Option("--pubkey", help="The lab's public key (PEM) you trust.")],
    suspect: Annotated[Path | None, typer.Option("--suspect", help="Also check that this file or folder is exactly what was examined (sha256 of every file).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Verify a bundle offline: signatures, the inclusion proof, the checkpoint, the claims.

    Needs no database and no network. Exit 0 when it verifies, 3 when it does not.

    Example: weightmark evidence verify leak-evidence.json --pubkey LAB.pub
    """
    from weightmark.evidence import MAX_BUNDLE_BYTES, check_examined, verify_bundle

    try:
        key = load_pem_public_key(_read(pubkey, MAX_PEM_BYTES, "public key"))
    except ValueError:
        raise InputFileError(pubkey, "not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputFileError(pubkey, "not an Ed25519 public key")
    result = verify_bundle(_read(bundle, MAX_BUNDLE_BYTES, "evidence bundle"), key, str(bundle))
    if suspect is not None:
        check_examined(result, suspect)
    if json_out:
        print_json({"ok": True, "tree_size": result.tree_size, "origin": result.origin,
                    "accused": result.accused, "scan": result.scan})
        return
    typer.echo(f"Evidence verified against {safe(result.origin)} (log of {result.tree_size} entries).")
    if suspect is not None:
        typer.echo(f"  {safe(suspect)} is exactly the examined checkpoint ({len(result.examined['files'])} files).")
    if not result.accused:
        typer.echo("  The bundle states that nobody was accused.")
    for accused, claim in zip(result.accused, result.scan["accused"], strict=True):
        typer.echo(f"  {safe(accused['legal_name'])} ({safe(accused['licensee_id'])}, {safe(accused['jurisdiction'])}) "
                   f"received entry {safe(accused['log_index'])} on {safe(accused['issued_at'])}; family-wise p = "
                   f"10^{claim['log10_family_wise_p_value']:.1f}")


@app.command("show")
def show(
    bundle: Annotated[Path, typer.Argument(help="The evidence bundle (JSON) written by scan --evidence.")],
    pubkey: Annotated[Path | None, typer.Option("--pubkey", help="The lab's public key (PEM) you trust (default: lab.pub of the lab home).", show_default=False)] = None,
    home: HomeOption = None,
) -> None:
    """Verify a bundle, then print its case summary: the finding, the accused, what was examined.

    Names are printed as plain text with control characters spelled out. Exit 3 when the bundle
    does not verify (nothing is printed from it then).

    Example: weightmark evidence show leak-evidence.json --pubkey LAB.pub
    """
    from weightmark.cli.report import read_case
    from weightmark.report import summary_lines

    for line in summary_lines(read_case(bundle, pubkey, home)):
        typer.echo(safe(line))
