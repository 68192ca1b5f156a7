"""Zip archives as weight containers (torch.save checkpoints, llamafiles): list the members and
find where a stored (uncompressed) member's bytes lie in the file, checked against its size."""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError

ZIP_MAGIC = b"PK\x03\x04"
_LOCAL = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length
_MAX_MEMBERS = 1 << 20


@dataclass(frozen=True)
class Member:
    """One stored member: its name and the byte span of its data in the archive file."""

    name: str
    offset: int  # absolute offset of the first data byte in the file
    size: int


def zip_names(path: Path) -> list[str] | None:
    """The member names of a zip archive (also one with a prefix, like a llamafile), or None
    if the file is no zip archive at all."""
    if not path.is_file():
        return None
    try:
        from . import looks_like_safetensors

        if looks_like_safetensors(path):
            return None  # never searched for a zip tail
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return None
    if len(infos) > _MAX_MEMBERS:
        raise FormatError(path, f"zip archive lists {len(infos)} members (limit {_MAX_MEMBERS})")
    return [info.filename for info in infos]


def stored_members(path: Path, wanted: Callable[[str], bool] = lambda name: True) -> dict[str, Member]:
    """The `wanted` members of the zip archive at `path` with their data spans; compressed,
    encrypted or out-of-bounds members among them are refused with an error naming them."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
            out: dict[str, Member] = {}
            for info in archive.infolist():
                if info.filename.endswith("/") or not wanted(info.filename):
                    continue
                out[info.filename] = _member(path, fh, info, size)
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise FormatError(path, f"is not a readable zip archive ({exc})") from None
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None


def _member(path: Path, fh: object, info: zipfile.ZipInfo, file_size: int) -> Member:
    name = info.filename
    if info.flag_bits & 0x1:
        raise FormatError(path, f"zip member {name!r} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        raise FormatError(path, f"zip member {name!r} is compressed (method {info.compress_type}); "
                                "weights are read only from stored members")
    if info.compress_size != info.file_size:
        raise FormatError(path, f"zip member {name!r} is stored but its sizes differ "
                                f"({info.compress_size} != {info.file_size})")
    # the data follows the member's local header, whose name and extra lengths may differ
    # from the central directory's
    start = info.header_offset
    if start < 0 or start + _LOCAL.size > file_size:
        raise FormatError(path, f"zip member {name!r}: local header at {start} lies outside the file")
    fh.seek(start)  # type: ignore[attr-defined]
    magic, name_len, extra_len = _LOCAL.unpack(fh.read(_LOCAL.size))  # type: ignore[attr-defined]
    if magic != ZIP_MAGIC:
        raise FormatError(path, f"zip member {name!r}: no local header at offset {start}")
    offset = start + _LOCAL.size + name_len + extra_len
    if offset + info.file_size > file_size:
        raise FormatError(path, f"zip member {name!r}: {info.file_size} bytes at offset {offset} "
                                f"run past the end of the file ({file_size} bytes)")
    return Member(name, offset, info.file_size)


def read_member(path: Path, member: Member, limit: int) -> bytes:
    """The whole data of a (small) member, refused above `limit` bytes."""
    if member.size > limit:
        raise FormatError(path, f"zip member {member.name!r} is {member.size} bytes (limit {limit})")
    with open(path, "rb") as fh:
        fh.seek(member.offset)
        data = fh.read(member.size)
    if len(data) != member.size:
        raise FormatError(path, f"zip member {member.name!r} is truncated")
    return data
