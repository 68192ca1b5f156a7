"""Where a command may write: nothing existing is replaced without --force, and --force replaces
only an earlier output of the same kind, never the lab's own files or a registered base.

Every writing command resolves its target with `prepare_output`, which returns a `Target`
saying whether something is replaced. The decision is taken on the resolved path (symlinks
followed, both of the name and of its folder) and re-checked just before the final rename.

What each kind recognises positively before --force may replace it:
- a stamped copy: its files hash to the manifest of a signed issued-copy entry of this lab that
  was written to that same path (no marker file: a marker can be copied into anything, while a
  manifest match proves the bytes are exactly a copy this registry issued there);
- an evidence bundle: a signed JSON bundle whose `format` is the evidence format;
- a public key: a PEM file holding one Ed25519 public key and nothing secret;
- a trust file: JSON that parses as a trust file;
- a scan key: a sealed scan key file of the same model (replacing it re-issues that model's key,
  never a key of another model or a lab key file);
- an exported log: a folder holding exactly the export's three files.
Never replaced, with or without --force: the lab home or anything inside it (its registry
database, its key files), a registered base, or a folder that contains any of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from weightmark.errors import InputFileError
from weightmark.fsutil import sha256_file, staged_output

if TYPE_CHECKING:
    from weightmark.registry.store import Registry

__all__ = [
    "EVIDENCE",
    "LOG_EXPORT",
    "PUBLIC_KEY",
    "scan_key_output",
    "STAMPED_COPY",
    "TRUST_FILE",
    "OutputKind",
    "Protected",
    "Target",
    "manifest_matches",
    "prepare_output",
    "write_output_bytes",
]

# Largest file the small-output recognisers read (an evidence bundle, a key, a trust file).
_SMALL_FILE_LIMIT = 64 << 20


@dataclass(frozen=True)
class OutputKind:
    """One kind of output: its name in messages and how an earlier one is recognised."""

    noun: str
    is_dir: bool
    recognise: Callable[[Path, Registry | None], bool]


def _read_small(path: Path) -> bytes | None:
    try:
        if not path.is_file() or path.stat().st_size > _SMALL_FILE_LIMIT:
            return None
        return path.read_bytes()
    except OSError:
        return None


def _is_evidence(path: Path, _: Registry | None) -> bool:
    from weightmark.evidence import EVIDENCE_FORMAT

    data = _read_small(path)
    try:
        doc = json.loads(data) if data is not None else None
    except ValueError:
        return False
    bundle = doc.get("bundle") if isinstance(doc, dict) else None
    return isinstance(bundle, dict) and bundle.get("format") == EVIDENCE_FORMAT and "signature" in doc


def _is_public_key(path: Path, _: Registry | None) -> bool:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read_small(path)
    if data is None or b"PRIVATE" in data or data.count(b"-----BEGIN ") != 1:
        return False
    try:
        return isinstance(load_pem_public_key(data), Ed25519PublicKey)
    except (ValueError, TypeError):
        return False


def _is_trust_file(path: Path, _: Registry | None) -> bool:
    from weightmark.registry.log import LogVerificationError, Trust

    data = _read_small(path)
    try:
        Trust.from_json(json.loads(data) if data is not None else None, str(path))
    except (ValueError, LogVerificationError):
        return False
    return True


def _is_scan_key(model_id: str) -> Callable[[Path, Registry | None], bool]:
    def recognise(path: Path, _: Registry | None) -> bool:
        from weightmark.errors import KeyProblem
        from weightmark.scankey import read_scan_key

        try:
            return path.is_file() and not path.is_symlink() and read_scan_key(path).model_id == model_id
        except KeyProblem:
            return False

    return recognise


def scan_key_output(model_id: str) -> OutputKind:
    """The output kind of a scan key file for `model_id`: --force replaces only one of that model."""
    return OutputKind(f"scan key file of model {model_id[:16]}", False, _is_scan_key(model_id))


def _is_log_export(path: Path, registry: Registry | None) -> bool:
    from weightmark.evidence import CHECKPOINTS_FILE, ENTRIES_FILE
    from weightmark.evidence import TRUST_FILE as EXPORT_TRUST

    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}
    if names != {ENTRIES_FILE, CHECKPOINTS_FILE, EXPORT_TRUST}:
        return False
    if any(not (path / n).is_file() or (path / n).is_symlink() for n in names):
        return False
    return _is_trust_file(path / EXPORT_TRUST, registry)


def _tree_manifest(root: Path) -> dict[str, str] | None:
    """{relative posix path: sha256} of every file under `root`; None if it holds a symlink or
    anything that is not a plain file or folder."""
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                return None
        for name in files:
            p = Path(folder) / name
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def manifest_matches(path: Path, files: dict[str, str]) -> bool:
    """True when the file or folder at `path` holds exactly the files and digests of `files`
    (a single file matches a one-file manifest whatever name the manifest gives it)."""
    try:
        if path.is_symlink():
            return False
        if path.is_file():
            return len(files) == 1 and sha256_file(path) == next(iter(files.values()))
        if path.is_dir():
            return _tree_manifest(path) == files
    except (OSError, InputFileError):
        return False
    return False


def _is_stamped_copy(path: Path, registry: Registry | None) -> bool:
    if registry is None:
        return False
    return any(manifest_matches(path, files) for files in registry.issued_manifests_at(str(path)))


EVIDENCE = OutputKind("evidence bundle", False, _is_evidence)
PUBLIC_KEY = OutputKind("exported public key", False, _is_public_key)
TRUST_FILE = OutputKind("exported trust file", False, _is_trust_file)
LOG_EXPORT = OutputKind("exported log folder", True, _is_log_export)
STAMPED_COPY = OutputKind("stamped copy issued by this lab to this path", False, _is_stamped_copy)


@dataclass(frozen=True)
class Protected:
    """Paths no output may be, be inside of (the home), or contain: resolved, with what they are."""

    home: Path | None
    paths: tuple[tuple[Path, str], ...] = field(default=())

    @classmethod
    def of_lab(cls, home: str | os.PathLike[str] | None, registry: Registry | None = None) -> Protected:
        """The lab home, its registry database and key files, and every registered base."""
        from weightmark.keys import KEY_FILE, NEXT_KEY_FILE, PUBLIC_KEY_FILE
        from weightmark.registry.store import DB_FILE

        paths: list[tuple[Path, str]] = []
        resolved_home = None
        if home is not None:
            resolved_home = Path(os.path.realpath(home))
            paths.append((resolved_home, "the lab home"))
            paths.append((resolved_home / DB_FILE, "the lab's registry database"))
            for name in (KEY_FILE, NEXT_KEY_FILE, PUBLIC_KEY_FILE):
                paths.append((resolved_home / name, "a lab key file"))
        if registry is not None:
            paths.append((Path(os.path.realpath(registry.path)), "a registry database"))
            for model in registry.models():
                paths.append((Path(os.path.realpath(model.base_path)), f"the registered base of model {model.name!r}"))
        return cls(resolved_home, tuple(paths))

    def refuse(self, path: Path, shown: Path) -> None:
        """Raise if `path` (resolved) is, is inside the home, or contains a protected path."""
        for p, what in self.paths:
            if path == p:
                raise InputFileError(shown, f"is {what}; no command replaces it")
        if self.home is not None and path.is_relative_to(self.home):
            raise InputFileError(shown, f"is inside the lab home {self.home}; write outputs elsewhere")
        for p, what in self.paths:
            if p.is_relative_to(path):
                raise InputFileError(shown, f"contains {what} ({p}); no command replaces it")


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


@dataclass(frozen=True)
class Target:
    """A checked output path. `replace` is True when an earlier output of the kind is there."""

    final: Path
    kind: OutputKind
    replace: bool
    flag: str
    _identity: tuple[int, int, int, int] | None

    def recheck(self) -> None:
        """Just before the rename: the path still holds what was checked (or still nothing)."""
        now = _identity(self.final)
        if now != self._identity:
            if self._identity is None:
                raise InputFileError(self.final, f"appeared while writing; pass {self.flag} to replace it")
            raise InputFileError(self.final, "changed while writing; it was left alone")


def _resolved(path: Path) -> Path:
    """The path with its folder's symlinks resolved, and its own if it is a symlink."""
    return Path(os.path.realpath(path))


