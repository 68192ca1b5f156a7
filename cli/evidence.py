"""`weightmark evidence verify`: check an evidence bundle offline with the lab's public key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from weightmark.cli.common import JsonOption, print_json
from weightmark.errors import InputFileError

app = typer.Typer(help="Evidence bundles from scans.", no_args_is_help=True)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror})") from None


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
    from weightmark.evidence import check_examined, verify_bundle

    try:
        key = load_pem_public_key(_read(pubkey))
    except ValueError:
        raise InputFileError(pubkey, "not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputFileError(pubkey, "not an Ed25519 public key")
    result = verify_bundle(_read(bundle), key, str(bundle))
    if suspect is not None:
        check_examined(result, suspect)
    if json_out:
        print_json({"ok": True, "tree_size": result.tree_size, "origin": result.origin,
                    "accused": result.accused, "scan": result.scan})
        return
    typer.echo(f"Evidence verified against {result.origin} (log of {result.tree_size} entries).")
    if suspect is not None:
        typer.echo(f"  {suspect} is exactly the examined checkpoint ({len(result.examined['files'])} files).")
    if not result.accused:
        typer.echo("  The bundle states that nobody was accused.")
    for accused, claim in zip(result.accused, result.scan["accused"], strict=True):
        typer.echo(f"  {accused['legal_name']} ({accused['licensee_id']}, {accused['jurisdiction']}) received "
                   f"entry {accused['log_index']} on {accused['issued_at']}; family-wise p = "
                   f"10^{claim['log10_family_wise_p_value']:.1f}")
