"""Roles, and homes that hold only one role's material (least privilege).

A lab has four roles, each needing its own material and nothing more:

- signer: the Ed25519 signing key (in `lab-keys.json`, or in a PKCS#11 token). The only role
  that appends to the registry: every entry and checkpoint is signed.
- stamper: the watermark master secret (or the key of each model it may stamp). Stamping also
  appends the issued copy's entry, so a stamp needs the signer too.
- investigator: the scan key of one or more models (`weightmark keys export-scan-key`) and read
  access to the registry: scans, accuses, looks entries up; cannot sign, append or stamp.
- auditor: the public trust file and read access to the registry: `registry verify` and
  look-ups, nothing secret at all.

A lab home (`weightmark init`) holds the signer's and the stamper's material. An investigator
or auditor home (`weightmark init --role ...`) holds `role.json` (its role and where the
registry is), the trust file it was given (`trust.json`, the anchor of every checked read in
place of a lab.pub) and, for an investigator, its sealed scan keys (`scan-keys/`). Its
registry is another home's SQLite file or the lab's PostgreSQL database, opened read-only
(SQLite `mode=ro`; on PostgreSQL a session whose every transaction is READ ONLY, best as the
read-only role `weightmark registry grant --reader` makes, so the grants refuse writes too).
A command that needs material the home does
not hold stops with a KeyProblem (exit 4) naming the role and the material.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from weightmark.bounded import loads_json, read_bounded, read_json
from weightmark.errors import InputFileError, KeyProblem, RegistryError, UsageError
from weightmark.fsutil import write_bytes_atomic
from weightmark.lab import Lab, PassphraseSource, passphrase_from_env
from weightmark.outputs import OutputKind, Protected, Target, prepare_output
from weightmark.registry.backend import check_url, is_url
from weightmark.registry.log import (
    LogVerificationError,
    Trust,
    VerifiedLog,
    trust_from_entries,
)
from weightmark.registry.store import DB_FILE, Registry
from weightmark.scankey import ScanKeys, read_scan_key, unseal_scan_key

ROLE_FILE = "role.json"
ROLE_FORMAT = "weightmark-role-home"
HOME_TRUST_FILE = "trust.json"
SCAN_KEY_DIR = "scan-keys"
MAX_ROLE_FILE_BYTES = 64 << 10
MAX_TRUST_BYTES = 16 << 20

__all__ = ["MATERIAL", "ROLE_FILE", "Role", "RoleHome", "lacks", "open_home"]


class Role(StrEnum):
    SIGNER = "signer"
    STAMPER = "stamper"
    INVESTIGATOR = "investigator"
    AUDITOR = "auditor"


# What each role holds, as messages name it.
MATERIAL = {
    Role.SIGNER: "the signer's signing key (lab-keys.json in a lab home, or a PKCS#11 token)",
    Role.STAMPER: "the stamper's watermark master secret (lab-keys.json in a lab home)",
    Role.INVESTIGATOR: "an investigator's scan key for the model (weightmark keys export-scan-key)",
    Role.AUDITOR: "the auditor's trust file and read access to the registry",
}

# Role homes that `weightmark init --role` makes (signer and stamper material lives in a lab home).
HOME_ROLES = (Role.INVESTIGATOR, Role.AUDITOR)


def lacks(home: Path, role: Role, action: str, *needed: Role) -> KeyProblem:
    """The error of a command that needs material this role home does not hold."""
    what = " and ".join(MATERIAL[n] for n in needed)
    return KeyProblem(f"{home}: {action} needs {what}, which this {role} home does not hold")


def registry_location(text: str | os.PathLike[str]) -> Path | str:
    """A registry from a path (the database file itself, or a lab home folder holding one) or
    a PostgreSQL URL (postgresql://reader@host/database, no password in it)."""
    if is_url(str(text)):
        return check_url(str(text))
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / DB_FILE
    if not path.is_file():
        raise RegistryError(f"{path}: no registry database here")
    return path.resolve()


def check_chain(pinned: Trust, chain: Trust, source: str) -> None:
    """The log's key chain must be the pinned trust, or extend it by rotations from its last key.

    Each rotation entry is signed by the key it retires, so a chain that continues the pinned
    one is as trustworthy as the pinned keys themselves; anything else is refused.
    """
    if chain.origin != pinned.origin:
        raise LogVerificationError(f"{source}: the registry is the log {chain.origin!r}, but the trust file "
                                   f"is for {pinned.origin!r}")
    if len(chain.keys) < len(pinned.keys):
        raise LogVerificationError(f"{source}: the log's key chain has fewer keys than the trust file")
    for i, (mine, theirs) in enumerate(zip(pinned.keys, chain.keys, strict=False)):
        last = i == len(pinned.keys) - 1
        same_until = mine.valid_until == theirs.valid_until or (last and mine.valid_until is None)
        if (mine.key_id, mine.pem.strip(), mine.valid_from) != (theirs.key_id, theirs.pem.strip(),
                                                                theirs.valid_from) or not same_until:
            raise LogVerificationError(f"{source}: the log's key chain differs from the trusted keys "
                                       f"(key {i + 1}: {theirs.key_id} in the log, {mine.key_id} trusted)")


class PinnedTrust:
    """The anchor of a role home's registry: the log's key chain must be (or extend) the trust
    file's keys. Plain data (the trust file's JSON), so it travels to cluster workers."""

    def __init__(self, trust: Trust, source: str) -> None:
        self.doc, self.source = trust.to_json(), source

    def __call__(self, chain: Trust) -> None:
        check_chain(Trust.from_json(self.doc, self.source), chain, self.source)


def read_trust(path: Path) -> Trust:
    """A trust file, checked."""
    try:
        doc = read_json(path, MAX_TRUST_BYTES, "trust file")
    except InputFileError as exc:
        raise KeyProblem(str(exc)) from None
    return Trust.from_json(doc, str(path))


class RoleHome(Lab):
    """An investigator's or auditor's home: a Lab whose keys are only its role's material and
    whose registry is another home's database, opened read-only and anchored on the trust file.

    Example::

        with RoleHome("/srv/scan-home") as home:
            report = home.scan("leak.safetensors")
    """

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 passphrase: str | PassphraseSource | None = passphrase_from_env,
                 notify: Callable[[str], None] | None = None) -> None:
        if notify is None:
            super().__init__(home, passphrase)
        else:
            super().__init__(home, passphrase, notify)
        doc = self._role_document()
        self.role = Role(doc["role"])
        # Where the registry is: a database file, or a PostgreSQL URL.
        self.registry_location: Path | str = doc["registry"] if is_url(doc["registry"]) else Path(doc["registry"])
        # The registry's file (None on PostgreSQL), for messages about the disk it is on.
        self.registry_path: Path | None = None if is_url(doc["registry"]) else Path(doc["registry"])
        self._scan_keys: ScanKeys | None = None

    def _role_document(self) -> dict[str, Any]:
        path = self.home / ROLE_FILE
        try:
            doc = loads_json(read_bounded(path, MAX_ROLE_FILE_BYTES, "role file"), str(path), "role file")
        except InputFileError as exc:
            raise KeyProblem(str(exc)) from None
        if (not isinstance(doc, dict) or doc.get("format") != ROLE_FORMAT or doc.get("version") != 1
                or doc.get("role") not in [r.value for r in HOME_ROLES] or not isinstance(doc.get("registry"), str)):
            raise KeyProblem(f"{path}: not a weightmark role file (format, version, role or registry)")
        return doc

    @classmethod
    def init_role(cls, home: str | os.PathLike[str], role: Role | str, registry: str | os.PathLike[str],
                  trust_file: str | os.PathLike[str], scan_keys: Sequence[str | os.PathLike[str]] = (),
                  passphrase: str | PassphraseSource | None = passphrase_from_env) -> RoleHome:
        """Create an investigator or auditor home: the trust file, the scan keys (investigator
        only; copied sealed as they are) and a pointer to the registry, checked before anything
        is written: the registry's log must match the trust file, and each scan key must be of
        a model registered in that log."""
        role = Role(role)
        if role not in HOME_ROLES:
            raise UsageError(f"--role {role}: a {role}'s material lives in a lab home (weightmark init "
                             f"without --role); role homes are {', '.join(HOME_ROLES)}")
        if role is Role.INVESTIGATOR and not scan_keys:
            raise UsageError("an investigator home needs at least one --scan-key FILE")
        if role is Role.AUDITOR and scan_keys:
            raise UsageError("an auditor home holds no scan key (it is public material only)")
        home = Path(home)
        if home.exists() and any(home.iterdir()):
            raise UsageError(f"{home}: not empty; a role home is made in a new or empty folder")
        db = registry_location(registry)
        trust = read_trust(Path(trust_file))
        source = str(trust_file)
        reg = Registry.open_read_only(db, PinnedTrust(trust, source))
        try:
            reg.signed_index()  # the log checks out against the trust file
            infos = [read_scan_key(Path(p)) for p in scan_keys]
            for info in infos:
                if info.origin != trust.origin:
                    raise KeyProblem(f"{info.path}: a scan key of the log {info.origin!r}, not of {trust.origin!r}")
                try:
                    reg.model_by_id(info.model_id)
                except RegistryError:
                    raise KeyProblem(f"{info.path}: model {info.model_id[:16]} is not registered in {db}") from None
        finally:
            reg.close()
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        write_bytes_atomic(home / HOME_TRUST_FILE, (json.dumps(trust.to_json(), indent=2) + "\n").encode(),
                           mode=0o644)
        if infos:
            (home / SCAN_KEY_DIR).mkdir(mode=0o700)
            for info in infos:
                shutil.copyfile(info.path, home / SCAN_KEY_DIR / f"{info.model_id}.json")
                os.chmod(home / SCAN_KEY_DIR / f"{info.model_id}.json", 0o600)
        doc = {"format": ROLE_FORMAT, "version": 1, "role": role.value, "registry": str(db)}
        write_bytes_atomic(home / ROLE_FILE, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o644)
        return cls(home, passphrase)

    # -- what this home holds ------------------------------------------------------------------

    def holds(self, role: Role) -> bool:
        return role is self.role or (self.role is Role.INVESTIGATOR and role is Role.AUDITOR)

    def require(self, action: str, *roles: Role) -> None:
        missing = [r for r in roles if not self.holds(r)]
        if missing:
            raise lacks(self.home, self.role, action, *missing)

    def pinned_trust(self) -> Trust:
        return read_trust(self.home / HOME_TRUST_FILE)

    @property
    def registry(self) -> Registry:
        """The registry this home points at, read-only, its key chain checked against trust.json."""
        if self._registry is None:
            anchor = PinnedTrust(self.pinned_trust(), str(self.home / HOME_TRUST_FILE))
            self._registry = Registry.open_read_only(self.registry_location, anchor)
        return self._registry

    @property
    def keys(self) -> Any:
        """A role home holds no lab keys: whatever asks for them is told what is missing."""
        raise lacks(self.home, self.role, "signing (appending to the registry)", Role.SIGNER)

    def scan_keys(self) -> ScanKeys:
        """The scan keys this home holds (unsealed on first use with the home's passphrase)."""
        self.require("scanning", Role.INVESTIGATOR)
        if self._scan_keys is None:
            folder = self.home / SCAN_KEY_DIR
            paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
            encrypted = any(read_scan_key(p).encrypted for p in paths)
            phrase = self._passphrase() if encrypted else None
            keys = [unseal_scan_key(p, phrase) for p in paths]
            origin = self.pinned_trust().origin
            for p, key in zip(paths, keys, strict=True):
                if key.origin != origin or p.stem != key.model_id:
                    raise KeyProblem(f"{p}: a scan key of another log or model than this home's")
            self._scan_keys = ScanKeys(keys, self.home)
        return self._scan_keys

    def trust(self) -> Trust:
        self.registry.signed_index()  # checks the chain against trust.json
        return trust_from_entries(self.registry.key_chain_entries())

    def verify_log(self) -> VerifiedLog:
        """Everything `Lab.verify_log` checks, anchored on this home's trust file."""
        result = self._verify_registry()
        check_chain(self.pinned_trust(), result.trust, str(self.home / HOME_TRUST_FILE))
        return result

    def output(self, out: str | os.PathLike[str], kind: OutputKind, overwrite: bool) -> Target:
        from weightmark.outputs import EVIDENCE

        if kind is EVIDENCE:
            raise lacks(self.home, self.role, "an evidence bundle (signed by the lab)", Role.SIGNER)
        protected = Protected.of_lab(self.home, self.registry)
        return prepare_output(out, kind, force=overwrite, registry=self.registry, protected=protected)

    # -- what it cannot do, said plainly -----------------------------------------------------------

    def stamp(self, *args: Any, **kwargs: Any) -> Any:
        raise lacks(self.home, self.role, "stamping", Role.STAMPER, Role.SIGNER)

    def export_scan_key(self, *args: Any, **kwargs: Any) -> Path:
        raise lacks(self.home, self.role, "exporting a scan key", Role.STAMPER)

    def rotate_keys(self) -> Any:
        raise lacks(self.home, self.role, "rotating the signing key", Role.SIGNER)

    def rotate_to_token(self, *args: Any, **kwargs: Any) -> Any:
        raise lacks(self.home, self.role, "rotating the signing key", Role.SIGNER)


def open_home(home: str | os.PathLike[str] | None,
              passphrase: str | PassphraseSource | None = passphrase_from_env) -> Lab:
    """The home at `home`: a RoleHome where a role file says so, else the lab home."""
    lab = Lab(home, passphrase=passphrase)
    if (lab.home / ROLE_FILE).exists():
        return RoleHome(lab.home, passphrase)
    return lab
