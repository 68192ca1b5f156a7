"""The lab's home: keys, registry and the operations on them (the library's front door)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightmark import keys as _keys
from weightmark.errors import InputFileError, KeyProblem, RegistryError
from weightmark.fsutil import write_bytes_atomic
from weightmark.progress import NO_PROGRESS, Progress
from weightmark.registry import policy
from weightmark.registry.log import (
    LogVerificationError,
    Trust,
    VerifiedLog,
    trust_from_entries,
    verify_log,
)
from weightmark.registry.store import DB_FILE, IssuedCopy, Licensee, Model, Registry
from weightmark.scheme import DEFAULT_ALPHA, DEFAULT_COLLUSION, DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from weightmark.scan import ScanReport

# Model registration, stamping and scanning import the numba kernels; they are imported when
# first used, so that registry and licensee commands start fast.

HOME_ENV = "WEIGHTMARK_HOME"
PASSPHRASE_ENV = "WEIGHTMARK_PASSPHRASE"

PassphraseSource = Callable[[], str | None]


def default_home() -> Path:
    """--home, else $WEIGHTMARK_HOME, else the per-user data folder."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV])
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "weightmark"


def passphrase_from_env() -> str | None:
    return os.environ.get(PASSPHRASE_ENV)


class Lab:
    """A lab home folder. Keys are unlocked on first use, with the passphrase from `passphrase`."""

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 passphrase: PassphraseSource = passphrase_from_env) -> None:
        self.home = Path(home) if home is not None else default_home()
        self._passphrase = passphrase
        self._registry: Registry | None = None
        self._keys: _keys.LabKeys | None = None

    @classmethod
    def init(cls, home: str | os.PathLike[str] | None, passphrase: str | None) -> Lab:
        """Create a home: keys (encrypted unless passphrase is None) and a log with its genesis."""
        lab = cls(home, passphrase=lambda: passphrase)
        lab.home.mkdir(parents=True, exist_ok=True)
        os.chmod(lab.home, 0o700)
        if (lab.home / DB_FILE).exists():
            raise RegistryError(f"{lab.home / DB_FILE}: a registry already exists here")
        keys = _keys.create(lab.home, passphrase)
        lab._keys = keys
        lab._registry = Registry.create(lab.home)
        lab._registry.init_log(f"weightmark.lab/{keys.key_id}-{secrets.token_hex(4)}", keys.public_pem, keys)
        return lab

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.open(self.home)
            installed = policy.current(self.home)
            self._registry.policy_in_force = None if installed is None else {
                "version": installed.version, "date": installed.date.isoformat(), "sha256": installed.sha256}
        return self._registry

    @property
    def keys(self) -> _keys.LabKeys:
        if self._keys is None:
            if not (self.home / _keys.KEY_FILE).exists():
                raise KeyProblem(f"{self.home}: no lab keys here; run `weightmark init` first")
            self._finish_rotation()
            phrase = self._passphrase() if _keys.is_encrypted(self.home) else None
            self._keys = _keys.load(self.home, phrase)
        return self._keys

    def _finish_rotation(self) -> None:
        """Complete a rotation the log recorded but the key files did not (a crash in between),
        or drop one the log never recorded. Needs no passphrase: only the key id is read."""
        pending_path = self.home / _keys.NEXT_KEY_FILE
        if not pending_path.exists():
            return
        pending_id = _keys.sealed_key_id(pending_path)
        current = self.trust().current
        if current.key_id == pending_id:
            os.replace(pending_path, self.home / _keys.KEY_FILE)
            write_bytes_atomic(self.home / _keys.PUBLIC_KEY_FILE, current.pem.encode("ascii"), mode=0o644)
            self._keys = None
        else:
            pending_path.unlink()

    # -- the transparency log ---------------------------------------------------------------

    def trust(self) -> Trust:
        """The lab's signing keys and their validity, as the log's key chain records them."""
        return trust_from_entries(self.registry.log_entries())

    def verify_log(self) -> VerifiedLog:
        """Recompute the whole log from the database; the current key must be this home's lab.pub."""
        registry = self.registry
        entries = registry.log_entries()
        result = verify_log(entries, registry.checkpoints(), trust_from_entries(entries))
        self._finish_rotation()
        pub_path = self.home / _keys.PUBLIC_KEY_FILE
        try:
            pub = pub_path.read_bytes().decode("ascii", errors="replace")
        except OSError as exc:
            raise KeyProblem(f"{pub_path}: cannot read the lab's public key ({exc.strerror})") from None
        if pub.strip() != result.trust.current.pem.strip():
            raise LogVerificationError(f"{pub_path}: is not the log's current signing key")
        return result

    def rotate_keys(self) -> _keys.LabKeys:
        """New signing key, same watermark secret; the handover checkpoint is signed by both."""
        old = self.keys
        phrase = self._passphrase() if _keys.is_encrypted(self.home) else None
        new = old.rotated()
        write_bytes_atomic(self.home / _keys.NEXT_KEY_FILE, _keys.seal(new, phrase), mode=0o600)
        self.registry.rotate_key(old, new.key_id, new.public_pem, new.signing_key)
        self._finish_rotation()
        return self.keys

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations --------------------------------------------------------------------------

    def register_model(self, path: str | os.PathLike[str], name: str, progress: Progress = NO_PROGRESS) -> Model:
        """Register a base model: manifest id, carriers and their row-RMS table, signed.

        The base is a float safetensors file or folder, or an already-quantized GGUF file or
        GPTQ folder (a lab with no float master): its copies are then stamped by moving codes.
        """
        from weightmark.formats.safetensors import Checkpoint
        from weightmark.model import (
            GGUF_FORMAT,
            PACKED_FORMATS,
            base_format,
            carriers_of,
            file_stats,
            gguf_carriers,
            gguf_file_stats,
            gguf_manifest_id,
            manifest_id,
            open_base,
            open_gguf_base,
            packed_carriers,
        )

        keys = self.keys
        path = Path(path).resolve()
        fmt = base_format(path)
        if fmt == GGUF_FORMAT:
            base = open_gguf_base(path)
            total = sum(base.info(n).nbytes for n in base.tensors())
            identify, find_carriers, file_stats_of = gguf_manifest_id, gguf_carriers, gguf_file_stats
        elif fmt in PACKED_FORMATS:
            base = Checkpoint.open(path)
            total = sum(info.nbytes for _, info in base.tensors.values())
            identify, file_stats_of = manifest_id, file_stats
            find_carriers = lambda _, advance: packed_carriers(path, advance)  # noqa: E731
        else:
            base = open_base(path)
            total = sum(info.nbytes for _, info in base.tensors.values())
            identify, find_carriers, file_stats_of = manifest_id, carriers_of, file_stats
        with base:
            progress.begin(f"registering {name}", 2 * total)
            try:
                model_id = identify(base, progress.advance)
                carriers = find_carriers(base, progress.advance)
            finally:
                progress.end()
            stats = file_stats_of(base)
        if not carriers:
            raise InputFileError(path, "no tensor can carry a watermark")
        return self.registry.add_model(model_id, name, str(path), fmt, stats, carriers, keys)

    def add_licensee(self, name: str, jurisdiction: str, email: str | None = None) -> Licensee:
        return self.registry.add_licensee(name, jurisdiction, email, self.keys)

    def stamp(self, model_name: str, licensee_id: str, out: str | os.PathLike[str],
              alpha: float = DEFAULT_ALPHA, overwrite: bool = False,
              progress: Progress = NO_PROGRESS, override_reason: str | None = None,
              fmt: str = "same", collusion: int = DEFAULT_COLLUSION, cluster: Any = None) -> IssuedCopy:
        """Issue a stamped copy, subject to the installed jurisdiction policy.

        `fmt`: "same" (the base's own format and dtypes) or a quantized output: a GGUF file
        ("gguf:Q4_K_M", "gguf:Q8_0", "gguf:Q4_0", "gguf:Q6_K", ...) or a quantized safetensors
        folder ("gptq:4bit-g128", "awq:4bit-g128", "ct:w4a16", "ct:w8a16", "bnb:nf4"; round-to-
        nearest quantizations in those containers, scales frozen from the unstamped base).
        """
        from weightmark.stamp import stamp

        return stamp(self.registry, self.keys, model_name, licensee_id, out, alpha, overwrite, progress,
                     policy.current(self.home), override_reason, fmt, collusion, cluster)

    def evidence(self, report: ScanReport, out: str | os.PathLike[str],
                 suspect: str | os.PathLike[str] | None = None) -> Path:
        """Write a signed evidence bundle of a scan: its accusations, or that nobody was accused.

        `suspect` (default: the path the scan read) is hashed file by file into the bundle.
        """
        from weightmark.evidence import build_bundle
        from weightmark.registry.store import now

        data = build_bundle(self.registry, self.keys, report, now(),
                            suspect if suspect is not None else report.suspect)
        out = Path(out)
        write_bytes_atomic(out, data, mode=0o644)
        return out

    def export_log(self, out: str | os.PathLike[str]) -> int:
        from weightmark.evidence import export_log

        self.verify_log()
        return export_log(self.registry, Path(out))

    def scan(self, suspect: str | os.PathLike[str], model_name: str | None = None,
             reference: str | os.PathLike[str] | None = None, blind: bool = False,
             threshold: float = DEFAULT_THRESHOLD, assume_licensees: int = 0,
             progress: Progress = NO_PROGRESS, realign: bool = True, cluster: Any = None) -> ScanReport:
        from weightmark.scan import scan

        return scan(self.registry, self.keys, suspect, model_name, reference, blind, threshold,
                    assume_licensees, progress, realign, cluster=cluster)
