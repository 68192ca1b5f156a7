"""C2SP signed notes carrying tlog checkpoints: strict parsing, Ed25519 signing and verification."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAX_NOTE_BYTES = 1 << 20
MAX_SIGNATURES = 100
SIG_PREFIX = "\u2014 "  # EM DASH, space
ED25519_ALG = b"\x01"
HASH_SIZE = 32
_KEY_ID_SIZE = 4
_SIGNATURE_SIZE = 64
_MAX_TREE_SIZE = (1 << 64) - 1
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)", re.ASCII)


class NoteError(ValueError):
    """A signed note or checkpoint breaks a rule of the C2SP signed-note / tlog-checkpoint specs."""


# -- keys ------------------------------------------------------------------------------------------


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_key_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise NoteError("key name must be a non-empty string")
    if "+" in name or any(ch.isspace() for ch in name):
        raise NoteError(f"key name {name!r} must contain neither spaces nor '+'")
    _check_text_chars(name, "key name")


def note_key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """C2SP key id: the first 4 bytes of SHA-256(name || "\\n" || 0x01 || raw public key)."""
    _check_key_name(name)
    return hashlib.sha256(name.encode("utf-8") + b"\n" + ED25519_ALG + _raw(public_key)).digest()[
        :_KEY_ID_SIZE
    ]


def verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """The vkey string `<name>+<hex key id>+<base64(0x01 || public key)>`."""
    key_id = note_key_id(name, public_key).hex()
    return f"{name}+{key_id}+{base64.b64encode(ED25519_ALG + _raw(public_key)).decode('ascii')}"


# -- checkpoints -----------------------------------------------------------------------------------


def _check_text_chars(text: str, what: str) -> None:
    for ch in text:
        if ch == "\r":
            raise NoteError(f"{what} contains a carriage return (lines must end with \\n only)")
        if (ch < " " and ch != "\n") or ch == "\x7f":
            raise NoteError(f"{what} contains control character U+{ord(ch):04X}")


def _strict_b64(text: str, what: str) -> bytes:
    """Standard, padded base64 in its one canonical spelling (so no two texts decode alike)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise NoteError(f"{what} is not valid standard base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw


@dataclass(frozen=True)
class Checkpoint:
    """A tlog checkpoint: origin line, tree size, root hash and optional extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin:
            raise NoteError("checkpoint origin must be a non-empty line")
        if "\n" in self.origin:
            raise NoteError("checkpoint origin must be a single line")
        if "+" in self.origin or any(ch.isspace() for ch in self.origin):
            raise NoteError(f"checkpoint origin {self.origin!r} must contain neither spaces nor '+'")
        _check_text_chars(self.origin, "checkpoint origin")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise NoteError("checkpoint tree size must be an int")
        if not 0 <= self.size <= _MAX_TREE_SIZE:
            raise NoteError(f"checkpoint tree size {self.size} is outside 0..2^64-1")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise NoteError(f"checkpoint root hash must be exactly {HASH_SIZE} bytes")
        if not isinstance(self.extensions, tuple):
            raise NoteError("checkpoint extensions must be a tuple of lines")
        for line in self.extensions:
            if not isinstance(line, str) or not line:
                raise NoteError("checkpoint extension lines must be non-empty")
            if "\n" in line:
                raise NoteError("a checkpoint extension must be a single line")
            _check_text_chars(line, "checkpoint extension line")

    def body(self) -> bytes:
        """The note text that signatures cover: every line ends in \\n, no blank line."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii")]
        return ("\n".join([*lines, *self.extensions]) + "\n").encode("utf-8")


