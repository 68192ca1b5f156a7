"""`weightmark keys ...`: export the public key, trust file and scan keys, rotate the signing key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightmark.cli.common import HomeOption, info, open_lab, prompt_passphrase, safe, warn
from weightmark.errors import KeyProblem, UsageError
from weightmark.roles import Role

EXPORT_PASSPHRASE_ENV = "WEIGHTMARK_EXPORT_PASSPHRASE"

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
def rotate(
    pkcs11: Annotated[str | None, typer.Option(
        "--pkcs11", metavar="MODULE:TOKEN:LABEL",
        help="Rotate to the Ed25519 key pair LABEL in the PKCS#11 token TOKEN of library MODULE (generated "
             "there, not extractable, if absent); the PIN comes from $WEIGHTMARK_PKCS11_PIN.")] = None,
    home: HomeOption = None,
) -> None:
    """Replace the signing key; the watermark secret stays. Old entries keep verifying.

    The rotation is a log entry signed by the old key, and its checkpoint is signed by both.
    With --pkcs11 the new key lives in a hardware or software token (signer.json in the home
    says which); the watermark master secret stays in lab-keys.json.

    Example: weightmark keys rotate && weightmark keys export-public --out LAB.pub
    Example: WEIGHTMARK_PKCS11_PIN=... weightmark keys rotate --pkcs11 /usr/lib/softhsm/libsofthsm2.so:lab:signer
    """
    from weightmark.pkcs11 import TokenSpec

    spec = TokenSpec.parse(pkcs11) if pkcs11 is not None else None
    with open_lab(home) as lab:
        lab.require("rotating the signing key", Role.SIGNER)
        old = lab.keys.key_id
        new = (lab.rotate_keys() if spec is None else lab.rotate_to_token(spec)).key_id
    where = f" (in the PKCS#11 token {spec.token!r}, key {spec.label!r})" if spec is not None else ""
    info(f"Signing key rotated: {old} -> {new}{where}. Hand out the new public key and trust file.")
    typer.echo(new)


@app.command("export-scan-key")
def export_scan_key(
    model: Annotated[str, typer.Option("--model", help="The registered model whose scan key to export.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the sealed scan key file (must not exist).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier scan key file of the SAME model at "
                                        "--out; nothing else, and nothing in the lab home.")] = False,
    insecure_no_passphrase: Annotated[bool, typer.Option(
        "--insecure-no-passphrase", help="Write the scan key UNENCRYPTED (demos and tests only).")] = False,
    home: HomeOption = None,
) -> None:
    """Write the key material to scan ONE model, and nothing else, sealed with a passphrase.

    The file holds the model's key, from which its chips, code positions and codewords derive:
    with it an investigator's home (weightmark init --role investigator) scans and accuses
    copies of that model. It holds nothing of the signing key or of any other model. The
    watermark is symmetric, so the same key can also EMBED codewords of that model (forge or
    wash a stamp): hand it only to people you would let stamp the model. It is encrypted with
    the passphrase in $WEIGHTMARK_EXPORT_PASSPHRASE (or asked for; the lab keys are unlocked
    with $WEIGHTMARK_PASSPHRASE as usual); the investigator unlocks it with $WEIGHTMARK_PASSPHRASE.

    Example: WEIGHTMARK_EXPORT_PASSPHRASE=... weightmark keys export-scan-key --model m1 --out m1.scankey
    """
    with open_lab(home) as lab:
        lab.require("exporting a scan key", Role.STAMPER)
        if insecure_no_passphrase:
            phrase = None
            warn("the scan key will be written UNENCRYPTED (--insecure-no-passphrase); it can stamp this model")
        else:
            phrase = _export_passphrase()
        lab.export_scan_key(model, out, phrase, overwrite=force)
    info(f"Scan key of model {model} written to {out}. It scans AND can stamp this model; keep it sealed.")
    typer.echo(safe(out))


def _export_passphrase() -> str:
    import os
    import sys

    phrase = os.environ.get(EXPORT_PASSPHRASE_ENV)
    if phrase is None:
        if not sys.stdin.isatty():
            raise KeyProblem(f"set {EXPORT_PASSPHRASE_ENV} (or run on a terminal) to seal the scan key")
        phrase = prompt_passphrase("New passphrase for the scan key: ")
        if prompt_passphrase("Repeat it: ") != phrase:
            raise UsageError("the two passphrases differ")
    if len(phrase) < 8:
        raise UsageError("the scan key's passphrase must have at least 8 characters")
    return phrase
