"""The `weightmark` command line: one typer sub-app per file, errors mapped to exit codes here."""

from __future__ import annotations

import signal
import sys

# Exit codes, one table for every command.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_KEY_OR_REGISTRY = 4
EXIT_POLICY = 5
# Interrupted by SIGINT or SIGTERM: 128 + the signal number, as shells report it (130, 143).


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (rolling back what is not committed), then exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turn library errors into `Error: ...` lines."""
    from weightmark.cli.app import app
    from weightmark.errors import WeightmarkError

    # Raised as a BaseException, so that click does not turn it into "Aborted!" and exit 1.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app(args=argv, prog_name="weightmark")
    except WeightmarkError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"Error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except Interrupted as exc:
        print("Error: interrupted", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        # The command is over (done or rolled back): a late signal must not raise during exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
