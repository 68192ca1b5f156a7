"""`weightmark report`: render a verified evidence bundle as a case report people can read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from weightmark.cli.common import HomeOption, info

if TYPE_CHECKING:
    from weightmark.report import Case

PubkeyOption = Annotated[
    Path | None,
    typer.Option("--pubkey", help="The lab's public key (PEM) you trust (default: lab.pub of the lab home).",
                 show_default=False),
]


def read_case(bundle: Path, pubkey: Path | None, home: Path | None) -> Case:
    """Read and verify BUNDLE with --pubkey, else the lab home's lab.pub (exit 3 if it does not verify)."""
    from weightmark.bounded import read_bounded
    from weightmark.errors import InputFileError
    from weightmark.evidence import MAX_BUNDLE_BYTES
    from weightmark.keys import PUBLIC_KEY_FILE
    from weightmark.lab import default_home
    from weightmark.report import load_public_key, open_case

    if pubkey is None:
        pubkey = (home or default_home()) / PUBLIC_KEY_FILE
        if not pubkey.exists():
            raise InputFileError(pubkey, "no lab public key here: pass --pubkey LAB.pub")
    key = load_public_key(pubkey)
    data = read_bounded(bundle, MAX_BUNDLE_BYTES, "evidence bundle")  # no FIFO, device or huge file
    return open_case(data, key, str(bundle))


def report(
    bundle: Annotated[Path, typer.Argument(help="The evidence bundle (JSON) written by scan --evidence.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the report (one self-contained file).")],
    pubkey: PubkeyOption = None,
    fmt: Annotated[str, typer.Option("--format", help="html, or pdf when WeasyPrint is installed.")] = "html",
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier case report at --out.")] = False,
    home: HomeOption = None,
) -> None:
    """Verify BUNDLE, then write a case report for people who will not run a CLI.

    One HTML file with everything inline (no network): the finding, the examined files by hash,
    the method and its error rates, figures, limitations, the chain of custody and the commands
    that repeat the check. A bundle that does not verify gets no report (exit 3).

    Example: weightmark report leak-evidence.json --out case.html --pubkey LAB.pub
    """
    from weightmark.report import write_report

    case = read_case(bundle, pubkey, home)
    write_report(case, out, force=force, fmt=fmt)
    info(f"Case report written to {out} (bundle {case.bundle_sha256[:16]}, verified with key "
         f"{case.signer_key_id})")
