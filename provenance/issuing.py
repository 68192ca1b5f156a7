"""Issuing a stamped copy so that a crash at any moment leaves no copy without its registry entry.

Every format's copy is made through `issue_copy`, in this order:

1. a journal `pending/<token>.json` in the lab home names the final path, the staging path next
   to it, the model and the codeword index; it is written, fsynced and locked (flock) before the
   first byte of the copy, and stays locked while this process works on the issue;
2. the copy is written into the staging path and fsynced;
3. the signed issued-copy entry is appended (committed);
4. the staging path is renamed to the final path (an earlier copy replaced with --force is
   first moved aside, then removed), and the journal is removed.

SIGINT and SIGTERM are held from step 3 to the end of step 4 (a commit is always followed by its
rename); before step 3 they roll everything back. Whatever kills the process (SIGKILL, power
loss) leaves the journal, and the next command that opens the lab resolves it with
`recover_pending`:

- no entry for the codeword: the staging is deleted (the codeword stays skipped);
- entry, and the staging holds exactly the entry's files: the rename is finished;
- entry, and the final path already holds the entry's files: nothing left to do;
- entry, but the copy is gone or incomplete: a signed `issue-void` entry records that the copy
  was never delivered (this needs the signing key; while the keys are locked the journal is
  kept, and resolved by the first command that unlocks them).

A journal still locked belongs to a stamp in progress and is left alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightmark.errors import InputFileError
from weightmark.fsutil import fsync_dir, remove_path
from weightmark.outputs import Target, manifest_matches
from weightmark.registry.store import IssuedCopy, Licensee, Model, Registry, Signer, now

__all__ = ["PENDING_DIR", "issue_copy", "pause_at", "recover_pending"]

PENDING_DIR = "pending"
_JOURNAL_FORMAT = "weightmark-pending-issue/v1"


def pause_at(point: str) -> None:
    """Test hook; does nothing. The kill tests replace it in a child process to stop a stamp at
    a named point: "journal-written", "copy-written", "after-commit", "before-rename"."""


def _sync_tree(path: Path) -> None:
    """fsync every file and folder of a staged copy (cheap when the writer already synced)."""
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        return
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(Path(folder) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(folder)


def _staged_names(path: Path) -> set[str | None]:
    """The relative file names of a staged folder, or {None} for a staged file (a cheap check
    that the manifest the writer hashed names exactly what is on disk)."""
    if path.is_file():
        return {None}
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


@dataclass
class _Journal:
    """One issue in progress, as written in pending/<token>.json (and locked while we hold `fd`)."""

    path: Path
    fd: int
    token: str
    final: Path
    is_dir: bool
    replace: bool
    model_id: str
    codeword_index: int
    licensee_id: str

    @property
    def staging(self) -> Path:
        return self.final.parent / f".{self.final.name}.tmp-{self.token}"

    @property
    def backup(self) -> Path:
        """Where an earlier copy replaced with --force waits while the new one moves in."""
        return self.final.parent / f".{self.final.name}.old-{self.token}"

    def to_json(self) -> dict[str, Any]:
        return {"format": _JOURNAL_FORMAT, "token": self.token, "final": str(self.final),
                "staging": str(self.staging), "is_dir": self.is_dir, "replace": self.replace,
                "model_id": self.model_id, "codeword_index": self.codeword_index,
                "licensee_id": self.licensee_id, "started_at": now()}

    def release(self, remove: bool) -> None:
        """Drop the journal (when `remove`) and its lock."""
        if remove:
            with suppress(FileNotFoundError):
                self.path.unlink()
            fsync_dir(self.path.parent)
        os.close(self.fd)


def _open_locked(path: Path, create: bool) -> int | None:
    """An fd of `path` holding its exclusive flock; None if another process holds it or the file
    was removed meanwhile (its owner finished)."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if create else fcntl.LOCK_NB))
        if os.fstat(fd).st_nlink == 0:
            os.close(fd)
            return None
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _begin(home: Path, target: Target, is_dir: bool, model_id: str, codeword_index: int,
           licensee_id: str) -> _Journal:
    pending = home / PENDING_DIR
    pending.mkdir(mode=0o700, exist_ok=True)
    while True:
        token = secrets.token_hex(8)
        path = pending / f"{token}.json"
        fd = _open_locked(path, create=True)
        if fd is not None:
            break
    journal = _Journal(path, fd, token, target.final, is_dir, target.replace, model_id, codeword_index,
                       licensee_id)
    data = json.dumps(journal.to_json(), indent=2).encode()
    os.write(fd, data)
    os.fsync(fd)
    fsync_dir(pending)
    return journal


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them: a commit is always
    followed by its rename. (Python-level handlers, not a signal mask: the kernel may deliver a
    process signal to any thread, and numba's worker threads do not share our mask.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: object) -> None:
        caught.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])  # now handled as it would have been


def _publish(staging: Path, final: Path, backup: Path, replace: bool) -> None:
    """Move the staged copy to `final`; an earlier copy there (only when `replace`) is moved to
    `backup` first and removed after. Safe to run again after a crash at any step."""
    if os.path.lexists(staging):
        if os.path.lexists(final):
            if not replace:
                raise InputFileError(final, "appeared while the copy was written; pass --force to replace it")
            if os.path.lexists(backup):
                raise InputFileError(final, "appeared while an earlier copy was being replaced; it was left alone")
            os.rename(final, backup)
        if staging.is_dir():
            os.rename(staging, final)
        else:
            try:
                os.link(staging, final)  # fails, rather than replaces, if the name was taken meanwhile
            except FileExistsError:
                raise InputFileError(final, "appeared while the copy was written; it was left alone") from None
            os.unlink(staging)
        fsync_dir(final.parent)
    remove_path(backup)


