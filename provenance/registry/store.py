"""The registry database: licensees, models and issued copies as signed, append-only entries.

Every fact a scan relies on is a row of `entries` (index, canonical statement, signature);
the tables beside it are indexes over those entries for look-ups. The Merkle log sits over
`entries` in index order.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weightmark.errors import NotFound, RegistryError, UsageError
from weightmark.registry.envelope import PAYLOAD_TYPE, canonical_json, pae, statement
from weightmark.registry.log import LogEntry, entry_bytes
from weightmark.registry.merkle import CompactRange, leaf_hash
from weightmark.registry.note import Checkpoint as NoteCheckpoint
from weightmark.registry.note import sign_note

DB_FILE = "registry.db"


class Signer(Protocol):
    key_id: str
    signing_key: Ed25519PrivateKey

    def sign(self, message: bytes) -> bytes: ...


# Numbered migrations: each runs once, in order, inside a transaction; never edit a released one.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE entries (
            idx INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            payload_type TEXT NOT NULL,
            payload BLOB NOT NULL,
            key_id TEXT NOT NULL,
            signature BLOB NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE licensees (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            jurisdiction TEXT NOT NULL,
            email TEXT,
            created_at TEXT NOT NULL,
            entry_idx INTEGER NOT NULL REFERENCES entries(idx)
        );
        CREATE INDEX licensees_jurisdiction ON licensees(jurisdiction);
        CREATE TABLE models (
            model_id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            base_path TEXT NOT NULL,
            format TEXT NOT NULL,
            files TEXT NOT NULL,
            created_at TEXT NOT NULL,
            entry_idx INTEGER NOT NULL REFERENCES entries(idx)
        );
        CREATE TABLE carriers (
            model_id TEXT NOT NULL REFERENCES models(model_id),
            ordinal INTEGER NOT NULL,
            name TEXT NOT NULL,
            dtype TEXT NOT NULL,
            shape TEXT NOT NULL,
            row_scale BLOB NOT NULL,
            PRIMARY KEY (model_id, name)
        );
        CREATE TABLE codeword_reservations (
            model_id TEXT NOT NULL REFERENCES models(model_id),
            codeword_index INTEGER NOT NULL,
            reserved_at TEXT NOT NULL,
            PRIMARY KEY (model_id, codeword_index)
        );
        CREATE TABLE issued_copies (
            entry_idx INTEGER PRIMARY KEY REFERENCES entries(idx),
            model_id TEXT NOT NULL REFERENCES models(model_id),
            licensee_id TEXT NOT NULL REFERENCES licensees(id),
            codeword_index INTEGER NOT NULL,
            scheme TEXT NOT NULL,
            output_format TEXT NOT NULL,
            variant TEXT NOT NULL,
            out_path TEXT NOT NULL,
            digest TEXT NOT NULL,
            issued_at TEXT NOT NULL,
            UNIQUE (model_id, codeword_index)
        );
        CREATE INDEX issued_by_licensee ON issued_copies(licensee_id);
        """,
    ),
    (
        2,
        """
        ALTER TABLE entries ADD COLUMN leaf_hash BLOB;
        CREATE TABLE log_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE checkpoints (
            size INTEGER PRIMARY KEY,
            root BLOB NOT NULL,
            note BLOB NOT NULL,
            frontier TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        ALTER TABLE issued_copies ADD COLUMN jurisdiction TEXT;
        ALTER TABLE issued_copies ADD COLUMN policy TEXT;
        CREATE INDEX entries_created ON entries(created_at);
        """,
    ),
    (
        5,
        """
        CREATE TABLE model_facts (
            entry_idx INTEGER PRIMARY KEY REFERENCES entries(idx),
            model_id TEXT NOT NULL REFERENCES models(model_id)
        );
        CREATE INDEX model_facts_by_model ON model_facts(model_id);
        """,
    ),
]


