"""`weightmark init`: create a lab home with keys and an empty registry, or a role home."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from weightmark.cli.common import HomeOption, info, prompt_passphrase, safe, warn
from weightmark.errors import KeyProblem, UsageError
from weightmark.lab import PASSPHRASE_ENV, Lab, default_home, passphrase_from_env
from weightmark.registry.backend import REGISTRY_ENV, check_url, is_url


def init(
    home: HomeOption = None,
    insecure_no_passphrase: Annotated[
        bool, typer.Option("--insecure-no-passphrase", help="Store the lab keys UNENCRYPTED (demos and tests only).")
    ] = False,
    role: Annotated[str | None, typer.Option(
        "--role", help="Make an investigator or auditor home instead of a lab home: no lab keys, the registry "
                       "read-only.")] = None,
    registry: Annotated[str | None, typer.Option(
        "--registry", envvar=REGISTRY_ENV, show_envvar=True,
        help="A lab home: a PostgreSQL registry shared by several homes, postgresql://[user@]host[:port]/database "
             "(no password in it: libpq reads it from PGPASSFILE / ~/.pgpass); default registry.db in the home. "
             "With --role: the registry to read (its database file, the lab home holding it, or the lab's "
             "postgresql:// URL, best with the read-only role of `weightmark registry grant --reader`).")] = None,
    trust: Annotated[Path | None, typer.Option(
        "--trust", help="With --role: the lab's trust file (weightmark keys trust), the anchor of every check.")] = None,
    scan_key: Annotated[list[Path] | None, typer.Option(
        "--scan-key", help="With --role investigator: a sealed scan key file (weightmark keys export-scan-key); "
                           "repeat for several models.")] = None,
) -> None:
    """Create a lab home: an Ed25519 signing key, a watermark master secret, an empty registry.

    The secrets are encrypted with a passphrase from $WEIGHTMARK_PASSPHRASE or a prompt.

    With --role investigator (scan keys, trust file, read-only registry) or --role auditor
    (trust file, read-only registry), make a home that holds only that role's material.

    Example: WEIGHTMARK_PASSPHRASE=... weightmark init --home ~/lab
    [--registry postgresql://weightmark@db.lab.example/registry]

    Example: weightmark init --home ~/scan --role investigator --scan-key m1.scankey --trust trust.json --registry /srv/lab
    """
    if role is not None:
        from weightmark.cli.common import ask_passphrase
        from weightmark.roles import RoleHome

        if registry is None or trust is None:
            raise UsageError("--role needs --registry PATH and --trust FILE")
        if insecure_no_passphrase:
            raise UsageError("--insecure-no-passphrase is for lab keys; a role home holds none "
                             "(scan keys are sealed when exported)")
        where = check_url(registry) if is_url(registry) else Path(registry)
        made = RoleHome.init_role(home if home is not None else default_home(), role, where, trust,
                                  scan_key or [], passphrase=ask_passphrase)
        info(f"{made.role.capitalize()} home ready at {made.home} (registry {made.registry_location}, read-only).")
        typer.echo(safe(made.home))
        return
    if trust is not None or scan_key:
        raise UsageError("--trust and --scan-key go with --role")
    from weightmark.roles import ROLE_FILE

    target = home if home is not None else default_home()
    if (target / ROLE_FILE).exists():
        raise UsageError(f"{target}: is an investigator's or auditor's home; a lab home goes in another folder")
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
    with Lab.init(home, passphrase, registry) as lab:
        info(f"Lab home ready at {lab.home} (key id {lab.keys.key_id}).")
        typer.echo(safe(lab.home))
