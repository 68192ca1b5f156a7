"""The registry as a transparency log: entry bytes, the key chain, proofs and full verification.

Entry i's leaf is SHA-256(0x00 || canonical DSSE envelope of entry i). Entry 0 is the log's
genesis: it names the origin and the first signing key and is signed by it; every key rotation
is an entry signed by the outgoing key naming the incoming one. Verification recomputes every
leaf, every signature, the tree and every checkpoint from the rows alone.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from weightmark.errors import RegistryError
from weightmark.registry.envelope import (
    PAYLOAD_TYPE,
    PREDICATE_BASE,
    canonical_json,
    envelope,
    verify,
)
from weightmark.registry.merkle import CompactRange, leaf_hash
from weightmark.registry.note import NoteError, note_key_id, verify_note

TRUST_FORMAT = "weightmark-trust/v1"


class LogVerificationError(RegistryError):
    """The log does not verify; the message names the first bad entry or checkpoint."""


def entry_bytes(payload: bytes, key_id: str, signature: bytes) -> bytes:
    """The bytes a leaf commits to: the canonical JSON of the entry's DSSE envelope."""
    return canonical_json(envelope(payload, key_id, signature))


@dataclass(frozen=True)
class LogEntry:
    idx: int
    payload_type: str
    payload: bytes
    key_id: str
    signature: bytes
    stored_leaf: bytes | None = None

    @property
    def data(self) -> bytes:
        return entry_bytes(self.payload, self.key_id, self.signature)

    @property
    def statement(self) -> dict[str, Any]:
        return json.loads(self.payload)


@dataclass(frozen=True)
class TrustedKey:
    key_id: str  # DSSE key id: SHA-256(raw public key)[:4], hex
    public_key: Ed25519PublicKey
    pem: str
    valid_from: int  # first log index this key signs
    valid_until: int | None = None  # first index it no longer signs (None: current key)

    def covers(self, index: int) -> bool:
        return self.valid_from <= index and (self.valid_until is None or index < self.valid_until)


@dataclass
class Trust:
    """The lab's signing keys with the log indices each one is valid for."""

    origin: str
    keys: list[TrustedKey] = field(default_factory=list)

    @property
    def current(self) -> TrustedKey:
        return self.keys[-1]

    def key_for(self, key_id: str, index: int) -> TrustedKey:
        for key in self.keys:
            if key.key_id == key_id and key.covers(index):
                return key
        raise LogVerificationError(f"entry {index}: signed by key {key_id}, which is not valid for that index")

    def note_keys(self, size: int) -> dict[bytes, tuple[str, Ed25519PublicKey]]:
        """Keys that may sign the checkpoint of `size` entries (the handover one: both keys)."""
        last = size - 1
        chosen = [k for k in self.keys if k.covers(last) or k.valid_from == size]
        return {note_key_id(self.origin, k.public_key): (self.origin, k.public_key) for k in chosen}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": TRUST_FORMAT,
            "origin": self.origin,
            "keys": [
                {"key_id": k.key_id, "note_key_id": note_key_id(self.origin, k.public_key).hex(),
                 "public_key": k.pem, "valid_from_index": k.valid_from, "valid_until_index": k.valid_until}
                for k in self.keys
            ],
        }

    @classmethod
    def from_json(cls, doc: Any, source: str = "trust file") -> Trust:
        try:
            if doc["format"] != TRUST_FORMAT:
                raise ValueError(f"format is {doc['format']!r}")
            keys = []
            for item in doc["keys"]:
                pem = item["public_key"]
                key = _load_public_key(pem)
                until = item["valid_until_index"]
                keys.append(TrustedKey(item["key_id"], key, pem, int(item["valid_from_index"]),
                                       None if until is None else int(until)))
            trust = cls(str(doc["origin"]), keys)
        except (KeyError, TypeError, ValueError) as exc:
            raise LogVerificationError(f"{source}: not a usable trust file ({exc})") from None
        if not trust.keys:
            raise LogVerificationError(f"{source}: lists no keys")
        return trust


def _load_public_key(pem: str) -> Ed25519PublicKey:
    key = load_pem_public_key(pem.encode("ascii"))
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def statement_kind(statement: Any) -> str:
    """'issued-copy', 'log-genesis', ... from a statement's predicateType ('' when not ours)."""
    if not isinstance(statement, dict):
        return ""
    ptype = statement.get("predicateType")
    if not isinstance(ptype, str) or not ptype.startswith(PREDICATE_BASE + "/"):
        return ""
    return ptype[len(PREDICATE_BASE) + 1 :].split("/", 1)[0]


def _predicate(entry: LogEntry) -> tuple[str, dict[str, Any]]:
    try:
        statement = entry.statement
    except ValueError:
        raise LogVerificationError(f"entry {entry.idx}: statement is not valid JSON") from None
    kind = statement_kind(statement)
    predicate = statement.get("predicate") if isinstance(statement, dict) else None
    if not kind or not isinstance(predicate, dict):
        raise LogVerificationError(f"entry {entry.idx}: not a weightmark statement")
    return kind, predicate


def _signed_by(entry: LogEntry, key: Ed25519PublicKey) -> None:
    try:
        verify(entry.payload, entry.signature, key)
    except InvalidSignature:
        raise LogVerificationError(f"entry {entry.idx}: signature does not verify") from None


