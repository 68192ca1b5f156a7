"""Crash-safe file output: stage under a hidden temp name, fsync, then rename into place."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import pathlib
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import InputFileError

__all__ = ["Staging", "fsync_dir", "remove_path", "sha256_file", "staged_output", "write_bytes_atomic"]

# Errors that mean "this filesystem cannot fsync a directory", not "the data is lost".
_FSYNC_DIR_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES}


def _temp_sibling(final: pathlib.Path, tag: str) -> pathlib.Path:
    return final.parent / f".{final.name}.{tag}-{secrets.token_hex(6)}"


def remove_path(path: pathlib.Path) -> None:
    """Remove a file, symlink or whole tree; a missing path is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames and new entries inside it survive a crash."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in _FSYNC_DIR_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_DIR_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _sync_file_range() -> Any:
    """libc's sync_file_range (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `length` bytes at `offset` of a file to disk, without
    waiting (Linux sync_file_range; nothing elsewhere). A large output written tensor by tensor
    then reaches the disk while the next tensors are computed, and its final fsync, which
    stays the only durability guarantee, has little left to wait for. Errors are ignored."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Staging:
    """A temp path next to `final`; `publish()` moves it to the final name."""

    def __init__(
        self, final: pathlib.Path, path: pathlib.Path, is_dir: bool, overwrite: bool
    ) -> None:
        self.final = final
        self.path = path
        self.is_dir = is_dir
        self.overwrite = overwrite
        self.published = False

    def publish(self) -> None:
        """Atomically move the staged file or folder to the final name, then fsync the parent."""
        if self.published:
            raise RuntimeError(f"{self.final}: already published")
        if not os.path.lexists(self.path):
            raise RuntimeError(f"{self.path}: nothing was staged")
        final = self.final
        try:
            if os.path.lexists(final):
                if not self.overwrite:
                    raise InputFileError(final, "already exists; refusing to overwrite it")
                if self.is_dir:
                    old = _temp_sibling(final, "old")
                    os.rename(final, old)
                    try:
                        os.rename(self.path, final)
                    except OSError:
                        os.rename(old, final)  # put the previous folder back
                        raise
                    remove_path(old)
                else:
                    os.replace(self.path, final)
            elif self.is_dir:
                os.rename(self.path, final)
            else:
                self._publish_file_no_clobber()
        except OSError as exc:
            raise InputFileError(
                final, f"cannot move the staged output into place: {exc.strerror}"
            ) from exc
        self.published = True
        fsync_dir(final.parent)

    def _publish_file_no_clobber(self) -> None:
        # A hard link fails if something appeared under the final name meanwhile.
        try:
            os.link(self.path, self.final)
        except FileExistsError as exc:
            raise InputFileError(self.final, "already exists; refusing to overwrite it") from exc
        except OSError:
            # Filesystems without hard links: fall back to a plain rename.
            os.rename(self.path, self.final)
            return
        os.unlink(self.path)


@contextmanager
def staged_output(
    final: str | os.PathLike[str], *, is_dir: bool, overwrite: bool = False
) -> Iterator[Staging]:
    """Yield a Staging whose temp path the caller fills; `final` changes only on publish()."""
    final = pathlib.Path(final)
    if os.path.lexists(final):
        if not overwrite:
            raise InputFileError(final, "already exists; pass overwrite to replace it")
        if final.is_dir() != is_dir:
            kind = "a folder" if final.is_dir() else "a file"
            raise InputFileError(final, f"already exists as {kind}; will not replace it")
    if not final.parent.is_dir():
        raise InputFileError(final.parent, "output folder does not exist")
    temp = _temp_sibling(final, "tmp")
    if is_dir:
        try:
            temp.mkdir()
        except OSError as exc:
            raise InputFileError(temp, f"cannot create staging folder: {exc.strerror}") from exc
    staging = Staging(final, temp, is_dir, overwrite)
    try:
        yield staging
    finally:
        if not staging.published:
            remove_path(temp)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a 0600 temp file that is fsynced, chmodded and renamed."""
    path = pathlib.Path(path)
    temp = _temp_sibling(path, "tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise InputFileError(path, f"cannot create: {exc.strerror}") from exc
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as exc:
        remove_path(temp)
        raise InputFileError(path, f"cannot write: {exc.strerror}") from exc
    except BaseException:
        remove_path(temp)
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    except OSError as exc:
        raise InputFileError(path, f"cannot read: {exc.strerror}") from exc
    return digest.hexdigest()