def prepare_output(
    path: str | os.PathLike[str],
    kind: OutputKind,
    *,
    force: bool,
    protected: Protected,
    registry: Registry | None = None,
    flag: str = "--force",
) -> Target:
    """Check that `path` may receive an output of `kind`; raise InputFileError (exit 3) if not.

    Nothing there: fine. Something there: refused without `force` ("pass --force to replace
    it"); with `force`, replaced only if it is recognised as an earlier output of `kind` and
    is not, is not inside, and does not contain a protected path.
    """
    shown = Path(path)
    name_only = Path(os.path.realpath(shown.parent)) / shown.name
    final = _resolved(shown)
    for candidate in {name_only, final}:
        protected.refuse(candidate, shown)
    if not os.path.lexists(shown):
        if not shown.parent.is_dir():
            raise InputFileError(shown.parent, "output folder does not exist")
        return Target(name_only, kind, False, flag, None)
    if not force:
        raise InputFileError(shown, f"already exists; pass {flag} to replace it")
    if not kind.recognise(final, registry):
        raise InputFileError(shown, f"is not an earlier {kind.noun}; {flag} replaces only that, so it was "
                                    "left alone")
    return Target(name_only, kind, True, flag, _identity(name_only))


def write_output_bytes(target: Target, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` at a checked target: staged, fsynced, then renamed (no-clobber unless replacing)."""
    with staged_output(target.final, is_dir=False, overwrite=target.replace) as staging:
        fd = os.open(staging.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        target.recheck()
        staging.publish()
    return target.final


def manifest_digest(files: dict[str, str]) -> str:
    """The registry's digest of a files manifest (sha256 of its canonical JSON)."""
    from weightmark.registry.envelope import canonical_json

    return hashlib.sha256(canonical_json(files)).hexdigest()
