"""`weightmark init`: create a lab home with keys and an empty registry."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from weightmark.cli.common import HomeOption, info, prompt_passphrase, safe, warn
from weightmark.errors import KeyProblem, UsageError
from weightmark.lab import PASSPHRASE_ENV, Lab, passphrase_from_env
from weightmark.registry.backend import REGISTRY_ENV, check_url


def init(
    home: HomeOption = None,
    insecure_no_passphrase: Annotated[
        bool, typer.Option("--insecure-no-passphrase", help="Store the lab keys UNENCRYPTED (demos and tests only).")
    ] = False,
    registry: Annotated[str | None, typer.Option(
        "--registry", envvar=REGISTRY_ENV, show_envvar=True,
        help="A PostgreSQL registry shared by several homes: postgresql://[user@]host[:port]/database "
             "(no password in it: libpq reads it from PGPASSFILE / ~/.pgpass). Default: registry.db in the home.",
    )] = None,
) -> None:
    """Create a lab home: an Ed25519 signing key, a watermark master secret, an empty registry.

    The secrets are encrypted with a passphrase from $WEIGHTMARK_PASSPHRASE or a prompt.

    Example: WEIGHTMARK_PASSPHRASE=... weightmark init --home ~/lab
    [--registry postgresql://weightmark@db.lab.example/registry]
    """
    if insecure_no_passphrase:
        passphrase = None
        warn("lab keys will be stored UNENCRYPTED (--insecure-no-passphrase). "
             "Use this for demos and tests only.")
    else:
        passphrase = passphrase_from_env()
        if passphrase is None:
            if not sys.stdin.isatty():
                raise KeyProblem(f"set {PASSPHRASE_ENV} (or run on a terminal) to encrypt the lab keys")
            passphrase = prompt_passphrase("New passphrase for the lab keys: ")
            if prompt_passphrase("Repeat it: ") != passphrase:
                raise UsageError("the two passphrases differ")
        if len(passphrase) < 8:
            raise UsageError("the passphrase must have at least 8 characters")
    if registry is not None:
        check_url(registry)  # before any key is made
    lab = Lab.init(home, passphrase, registry)
    info(f"Lab home ready at {lab.home} (key id {lab.keys.key_id}).")
    typer.echo(safe(lab.home))
