"""Evidence bundles and log exports that a third party verifies offline, with no database.

A bundle is one canonical-JSON file: the scan result, each accused entry's signed envelope, its
inclusion proof, the latest signed checkpoint and the trust file, all under one Ed25519
signature by the lab. Any byte changed anywhere makes verification fail.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from weightmark.bounded import loads_json, read_bounded, read_json
from weightmark.errors import InputFileError
from weightmark.fsutil import sha256_file, staged_output, write_bytes_atomic
from weightmark.keys import LabKeys, key_id
from weightmark.registry.envelope import PAYLOAD_TYPE, canonical_json, envelope, pae
from weightmark.registry.log import (
    LogEntry,
    LogVerificationError,
    Trust,
    VerifiedLog,
    b64,
    entry_bytes,
    statement_kind,
    trust_from_entries,
    verify_log,
)
from weightmark.registry.merkle import ProofError, leaf_hash, verify_inclusion
from weightmark.registry.note import NoteError, verify_note
from weightmark.registry.store import Registry

if TYPE_CHECKING:
    from weightmark.scan import ScanReport

EVIDENCE_FORMAT = "weightmark-evidence/v2"
# Bundles written before v2 (no examined-file hashes, tool versions or parameters) still verify.
EVIDENCE_FORMATS = ("weightmark-evidence/v1", EVIDENCE_FORMAT)
EVIDENCE_PAYLOAD_TYPE = "application/vnd.weightmark.evidence+json"
MAX_BUNDLE_BYTES = 64 << 20
MAX_TRUST_BYTES = 16 << 20
MAX_EXPORT_FILE_BYTES = 4 << 30  # entries.jsonl of a log with millions of entries


class EvidenceError(InputFileError):
    """An evidence bundle or exported log that does not verify (exit code 3: bad input file)."""


def _unb64(text: Any, what: str) -> bytes:
    """Strict base64: only the one canonical spelling of the bytes is accepted."""
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a string")
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError(f"{what} is not base64") from None
    if b64(data) != text:
        raise ValueError(f"{what} is not canonical base64")
    return data


def _entry_from_envelope(index: int, env: Any) -> LogEntry:
    if not isinstance(env, dict) or set(env) != {"payloadType", "payload", "signatures"}:
        raise ValueError(f"entry {index}: not a DSSE envelope")
    sigs = env["signatures"]
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict) or set(sigs[0]) != {"keyid", "sig"}:
        raise ValueError(f"entry {index}: envelope must carry exactly one signature")
    return LogEntry(index, env["payloadType"], _unb64(env["payload"], f"entry {index} payload"),
                    str(sigs[0]["keyid"]), _unb64(sigs[0]["sig"], f"entry {index} signature"))


# -- evidence bundles ------------------------------------------------------------------------


def examined_files(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every regular file of a suspect (a file, or a folder walked without following links)
    with its sha256 and size: what the bundle says was examined."""
    root = Path(path)
    if root.is_dir():
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
            paths += [Path(dirpath) / f for f in sorted(filenames)
                      if not os.path.islink(os.path.join(dirpath, f))]
    else:
        paths = [root]
    files = []
    for file in paths:
        if not file.is_file():
            continue
        files.append({"path": file.name if not root.is_dir() else str(file.relative_to(root)),
                      "sha256": sha256_file(file), "size": file.stat().st_size})
    return {"path": str(root.resolve()), "files": files, "total_bytes": sum(f["size"] for f in files)}


def tool_versions() -> dict[str, str]:
    """The versions a court would ask for: weightmark, Python, numpy, numba, the platform."""
    import platform
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"name": "weightmark", "version": version("weightmark"), "python": platform.python_version(),
            "numpy": version("numpy"), "numba": version("numba"), "platform": platform.platform()}


