"""Shared CLI pieces: the --home option, opening the lab, safe printing, JSON output, progress.

Everything printed that came from a user or a file (names, paths, messages quoting them) goes
through `safe()`: control characters, escape sequences and bidi overrides are shown as visible
escapes (`\x1b`, `\u202e`) so a licensee name cannot rewrite the terminal, and messages are
printed without rich markup so `[/bold]` in a name is text, not a crash.
"""

from __future__ import annotations

import getpass
import json
import re
import sys
import unicodedata
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

from weightmark.errors import KeyProblem, NotFound, UsageError
from weightmark.lab import HOME_ENV, PASSPHRASE_ENV, Lab, passphrase_from_env
from weightmark.registry.store import DB_FILE

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar=HOME_ENV, help="Lab home folder (keys, registry).", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]

err = Console(stderr=True, soft_wrap=True)


class Settings:
    """Options of the root command that every sub-command obeys."""

    quiet = False
    registry_path: Path | None = None  # the registry a command opened, for error messages


# C0 and C1 controls (ESC, BEL, CR, NUL, DEL, CSI...), bidi embeddings, overrides and isolates,
# line/paragraph separators, and lone surrogates (bytes that were not UTF-8, from argv or a file).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte Python kept from undecodable input
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: object) -> str:
    """`str(value)` made safe to print: controls and bidi overrides become visible escapes."""
    return _UNSAFE.sub(_visible, str(value))


def safe_lines(text: str) -> str:
    """safe() for a block of several lines: the newlines stay, everything else is escaped."""
    return "\n".join(safe(line) for line in str(text).split("\n"))


def info(message: str) -> None:
    """An informational line on stderr (not with --quiet), through safe() and printed as text:
    never rich markup, emoji codes or highlighting."""
    if not Settings.quiet:
        err.print(safe(message), markup=False, highlight=False, emoji=False)


def warn(message: str) -> None:
    """A warning on stderr, shown even with --quiet."""
    err.print(f"Warning: {safe(message)}", markup=False, highlight=False, emoji=False, style="bold red")


def ask_passphrase() -> str | None:
    """$WEIGHTMARK_PASSPHRASE, else a prompt on the terminal, else None (the caller says why)."""
    phrase = passphrase_from_env()
    if phrase is None and sys.stdin.isatty():
        phrase = prompt_passphrase(f"Passphrase for the keys of this home (or set {PASSPHRASE_ENV}): ")
    return phrase


def prompt_passphrase(prompt: str) -> str:
    """getpass(), with bytes that are not text in the terminal's encoding a KeyProblem."""
    try:
        return getpass.getpass(prompt)
    except UnicodeDecodeError:
        raise KeyProblem("the passphrase typed is not valid text in the terminal's encoding") from None


def open_lab(home: Path | None) -> Lab:
    """The home at --home (or the default): a lab home, or an investigator's or auditor's home
    (weightmark.roles); the passphrase is asked for only if keys are needed."""
    from weightmark.roles import RoleHome, open_home

    lab = open_home(home, passphrase=ask_passphrase)
    Settings.registry_path = lab.registry_path if isinstance(lab, RoleHome) else lab.home / DB_FILE
    return lab


# Characters json.dumps(ensure_ascii=False) leaves raw that a terminal acts on: DEL and the C1
# controls, bidi controls, separators, and lone surrogates. They can only occur inside JSON
# strings, where a \uXXXX escape denotes the same character, so the value stays exact.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def json_text(value: Any) -> str:
    """JSON for stdout: UTF-8 text kept readable, every terminal-active character escaped."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def print_json(value: Any) -> None:
    """Print a result as JSON on stdout (the --json output of every command)."""
    typer.echo(json_text(value))


def name_key(name: str) -> str:
    """A licensee name for comparisons: NFKC, case-folded, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def resolve_licensee(lab: Lab, text: str) -> str:
    """A licensee id from an id or a legal name (compared by name_key); several -> UsageError."""
    everyone = lab.registry.licensees()
    if any(lic.id == text for lic in everyone):
        return text
    matches = [lic.id for lic in everyone if name_key(lic.name) == name_key(text)]
    if not matches:
        raise NotFound(f"no licensee with id or name {text!r} (see `weightmark licensee list`)")
    if len(matches) > 1:
        raise UsageError(f"{len(matches)} licensees are named {text!r}: {', '.join(matches)}; give one id")
    return matches[0]


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
        if Settings.quiet or not err.is_terminal:
            return
        self._bar = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=err, transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(safe(description), total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, nbytes)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
