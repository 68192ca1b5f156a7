"""Signed records: in-toto Statement v1 payloads in DSSE envelopes over canonical JSON."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_BASE = "https://weightmark.dev/predicates"
PREDICATE_TYPES = {
    "licensee": f"{PREDICATE_BASE}/licensee/v1",
    "model": f"{PREDICATE_BASE}/model/v1",
    "model-relocation": f"{PREDICATE_BASE}/model-relocation/v1",
    "issued-copy": f"{PREDICATE_BASE}/issued-copy/v1",
    "log-genesis": f"{PREDICATE_BASE}/log-genesis/v1",
    "key-rotation": f"{PREDICATE_BASE}/key-rotation/v1",
    "model-facts": f"{PREDICATE_BASE}/model-facts/v1",
    "issue-void": f"{PREDICATE_BASE}/issue-void/v1",
}


def canonical_json(value: Any) -> bytes:
    """Deterministic bytes: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what the signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def statement(kind: str, subject_name: str, sha256_hex: str, predicate: dict[str, Any]) -> dict[str, Any]:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": sha256_hex}}],
        "predicateType": PREDICATE_TYPES[kind],
        "predicate": predicate,
    }


def envelope(payload: bytes, key_id: str, signature: bytes) -> dict[str, Any]:
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": key_id, "sig": base64.b64encode(signature).decode("ascii")}],
    }


def verify(payload: bytes, signature: bytes, public_key: Ed25519PublicKey) -> None:
    """Raise InvalidSignature unless `signature` signs PAE(payload). Never returns False."""
    try:
        public_key.verify(signature, pae(PAYLOAD_TYPE, payload))
    except InvalidSignature:
        raise
    except Exception as exc:  # malformed signature bytes count as invalid
        raise InvalidSignature(str(exc)) from None