def build_bundle(registry: Registry, keys: LabKeys, report: ScanReport, created_at: str,
                 suspect: str | os.PathLike[str]) -> bytes:
    """The signed bundle of a scan: what was examined (hashes), with which tool and parameters,
    every accused entry with its inclusion proof, or the statement that nobody was accused.
    Innocent licensees appear only as counts and score statistics."""
    size, _root, note = registry.latest_checkpoint()
    trust = trust_from_entries(registry.log_entries())
    scan = report.evidence_json()
    accusations = []
    for accused in scan["accused"]:
        index = int(accused["entry_id"])
        (entry,) = registry.log_entries(index, index + 1)
        accusations.append({
            "entry_index": index,
            "envelope": envelope(entry.payload, entry.key_id, entry.signature),
            "inclusion_proof": [b64(h) for h in registry.inclusion_proof(index, size)],
        })
    examined = examined_files(suspect)
    examined["format"] = report.format
    content = {
        "format": EVIDENCE_FORMAT,
        "created_at": created_at,
        "tool": tool_versions(),
        "examined": examined,
        "reference": scan["reference"],
        "parameters": {
            "model": report.model, "model_id": report.model_id, "mode": report.mode,
            "threshold": report.threshold, "family_size": report.family_size,
            "assume_licensees": report.assume_licensees, "models_tried": len(report.models_scanned) or 1,
            "models_considered": report.models_considered, "realign": report.realign,
            "aligned": report.aligned, "carriers_used": report.carriers_used,
            "carriers_registered": report.carriers_total, "carriers_skipped": report.carriers_skipped,
            "elements_used": report.elements_used, "scheme": report.scheme,
            "missing_shards": report.missing_shards,
        },
        "scan": scan,
        "accusations": accusations,
        "tree_size": size,
        "checkpoint": note.decode("utf-8"),
        "trust": trust.to_json(),
    }
    signature = keys.sign(pae(EVIDENCE_PAYLOAD_TYPE, canonical_json(content)))
    return canonical_json({"bundle": content, "signature": {"keyid": keys.key_id, "sig": b64(signature)}})


def check_examined(verified: VerifiedEvidence, suspect: str | os.PathLike[str]) -> None:
    """Raise EvidenceError unless `suspect` holds exactly the files (sha256, size) the bundle
    says were examined."""
    recorded = verified.examined
    if recorded is None:
        raise EvidenceError(suspect, "the bundle records no examined files (a v1 bundle): nothing to compare")
    found = examined_files(suspect)
    want = {f["path"]: (f["sha256"], f["size"]) for f in recorded.get("files", [])}
    have = {f["path"]: (f["sha256"], f["size"]) for f in found["files"]}
    for name, (digest, nbytes) in sorted(want.items()):
        if name not in have:
            raise EvidenceError(suspect, f"file {name!r} that the bundle examined is not here")
        if have[name] != (digest, nbytes):
            raise EvidenceError(suspect, f"file {name!r} is not the examined one (sha256 {have[name][0][:16]}..., "
                                         f"the bundle says {digest[:16]}...)")
    extra = sorted(set(have) - set(want))
    if extra:
        raise EvidenceError(suspect, f"file {extra[0]!r} was not among the examined files")


@dataclass(frozen=True)
class VerifiedEvidence:
    scan: dict[str, Any]
    accused: list[dict[str, Any]]  # the signed issued-copy predicates, one per accusation
    tree_size: int
    origin: str
    examined: dict[str, Any] | None = None  # v2: the examined files with sha256 and size
    content: dict[str, Any] | None = None  # the whole signed bundle content


def verify_bundle(data: bytes, public_key: Ed25519PublicKey, source: str = "bundle") -> VerifiedEvidence:
    """Check everything in a bundle against the lab's public key; raise EvidenceError otherwise."""
    try:
        return _verify_bundle(data, public_key)
    except EvidenceError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError,
            InvalidSignature, ProofError, NoteError, LogVerificationError) as exc:
        raise EvidenceError(source, f"does not verify: {exc or type(exc).__name__}") from None