def now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def validate_jurisdiction(code: str) -> str:
    """An ISO 3166-1 alpha-2 code, exactly as the standard writes it (upper case)."""
    if not isinstance(code, str) or len(code) != 2 or not code.isascii() or not code.isupper():
        raise UsageError(
            f"jurisdiction {code!r} is not an ISO 3166-1 alpha-2 code (two upper-case letters, e.g. GB, DE, US)"
        )
    import pycountry  # on first use: every CLI start-up would pay for it otherwise

    if pycountry.countries.get(alpha_2=code) is None:
        hint = " (the United Kingdom is GB)" if code == "UK" else ""
        raise UsageError(f"jurisdiction {code!r} is not an assigned ISO 3166-1 alpha-2 code{hint}")
    return code


@dataclass(frozen=True)
class Licensee:
    id: str
    name: str
    jurisdiction: str
    email: str | None
    created_at: str
    entry_idx: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "jurisdiction": self.jurisdiction,
            "country": country_name(self.jurisdiction),
            "email": self.email,
            "created_at": self.created_at,
            "entry_id": self.entry_idx,
        }


@dataclass(frozen=True)
class Model:
    model_id: str
    name: str
    base_path: str
    format: str
    files: dict[str, dict[str, int]]
    created_at: str
    entry_idx: int


@dataclass(frozen=True)
class Carrier:
    name: str
    dtype: str
    shape: tuple[int, ...]
    row_scale: np.ndarray


@dataclass(frozen=True)
class IssuedCopy:
    entry_idx: int
    model_id: str
    licensee_id: str
    codeword_index: int
    scheme: str
    output_format: str
    variant: str
    out_path: str
    digest: str
    issued_at: str
    jurisdiction: str | None = None
    policy: str | None = None  # JSON of the policy decision recorded with the issue

    def to_json(self) -> dict[str, Any]:
        return {
            "entry_id": self.entry_idx,
            "model_id": self.model_id,
            "licensee_id": self.licensee_id,
            "codeword_index": self.codeword_index,
            "scheme": self.scheme,
            "output_format": self.output_format,
            "variant": self.variant,
            "out_path": self.out_path,
            "digest": self.digest,
            "issued_at": self.issued_at,
            "jurisdiction": self.jurisdiction,
            "policy": json.loads(self.policy) if self.policy else None,
        }


@dataclass(frozen=True)
class Entry:
    idx: int
    kind: str
    payload_type: str
    payload: bytes
    key_id: str
    signature: bytes
    created_at: str

    @property
    def statement(self) -> dict[str, Any]:
        return json.loads(self.payload)

    @property
    def signed_message(self) -> bytes:
        return pae(self.payload_type, self.payload)


def country_name(code: str) -> str:
    import pycountry

    country = pycountry.countries.get(alpha_2=code)
    return country.name if country is not None else code


