"""Scan keys: the key material to scan one model, and nothing else, sealed like the lab keys.

A model's scan key is its model key, `HKDF-SHA256(master, salt=model_id, info=MODEL_KEY_INFO)`:
the carrier seeds (chips and code positions) and every licensee's codeword derive from it
(see scheme.py), so it is exactly what a scan needs. It holds nothing of the signing key or of
any other model (HKDF is one-way: the master secret cannot be recovered from it).

The watermark is symmetric: whoever holds a model's scan key can also embed a codeword of that
model (forge a copy that accuses a licensee, or wash a stamp out of a copy). So the file is
sealed like the lab keys (scrypt + AES-256-GCM; the model id and the log origin are the
associated data, so neither can be swapped), created 0600, and handed only to people the lab
would trust to stamp that model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from weightmark.errors import KeyProblem
from weightmark.keys import open_secret, read_key_file, seal_secret, sealed_document

SCAN_KEY_FORMAT = "weightmark-scan-key"
_AAD = b"weightmark/scan-key/v1\x00"
__all__ = ["SCAN_KEY_FORMAT", "ScanKey", "ScanKeys", "read_scan_key", "seal_scan_key", "unseal_scan_key"]


def _aad(model_id: str, origin: str) -> bytes:
    return _AAD + model_id.encode("ascii") + b"\x00" + origin.encode("utf-8")


def scan_key_id(model_key: bytes) -> str:
    """A public fingerprint of a scan key (SHA-256 under its own label, 8 bytes, hex)."""
    return hashlib.sha256(b"weightmark/v1/scan-key-id\x00" + model_key).digest()[:8].hex()


@dataclass(frozen=True)
class ScanKey:
    """One model's scan key, unsealed: what `scan` needs for that model."""

    model_id: str
    model_name: str
    origin: str  # the log this model is registered in
    model_key: bytes

    @property
    def key_id(self) -> str:
        return scan_key_id(self.model_key)


@dataclass(frozen=True)
class ScanKeyInfo:
    """What a sealed scan key file says about itself without its passphrase."""

    path: Path
    model_id: str
    model_name: str
    origin: str
    key_id: str
    encrypted: bool


def seal_scan_key(key: ScanKey, passphrase: str | None) -> bytes:
    """The file of a scan key: AES-256-GCM under a scrypt key, or plain when passphrase is None."""
    doc: dict[str, object] = {"format": SCAN_KEY_FORMAT, "version": 1, "model_id": key.model_id,
                              "model": key.model_name, "origin": key.origin, "scan_key_id": key.key_id,
                              "allows": "scanning AND stamping (embedding) copies of this one model; "
                                        "nothing of the signing key or of other models"}
    doc.update(seal_secret(key.model_key, passphrase, _aad(key.model_id, key.origin)))
    return (json.dumps(doc, indent=2) + "\n").encode()


def _document(data: bytes, source: str) -> dict:
    doc = sealed_document(data, source, SCAN_KEY_FORMAT)
    for name in ("model_id", "model", "origin", "scan_key_id"):
        if not isinstance(doc.get(name), str):
            raise KeyProblem(f"{source}: not a weightmark scan key file ({name!r} missing or not a str)")
    try:
        if len(bytes.fromhex(doc["model_id"])) != 32:
            raise ValueError
    except ValueError:
        raise KeyProblem(f"{source}: not a weightmark scan key file (model_id is not 64 hex digits)") from None
    return doc


def read_scan_key(path: Path) -> ScanKeyInfo:
    """The public fields of a sealed scan key file (checked; no passphrase needed)."""
    doc = _document(read_key_file(path), str(path))
    return ScanKeyInfo(Path(path), doc["model_id"], doc["model"], doc["origin"], doc["scan_key_id"],
                       doc["kdf"] != "none")


def unseal_scan_key(path: Path, passphrase: str | None) -> ScanKey:
    """Open a sealed scan key file. Raises KeyProblem on a wrong passphrase or a damaged file."""
    source = str(path)
    doc = _document(read_key_file(path), source)
    secret = open_secret(doc, passphrase, _aad(doc["model_id"], doc["origin"]), source, "scan keys")
    if len(secret) != 32:
        raise KeyProblem(f"{source}: damaged scan key file (key has {len(secret)} bytes, expected 32)")
    key = ScanKey(doc["model_id"], doc["model"], doc["origin"], secret)
    if key.key_id != doc["scan_key_id"]:
        raise KeyProblem(f"{source}: scan key id does not match the stored key")
    return key


class ScanKeys:
    """The keys an investigator holds, one per model: `model_key(model_id)` as LabKeys has it,
    and a KeyProblem naming the missing material for any other model (never a guess)."""

    def __init__(self, keys: list[ScanKey], home: Path) -> None:
        self._keys = {k.model_id: k for k in keys}
        self._home = home

    @property
    def models(self) -> list[str]:
        return sorted(k.model_name for k in self._keys.values())

    def model_key(self, model_id: str) -> bytes:
        key = self._keys.get(model_id)
        if key is None:
            held = ", ".join(self.models) or "none"
            raise KeyProblem(f"{self._home}: scanning model {model_id[:16]} needs an investigator's scan key "
                             f"for it (weightmark keys export-scan-key) or the stamper's master secret; this "
                             f"home holds scan keys for: {held}")
        return key.model_key