def parse_checkpoint(body: bytes) -> Checkpoint:
    """Strictly parse a checkpoint body (the note text, ending in \\n, without signatures)."""
    text = _decode(body, "checkpoint")
    if not text.endswith("\n"):
        raise NoteError("checkpoint body must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("checkpoint needs origin, tree size and root hash lines")
    if any(line == "" for line in lines):
        raise NoteError("checkpoint body must not contain an empty line")
    origin, size_line, root_line, *extensions = lines
    if not _DECIMAL.fullmatch(size_line):
        raise NoteError(
            f"checkpoint tree size {size_line!r} must be ASCII decimal without leading zeros"
        )
    size = int(size_line)
    if size > _MAX_TREE_SIZE:
        raise NoteError(f"checkpoint tree size {size_line} does not fit in 64 bits")
    root = _strict_b64(root_line, "checkpoint root hash")
    if len(root) != HASH_SIZE:
        raise NoteError(f"checkpoint root hash has {len(root)} bytes, expected {HASH_SIZE}")
    return Checkpoint(origin, size, root, tuple(extensions))


# -- signed notes ------------------------------------------------------------------------------------


def _decode(data: bytes, what: str) -> str:
    if not isinstance(data, bytes | bytearray):
        raise NoteError(f"{what} must be bytes")
    try:
        text = bytes(data).decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise NoteError(f"{what} is not valid UTF-8") from None
    _check_text_chars(text, what)
    return text


def _check_body(body: bytes) -> str:
    text = _decode(body, "note text")
    if not text or not text.endswith("\n"):
        raise NoteError("note text must be non-empty and end with a newline")
    if "\n\n" in text or text.startswith("\n"):
        raise NoteError("note text must not contain a blank line")
    return text


def sign_note(body: bytes, signers: list[tuple[str, Ed25519PrivateKey]]) -> bytes:
    """Append a blank line and one signature line per signer, in order, to the note text `body`."""
    _check_body(body)
    if len(body) > MAX_NOTE_BYTES:
        raise NoteError(f"note text exceeds {MAX_NOTE_BYTES} bytes")
    if not signers:
        raise NoteError("a signed note needs at least one signer")
    if len(signers) > MAX_SIGNATURES:
        raise NoteError(f"a signed note carries at most {MAX_SIGNATURES} signatures")
    lines = []
    for name, private_key in signers:
        key_id = note_key_id(name, private_key.public_key())
        blob = base64.b64encode(key_id + private_key.sign(bytes(body))).decode("ascii")
        lines.append(f"{SIG_PREFIX}{name} {blob}\n")
    note = bytes(body) + b"\n" + "".join(lines).encode("utf-8")
    if len(note) > MAX_NOTE_BYTES:
        raise NoteError(f"signed note exceeds {MAX_NOTE_BYTES} bytes")
    return note


def _split_note(text: bytes) -> tuple[bytes, list[tuple[str, bytes, bytes]]]:
    """(body bytes, signature lines) after every structural check of the signed-note format."""
    if not isinstance(text, bytes | bytearray):
        raise NoteError("signed note must be bytes")
    if len(text) > MAX_NOTE_BYTES:
        raise NoteError(f"signed note is {len(text)} bytes, the limit is {MAX_NOTE_BYTES}")
    full = _decode(bytes(text), "signed note")
    if not full.endswith("\n"):
        raise NoteError("signed note must end with a newline")
    cut = full.rfind("\n\n")
    if cut < 0:
        raise NoteError("signed note has no blank line between the text and the signatures")
    body, block = full[: cut + 1], full[cut + 2 :]
    _check_body(body.encode("utf-8"))
    if not block:
        raise NoteError("signed note has no signature lines")
    sig_lines = block[:-1].split("\n")
    if len(sig_lines) > MAX_SIGNATURES:
        raise NoteError(f"signed note has more than {MAX_SIGNATURES} signature lines")
    signatures = []
    for number, line in enumerate(sig_lines, start=1):
        where = f"signature line {number}"
        if not line.startswith(SIG_PREFIX):
            raise NoteError(f"{where} must start with an em dash (U+2014) and a space")
        parts = line[len(SIG_PREFIX) :].split(" ")
        if len(parts) != 2:
            raise NoteError(f"{where} must be '\u2014 <key name> <base64 signature>'")
        name, blob = parts
        try:
            _check_key_name(name)
        except NoteError as exc:
            raise NoteError(f"{where}: {exc}") from None
        raw = _strict_b64(blob, f"{where} signature")
        if len(raw) < _KEY_ID_SIZE + 1:
            raise NoteError(f"{where}: signature must hold a 4-byte key id and a signature")
        signatures.append((name, raw[:_KEY_ID_SIZE], raw[_KEY_ID_SIZE:]))
    return body.encode("utf-8"), signatures


def parse_note(text: bytes) -> tuple[Checkpoint, list[tuple[str, bytes, bytes]]]:
    """Strictly parse a signed checkpoint into (checkpoint, [(key name, key id, signature)])."""
    body, signatures = _split_note(text)
    return parse_checkpoint(body), signatures


def verify_note(
    text: bytes,
    trusted: dict[bytes, tuple[str, Ed25519PublicKey]],
    origin: str | None = None,
) -> Checkpoint:
    """Return the checkpoint if a trusted key signed it and no trusted key's signature is bad.

    `trusted` maps key id to (key name, public key). Lines from unknown key ids are ignored; a
    line with a trusted key id must carry that key's name and a valid signature, or the whole
    note is rejected. With `origin`, the checkpoint's origin line must equal it.
    """
    for key_id, (name, public_key) in trusted.items():
        if note_key_id(name, public_key) != key_id:
            raise ValueError(f"trusted key table: {key_id.hex()} is not the key id of {name!r}")
    body, signatures = _split_note(text)
    checkpoint = parse_checkpoint(body)
    verified = 0
    for name, key_id, signature in signatures:
        if key_id not in trusted:
            continue
        trusted_name, public_key = trusted[key_id]
        if name != trusted_name:
            raise NoteError(
                f"signature line names {name!r} but key id {key_id.hex()} is trusted as {trusted_name!r}"
            )
        if len(signature) != _SIGNATURE_SIZE:
            raise NoteError(f"signature by {name!r} is {len(signature)} bytes, Ed25519 needs 64")
        try:
            public_key.verify(signature, body)
        except InvalidSignature:
            raise NoteError(f"invalid signature by trusted key {name!r} ({key_id.hex()})") from None
        verified += 1
    if verified == 0:
        raise NoteError("no signature by a trusted key")
    if origin is not None and checkpoint.origin != origin:
        raise NoteError(f"checkpoint origin {checkpoint.origin!r} is not the expected {origin!r}")
    return checkpoint