class Registry:
    """SQLite store (WAL, synchronous=FULL, appends under BEGIN IMMEDIATE)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # The jurisdiction policy (version, date, sha256) recorded in every entry; None when no
        # policy is installed. The lab sets it when it opens the registry.
        self.policy_in_force: dict[str, Any] | None = None
        try:
            self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"{self.path}: not a usable registry database ({exc})") from None

    @classmethod
    def create(cls, home: Path) -> Registry:
        return cls(home / DB_FILE)

    @classmethod
    def open(cls, home: Path) -> Registry:
        path = home / DB_FILE
        if not path.is_file():
            raise RegistryError(f"{path}: no registry here; run `weightmark init` first")
        return cls(path)

    def close(self) -> None:
        self._db.close()

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before reading the state it depends on."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        with self._write() as db:
            done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            for version, sql in MIGRATIONS:
                if version in done:
                    continue
                for stmt in sql.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, now()))

    @property
    def schema_version(self) -> int:
        return self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    def _append(self, db: sqlite3.Connection, kind: str, stmt: dict[str, Any], signer: Signer,
                cosigner: Ed25519PrivateKey | None = None) -> int:
        """Append a signed entry and the signed checkpoint over it, in the caller's transaction.

        The statement carries its own log index, so a moved or swapped entry fails its signature.
        """
        idx = db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM entries").fetchone()[0]
        if idx > 0 and self.origin is None:
            raise RegistryError(f"{self.path}: this registry has no log genesis entry")
        stmt["predicate"]["log_index"] = idx
        stmt["predicate"]["policy_in_force"] = self.policy_in_force
        payload = canonical_json(stmt)
        signature = signer.sign(pae(PAYLOAD_TYPE, payload))
        leaf = leaf_hash(entry_bytes(payload, signer.key_id, signature))
        db.execute(
            "INSERT INTO entries (idx, kind, payload_type, payload, key_id, signature, created_at, leaf_hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (idx, kind, PAYLOAD_TYPE, payload, signer.key_id, signature, now(), leaf),
        )
        self._seal(db, idx, leaf, signer, cosigner)
        return idx

    def _seal(self, db: sqlite3.Connection, idx: int, leaf: bytes, signer: Signer,
              cosigner: Ed25519PrivateKey | None) -> None:
        """Sign the checkpoint of size idx + 1, extending the previous one (never contradicting it)."""
        prev = db.execute("SELECT size, root, frontier FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        if prev is None:
            tree = CompactRange()
        else:
            tree = CompactRange(prev[0], [bytes.fromhex(h) for h in json.loads(prev[2])])
            if tree.root() != prev[1]:
                raise RegistryError(f"checkpoint {prev[0]}: stored frontier does not match its root; "
                                    "run `weightmark registry verify`")
        if tree.size != idx:
            raise RegistryError(f"checkpoint {tree.size}: the latest checkpoint does not end where entry {idx} "
                                "begins; run `weightmark registry verify`")
        tree.append(leaf)
        origin = self.origin or ""
        signers = [(origin, signer.signing_key)] + ([(origin, cosigner)] if cosigner is not None else [])
        note = sign_note(NoteCheckpoint(origin, idx + 1, tree.root()).body(), signers)
        db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                   (idx + 1, tree.root(), note, json.dumps([h.hex() for h in tree.hashes]), now()))

    # -- the log -----------------------------------------------------------------------------

    @property
    def origin(self) -> str | None:
        row = self._db.execute("SELECT value FROM log_meta WHERE key = 'origin'").fetchone()
        return None if row is None else row[0]

    def init_log(self, origin: str, public_key_pem: str, signer: Signer) -> int:
        """Append the genesis entry: the log's origin and its first signing key."""
        with self._write() as db:
            if db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]:
                raise RegistryError(f"{self.path}: the log already has entries")
            db.execute("INSERT INTO log_meta VALUES ('origin', ?)", (origin,))
            predicate = {"origin": origin, "key_id": signer.key_id, "public_key": public_key_pem,
                         "created_at": now()}
            digest = hashlib.sha256(public_key_pem.encode()).hexdigest()
            return self._append(db, "log-genesis", statement("log-genesis", origin, digest, predicate), signer)

    def rotate_key(self, old: Signer, new_key_id: str, new_public_key_pem: str,
                   new_signing_key: Ed25519PrivateKey) -> int:
        """Record a signing-key rotation: signed by the old key, checkpoint signed by both."""
        predicate = {"old_key_id": old.key_id, "new_key_id": new_key_id, "new_public_key": new_public_key_pem,
                     "rotated_at": now()}
        digest = hashlib.sha256(new_public_key_pem.encode()).hexdigest()
        with self._write() as db:
            return self._append(db, "key-rotation", statement("key-rotation", new_key_id, digest, predicate),
                                old, cosigner=new_signing_key)

    def log_entries(self, start: int = 0, stop: int | None = None) -> list[LogEntry]:
        sql = "SELECT idx, payload_type, payload, key_id, signature, leaf_hash FROM entries WHERE idx >= ?"
        args: list[Any] = [start]
        if stop is not None:
            sql += " AND idx < ?"
            args.append(stop)
        return [LogEntry(*row) for row in self._db.execute(sql + " ORDER BY idx", args)]

    def leaf_hashes(self, size: int) -> list[bytes]:
        rows = self._db.execute("SELECT idx, leaf_hash FROM entries WHERE idx < ? ORDER BY idx", (size,)).fetchall()
        if len(rows) != size or any(r[0] != i for i, r in enumerate(rows)):
            raise RegistryError("the log's entries are not contiguous; run `weightmark registry verify`")
        return [r[1] for r in rows]

    def checkpoints(self) -> list[tuple[int, bytes]]:
        return [(s, n) for s, n in self._db.execute("SELECT size, note FROM checkpoints ORDER BY size")]

    def latest_checkpoint(self) -> tuple[int, bytes, bytes]:
        row = self._db.execute("SELECT size, root, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        if row is None:
            raise RegistryError(f"{self.path}: no signed checkpoint yet")
        return row[0], row[1], row[2]

    def checkpoint(self, size: int) -> tuple[bytes, bytes]:
        row = self._db.execute("SELECT root, note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        if row is None:
            raise NotFound(f"no checkpoint of size {size}")
        return row[0], row[1]

    # -- entries ----------------------------------------------------------------------------

    def entry(self, idx: int) -> Entry:
        row = self._db.execute(
            "SELECT idx, kind, payload_type, payload, key_id, signature, created_at FROM entries WHERE idx = ?",
            (idx,)).fetchone()
        if row is None:
            raise NotFound(f"no registry entry {idx}")
        return Entry(*row)

    def entry_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    # -- licensees --------------------------------------------------------------------------

    def add_licensee(self, name: str, jurisdiction: str, email: str | None, signer: Signer) -> Licensee:
        name = name.strip()
        if not name:
            raise UsageError("licensee name must not be empty")
        validate_jurisdiction(jurisdiction)
        created = now()
        with self._write() as db:
            lid = "lic-" + secrets.token_hex(4)
            while db.execute("SELECT 1 FROM licensees WHERE id = ?", (lid,)).fetchone():
                lid = "lic-" + secrets.token_hex(4)  # 32-bit ids: repeats happen past ~10^4
            predicate = {"licensee_id": lid, "legal_name": name, "jurisdiction": jurisdiction,
                         "email": email, "created_at": created}
            digest = hashlib.sha256(canonical_json(predicate)).hexdigest()
            idx = self._append(db, "licensee", statement("licensee", lid, digest, predicate), signer)
            db.execute("INSERT INTO licensees VALUES (?, ?, ?, ?, ?, ?)",
                       (lid, name, jurisdiction, email, created, idx))
        return Licensee(lid, name, jurisdiction, email, created, idx)

    def licensee(self, licensee_id: str) -> Licensee:
        row = self._db.execute("SELECT * FROM licensees WHERE id = ?", (licensee_id,)).fetchone()
        if row is None:
            raise NotFound(f"no licensee {licensee_id!r} (see `weightmark licensee list`)")
        return Licensee(*row)

    def licensees(self, jurisdiction: str | None = None) -> list[Licensee]:
        sql, args = "SELECT * FROM licensees", ()
        if jurisdiction:
            sql, args = sql + " WHERE jurisdiction = ?", (jurisdiction,)
        return [Licensee(*r) for r in self._db.execute(sql + " ORDER BY entry_idx", args)]

    # -- models -----------------------------------------------------------------------------

    def add_model(
        self,
        model_id: str,
        name: str,
        base_path: str,
        fmt: str,
        files: dict[str, dict[str, int]],
        carriers: Sequence[Carrier],
        signer: Signer,
        facts: dict[str, Any] | None = None,
    ) -> Model:
        if not name.strip():
            raise UsageError("model name must not be empty")
        table = hashlib.sha256()
        for c in carriers:
            table.update(canonical_json([c.name, c.dtype, list(c.shape)]))
            table.update(np.ascontiguousarray(c.row_scale, dtype="<f4").tobytes())
        created = now()
        predicate = {
            "model_id": model_id,
            "name": name,
            "format": fmt,
            "carriers": len(carriers),
            "carrier_elements": int(sum(int(np.prod(c.shape)) for c in carriers)),
            "row_scale_sha256": table.hexdigest(),
            "registered_at": created,
        }
        if facts is not None:
            predicate["facts"] = facts  # measured at registration (see weightmark.facts)
        with self._write() as db:
            clash = db.execute("SELECT name FROM models WHERE model_id = ? OR name = ?", (model_id, name)).fetchone()
            if clash is not None:
                raise RegistryError(
                    f"model {name!r} or these same weights are already registered (as {clash[0]!r})"
                )
            idx = self._append(db, "model", statement("model", name, model_id, predicate), signer)
            db.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (model_id, name, base_path, fmt, json.dumps(files), created, idx))
            db.executemany(
                "INSERT INTO carriers VALUES (?, ?, ?, ?, ?, ?)",
                [(model_id, i, c.name, c.dtype, json.dumps(list(c.shape)),
                  np.ascontiguousarray(c.row_scale, dtype="<f4").tobytes()) for i, c in enumerate(carriers)],
            )
        return self.model(name)

    def _model_from_row(self, row: tuple) -> Model:
        model_id, name, base_path, fmt, files, created, idx = row
        return Model(model_id, name, base_path, fmt, json.loads(files), created, idx)

    def model(self, name: str) -> Model:
        row = self._db.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no model named {name!r} (see `weightmark model list`)")
        return self._model_from_row(row)

    def model_by_id(self, model_id: str) -> Model:
        row = self._db.execute("SELECT * FROM models WHERE model_id = ?", (model_id,)).fetchone()
        if row is None:
            raise NotFound(f"no model with id {model_id}")
        return self._model_from_row(row)

    def models(self) -> list[Model]:
        return [self._model_from_row(r) for r in self._db.execute("SELECT * FROM models ORDER BY entry_idx")]

    def carriers(self, model_id: str) -> list[Carrier]:
        rows = self._db.execute(
            "SELECT name, dtype, shape, row_scale FROM carriers WHERE model_id = ? ORDER BY ordinal", (model_id,)
        )
        return [
            Carrier(name, dtype, tuple(json.loads(shape)), np.frombuffer(blob, dtype="<f4"))
            for name, dtype, shape, blob in rows
        ]

    def carrier_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """model_id -> {carrier name: shape}, for finding which model a suspect is."""
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for model_id, name, shape in self._db.execute("SELECT model_id, name, shape FROM carriers"):
            out.setdefault(model_id, {})[name] = tuple(json.loads(shape))
        return out

    # -- issued copies ----------------------------------------------------------------------

    def reserve_codeword(self, model_id: str) -> int:
        """Take the next codeword index of a model for an issue in progress.

        A reservation whose copy is never recorded (a crash, a failed write) is simply skipped:
        indices are never reused, so no two copies can share a codeword.
        """
        with self._write() as db:
            idx = db.execute(
                "SELECT MAX(i) FROM (SELECT MAX(codeword_index) AS i FROM codeword_reservations WHERE model_id = ?"
                " UNION ALL SELECT MAX(codeword_index) FROM issued_copies WHERE model_id = ?)",
                (model_id, model_id),
            ).fetchone()[0]
            index = 0 if idx is None else idx + 1
            db.execute("INSERT INTO codeword_reservations VALUES (?, ?, ?)", (model_id, index, now()))
        return index

    def record_issue(
        self,
        model: Model,
        licensee: Licensee,
        codeword_index: int,
        scheme: str,
        output_format: str,
        variant: str,
        out_path: str,
        files: dict[str, str],
        signer: Signer,
        policy: dict[str, Any] | None = None,
    ) -> IssuedCopy:
        """Append the signed issued-copy entry (call once the copy is fully written).

        `policy` is the jurisdiction-policy decision (version, date, tier, rule, any override
        reason); it goes into the signed statement.
        """
        digest = hashlib.sha256(canonical_json(files)).hexdigest()
        issued = now()
        predicate = {
            "licensee_id": licensee.id,
            "legal_name": licensee.name,
            "jurisdiction": licensee.jurisdiction,
            "model_id": model.model_id,
            "model_name": model.name,
            "codeword_index": codeword_index,
            "scheme": scheme,
            "output_format": output_format,
            "variant": variant,
            "files": files,
            "issuer_key_id": signer.key_id,
            "issued_at": issued,
            "policy": policy,
        }
        subject = Path(out_path).name
        with self._write() as db:
            idx = self._append(db, "issued-copy", statement("issued-copy", subject, digest, predicate), signer)
            db.execute(
                "INSERT INTO issued_copies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (idx, model.model_id, licensee.id, codeword_index, scheme, output_format, variant,
                 out_path, digest, issued, licensee.jurisdiction,
                 None if policy is None else json.dumps(policy, sort_keys=True)),
            )
            db.execute("DELETE FROM codeword_reservations WHERE model_id = ? AND codeword_index = ?",
                       (model.model_id, codeword_index))
        return self.issued_copy(idx)

    def issued_copy(self, entry_idx: int) -> IssuedCopy:
        row = self._db.execute("SELECT * FROM issued_copies WHERE entry_idx = ?", (entry_idx,)).fetchone()
        if row is None:
            raise NotFound(f"registry entry {entry_idx} is not an issued copy")
        return IssuedCopy(*row)

    def issued(self, model_id: str) -> list[IssuedCopy]:
        rows = self._db.execute(
            "SELECT * FROM issued_copies WHERE model_id = ? ORDER BY codeword_index", (model_id,)
        )
        return [IssuedCopy(*r) for r in rows]

    def find_issued(
        self,
        licensee_id: str | None = None,
        jurisdiction: str | None = None,
        model_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
        jurisdictions: frozenset[str] | None = None,
    ) -> list[tuple[IssuedCopy, Licensee]]:
        """Issued copies matching every given filter; since/until compare ISO 8601 UTC times."""
        sql = "SELECT i.*, l.* FROM issued_copies i JOIN licensees l ON l.id = i.licensee_id WHERE 1=1"
        args: list[Any] = []
        for clause, value in (("i.licensee_id = ?", licensee_id), ("l.jurisdiction = ?", jurisdiction),
                              ("i.model_id = ?", model_id), ("i.issued_at >= ?", since),
                              ("i.issued_at < ?", until)):
            if value is not None:
                sql += f" AND {clause}"
                args.append(value)
        if jurisdictions is not None:
            sql += f" AND l.jurisdiction IN ({','.join('?' * len(jurisdictions))})" if jurisdictions else " AND 0"
            args.extend(sorted(jurisdictions))
        n = len(IssuedCopy.__dataclass_fields__)
        return [(IssuedCopy(*r[:n]), Licensee(*r[n:])) for r in self._db.execute(sql + " ORDER BY i.entry_idx", args)]

    # -- model facts (export-control classification) --------------------------------------------

    def add_model_facts(self, model: Model, facts: dict[str, Any], how: str, signer: Signer,
                        by: str | None = None, source: str | None = None,
                        estimate: str | None = None) -> int:
        """Append a signed `model-facts` entry: facts `how` ("measured" or "declared") about a
        model, with who declared them (the signing key, and `by` if given), when, and from what."""
        at = now()
        predicate = {"model_id": model.model_id, "model_name": model.name, "how": how, "facts": facts,
                     "by": by, "source": source, "estimate": estimate, "declared_by_key_id": signer.key_id,
                     "at": at}
        digest = hashlib.sha256(canonical_json(facts)).hexdigest()
        with self._write() as db:
            idx = self._append(db, "model-facts", statement("model-facts", model.name, digest, predicate), signer)
            db.execute("INSERT INTO model_facts VALUES (?, ?)", (idx, model.model_id))
        return idx

    def model_fact_entries(self, model: Model) -> list[Entry]:
        """The model's signed `model` entry and its `model-facts` entries, in log order."""
        rows = self._db.execute("SELECT entry_idx FROM model_facts WHERE model_id = ? ORDER BY entry_idx",
                                (model.model_id,)).fetchall()
        return [self.entry(model.entry_idx)] + [self.entry(r[0]) for r in rows]

    def key_chain_entries(self) -> list[LogEntry]:
        """The genesis and key-rotation entries: enough to rebuild the log's key chain (each link
        is verified by trust_from_entries; a hidden rotation leaves later signatures unverifiable)."""
        return [LogEntry(*row) for row in self._db.execute(
            "SELECT idx, payload_type, payload, key_id, signature, leaf_hash FROM entries"
            " WHERE idx = 0 OR kind = 'key-rotation' ORDER BY idx")]

    def model_fact_index(self) -> list[tuple[int, str]]:
        """Every (entry index, model id) row of the model-facts index, in log order."""
        return [(idx, mid) for idx, mid in self._db.execute(
            "SELECT entry_idx, model_id FROM model_facts ORDER BY entry_idx")]
