"""Shared CLI pieces: the --home option, opening the lab, JSON output, the progress bar."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from weightmark.lab import HOME_ENV, PASSPHRASE_ENV, Lab, passphrase_from_env

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar=HOME_ENV, help="Lab home folder (keys, registry).", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]

err = Console(stderr=True, soft_wrap=True)


def ask_passphrase() -> str | None:
    """$WEIGHTMARK_PASSPHRASE, else a prompt on the terminal, else None (the caller says why)."""
    phrase = passphrase_from_env()
    if phrase is None and sys.stdin.isatty():
        phrase = getpass.getpass(f"Passphrase for the lab keys (or set {PASSPHRASE_ENV}): ")
    return phrase


def open_lab(home: Path | None) -> Lab:
    return Lab(home, passphrase=ask_passphrase)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def format_p(log10_p: float) -> str:
    """A p-value for people: 3.1e-07, or 10^-888.9 below what a double can hold."""
    if log10_p >= -300:
        p = 10.0**log10_p
        return "1" if p >= 0.9995 else f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"
    return f"10^{log10_p:.1f}"


class BarProgress:
    """Rich progress bar on stderr, shown only when stderr is a terminal."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task = None

    def begin(self, description: str, total_bytes: int) -> None:
        if not err.is_terminal:
            return
        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=err, transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, nbytes)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
