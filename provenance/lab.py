"""The lab's home: keys, registry and the operations on them (the library's front door)."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightmark import keys as _keys
from weightmark.bounded import MAX_PEM_BYTES, read_bounded
from weightmark.errors import InputFileError, KeyProblem, RegistryError, UsageError
from weightmark.fsutil import write_bytes_atomic
from weightmark.outputs import (
    EVIDENCE,
    LOG_EXPORT,
    PUBLIC_KEY,
    TRUST_FILE,
    OutputKind,
    Protected,
    Target,
    prepare_output,
    write_output_bytes,
)
from weightmark.pkcs11 import NEXT_SIGNER_FILE, SIGNER_FILE, TokenSpec
from weightmark.progress import NO_PROGRESS, Progress
from weightmark.registry import policy
from weightmark.registry.backend import LOCATION_FILE, check_url
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
    from weightmark.facts import Fact
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
    """$WEIGHTMARK_PASSPHRASE, or None when it is not set."""
    return os.environ.get(PASSPHRASE_ENV)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class Lab:
    """A lab home folder. Keys are unlocked on first use, with the passphrase from `passphrase`.

    `passphrase` is the passphrase itself (a str, or None for keys stored unencrypted) or a
    function returning it, asked only when encrypted keys are first needed. By default it is
    read from $WEIGHTMARK_PASSPHRASE.

    Example::

        with Lab("/srv/lab", passphrase="correct horse battery staple") as lab:
            print(lab.registry.models())
    """

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 passphrase: str | PassphraseSource | None = passphrase_from_env,
                 notify: Callable[[str], None] = _to_stderr) -> None:
        self.home = Path(home) if home is not None else default_home()
        if passphrase is None or isinstance(passphrase, str):
            fixed = passphrase
            self._passphrase: PassphraseSource = lambda: fixed
        elif callable(passphrase):
            self._passphrase = passphrase
        else:
            raise TypeError(f"passphrase must be a str, None or a callable, not {type(passphrase).__name__}")
        self._notify = notify
        self._registry: Registry | None = None
        self._keys: _keys.LabKeys | None = None
        self._unresolved = 0  # interrupted stamps waiting for the keys to be unlocked

    @classmethod
    def init(cls, home: str | os.PathLike[str] | None, passphrase: str | None, registry: str | None = None) -> Lab:
        """Create a home: keys (encrypted unless passphrase is None) and a log with its genesis.

        `registry`: a postgresql:// URL (no password in it) for a registry shared by several
        homes; the home records it in registry.location. None: the home's own SQLite file.
        """
        if registry is not None:
            check_url(registry)
        lab = cls(home, passphrase=lambda: passphrase)
        lab.home.mkdir(parents=True, exist_ok=True)
        os.chmod(lab.home, 0o700)
        for name in (DB_FILE, LOCATION_FILE):
            if os.path.lexists(lab.home / name):
                raise RegistryError(f"{lab.home / name}: a registry already exists here")
        # A shared database is reached (and found empty) before any key is made.
        created = Registry.create(lab.home, registry) if registry is not None else None
        try:
            keys = _keys.create(lab.home, passphrase)
        except BaseException:
            if created is not None:
                created.close()
            raise
        lab._keys = keys
        lab._registry = created if created is not None else Registry.create(lab.home)
        lab._registry.init_log(f"weightmark.lab/{keys.key_id}-{secrets.token_hex(4)}", keys.public_pem, keys)
        if registry is not None:
            write_bytes_atomic(lab.home / LOCATION_FILE, registry.encode() + b"\n", mode=0o644)
        return lab

    @property
    def registry(self) -> Registry:
        """The lab's registry database, opened on first use (with the policy in force)."""
        if self._registry is None:
            self._registry = Registry.open(self.home)
            installed = policy.current(self.home)
            self._registry.policy_in_force = None if installed is None else {
                "version": installed.version, "date": installed.date.isoformat(), "sha256": installed.sha256}
            # Checked reads anchor on lab.pub: finish a rotation the log recorded first.
            if (self.home / _keys.NEXT_KEY_FILE).exists() or (self.home / NEXT_SIGNER_FILE).exists():
                self._finish_rotation()
            self._recover()
        return self._registry

    def _recover(self) -> None:
        """Finish or roll back stamps that were killed (see issuing.recover_pending)."""
        from weightmark.issuing import recover_pending

        def signer() -> _keys.LabKeys | None:
            try:
                return self.keys
            except KeyProblem:
                return None

        assert self._registry is not None
        self._unresolved = recover_pending(self._registry, signer, self._notify)

    @property
    def keys(self) -> _keys.LabKeys:
        """The unlocked lab keys; the passphrase is asked for on first use."""
        if self._keys is None:
            if not os.path.lexists(self.home / _keys.KEY_FILE):
                raise KeyProblem(f"{self.home}: no lab keys here; run `weightmark init` first")
            self._finish_rotation()
            phrase = self._passphrase() if _keys.is_encrypted(self.home) else None
            keys = _keys.load(self.home, phrase)
            if (self.home / SIGNER_FILE).exists():  # the signing key is in a PKCS#11 token
                keys = _keys.LabKeys(self._token_key(self.home / SIGNER_FILE), keys.master_secret)
            self._keys = keys
            if self._unresolved:
                self._recover()  # interrupted stamps that waited for the keys
        return self._keys

    def _token_key(self, path: Path) -> Any:
        """The signing key in the PKCS#11 token that `path` (signer.json) names, checked against
        the key id recorded there."""
        from weightmark.pkcs11 import TokenSigningKey, read_signer, token_pin

        spec, expected = read_signer(path)
        token_key = TokenSigningKey(spec, token_pin())
        found = _keys.key_id(token_key.public_key())
        if found != expected:
            raise KeyProblem(f"{path}: the token key {spec.label!r} has key id {found}, not {expected}")
        return token_key

    def _finish_rotation(self) -> None:
        """Complete a rotation the log recorded but the key files did not (a crash in between),
        or drop one the log never recorded. Needs no passphrase or PIN: only key ids are read."""
        file_path, token_path = self.home / _keys.NEXT_KEY_FILE, self.home / NEXT_SIGNER_FILE
        if not file_path.exists() and not token_path.exists():
            return
        _ = self.registry  # opening the registry may itself finish the rotation
        for pending_path in (file_path, token_path):
            if not pending_path.exists():
                continue
            if pending_path == file_path:
                pending_id = _keys.sealed_key_id(pending_path)
            else:
                from weightmark.pkcs11 import read_signer

                pending_id = read_signer(pending_path)[1]
            current = self.trust().current
            if current.key_id == pending_id:
                if pending_path == file_path:  # back to a key in a file: no token signer any more
                    os.replace(pending_path, self.home / _keys.KEY_FILE)
                    if (self.home / SIGNER_FILE).exists():
                        os.unlink(self.home / SIGNER_FILE)
                else:
                    os.replace(pending_path, self.home / SIGNER_FILE)
                write_bytes_atomic(self.home / _keys.PUBLIC_KEY_FILE, current.pem.encode("ascii"), mode=0o644)
                self._keys = None
            else:
                pending_path.unlink()

    def migrate_registry(self, url: str) -> VerifiedLog:
        """Copy this home's SQLite registry into the empty PostgreSQL database at `url`, verify the
        copy in full (the same checks as `registry verify`, and the same size and root as the
        original), and only then record the URL in the home. The SQLite file is not changed."""
        check_url(url)
        if os.path.lexists(self.home / LOCATION_FILE):
            raise RegistryError(f"{self.home / LOCATION_FILE}: this home's registry is already in PostgreSQL")
        source = self.verify_log()
        target = Registry.create(self.home, url)
        try:
            target.policy_in_force = self.registry.policy_in_force
            self.registry.copy_into(target)
            copy = Lab(self.home, passphrase=None, notify=self._notify)
            copy._registry = target
            result = copy.verify_log()
        except BaseException:
            target.close()
            raise
        if (result.size, result.root) != (source.size, source.root):
            target.close()
            raise RegistryError(f"{target.where}: the copy holds {result.size} entries, the original {source.size}; "
                                "the home still uses its SQLite registry")
        write_bytes_atomic(self.home / LOCATION_FILE, url.encode() + b"\n", mode=0o644)
        self.registry.close()
        self._registry = target
        return result

    # -- the transparency log ---------------------------------------------------------------

    def trust(self) -> Trust:
        """The lab's signing keys and their validity, as the log's key chain records them."""
        return trust_from_entries(self.registry.log_entries())

    def verify_log(self) -> VerifiedLog:
        """Check the database file (integrity, foreign keys), recompute the whole log from it, and
        re-derive every table row a command reads from the signed entries; the current key must
        be this home's lab.pub. Raises a RegistryError naming the first thing that does not hold."""
        result = self._verify_registry()
        self._finish_rotation()
        pub_path = self.home / _keys.PUBLIC_KEY_FILE
        try:
            pub = read_bounded(pub_path, MAX_PEM_BYTES, "public key").decode("ascii", errors="replace")
        except InputFileError as exc:
            raise KeyProblem(str(exc)) from None
        if pub.strip() != result.trust.current.pem.strip():
            raise LogVerificationError(f"{pub_path}: is not the log's current signing key")
        return result

    def _verify_registry(self) -> VerifiedLog:
        """The database and the log, every check but the anchor (which key the home trusts)."""
        registry = self.registry
        registry.check_integrity()
        with registry.snapshot():
            entries = registry.log_entries()
            result = verify_log(entries, registry.checkpoints(), trust_from_entries(entries))
            # After the log itself, so that a deleted entry is named as such rather than by a
            # row that refers to it.
            registry.check_foreign_keys()
            registry.verify_tables(entries)
            from weightmark.facts import check_fact_index

            check_fact_index(registry, entries)
        return result

    def rotate_keys(self) -> _keys.LabKeys:
        """New signing key, same watermark secret; the handover checkpoint is signed by both."""
        old = self.keys
        registry = self.registry  # a database that is not a usable registry stops us before any key is written
        phrase = self._passphrase() if _keys.is_encrypted(self.home) else None
        new = old.rotated()
        write_bytes_atomic(self.home / _keys.NEXT_KEY_FILE, _keys.seal(new, phrase), mode=0o600)
        registry.rotate_key(old, new.key_id, new.public_pem, new.signing_key)
        self._finish_rotation()
        return self.keys

    def rotate_to_token(self, spec: TokenSpec) -> _keys.LabKeys:
        """Move the signing key into a PKCS#11 token: the key pair labelled `spec.label` there
        (generated in the token, never extractable, if there is none) becomes the signing key
        by a rotation signed by the old key (the handover checkpoint by both). The watermark
        master secret stays in lab-keys.json. A crash mid-way is finished or rolled back when the
        home is next opened (signer.next.json, as lab-keys.next.json for a file key)."""
        from weightmark.pkcs11 import TokenSigningKey, signer_document, token_pin

        old = self.keys
        registry = self.registry
        token_key = TokenSigningKey(spec, token_pin(), create=True)
        new_id = _keys.key_id(token_key.public_key())
        current = self.trust().current.key_id
        if new_id == old.key_id and current == new_id:
            raise UsageError(f"the token key {spec.label!r} is already the lab's signing key")
        write_bytes_atomic(self.home / NEXT_SIGNER_FILE, signer_document(spec, new_id), mode=0o600)
        if current != new_id:
            registry.rotate_key(old, new_id, _keys.public_key_pem(token_key.public_key()).decode("ascii"), token_key)
        self._finish_rotation()
        return self.keys

    def close(self) -> None:
        """Close the registry database (the Lab is also a context manager that does this)."""
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
        registry = self.registry  # refuse an unusable registry before reading the weights
        try:
            path = Path(path).resolve()
        except RuntimeError:  # Python < 3.13 reports a symlink loop so
            raise InputFileError(path, "symbolic link loop") from None
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
        from weightmark.facts import measure

        facts = measure(path, fmt)
        return registry.add_model(model_id, name, str(path), fmt, stats, carriers, keys, facts=facts)

    def relocate_model(self, name: str, path: str | os.PathLike[str], progress: Progress = NO_PROGRESS) -> Model:
        """Point a model at its moved base files, once they are shown to be the registered weights
        (the manifest id recomputed as `register_model` does); the new location is signed."""
        from weightmark.formats.safetensors import Checkpoint
        from weightmark.model import (
            GGUF_FORMAT,
            base_format,
            file_stats,
            gguf_file_stats,
            gguf_manifest_id,
            manifest_id,
        )

        keys = self.keys
        model = self.registry.model(name)
        path = Path(path).resolve()
        if not path.exists():
            raise InputFileError(path, "no such file or folder")
        fmt = base_format(path)
        if fmt != model.format:
            raise InputFileError(path, f"is a {fmt} base, but model {name!r} was registered from a {model.format} one")
        if fmt == GGUF_FORMAT:
            from weightmark.formats.gguf import GGUFModel

            base = GGUFModel(path)
            total = sum(base.info(n).nbytes for n in base.tensors())
            identify, file_stats_of = gguf_manifest_id, gguf_file_stats
        else:
            base = Checkpoint.open(path)
            total = sum(info.nbytes for _, info in base.tensors.values())
            identify, file_stats_of = manifest_id, file_stats
        with base:
            progress.begin(f"checking {path.name}", total)
            try:
                model_id = identify(base, progress.advance)
            finally:
                progress.end()
            stats = file_stats_of(base)
        if model_id != model.model_id:
            raise InputFileError(path, f"weights differ from model {name!r} (manifest id {model_id[:16]}, "
                                       f"registered {model.model_id[:16]})")
        return self.registry.relocate_model(model, str(path), stats, keys)

    def add_licensee(self, name: str, jurisdiction: str, email: str | None = None) -> Licensee:
        """Record a licensee (legal name, ISO 3166-1 alpha-2 country, contact) in a signed entry."""
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
                 suspect: str | os.PathLike[str] | None = None, overwrite: bool = False) -> Path:
        """Write a signed evidence bundle of a scan: its accusations, or that nobody was accused
        (replacing only an earlier evidence bundle, and only with `overwrite`).

        `suspect` (default: the path the scan read) is hashed file by file into the bundle.
        """
        from weightmark.evidence import build_bundle
        from weightmark.registry.store import now

        target = self.output(out, EVIDENCE, overwrite)
        data = build_bundle(self.registry, self.keys, report, now(),
                            suspect if suspect is not None else report.suspect)
        return write_output_bytes(target, data)

    def export_log(self, out: str | os.PathLike[str], overwrite: bool = False) -> int:
        """Write the verified log as a folder of files (an earlier export is replaced only with
        `overwrite`)."""
        from weightmark.evidence import export_log

        target = self.output(out, LOG_EXPORT, overwrite)
        self.verify_log()
        return export_log(self.registry, target.final, overwrite=target.replace, before_publish=target.recheck)

    def write_public_key(self, out: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the current public signing key as PEM (replacing only an earlier exported key)."""
        target = self.output(out, PUBLIC_KEY, overwrite)
        return write_output_bytes(target, self.trust().current.pem.encode("ascii"))

    def write_trust(self, out: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the trust file (every signing key and its valid indices; replacing only an
        earlier trust file)."""
        import json

        target = self.output(out, TRUST_FILE, overwrite)
        return write_output_bytes(target, (json.dumps(self.trust().to_json(), indent=2) + "\n").encode())

    def output(self, out: str | os.PathLike[str], kind: OutputKind, overwrite: bool) -> Target:
        """Check where an output of `kind` may go (see outputs.prepare_output)."""
        return prepare_output(out, kind, force=overwrite, registry=self.registry,
                              protected=Protected.of_lab(self.home, self.registry))

    def scan(self, suspect: str | os.PathLike[str], model_name: str | None = None,
             reference: str | os.PathLike[str] | None = None, blind: bool = False,
             threshold: float = DEFAULT_THRESHOLD, assume_licensees: int = 0,
             progress: Progress = NO_PROGRESS, realign: bool = True, cluster: Any = None) -> ScanReport:
        """Score a suspect checkpoint against every copy issued of its model; accuse only when
        the family-wise p-value is at most `threshold`."""
        from weightmark.scan import scan

        return scan(self.registry, self.scan_keys(), suspect, model_name, reference, blind, threshold,
                    assume_licensees, progress, realign, cluster=cluster)

    # -- roles ---------------------------------------------------------------------------------

    def require(self, action: str, *roles: object) -> None:
        """Raise a KeyProblem naming the material `action` needs that this home lacks. A lab
        home holds the signer's and the stamper's material, and so can do what the others do."""

    def scan_keys(self) -> Any:
        """What a scan derives its chips, positions and codewords from (`model_key(model_id)`):
        the lab keys here; an investigator's scan keys in its home."""
        return self.keys

    def export_scan_key(self, model_name: str, out: str | os.PathLike[str], passphrase: str | None,
                        overwrite: bool = False) -> Path:
        """Write the sealed scan key of one model (its model key and nothing else) to `out`,
        encrypted with `passphrase` (None: unencrypted). Replaces only a scan key file of the
        same model, and only with `overwrite`."""
        from weightmark.outputs import scan_key_output
        from weightmark.scankey import ScanKey, seal_scan_key

        model = self.registry.model(model_name)
        origin = self.trust().origin
        target = self.output(out, scan_key_output(model.model_id), overwrite)
        key = ScanKey(model.model_id, model.name, origin, self.keys.model_key(model.model_id))
        return write_output_bytes(target, seal_scan_key(key, passphrase), mode=0o600)

    # -- model facts and export-control classes ------------------------------------------------

    def model_facts(self, model_name: str) -> dict[str, Fact]:
        """The facts in force for a model (measured and declared), from its verified signed entries."""
        from weightmark.facts import verified_facts

        return verified_facts(self.registry, self.registry.model(model_name))

    def measure_model(self, model_name: str) -> int:
        """Measure a registered model's base again and append a signed `model-facts` entry
        (for models registered before facts were measured); returns its log index."""
        from weightmark.facts import measure
        from weightmark.model import open_registered_base

        model = self.registry.model(model_name)
        with open_registered_base(model):  # refuses a base whose weights changed
            pass
        facts = measure(model.base_path, model.format)
        return self.registry.add_model_facts(model, facts, "measured", self.keys)

    def declare_facts(self, model_name: str, training_flops: float | None = None,
                      training_tokens: float | None = None, benchmarks: dict[str, float] | None = None,
                      capabilities: tuple[str, ...] | list[str] = (), source: str | None = None,
                      by: str | None = None) -> int:
        """Append a signed declaration of facts the weights cannot show (training compute and
        tokens, benchmark scores, capabilities); returns its log index. Tokens without flops
        record flops estimated as 6 x active parameters x tokens, marked as an estimate."""
        from weightmark.facts import declaration

        model = self.registry.model(model_name)
        facts = self.model_facts(model_name)
        params = facts.get("active_params") or facts.get("params")
        value = params.value if params is not None and isinstance(params.value, int) else None
        declared = declaration(value, training_flops, training_tokens, benchmarks, capabilities, source)
        who = (by or "").strip() or None
        return self.registry.add_model_facts(model, declared["facts"], "declared", self.keys, by=who,
                                             source=declared["source"], estimate=declared["estimate"])

    def classify(self, model_name: str, against: policy.Policy | None = None) -> policy.Classification:
        """Which control classes of the installed policy (or `against`) the model trips, rule by rule."""
        chosen = against if against is not None else policy.current(self.home)
        if chosen is None:
            raise UsageError("no jurisdiction policy is installed (weightmark policy set FILE), so there are "
                             "no control classes to classify by")
        if not chosen.classes:
            raise UsageError(f"{chosen.label} defines no control classes ([[class]] tables); every model "
                             "gets its tiers")
        return chosen.classify(self.model_facts(model_name))

    def issued_in_control_class(self, copies: list[tuple[IssuedCopy, Licensee]],
                                control_class: str) -> list[tuple[IssuedCopy, Licensee]]:
        """The copies whose signed policy record (signature checked) classified the model in `control_class`."""
        from weightmark.facts import recorded_control_classes, signed_statement
        from weightmark.registry.log import trust_from_entries

        trust = trust_from_entries(self.registry.key_chain_entries())
        return [(copy, lic) for copy, lic in copies
                if control_class in recorded_control_classes(signed_statement(self.registry, copy.entry_idx, trust))]

    def check_policy(self, source: str | os.PathLike[str]) -> dict[str, object]:
        """What installing the policy file `source` would change, model by model and country by
        country, and which copies already issued it would deny (nothing is installed)."""
        new = policy.Policy.load(source)
        return policy.check(self.registry, policy.current(self.home), new)
