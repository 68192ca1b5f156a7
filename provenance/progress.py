"""A minimal progress protocol the library reports to; the CLI draws it as a bar."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def begin(self, description: str, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def end(self) -> None: ...


class NoProgress:
    """Reports nothing (library default, tests, non-terminal output)."""

    def begin(self, description: str, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def end(self) -> None:
        pass


NO_PROGRESS = NoProgress()