def issue_copy(
    registry: Registry,
    signer: Signer,
    model: Model,
    licensee: Licensee,
    codeword_index: int,
    target: Target,
    is_dir: bool,
    write: Callable[[Path], tuple[dict[str, str], str]],
    record: Callable[[dict[str, str], str], IssuedCopy],
) -> IssuedCopy:
    """Make one copy crash-safely: `write(staging)` fills the staging path and returns (files
    manifest, output format); `record(files, output_format)` appends the signed entry."""
    home = registry.home
    journal = _begin(home, target, is_dir, model.model_id, codeword_index, licensee.id)
    committed = voided = False
    try:
        pause_at("journal-written")
        if is_dir:
            journal.staging.mkdir()
        files, output_format = write(journal.staging)
        _sync_tree(journal.staging)
        if _staged_names(journal.staging) != (set(files) if is_dir else {None}):
            raise InputFileError(journal.staging, "the staged copy does not hold the files of its manifest")
        pause_at("copy-written")
        with _signals_held():
            issued = record(files, output_format)
            committed = True
            pause_at("after-commit")
            try:
                target.recheck()
                pause_at("before-rename")
                _publish(journal.staging, target.final, journal.backup, target.replace)
            except BaseException:
                # The entry is signed but its copy cannot be delivered: say so in the log now.
                registry.void_issue(issued, "the copy could not be moved into place", signer)
                voided = True
                remove_path(journal.staging)
                _restore_backup(journal)
                raise
    except BaseException:
        if not committed:
            remove_path(journal.staging)
        # A committed entry that could not be voided keeps its journal: the next command resolves it.
        journal.release(remove=not committed or voided)
        raise
    journal.release(remove=True)
    return issued


def _read_journal(path: Path, fd: int) -> _Journal | None:
    try:
        doc = json.loads(os.pread(fd, 1 << 20, 0))
        if doc.get("format") != _JOURNAL_FORMAT:
            return None
        return _Journal(path, fd, str(doc["token"]), Path(doc["final"]), bool(doc["is_dir"]),
                        bool(doc["replace"]), str(doc["model_id"]), int(doc["codeword_index"]),
                        str(doc["licensee_id"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def recover_pending(registry: Registry, signer: Callable[[], Signer | None],
                    notify: Callable[[str], None]) -> int:
    """Resolve every journal left by a stamp that died; returns how many are still unresolved.

    `signer()` gives the unlocked signing key, or None while the keys are locked (a copy that
    must be voided then waits, and `notify` says so).
    """
    pending = registry.home / PENDING_DIR
    try:
        paths = sorted(pending.iterdir())
    except FileNotFoundError:
        return 0
    left = 0
    for path in paths:
        fd = _open_locked(path, create=False)
        if fd is None:
            continue  # a stamp in progress, or one that just finished
        journal = _read_journal(path, fd)
        if journal is None:
            # Killed while the journal itself was written: nothing else was started.
            with suppress(FileNotFoundError):
                path.unlink()
            os.close(fd)
            continue
        try:
            done = _resolve(registry, journal, signer, notify)
        except BaseException:
            os.close(fd)
            raise
        journal.release(remove=done)
        left += not done
    return left


def _resolve(registry: Registry, journal: _Journal, signer: Callable[[], Signer | None],
             notify: Callable[[str], None]) -> bool:
    """Finish or roll back one interrupted issue; False when it must wait for the keys."""
    found = registry.issue_for_codeword(journal.model_id, journal.codeword_index)
    if found is None:
        remove_path(journal.staging)  # never recorded: nothing was issued
        remove_path(journal.backup)
        return True
    issued, files = found
    if issued.entry_idx in registry.voided_issues():
        remove_path(journal.staging)
        _restore_backup(journal)
        return True
    if os.path.lexists(journal.staging) and manifest_matches(journal.staging, files):
        try:
            _publish(journal.staging, journal.final, journal.backup, journal.replace)
            notify(f"finished an interrupted stamp: entry {issued.entry_idx} delivered to {journal.final}")
            return True
        except (OSError, InputFileError):
            pass  # the final name is taken by something else: the copy cannot be delivered
    elif not os.path.lexists(journal.staging) and manifest_matches(journal.final, files):
        remove_path(journal.backup)  # killed after the rename
        return True
    key = signer()
    if key is None:
        notify(f"entry {issued.entry_idx}: an interrupted stamp left no deliverable copy; it will be recorded "
               "as never delivered once the lab keys are unlocked (run a command that unlocks them)")
        remove_path(journal.staging)
        return False
    void = registry.void_issue(issued, "the stamp was interrupted before the copy was delivered", key)
    remove_path(journal.staging)
    _restore_backup(journal)
    notify(f"entry {issued.entry_idx}: an interrupted stamp never delivered its copy; recorded in entry {void}")
    return True


def _restore_backup(journal: _Journal) -> None:
    """Put back an earlier copy that was moved aside for a replacement that never arrived."""
    if os.path.lexists(journal.backup):
        if os.path.lexists(journal.final):
            remove_path(journal.backup)
        else:
            os.rename(journal.backup, journal.final)
            fsync_dir(journal.final.parent)