def _verify_bundle(data: bytes, public_key: Ed25519PublicKey) -> VerifiedEvidence:
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError("larger than any bundle we write")
    doc = json.loads(data.decode("utf-8"))
    if canonical_json(doc) != data:
        raise ValueError("not in canonical form (edited after signing?)")
    if set(doc) != {"bundle", "signature"} or set(doc["signature"]) != {"keyid", "sig"}:
        raise ValueError("unexpected top-level layout")
    content = doc["bundle"]
    if content.get("format") not in EVIDENCE_FORMATS:
        raise ValueError(f"format {content.get('format')!r}")
    if doc["signature"]["keyid"] != key_id(public_key):
        raise ValueError(f"signed by key {doc['signature']['keyid']}, not by the given public key {key_id(public_key)}")
    public_key.verify(_unb64(doc["signature"]["sig"], "bundle signature"), pae(EVIDENCE_PAYLOAD_TYPE, canonical_json(content)))

    trust = Trust.from_json(content["trust"], "bundle trust file")
    if key_id(public_key) not in {k.key_id for k in trust.keys}:
        raise ValueError("the given public key is not one of the log's keys")
    size = content["tree_size"]
    checkpoint = verify_note(content["checkpoint"].encode("utf-8"), trust.note_keys(size), origin=trust.origin)
    if checkpoint.size != size:
        raise ValueError(f"checkpoint is for {checkpoint.size} entries, bundle says {size}")
    scan = content["scan"]
    if len(content["accusations"]) != len(scan["accused"]):
        raise ValueError("accusations do not match the scan's accused list")
    predicates = []
    for claim, accused in zip(content["accusations"], scan["accused"], strict=True):
        index = claim["entry_index"]
        if index != accused["entry_id"]:
            raise ValueError(f"accusation names entry {accused['entry_id']}, evidence is for entry {index}")
        entry = _entry_from_envelope(index, claim["envelope"])
        if entry.payload_type != PAYLOAD_TYPE:
            raise ValueError(f"entry {index}: payload type {entry.payload_type!r}")
        key = trust.key_for(entry.key_id, index)
        key.public_key.verify(entry.signature, pae(entry.payload_type, entry.payload))
        proof = [_unb64(h, f"entry {index} proof node") for h in claim["inclusion_proof"]]
        verify_inclusion(leaf_hash(entry_bytes(entry.payload, entry.key_id, entry.signature)), index, size,
                         proof, checkpoint.root)
        statement = entry.statement
        predicate = statement["predicate"]
        if statement_kind(statement) != "issued-copy" or predicate["log_index"] != index:
            raise ValueError(f"entry {index}: not the issued-copy entry it claims to be")
        for field, value in (("licensee_id", accused["licensee_id"]), ("jurisdiction", accused["jurisdiction"]),
                             ("legal_name", accused["name"]), ("model_id", scan["model_id"])):
            if predicate[field] != value:
                raise ValueError(f"entry {index}: signed {field} {predicate[field]!r} but the scan says {value!r}")
        predicates.append(predicate)
    if content["format"] != "weightmark-evidence/v1":
        examined = content["examined"]
        if not isinstance(examined, dict) or not isinstance(examined.get("files"), list):
            raise ValueError("examined files missing")
        if scan["model_id"] != content["parameters"]["model_id"]:
            raise ValueError("parameters name another model than the scan")
    return VerifiedEvidence(scan, predicates, size, trust.origin, content.get("examined"), content)


# -- exported logs ---------------------------------------------------------------------------

ENTRIES_FILE = "entries.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
TRUST_FILE = "trust.json"


def export_log(registry: Registry, out: Path, overwrite: bool = False,
               before_publish: Callable[[], None] | None = None) -> int:
    """Write the log as files: entries, checkpoints and the trust file. Returns the entry count.

    `overwrite` replaces a folder already at `out` (the caller checks it is an earlier export);
    `before_publish` runs just before the rename (a last check of the target)."""
    entries = registry.log_entries()
    trust = trust_from_entries(entries)
    with staged_output(out, is_dir=True, overwrite=overwrite) as staging:
        with open(staging.path / ENTRIES_FILE, "wb") as fh:
            for e in entries:
                fh.write(canonical_json({"index": e.idx, "envelope": envelope(e.payload, e.key_id, e.signature)}) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        with open(staging.path / CHECKPOINTS_FILE, "wb") as fh:
            for size, note in registry.checkpoints():
                fh.write(canonical_json({"size": size, "note": note.decode("utf-8")}) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        write_bytes_atomic(staging.path / TRUST_FILE, (json.dumps(trust.to_json(), indent=2) + "\n").encode())
        if before_publish is not None:
            before_publish()
        staging.publish()
    return len(entries)


def _read_jsonl(path: Path) -> list[Any]:
    try:
        lines = read_bounded(path, MAX_EXPORT_FILE_BYTES, "log export file").splitlines()
        return [loads_json(line, path, "log export line") for line in lines]
    except InputFileError as exc:
        raise EvidenceError(path, exc.problem) from None


def verify_export(folder: Path, trust_file: Path | None = None) -> VerifiedLog:
    """Verify an exported log with no database. The trust file pinned by the verifier (or the
    export's own) must agree with the key chain the entries record."""
    folder = Path(folder)
    pinned_path = trust_file or folder / TRUST_FILE
    try:
        pinned = Trust.from_json(read_json(pinned_path, MAX_TRUST_BYTES, "trust file"), str(pinned_path))
    except InputFileError as exc:
        raise EvidenceError(pinned_path, exc.problem) from None
    except ValueError as exc:
        raise EvidenceError(pinned_path, f"not a readable trust file ({exc})") from None
    try:
        entries = [_entry_from_envelope(int(row["index"]), row["envelope"]) for row in _read_jsonl(folder / ENTRIES_FILE)]
        checkpoints = [(int(row["size"]), row["note"].encode("utf-8")) for row in _read_jsonl(folder / CHECKPOINTS_FILE)]
        chain = trust_from_entries(entries)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LogVerificationError(f"{folder}: {exc}") from None
    if chain.to_json() != pinned.to_json():
        raise LogVerificationError(f"{pinned_path}: the log's key chain differs from the trusted keys")
    return verify_log(entries, checkpoints, pinned)
