"""Lab keys: the Ed25519 signing key and the watermark master secret, encrypted at rest."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from weightmark.bounded import loads_json, read_bounded
from weightmark.errors import InputFileError, KeyProblem
from weightmark.fsutil import write_bytes_atomic

KEY_FILE = "lab-keys.json"
NEXT_KEY_FILE = "lab-keys.next.json"  # a rotation in progress
PUBLIC_KEY_FILE = "lab.pub"
_AAD = b"weightmark/lab-keys/v1"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
# The most a key file may ask scrypt for (n * r * 128 bytes of memory: 1 GiB at the caps).
# A hostile file asking for n = 2**40 is refused before anything is derived.
MAX_SCRYPT = {"n": 2**20, "r": 8, "p": 1}
MAX_KEY_FILE_BYTES = 64 << 10
MODEL_KEY_INFO = b"weightmark/v1/model"


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 4 bytes of SHA-256 of the raw public key, hex: the key id of DSSE signatures.

    (Signed-note checkpoints use the C2SP key id instead, which also hashes the key's name:
    see weightmark.registry.note.note_key_id.)
    """
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:4].hex()


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class LabKeys:
    """The unlocked secrets of a lab. Never written anywhere unencrypted but with --insecure."""

    signing_key: Ed25519PrivateKey
    master_secret: bytes

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message)

    def model_key(self, model_id: str) -> bytes:
        """HKDF-SHA256(master, salt=model_id, info='weightmark/v1/model'): one key per model."""
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=bytes.fromhex(model_id), info=MODEL_KEY_INFO
        )
        return hkdf.derive(self.master_secret)

    @classmethod
    def generate(cls) -> LabKeys:
        return cls(Ed25519PrivateKey.generate(), secrets.token_bytes(32))

    def rotated(self) -> LabKeys:
        """A new signing key with the same watermark master secret (copies stay traceable)."""
        return LabKeys(Ed25519PrivateKey.generate(), self.master_secret)

    @property
    def public_pem(self) -> str:
        return public_key_pem(self.public_key).decode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def passphrase_bytes(passphrase: str) -> bytes:
    """The passphrase as UTF-8; text that is not (undecodable bytes from the environment or a
    terminal) is a KeyProblem, not an encoding traceback."""
    try:
        return passphrase.encode("utf-8")
    except UnicodeEncodeError:
        raise KeyProblem("the passphrase is not valid UTF-8 text") from None


def _scrypt_key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase_bytes(passphrase))


def seal_secret(secret: bytes, passphrase: str | None, aad: bytes) -> dict[str, object]:
    """The fields that keep `secret` on disk: AES-256-GCM under a scrypt key bound to `aad`, or
    plain (marked UNENCRYPTED) when passphrase is None. Every sealed weightmark file uses them."""
    if passphrase is None:
        return {"kdf": "none", "warning": "UNENCRYPTED: created with --insecure-no-passphrase", "secret": _b64(secret)}
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    key = _scrypt_key(passphrase, salt, **_SCRYPT)
    return {"kdf": "scrypt", "scrypt": dict(_SCRYPT, salt=_b64(salt)), "cipher": "aes-256-gcm",
            "nonce": _b64(nonce), "ciphertext": _b64(AESGCM(key).encrypt(nonce, secret, aad))}


def seal(keys: LabKeys, passphrase: str | None) -> bytes:
    """Serialise keys for disk: AES-256-GCM under a scrypt key, or plain when passphrase is None."""
    secret = keys.signing_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ) + keys.master_secret
    doc: dict[str, object] = {"format": "weightmark-lab-keys", "version": 1, "key_id": keys.key_id}
    doc.update(seal_secret(secret, passphrase, _AAD))
    return (json.dumps(doc, indent=2) + "\n").encode()


def _field(doc: dict, name: str, kind: type, source: str) -> object:
    """doc[name], which must be a `kind` (bool is not an int here)."""
    value = doc.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise KeyProblem(f"{source}: not a weightmark key file ({name!r} missing or not a {kind.__name__})")
    return value


def _key_document(data: bytes, source: str) -> dict:
    """The parsed key file with every field it needs checked for presence and type."""
    doc = sealed_document(data, source, "weightmark-lab-keys")
    _field(doc, "key_id", str, source)
    return doc


