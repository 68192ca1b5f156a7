"""The `weightmark` command line: one typer sub-app per file, errors mapped to exit codes here.

Every failure ends as one `Error: ...` line on stderr (and, under --json, also an
`{"error": {...}}` object on stdout) with the exit code of its class; SIGINT and SIGTERM unwind
the command (temp files are removed by the context managers that made them) and exit 130 / 143.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import sqlite3
import sys
from pathlib import Path
from types import FrameType

# Exit codes, one table for every command.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_KEY_OR_REGISTRY = 4
EXIT_POLICY = 5
EXIT_ACCUSED = 10  # scan --fail-on-accuse found someone


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like KeyboardInterrupt, which `except Exception`
    cannot swallow, so every `with` block on the way out cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _install_signal_handlers() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # keep `nohup`-style ignores
            signal.signal(signum, _on_signal)


def _wants_json(args: list[str]) -> bool:
    options = args[: args.index("--")] if "--" in args else args
    return "--json" in options


def _quiet_first(args: list[str]) -> list[str]:
    """-q/--quiet is an option of the root command; accept it after the sub-command as well."""
    end = args.index("--") if "--" in args else len(args)
    head = [a for a in args[:end] if a not in ("-q", "--quiet")]
    if len(head) == end:
        return args
    return ["--quiet", *head, *args[end:]]


def _not_text(args: list[str]) -> str | None:
    """The first argument holding bytes that were not UTF-8 (Python keeps them as surrogates)."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return arg
    return None


def _ignore_late_signals() -> None:
    """The command is over (done or rolled back): a late signal must not raise during exit, nor
    kill the process while the interpreter shuts down (which resets Python handlers), so SIG_IGN.
    A caller running main() in its own process restores its handlers afterwards (SIG_IGN would
    pass to the processes it starts)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _fail(message: str, exit_code: int, kind: str, json_mode: bool) -> None:
    from weightmark.cli.common import print_json, safe

    _ignore_late_signals()
    if json_mode:
        try:
            print_json({"error": {"message": message, "exit_code": exit_code, "type": kind}})
        except OSError:
            pass
    print(f"Error: {safe(message)}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def _os_error_message(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"{where}no space left on device"
    return f"{where}{exc.strerror or exc}"


def _disk_full(path: Path | None) -> bool:
    """True when the filesystem holding `path` has no block left for us (SQLite reports a full
    disk as "disk I/O error" as often as "database or disk is full")."""
    if path is None:
        return False
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turn every failure into one `Error: ...` line.

    Without `argv` (the console script, `python -m weightmark`) the command is the process's
    only work, and what it has built is frozen out of the garbage collector twice: once its
    modules are imported (the command's collections then skip them), and on the way out, after
    one collection of what the command built, so that every cycle it left is finalized as the
    exit would (a connection closed, a file flushed). The exit itself would otherwise walk
    numba's object graph in several full collections: 0.1 s of every command that ran a kernel,
    against 0.03 s for the one collection.
    """
    try:
        _run(argv)
    finally:
        if argv is None:
            gc.collect()
            gc.freeze()


def _run(argv: list[str] | None) -> None:
    import typer

    try:  # typer vendors click from 0.2x on; older releases use click itself
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover
        from click import exceptions as click_errors  # type: ignore[no-redef]

    from weightmark.cli.app import app
    from weightmark.cli.common import Settings
    from weightmark.errors import RegistryError, WeightmarkError

    if argv is None:  # the process's own command: see main
        gc.freeze()

    args = _quiet_first(sys.argv[1:] if argv is None else list(argv))
    json_mode = _wants_json(args)
    _install_signal_handlers()
    try:
        bad = _not_text(args)
        if bad is not None:
            from weightmark.cli.common import safe

            _fail(f"argument '{safe(bad)}' is not valid UTF-8 text", EXIT_USAGE, "UsageError", json_mode)
        code = app(args=args, prog_name="weightmark", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        typer.echo(exc.format_message(), err=True)
        sys.exit(EXIT_USAGE)
    except click_errors.ClickException as exc:
        hint = ""
        if isinstance(exc, click_errors.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        _fail(exc.format_message() + hint, exc.exit_code, "UsageError", json_mode)
    except typer.Abort:
        _fail("interrupted", 130, "Interrupted", json_mode)
    except RegistryError as exc:
        if _disk_full(Settings.registry_path):
            reason = str(exc).removeprefix(f"{Settings.registry_path}: ")
            _fail(f"{Settings.registry_path}: no space left on device ({reason})", exc.exit_code,
                  type(exc).__name__, json_mode)
        _fail(str(exc), exc.exit_code, type(exc).__name__, json_mode)
    except WeightmarkError as exc:
        _fail(str(exc), exc.exit_code, type(exc).__name__, json_mode)
    except sqlite3.Error as exc:
        where = f"{Settings.registry_path}: " if Settings.registry_path else "registry: "
        full = "full" in str(exc) or _disk_full(Settings.registry_path)
        text = "no space left on device" if full else f"database error ({exc})"
        _fail(where + text, EXIT_KEY_OR_REGISTRY, "RegistryError", json_mode)
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # `weightmark ... | head`: the reader went away
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        _fail(_os_error_message(exc), EXIT_BAD_INPUT, "InputFileError", json_mode)
    except UnicodeError as exc:
        _fail(f"text that is not valid UTF-8 ({exc.reason})", EXIT_USAGE, "UsageError", json_mode)
    except Interrupted as exc:
        _fail("interrupted", 128 + exc.signum, "Interrupted", json_mode)
    except KeyboardInterrupt:
        _fail("interrupted", 130, "Interrupted", json_mode)
    _ignore_late_signals()
    sys.exit(code or EXIT_OK)
