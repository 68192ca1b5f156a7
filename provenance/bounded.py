"""Bounded reads of small files from users and strangers: a size cap, regular files only, and
JSON that cannot exhaust memory or the stack.

A key file, a public key, a policy or an evidence bundle is read whole; `/dev/zero`, a FIFO or
a multi-gigabyte file under its name must fail at once with a one-line error, not hang or fill
memory. Files are opened with O_NONBLOCK (so a FIFO does not wait for a writer), checked to be
regular files, and read to at most `limit + 1` bytes.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from weightmark.errors import InputFileError

MAX_PEM_BYTES = 16 << 10  # a PEM public key is a few hundred bytes
# Deeper nesting than any file we write, far below what exhausts Python's stack.
MAX_JSON_DEPTH = 64
# Texts up to this size have their nesting checked before parsing (a pass in Python); longer
# ones rely on the parser's own RecursionError.
_DEPTH_SCAN_BYTES = 1 << 20


def read_bounded(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; InputFileError otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise InputFileError(path, f"cannot read the {what} ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputFileError(path, f"is a folder, not a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise InputFileError(path, f"is not a regular file (a device, pipe or socket), not a {what}")
        if info.st_size > limit:
            raise InputFileError(path, f"is {info.st_size} bytes, larger than any {what} ({limit} at most)")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise InputFileError(path, f"cannot read the {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if size > limit:
        raise InputFileError(path, f"grew past {limit} bytes while being read; not a {what}")
    return b"".join(chunks)


def json_depth_ok(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when no array or object in the JSON text nests deeper than `limit` (strings skipped)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def loads_json(data: bytes, source: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parse UTF-8 JSON text; too deep, not UTF-8 or not JSON -> InputFileError naming `source`."""
    too_deep = InputFileError(source, f"not a {what} (JSON nested deeper than {MAX_JSON_DEPTH} levels)")
    if len(data) <= _DEPTH_SCAN_BYTES and not json_depth_ok(data):
        raise too_deep
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputFileError(source, f"not a {what} (not UTF-8 text)") from None
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise InputFileError(source, f"not a {what} ({exc})") from None


def read_json(path: Path, limit: int, what: str = "JSON file") -> Any:
    """read_bounded() then loads_json(): a small JSON file from someone else."""
    return loads_json(read_bounded(path, limit, what), path, what)