def sealed_document(data: bytes, source: str, fmt: str) -> dict:
    """A sealed key file of format `fmt` (version 1), parsed, with its sealing fields checked for
    presence, type and sane scrypt parameters before anything is derived."""
    try:
        doc = loads_json(data, source, "weightmark key file")
    except InputFileError as exc:
        raise KeyProblem(str(exc)) from None
    if not isinstance(doc, dict):
        raise KeyProblem(f"{source}: not a weightmark key file (a JSON {type(doc).__name__}, not an object)")
    if doc.get("format") != fmt or _field(doc, "version", int, source) != 1:
        raise KeyProblem(f"{source}: not a weightmark key file of format {fmt!r} (format or version)")
    kdf = _field(doc, "kdf", str, source)
    if kdf == "none":
        _field(doc, "secret", str, source)
    elif kdf == "scrypt":
        for name in ("nonce", "ciphertext"):
            _field(doc, name, str, source)
        if doc.get("cipher") != "aes-256-gcm":
            raise KeyProblem(f"{source}: unknown key cipher {str(doc.get('cipher'))[:40]!r}")
        sc = _field(doc, "scrypt", dict, source)
        _field(sc, "salt", str, source)
        for name, cap in MAX_SCRYPT.items():
            value = _field(sc, name, int, source)
            if not 1 <= value <= cap:
                raise KeyProblem(f"{source}: scrypt parameter {name} = {value} is outside 1..{cap}; "
                                 "refusing to derive a key with it")
        if sc["n"] < 2 or sc["n"] & (sc["n"] - 1):
            raise KeyProblem(f"{source}: scrypt parameter n = {sc['n']} is not a power of two")
    else:
        raise KeyProblem(f"{source}: unknown key encryption {kdf[:40]!r}")
    return doc


def open_secret(doc: dict, passphrase: str | None, aad: bytes, source: str, what: str = "lab keys") -> bytes:
    """The secret of a document checked by sealed_document(). Raises KeyProblem on a wrong
    passphrase, an altered file, or a missing passphrase (naming the environment variable)."""
    try:
        if doc["kdf"] == "none":
            return base64.b64decode(doc["secret"], validate=True)
        if passphrase is None:
            raise KeyProblem(
                f"{source}: the {what} are passphrase-protected: set WEIGHTMARK_PASSPHRASE "
                "or run the command on a terminal"
            )
        sc = doc["scrypt"]
        key = _scrypt_key(passphrase, base64.b64decode(sc["salt"], validate=True), sc["n"], sc["r"], sc["p"])
        nonce = base64.b64decode(doc["nonce"], validate=True)
        return AESGCM(key).decrypt(nonce, base64.b64decode(doc["ciphertext"], validate=True), aad)
    except InvalidTag:
        raise KeyProblem(f"{source}: wrong passphrase (or the key file was altered)") from None
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"{source}: damaged key file ({exc})") from None


def unseal(data: bytes, passphrase: str | None, source: str = KEY_FILE) -> LabKeys:
    """Inverse of seal(). Raises KeyProblem on a wrong passphrase or a damaged file."""
    doc = _key_document(data, source)
    secret = open_secret(doc, passphrase, _AAD, source)
    if len(secret) != 64:
        raise KeyProblem(f"{source}: damaged key file (secret has {len(secret)} bytes, expected 64)")
    keys = LabKeys(Ed25519PrivateKey.from_private_bytes(secret[:32]), secret[32:])
    if doc.get("key_id") != keys.key_id:
        raise KeyProblem(f"{source}: key id does not match the stored key")
    return keys


def read_key_file(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_KEY_FILE_BYTES, "weightmark key file")
    except InputFileError as exc:
        raise KeyProblem(str(exc)) from None


def create(home: Path, passphrase: str | None) -> LabKeys:
    """Generate lab keys in `home` (0600 secret file, PEM public key). Refuses to overwrite."""
    path = home / KEY_FILE
    if path.exists():
        raise KeyProblem(f"{path}: lab keys already exist; refusing to replace them")
    keys = LabKeys.generate()
    write_bytes_atomic(path, seal(keys, passphrase), mode=0o600)
    write_bytes_atomic(home / PUBLIC_KEY_FILE, public_key_pem(keys.public_key), mode=0o644)
    return keys


def load(home: Path, passphrase: str | None, name: str = KEY_FILE) -> LabKeys:
    path = home / name
    if not os.path.lexists(path):
        raise KeyProblem(f"{path}: no lab keys here; run `weightmark init` first")
    data = read_key_file(path)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise KeyProblem(f"{path}: lab key file is readable by others (mode {mode:o}); chmod 600 it")
    return unseal(data, passphrase, str(path))


def sealed_key_id(path: Path) -> str:
    """The key id a sealed key file declares (readable without the passphrase)."""
    return str(_key_document(read_key_file(path), str(path))["key_id"])


def is_encrypted(home: Path) -> bool:
    try:
        return _key_document(read_key_file(home / KEY_FILE), KEY_FILE)["kdf"] != "none"
    except KeyProblem:
        return True  # load() then names the problem