def trust_from_entries(entries: Iterable[LogEntry]) -> Trust:
    """Follow the key chain: the genesis entry's key, then each key-rotation entry.

    Each link is checked as it is read (the genesis is signed by the key it names, a rotation by
    the outgoing key); every other entry is checked by verify_log().
    """
    trust: Trust | None = None
    for entry in entries:
        if trust is None and entry.idx != 0:
            raise LogVerificationError(f"entry 0: missing (first stored entry is {entry.idx})")
        if entry.idx != 0 and not (isinstance(entry.payload, bytes) and b"key-rotation" in entry.payload):
            continue  # cheap pre-filter: only rotation entries extend the chain
        kind, pred = _predicate(entry)
        try:
            if entry.idx == 0:
                if kind != "log-genesis":
                    raise LogVerificationError("entry 0: not the log's genesis entry")
                genesis = TrustedKey(pred["key_id"], _load_public_key(pred["public_key"]), pred["public_key"], 0)
                _signed_by(entry, genesis.public_key)
                trust = Trust(pred["origin"], [genesis])
            elif kind == "key-rotation" and trust is not None:
                old = trust.keys[-1]
                if pred.get("old_key_id") != old.key_id or entry.key_id != old.key_id:
                    raise LogVerificationError(f"entry {entry.idx}: rotation from {pred.get('old_key_id')}, "
                                               f"but the current key is {old.key_id}")
                _signed_by(entry, old.public_key)
                trust.keys[-1] = TrustedKey(old.key_id, old.public_key, old.pem, old.valid_from, entry.idx + 1)
                trust.keys.append(TrustedKey(pred["new_key_id"], _load_public_key(pred["new_public_key"]),
                                             pred["new_public_key"], entry.idx + 1))
        except (KeyError, TypeError, ValueError) as exc:
            raise LogVerificationError(f"entry {entry.idx}: unreadable {kind} entry ({exc})") from None
    if trust is None:
        raise LogVerificationError("the log is empty: no genesis entry")
    return trust


@dataclass(frozen=True)
class VerifiedLog:
    size: int
    root: bytes
    checkpoints: int
    trust: Trust


def verify_log(entries: Iterable[LogEntry], checkpoints: Iterable[tuple[int, bytes]], trust: Trust) -> VerifiedLog:
    """Recompute everything and raise LogVerificationError at the first thing that does not hold.

    `entries` in index order; `checkpoints` as (size, signed note) in size order.
    """
    notes = list(checkpoints)
    by_size: dict[int, bytes] = {}
    for size, note in notes:
        if size in by_size:
            raise LogVerificationError(f"checkpoint {size}: appears twice")
        by_size[size] = note
    tree = CompactRange()
    expected = 0
    checked = 0
    for entry in entries:
        if entry.idx != expected:
            what = "missing" if entry.idx > expected else "duplicated or out of order"
            raise LogVerificationError(f"entry {expected}: {what} (next stored entry is {entry.idx})")
        _verify_entry(entry, trust)
        tree.append(leaf_hash(entry.data))
        expected += 1
        note = by_size.get(expected)
        if note is not None:
            _verify_checkpoint(expected, note, tree.root(), trust)
            checked += 1
    if expected == 0:
        raise LogVerificationError("the log holds no entries")
    beyond = [s for s in by_size if s > expected]
    if beyond:
        raise LogVerificationError(
            f"checkpoint {min(beyond)}: covers entries up to {min(beyond) - 1}, but the log ends at {expected - 1} "
            "(entries were removed)")
    if expected not in by_size:
        raise LogVerificationError(f"entry {max(by_size, default=0)}: entries from here on are not covered by a signed checkpoint")
    return VerifiedLog(expected, tree.root(), checked, trust)


def verify_entry(entry: LogEntry, trust: Trust) -> dict[str, Any]:
    """Check one entry (payload type, stored leaf, signature under the key chain, signed log
    index) and return its statement; raise LogVerificationError naming it otherwise."""
    _verify_entry(entry, trust)
    return entry.statement


def _verify_entry(entry: LogEntry, trust: Trust) -> None:
    i = entry.idx
    if entry.payload_type != PAYLOAD_TYPE:
        raise LogVerificationError(f"entry {i}: payload type {entry.payload_type!r}")
    if entry.stored_leaf is not None and entry.stored_leaf != leaf_hash(entry.data):
        raise LogVerificationError(f"entry {i}: stored leaf hash does not match the entry's bytes")
    _signed_by(entry, trust.key_for(entry.key_id, i).public_key)
    claimed = _predicate(entry)[1].get("log_index")
    if claimed != i:
        raise LogVerificationError(f"entry {i}: statement was signed for log index {claimed}")


def _verify_checkpoint(size: int, note: bytes, root: bytes, trust: Trust) -> None:
    try:
        checkpoint = verify_note(note, trust.note_keys(size), origin=trust.origin)
    except NoteError as exc:
        raise LogVerificationError(f"checkpoint {size}: {exc}") from None
    if checkpoint.size != size:
        raise LogVerificationError(f"checkpoint {size}: note says size {checkpoint.size}")
    if checkpoint.root != root:
        raise LogVerificationError(f"checkpoint {size}: root does not match entries 0..{size - 1}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

