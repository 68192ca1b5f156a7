"""The registry database: licensees, models and issued copies as signed, append-only entries.

Every fact a scan relies on is a row of `entries` (index, canonical statement, signature);
the tables beside it are caches of those entries for look-ups. The Merkle log sits over
`entries` in index order. Every accessor that returns a cached row first checks it against
its signed entry (see registry/tables.py), so a row edited behind the tool's back is refused,
never acted on. A file is only opened as a registry after read-only checks that it is one.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weightmark.errors import KeyProblem, NotFound, RegistryError, UsageError
from weightmark.keys import PUBLIC_KEY_FILE
from weightmark.registry import merkle, tables
from weightmark.registry.backend import (
    DB_FILE,
    LOCATION_FILE,
    SQLITE_MIGRATIONS,
    Database,
    PostgresDatabase,
    SQLiteDatabase,
    check_schema,
    check_url,
    connect,
    is_url,
    recorded_location,
)
from weightmark.registry.envelope import PAYLOAD_TYPE, canonical_json, pae, statement
from weightmark.registry.log import (
    LogEntry,
    LogVerificationError,
    Trust,
    entry_bytes,
    trust_from_entries,
    verify_entry,
)
from weightmark.registry.merkle import CompactRange, leaf_hash, node_hash
from weightmark.registry.note import Checkpoint as NoteCheckpoint
from weightmark.registry.note import NoteError, sign_note, verify_note
from weightmark.registry.tables import (
    CARRIER_COLUMNS,
    ISSUED_COLUMNS,
    LICENSEE_COLUMNS,
    MODEL_COLUMNS,
    SignedIndex,
    TableMismatch,
    compare,
    row_dict,
)

SQLITE_MAGIC = b"SQLite format 3\x00"

# Raises unless the log's key chain (a Trust built from the log) is one the opener trusts.
Anchor = Callable[[Trust], None]


class Signer(Protocol):
    key_id: str
    signing_key: Ed25519PrivateKey

    def sign(self, message: bytes) -> bytes: ...


# Every table of the registry, parents before the rows that refer to them (for copying).
COPIED_TABLES = ("entries", "log_meta", "checkpoints", "merkle_nodes", "licensees", "models", "carriers",
                 "codeword_reservations", "issued_copies", "model_facts")


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


def inspect_database(path: Path) -> None:
    """Refuse, before anything is written to it, a file that is not a healthy weightmark registry.

    Empty files, files that are not SQLite, SQLite databases of something else (foreign
    tables, no schema_migrations, an unknown or newer schema version) and corrupted ones
    (PRAGMA quick_check) all raise RegistryError. The checks run on a read-only connection.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the registry database ({exc.strerror})") from None
    if size == 0:
        raise RegistryError(f"{path}: empty file (0 bytes), not a registry database")
    if head != SQLITE_MAGIC:
        raise RegistryError(f"{path}: not an SQLite database, so not a weightmark registry")
    # Read-only; and with no write-ahead log beside the file (a registry closed cleanly), as an
    # immutable file, so that not even SQLite's -shm and -wal side files are created.
    wal = Path(f"{path}-wal").exists()
    try:
        db = sqlite3.connect(path.resolve().as_uri() + ("?mode=ro" if wal else "?mode=ro&immutable=1"),
                             uri=True, timeout=60.0)
    except sqlite3.DatabaseError as exc:
        raise RegistryError(f"{path}: cannot open the registry database ({exc})") from None
    try:
        problems = [r[0] for r in db.execute("PRAGMA quick_check(1)")]
        if problems != ["ok"]:
            raise RegistryError(f"{path}: the database is corrupted ({' '.join(str(problems[0]).split())}); "
                                "restore it from a backup")
        found = {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        if "schema_migrations" not in found:
            raise RegistryError(f"{path}: an SQLite database without weightmark's schema_migrations table: "
                                "not a weightmark registry")
        versions = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
        check_schema(str(path), SQLITE_MIGRATIONS, found, versions)
    except sqlite3.DatabaseError as exc:
        raise RegistryError(f"{path}: not a usable registry database ({exc})") from None
    finally:
        db.close()


class Registry:
    """The registry, in SQLite (WAL, synchronous=FULL, appends under BEGIN IMMEDIATE) or in
    PostgreSQL (appends under the lock of one coordination row); see registry/backend.py.

    `Registry(location, home=...)` opens an existing registry (and brings an older schema up to
    date); only `Registry.create` writes a new schema. The trust anchor for checked reads is the
    lab's public key (`lab.pub`) in the home: the log's key chain must end in it.
    """

    def __init__(self, location: Path | str, create: bool = False, home: Path | None = None,
                 anchor: Anchor | None = None, read_only: bool = False) -> None:
        postgres = is_url(location)
        if postgres and home is None and not read_only:
            raise ValueError("a PostgreSQL registry needs the lab home it belongs to")
        if postgres and read_only and anchor is None:
            raise ValueError("a read-only PostgreSQL registry is opened with the anchor of the home reading it")
        # Where the registry is, as given: its file, or its PostgreSQL URL (a read-only opener
        # such as a cluster worker reopens it from this).
        self.location = str(location)
        self.home = Path(home) if home is not None else (Path.cwd() if postgres else Path(location).parent)
        # A file in the home: the SQLite database, or the file recording the PostgreSQL URL.
        self.path = self.home / LOCATION_FILE if postgres else Path(location)
        # Checks the log's key chain against what the opener trusts (default: lab.pub in the
        # home); a read-only registry (`open_read_only`) has one from its home.
        self.anchor: Anchor = anchor if anchor is not None else self._lab_pub_anchor
        self.read_only = read_only
        # The jurisdiction policy (version, date, sha256) recorded in every entry; None when no
        # policy is installed. The lab sets it when it opens the registry.
        self.policy_in_force: dict[str, Any] | None = None
        self._index: SignedIndex | None = None
        self._trust: Trust | None = None
        self._tree = CompactRange()  # frontier of the entries in _index
        self._chain: list[LogEntry] = []  # genesis and rotation entries in _index
        self._statements: dict[int, dict[str, Any]] = {}  # entries whose signature was checked
        self._carriers: dict[str, list[Carrier]] = {}
        if not postgres:
            if create:
                if self.path.exists():
                    raise RegistryError(f"{self.path}: a file is already there; not creating a registry over it")
            else:
                inspect_database(self.path)
        if read_only and postgres:
            self._connect_read_only_postgres(str(location))
            return
        if read_only:
            self.where = str(self.path)
            self._connect_read_only()
            return
        self._db: Database = connect(location)
        self.where = self._db.where  # how messages name this registry
        try:
            if postgres:
                self._inspect_postgres(create)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise RegistryError(f"{self.where}: not a usable registry database ({exc})") from None
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def create(cls, home: Path, url: str | None = None) -> Registry:
        """A new, empty registry for a home: its SQLite file, or the PostgreSQL database at url."""
        if url is None:
            return cls(home / DB_FILE, create=True)
        return cls(url, create=True, home=home)

    @classmethod
    def open(cls, home: Path) -> Registry:
        url = recorded_location(home)
        if url is not None:
            return cls(url, home=home)
        path = home / DB_FILE
        if not path.is_file():
            raise RegistryError(f"{path}: no registry here; run `weightmark init` first")
        return cls(path)

    @property
    def backend(self) -> str:
        """"sqlite" or "postgresql"."""
        return self._db.dialect

    @classmethod
    def open_read_only(cls, path: Path | str, anchor: Anchor) -> Registry:
        """The registry at `path` (a database file or a postgresql:// URL) on a read-only
        connection: SQLite `mode=ro`, or a PostgreSQL session whose every transaction is READ
        ONLY; either way every write is refused by the database itself, and no migration is
        run (an older schema is refused). The log's key chain is checked by `anchor` instead of
        a lab.pub beside the database."""
        if is_url(path):
            return cls(str(path), anchor=anchor, read_only=True)
        path = Path(path)
        if not path.is_file():
            raise RegistryError(f"{path}: no registry database here")
        return cls(path, anchor=anchor, read_only=True)

    def _connect_read_only_postgres(self, url: str) -> None:
        """A PostgreSQL registry for reading only: the session's transactions are READ ONLY, and
        the role in the URL should be one that `weightmark registry grant --reader` made, which
        holds SELECT and nothing else; the schema must already be this weightmark's."""
        self._db = PostgresDatabase(check_url(url), read_only=True)
        self.where = self._db.where
        try:
            self._inspect_postgres(create=False)
            version = self.schema_version
        except BaseException:
            self._db.close()
            raise
        latest = self._db.migrations[-1][0]
        if version != latest:
            self._db.close()
            raise RegistryError(f"{self.where}: registry schema version {version} is older than this weightmark's "
                                f"({latest}); open it once from a lab home to bring it up to date")

    def _connect_read_only(self) -> None:
        try:
            self._db = SQLiteDatabase(self.path, read_only=True)
            version = self.schema_version
        except sqlite3.DatabaseError as exc:
            hint = ""
            if "readonly" in str(exc):  # WAL: a reader needs the -shm index, made in the folder
                hint = "; a WAL database is read with its -wal and -shm files, which need write access to its folder"
            raise RegistryError(f"{self.path}: cannot open the registry database read-only ({exc}{hint})") from None
        if version != SQLITE_MIGRATIONS[-1][0]:
            raise RegistryError(f"{self.path}: registry schema version {version} is older than this weightmark's "
                                f"({SQLITE_MIGRATIONS[-1][0]}); open it once from the lab home to bring it up to date")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Database]:
        """One write transaction, holding the log's lock before reading the state it depends on."""
        self._db.begin_write()
        try:
            yield self._db
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()

    @contextmanager
    def snapshot(self) -> Iterator[Database]:
        """A read transaction: every query inside sees the same state of the database."""
        if self._db.in_transaction:
            yield self._db
            return
        self._db.begin_read()
        try:
            yield self._db
        finally:
            self._db.commit()

    def _inspect_postgres(self, create: bool) -> None:
        """Refuse a database that is not a weightmark registry (or, to create one, not empty)."""
        found = self._db.table_names()
        if create:
            if found:
                raise RegistryError(f"{self.where}: the database already holds tables ({sorted(found)[0]!r}, ...); "
                                    "not creating a registry over them")
            return
        if not found:
            raise RegistryError(f"{self.where}: an empty database, no registry here; "
                                "run `weightmark init --registry URL` or `weightmark registry migrate --to URL`")
        if "schema_migrations" not in found:
            raise RegistryError(f"{self.where}: a database without weightmark's schema_migrations table: "
                                "not a weightmark registry")
        versions = {r[0] for r in self._db.execute("SELECT version FROM schema_migrations")}
        check_schema(self.where, self._db.migrations, found, versions)

    def _migrate(self) -> None:
        migrations = self._db.migrations
        if isinstance(self._db, PostgresDatabase):
            # Read first: a read-only role opens an up-to-date registry without any DDL.
            if "schema_migrations" in self._db.table_names():
                done = {row[0] for row in self._db.execute("SELECT version FROM schema_migrations")}
                if all(v in done for v, _ in migrations):
                    return
            self._db.execute("BEGIN")
            self._db.execute("SELECT pg_advisory_xact_lock(7406033119)")  # one migrating process at a time
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                             "(version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)")
        else:
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                             "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
            self._db.begin_write()
        try:
            db = self._db
            done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            for version, sql in migrations:
                if version in done:
                    continue
                db.run_script(sql)
                if version == 6:
                    _store_all_nodes(db)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, now()))
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()

    @property
    def schema_version(self) -> int:
        return self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    def _append(self, db: Database, kind: str, stmt: dict[str, Any], signer: Signer,
                cosigner: Ed25519PrivateKey | None = None) -> int:
        """Append a signed entry and the signed checkpoint over it, in the caller's transaction.

        The statement carries its own log index, so a moved or swapped entry fails its signature.
        """
        idx = db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM entries").fetchone()[0]
        if idx > 0 and self.origin is None:
            raise RegistryError(f"{self.where}: this registry has no log genesis entry")
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

    def _seal(self, db: Database, idx: int, leaf: bytes, signer: Signer,
              cosigner: Ed25519PrivateKey | None) -> None:
        """Sign the checkpoint of size idx + 1, extending the previous one (never contradicting it)."""
        prev = db.execute("SELECT size, root, frontier, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        if prev is None:
            tree = CompactRange()
        else:
            tree = CompactRange(prev[0], [bytes.fromhex(h) for h in json.loads(prev[2])])
            try:
                signed_root = base64.b64decode(bytes(prev[3]).split(b"\n", 3)[2], validate=True)
            except (IndexError, ValueError):
                signed_root = None
            if tree.root() != prev[1] or signed_root != bytes(prev[1]):
                raise RegistryError(f"checkpoint {prev[0]}: stored frontier does not match its signed root; "
                                    "run `weightmark registry verify`")
        if tree.size != idx:
            raise RegistryError(f"checkpoint {tree.size}: the latest checkpoint does not end where entry {idx} "
                                "begins; run `weightmark registry verify`")
        # The perfect subtrees this leaf completes, stored for O(log n) proofs.
        stack, h, n, level, nodes = tree.hashes, leaf, idx, 0, []
        while n & 1:
            h = node_hash(stack.pop(), h)
            n >>= 1
            level += 1
            nodes.append((level, idx >> level, h))
        if nodes:
            db.executemany("INSERT INTO merkle_nodes VALUES (?, ?, ?)", nodes)
        tree.append(leaf)
        origin = self.origin or ""
        signers = [(origin, signer.signing_key)] + ([(origin, cosigner)] if cosigner is not None else [])
        note = sign_note(NoteCheckpoint(origin, idx + 1, tree.root()).body(), signers)
        db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                   (idx + 1, tree.root(), note, json.dumps([h.hex() for h in tree.hashes]), now()))

    # -- moving and guarding the database ---------------------------------------------------

    def copy_into(self, target: Registry) -> int:
        """Copy every row of this registry into an empty `target` (another backend), in one
        transaction of the target; return the number of entries copied. The caller verifies
        the copy before using it."""
        if target.entry_count():
            raise RegistryError(f"{target.where}: already holds a log; not copying over it")
        with self.snapshot() as src, target._write() as dst:
            for table in COPIED_TABLES:
                cur = src.execute(f"SELECT * FROM {table}")
                columns = [d[0] for d in cur.description]
                sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
                while rows := cur.fetchmany(2000):
                    dst.executemany(sql, [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                                          for r in rows])
            return self.entry_count()

    def grant(self, appender: str | None, reader: str | None) -> list[str]:
        """PostgreSQL only: create (if need be) and grant an appending role and a read-only role
        exactly what each needs; return the SQL statements run."""
        if not isinstance(self._db, PostgresDatabase):
            raise UsageError(f"{self.where}: roles and grants exist only for a PostgreSQL registry")
        return self._db.grant(appender, reader)

    # -- the log -----------------------------------------------------------------------------

    @property
    def origin(self) -> str | None:
        row = self._db.execute("SELECT value FROM log_meta WHERE key = 'origin'").fetchone()
        return None if row is None else row[0]

    def init_log(self, origin: str, public_key_pem: str, signer: Signer) -> int:
        """Append the genesis entry: the log's origin and its first signing key."""
        with self._write() as db:
            if db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]:
                raise RegistryError(f"{self.where}: the log already has entries")
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

    def subtree_hash(self, lo: int, hi: int) -> bytes:
        """MTH of leaves lo..hi-1 from the stored nodes: one read for a perfect aligned
        subtree, O(log n) reads for any range an RFC 6962 proof asks for."""
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            level = n.bit_length() - 1
            row = (self._db.execute("SELECT leaf_hash FROM entries WHERE idx = ?", (lo,)).fetchone() if level == 0
                   else self._db.execute("SELECT hash FROM merkle_nodes WHERE level = ? AND idx = ?",
                                         (level, lo >> level)).fetchone())
            if row is None or row[0] is None:
                raise RegistryError(f"{self.where}: no stored Merkle node for entries {lo}..{hi - 1}; "
                                    "run `weightmark registry verify`")
            return bytes(row[0])
        k = 1 << ((n - 1).bit_length() - 1)
        return node_hash(self.subtree_hash(lo, lo + k), self.subtree_hash(lo + k, hi))

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 6962 PATH(index, D[0:size]) from the stored nodes (O(log n) reads), checked
        against the entry's recomputed leaf and the stored checkpoint of that size."""
        with self.snapshot():
            if not 0 <= index < size:
                raise ValueError(f"leaf index {index} outside a tree of size {size}")
            root, _ = self.checkpoint(size)  # NotFound unless a checkpoint of that size was signed
            path = merkle.inclusion_proof_by(self.subtree_hash, index, size)
            (entry,) = self.log_entries(index, index + 1)
        try:
            merkle.verify_inclusion(leaf_hash(entry.data), index, size, path, bytes(root))
        except merkle.ProofError:
            raise RegistryError(f"{self.where}: the stored Merkle nodes do not prove entry {index} in checkpoint "
                                f"{size}; run `weightmark registry verify`") from None
        return path

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """RFC 6962 PROOF(size1, D[0:size2]) from the stored nodes (O(log n) reads), checked
        against the stored checkpoints of both sizes."""
        with self.snapshot():
            if not 0 < size1 <= size2:
                raise ValueError(f"consistency proof needs 0 < size1 <= size2, got {size1}, {size2}")
            root1, _ = self.checkpoint(size1)  # NotFound unless checkpoints of both sizes were signed
            root2, _ = self.checkpoint(size2)
            path = merkle.consistency_proof_by(self.subtree_hash, size1, size2)
        try:
            merkle.verify_consistency(size1, size2, path, bytes(root1), bytes(root2))
        except merkle.ProofError:
            raise RegistryError(f"{self.where}: the stored Merkle nodes do not prove checkpoint {size1} a prefix "
                                f"of checkpoint {size2}; run `weightmark registry verify`") from None
        return path

    def checkpoints(self) -> list[tuple[int, bytes]]:
        return [(s, n) for s, n in self._db.execute("SELECT size, note FROM checkpoints ORDER BY size")]

    def latest_checkpoint(self) -> tuple[int, bytes, bytes]:
        row = self._db.execute("SELECT size, root, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        if row is None:
            raise RegistryError(f"{self.where}: no signed checkpoint yet")
        return row[0], row[1], row[2]

    def checkpoint(self, size: int) -> tuple[bytes, bytes]:
        row = self._db.execute("SELECT root, note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        if row is None:
            raise NotFound(f"no checkpoint of size {size}")
        return row[0], row[1]

    # -- checked reads: the signed log as the truth --------------------------------------------

    def signed_index(self, covering: int = 0) -> SignedIndex:
        """The log's summary, built once per Registry in one pass and cached.

        The pass recomputes every entry's leaf from its bytes (and compares the stored leaf),
        the Merkle root from those leaves, and checks it against the latest checkpoint's
        signature under the log's key chain, whose current key must be the home's lab.pub.
        It is rebuilt when a row refers to an entry past it (an append since).
        """
        if self._index is None or self._index.size <= covering:
            known, self._index = self._index, None
            self._index, self._trust = self._read_log(known)
            if self._index.size <= covering:
                raise TableMismatch(f"entry {covering}: referred to by a table row but not in the signed log "
                                    f"(which ends at entry {self._index.size - 1})")
        return self._index

    def _read_log(self, known: SignedIndex | None) -> tuple[SignedIndex, Trust]:
        """Read the log into `known` (None: from entry 0), check it against the latest checkpoint.

        Extending a known index reads only the entries appended since; the tree's frontier and
        the key chain's entries are kept between calls for that.
        """
        with self.snapshot() as db:
            latest = db.execute("SELECT size, root, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
            if latest is None:
                raise RegistryError(f"{self.where}: no signed checkpoint yet")
            size, _, note = latest
            if known is None:
                index, tree, chain = SignedIndex(size), CompactRange(), []
            else:
                index, chain = known, list(self._chain)
                tree = CompactRange(self._tree.size, self._tree.hashes)
                index.size = size
            rows = db.execute("SELECT idx, payload_type, payload, key_id, signature, leaf_hash FROM entries"
                              " WHERE idx >= ? ORDER BY idx", (len(index.kinds),))
            for row in rows:
                idx = len(index.kinds)
                if row[0] != idx:
                    raise LogVerificationError(f"entry {idx}: missing or out of order (next stored entry is {row[0]}); "
                                               "run `weightmark registry verify`")
                try:
                    leaf = leaf_hash(entry_bytes(row[2], row[3], row[4]))
                    stmt = json.loads(row[2])
                except (TypeError, ValueError, AttributeError):
                    raise LogVerificationError(f"entry {idx}: unreadable entry bytes") from None
                if leaf != row[5]:
                    raise LogVerificationError(f"entry {idx}: stored leaf hash does not match the entry's bytes")
                tree.append(leaf)
                index.add(idx, stmt)
                if index.kinds[-1] in ("log-genesis", "key-rotation"):
                    chain.append(LogEntry(*row))
            origin = self.origin
            _check_row_keys(db, index)
        if tree.size != size:
            raise LogVerificationError(f"the log holds {tree.size} entries but its latest signed checkpoint covers "
                                       f"{size}; run `weightmark registry verify`")
        trust = trust_from_entries(chain)
        try:
            signed = verify_note(note, trust.note_keys(size), origin=trust.origin)
        except NoteError as exc:
            raise LogVerificationError(f"checkpoint {size}: {exc}") from None
        if signed.size != size or signed.root != tree.root():
            raise LogVerificationError(f"checkpoint {size}: root does not match entries 0..{size - 1}")
        if origin != trust.origin:
            raise TableMismatch(f"log_meta row origin: is {origin} but the signed entry 0 says {trust.origin}")
        self.anchor(trust)
        self._tree, self._chain = tree, chain
        return index, trust

    def _lab_pub_anchor(self, trust: Trust) -> None:
        """The default anchor: the chain's current key must be the lab.pub in the home."""
        pub_path = self.home / PUBLIC_KEY_FILE
        try:
            pub = pub_path.read_bytes().decode("ascii", errors="replace")
        except OSError as exc:
            raise KeyProblem(f"{pub_path}: cannot read the lab's public key ({exc.strerror})") from None
        if pub.strip() != trust.current.pem.strip():
            raise LogVerificationError(f"{pub_path}: is not the log's current signing key")

    def signed_statements(self, idxs: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The statements of these entries, each checked once per Registry: its leaf recomputed
        from its bytes, its signature under the key chain, its signed log index, and its
        inclusion in the latest signed checkpoint."""
        wanted = sorted(set(idxs))
        todo = [i for i in wanted if i not in self._statements]
        if todo:
            self.signed_index(todo[-1])
            assert self._trust is not None
            for start in range(0, len(todo), 500):
                chunk = todo[start:start + 500]
                rows = self._db.execute(
                    "SELECT idx, payload_type, payload, key_id, signature, leaf_hash FROM entries"
                    f" WHERE idx IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                for row in rows:
                    self._statements[row[0]] = verify_entry(LogEntry(*row), self._trust)
        missing = [i for i in wanted if i not in self._statements]
        if missing:
            raise NotFound(f"no registry entry {missing[0]}")
        return {i: self._statements[i] for i in wanted}

    def _signed(self, idx: int) -> dict[str, Any]:
        return self.signed_statements([idx])[idx]

    def _cover(self, rows: Sequence[dict[str, Any]]) -> SignedIndex:
        """The index, rebuilt if a row names an entry appended since it was built."""
        latest = max((r["entry_idx"] for r in rows if isinstance(r["entry_idx"], int)), default=-1)
        index = self.signed_index()
        return self.signed_index(latest) if latest >= index.size else index

    # -- entries ----------------------------------------------------------------------------

    def entry(self, idx: int) -> Entry:
        row = self._db.execute(
            "SELECT idx, kind, payload_type, payload, key_id, signature, created_at FROM entries WHERE idx = ?",
            (idx,)).fetchone()
        if row is None:
            raise NotFound(f"no registry entry {idx}")
        return Entry(*row)

    def checked_entry(self, idx: int) -> Entry:
        """An entry whose signature, leaf and checkpoint inclusion hold, and whose kind column
        is its signed kind (`created_at` is when the row was written: bookkeeping, not signed)."""
        if not 0 <= idx < self.entry_count():
            raise NotFound(f"no registry entry {idx}")
        self.signed_statements([idx])
        entry = self.entry(idx)
        signed_kind = self.signed_index().kinds[idx]
        if entry.kind != signed_kind:
            raise TableMismatch(f"entries row idx={idx}: kind is {entry.kind} but the signed entry {idx} "
                                f"says {signed_kind}")
        return entry

    def entry_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def check_integrity(self) -> None:
        """The database's own health check (SQLite: PRAGMA integrity_check; PostgreSQL: none,
        see backend.py): raise RegistryError naming the first problem found."""
        self._db.check_integrity()

    def check_foreign_keys(self) -> None:
        """Raise TableMismatch naming the first row that refers to a row that does not exist."""
        bad = self._db.foreign_key_violation()
        if bad is not None:
            table, key, value, parent = bad
            raise TableMismatch(f"{table} row {key}={tables.show(value)}: refers to a {parent} row that does not exist")

    def verify_tables(self, entries: Sequence[LogEntry]) -> None:
        """Every row of every table a command reads, re-derived from these (verified) entries."""
        with self.snapshot() as db:
            tables.verify_tables(db, entries)
            origin = json.loads(entries[0].payload)["predicate"]["origin"] if entries else None
            meta = db.execute("SELECT key, value FROM log_meta ORDER BY key").fetchall()
            if meta != [("origin", origin)]:
                raise TableMismatch(f"log_meta rows are {meta} but the signed entry 0 says origin {origin}")
            _check_nodes(db, entries)
            # Every checkpoint's note was verified with the log; its root column must be the
            # note's (the third line of the body). Only the latest frontier is ever resumed.
            latest = db.execute("SELECT MAX(size) FROM checkpoints").fetchone()[0]
            for size, root, note, frontier in db.execute("SELECT size, root, note, frontier FROM checkpoints"):
                where = f"checkpoints row size={size}"
                try:
                    signed_root = base64.b64decode(bytes(note).split(b"\n", 3)[2], validate=True)
                    resumed = signed_root if size != latest else CompactRange(
                        size, [bytes.fromhex(h) for h in json.loads(frontier)]).root()
                except (IndexError, ValueError, TypeError):
                    raise TableMismatch(f"{where}: note or frontier is unreadable") from None
                if root != signed_root:
                    raise TableMismatch(f"{where}: root is not the root its signed note states")
                if resumed != signed_root:
                    raise TableMismatch(f"{where}: frontier does not hash to the root its signed note states")

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
        row = self._db.execute(f"SELECT {', '.join(LICENSEE_COLUMNS)} FROM licensees WHERE id = ?",
                               (licensee_id,)).fetchone()
        if row is None:
            signed = self.signed_index().licensees.get(licensee_id)
            if signed is not None:
                raise TableMismatch(f"licensees: no row for the licensee of signed entry {signed[0]} (a deleted row)")
            raise NotFound(f"no licensee {licensee_id!r} (see `weightmark licensee list`)")
        return self._checked_licensees([row])[0]

    def licensees(self, jurisdiction: str | None = None) -> list[Licensee]:
        rows = self._db.execute(f"SELECT {', '.join(LICENSEE_COLUMNS)} FROM licensees ORDER BY entry_idx").fetchall()
        checked = self._checked_licensees(rows, complete=True)
        return [lic for lic in checked if jurisdiction is None or lic.jurisdiction == jurisdiction]

    def _checked_licensees(self, rows: Sequence[Sequence[Any]], complete: bool = False) -> list[Licensee]:
        """Licensee rows checked against their signed entries; `complete`: rows are the whole
        table, and every signed licensee must be among them."""
        dicts = [row_dict(LICENSEE_COLUMNS, r) for r in rows]
        index = self._cover(dicts)
        by_id = {}
        for d in dicts:
            signed = index.licensees.get(d["id"])
            if signed is None:
                raise TableMismatch(f"licensees row id={tables.show(d['id'])}: no signed licensee entry has this id "
                                    "(an added row)")
            by_id[d["id"]] = signed[0]
        statements = self.signed_statements(by_id.values())
        for d in dicts:
            idx = by_id[d["id"]]
            compare(f"licensees row id={d['id']}", d, _expected(tables.expected_licensee, idx, statements[idx]), idx,
                    values=False)
        if complete:
            for lid, (idx, _) in sorted(index.licensees.items(), key=lambda kv: kv[1][0]):
                if lid not in by_id:
                    raise TableMismatch(f"licensees: no row for the licensee of signed entry {idx} (a deleted row)")
        return [Licensee(*r) for r in rows]

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
        digest, count, elements = tables.row_scale_sha256(
            (c.name, c.dtype, c.shape, np.ascontiguousarray(c.row_scale, dtype="<f4").tobytes()) for c in carriers)
        created = now()
        predicate = {
            "model_id": model_id,
            "name": name,
            "format": fmt,
            "carriers": count,
            "carrier_elements": elements,
            "row_scale_sha256": digest,
            "registered_at": created,
            "base_path": base_path,
            "files": files,
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
        return Model(model_id, name, base_path, fmt, files, created, idx)

    def relocate_model(self, model: Model, base_path: str, files: dict[str, dict[str, int]],
                       signer: Signer) -> Model:
        """Record, in a signed `model-relocation` entry, that a model's base files now live at
        `base_path` (the caller has checked that they are the registered weights)."""
        predicate = {"model_id": model.model_id, "name": model.name, "base_path": base_path, "files": files,
                     "relocated_at": now()}
        with self._write() as db:
            self._append(db, "model-relocation", statement("model-relocation", model.name, model.model_id, predicate),
                         signer)
            db.execute("UPDATE models SET base_path = ?, files = ? WHERE model_id = ?",
                       (base_path, json.dumps(files), model.model_id))
        return replace(model, base_path=base_path, files=files)

    def models(self) -> list[Model]:
        """Every registered model, each row checked against its signed entry (and its latest
        signed relocation); a signed model without its row is refused too."""
        rows = self._db.execute(f"SELECT {', '.join(MODEL_COLUMNS)} FROM models ORDER BY entry_idx").fetchall()
        dicts = [row_dict(MODEL_COLUMNS, r) for r in rows]
        index = self._cover(dicts)
        by_id = {}
        for d in dicts:
            idx = index.models.get(d["model_id"])
            if idx is None:
                raise TableMismatch(f"models row model_id={tables.show(d['model_id'])}: no signed model entry has "
                                    "this model id (an added row)")
            by_id[d["model_id"]] = idx
        for model_id, idx in sorted(index.models.items(), key=lambda kv: kv[1]):
            if model_id not in by_id:
                raise TableMismatch(f"models: no row for model {model_id} of signed entry {idx} (a deleted row)")
        statements = self.signed_statements([*by_id.values(), *index.locations.values()])
        for d in dicts:
            idx = by_id[d["model_id"]]
            where = f"models row model_id={d['model_id']}"
            compare(where, d, _expected(tables.expected_model, idx, statements[idx]), idx, values=False)
            moved = index.locations.get(d["model_id"])
            at, location = _expected(tables.expected_location, idx, statements[idx],
                                     {} if moved is None else {moved: statements[moved]})
            compare(where, d, location, at, values=False)
        return [Model(d["model_id"], d["name"], d["base_path"], d["format"], d["files"], d["created_at"],
                      d["entry_idx"]) for d in dicts]

    def model(self, name: str) -> Model:
        for model in self.models():
            if model.name == name:
                return model
        raise NotFound(f"no model named {name!r} (see `weightmark model list`)")

    def model_by_id(self, model_id: str) -> Model:
        for model in self.models():
            if model.model_id == model_id:
                return model
        raise NotFound(f"no model with id {model_id}")

    def carriers(self, model_id: str) -> list[Carrier]:
        """A model's carriers in order, their row-scale table checked against the signed digest."""
        if model_id not in self._carriers:
            index = self.signed_index()
            idx = index.models.get(model_id)
            if idx is None:
                raise NotFound(f"no model with id {model_id}")
            rows = self._db.execute(f"SELECT {', '.join(CARRIER_COLUMNS)} FROM carriers WHERE model_id = ?"
                                    " ORDER BY ordinal", (model_id,)).fetchall()
            stmt = self._signed(idx)
            checked = _expected(tables.check_carriers, model_id, stmt["predicate"]["name"], stmt, idx, rows)
            self._carriers[model_id] = [Carrier(name, dtype, shape, np.frombuffer(blob, dtype="<f4"))
                                        for name, dtype, shape, blob in checked]
        return self._carriers[model_id]

    def carrier_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """model_id -> {carrier name: shape}, for finding which model a suspect is."""
        found = {r[0] for r in self._db.execute("SELECT DISTINCT model_id FROM carriers")}
        index = self.signed_index()
        for model_id in sorted(found - index.models.keys(), key=str):
            raise TableMismatch(f"carriers rows of model_id={tables.show(model_id)}: no signed model entry has "
                                "this model id (added rows)")
        return {model_id: {c.name: c.shape for c in self.carriers(model_id)}
                for model_id, _ in sorted(index.models.items(), key=lambda kv: kv[1])}

    # -- issued copies ----------------------------------------------------------------------

    def reserve_codeword(self, model_id: str) -> int:
        """Take the next codeword index of a model for an issue in progress.

        A reservation whose copy is never recorded (a crash, a failed write) is simply skipped:
        indices are never reused, so no two copies can share a codeword.
        """
        with self._write() as db:
            idx = db.execute(
                "SELECT MAX(i) FROM (SELECT MAX(codeword_index) AS i FROM codeword_reservations WHERE model_id = ?"
                " UNION ALL SELECT MAX(codeword_index) FROM issued_copies WHERE model_id = ?) AS taken",
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
            "out_path": out_path,
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
        return IssuedCopy(idx, model.model_id, licensee.id, codeword_index, scheme, output_format, variant,
                          out_path, digest, issued, licensee.jurisdiction,
                          None if policy is None else json.dumps(policy, sort_keys=True))

    def issued_copy(self, entry_idx: int) -> IssuedCopy:
        row = self._db.execute(f"SELECT {', '.join(ISSUED_COLUMNS)} FROM issued_copies WHERE entry_idx = ?",
                               (entry_idx,)).fetchone()
        if row is None:
            if entry_idx in self.signed_index().issued:
                raise TableMismatch(f"issued_copies: no row for the issued copy of signed entry {entry_idx} "
                                    "(a deleted row)")
            raise NotFound(f"registry entry {entry_idx} is not an issued copy")
        return self._checked_issued([row])[0]

    def issued(self, model_id: str) -> list[IssuedCopy]:
        """Every copy issued of a model, each row checked against its signed entry; a signed
        issued copy of this model without its row is refused too."""
        rows = self._db.execute(
            f"SELECT {', '.join(ISSUED_COLUMNS)} FROM issued_copies WHERE model_id = ? ORDER BY codeword_index",
            (model_id,)).fetchall()
        copies = self._checked_issued(rows)
        index = self.signed_index()
        self._complete({c.entry_idx for c in copies},
                       (idx for idx, (m, _, _) in index.issued.items() if m == model_id))
        return copies

    def _complete(self, returned: set[int], signed: Iterable[int]) -> None:
        """Every signed issued copy that a read should have returned was returned; otherwise
        name the row that hid it (deleted, or an edited column that a filter ran on)."""
        for idx in sorted(set(signed) - returned):
            copy = self.issued_copy(idx)  # raises naming a deleted or edited row
            self.licensee(copy.licensee_id)  # or the licensee row the search joined on
            raise TableMismatch(f"issued_copies: a stored row hides the issued copy of signed entry {idx} "
                                "from this search")

    def _checked_issued(self, rows: Sequence[Sequence[Any]]) -> list[IssuedCopy]:
        dicts = [row_dict(ISSUED_COLUMNS, r) for r in rows]
        index = self._cover(dicts)
        for d in dicts:
            idx = d["entry_idx"]
            if idx not in index.issued:
                kind = index.kinds[idx] if isinstance(idx, int) and 0 <= idx < index.size else ""
                what = f"a {kind} entry" if kind else "no entry"
                raise TableMismatch(f"issued_copies row entry_idx={tables.show(idx)}: signed entry {tables.show(idx)} "
                                    f"is {what}, not an issued copy (an added row)")
        statements = self.signed_statements(d["entry_idx"] for d in dicts)
        for d in dicts:
            idx = d["entry_idx"]
            compare(f"issued_copies row entry_idx={idx}", d, _expected(tables.expected_issued, idx, statements[idx]),
                    idx, values=False)
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
        sql = (f"SELECT {', '.join('i.' + c for c in ISSUED_COLUMNS)}, {', '.join('l.' + c for c in LICENSEE_COLUMNS)}"
               " FROM issued_copies i JOIN licensees l ON l.id = i.licensee_id WHERE 1=1")
        args: list[Any] = []
        for clause, value in (("i.licensee_id = ?", licensee_id), ("l.jurisdiction = ?", jurisdiction),
                              ("i.model_id = ?", model_id), ("i.issued_at >= ?", since),
                              ("i.issued_at < ?", until)):
            if value is not None:
                sql += f" AND {clause}"
                args.append(value)
        if jurisdictions is not None:
            sql += f" AND l.jurisdiction IN ({','.join('?' * len(jurisdictions))})" if jurisdictions else " AND 1 = 0"
            args.extend(sorted(jurisdictions))
        n = len(ISSUED_COLUMNS)
        rows = self._db.execute(sql + " ORDER BY i.entry_idx", args).fetchall()
        copies = self._checked_issued([r[:n] for r in rows])
        licensees = self._checked_licensees([r[n:] for r in rows])
        # The filters ran on the stored rows; the same filters on the signed entries must pick
        # the same copies, or a row was deleted (or hidden by an edit of a row not returned).
        index = self.signed_index()
        wanted = jurisdictions
        if jurisdiction is not None:
            wanted = frozenset({jurisdiction}) & (wanted if wanted is not None else frozenset({jurisdiction}))

        def selected(model: str, lic: str, at: str) -> bool:
            place = index.licensees.get(lic, (None, None))[1]
            return ((licensee_id is None or lic == licensee_id) and (model_id is None or model == model_id)
                    and (since is None or at >= since) and (until is None or at < until)
                    and (wanted is None or place in wanted))

        self._complete({c.entry_idx for c in copies}, (i for i, v in index.issued.items() if selected(*v)))
        return list(zip(copies, licensees, strict=True))


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

    # -- copies never delivered ---------------------------------------------------------------

    def _issue_files(self, entry_idx: int) -> dict[str, str]:
        """The files manifest of an issued-copy entry, from its signed statement (checked)."""
        files = self._signed(entry_idx)["predicate"].get("files")
        if not isinstance(files, dict):
            raise RegistryError(f"registry entry {entry_idx}: issued copy without a files manifest")
        return files

    def issued_manifests_at(self, out_path: str) -> list[dict[str, str]]:
        """The files manifests of every copy issued to `out_path` (newest first), voided or not."""
        rows = self._db.execute(f"SELECT {', '.join(ISSUED_COLUMNS)} FROM issued_copies WHERE out_path = ?"
                                " ORDER BY entry_idx DESC", (out_path,)).fetchall()
        return [self._issue_files(copy.entry_idx) for copy in self._checked_issued(rows)]

    def issue_for_codeword(self, model_id: str, codeword_index: int) -> tuple[IssuedCopy, dict[str, str]] | None:
        """The copy recorded for a model's codeword and its files manifest; None if not recorded."""
        row = self._db.execute("SELECT entry_idx FROM issued_copies WHERE model_id = ? AND codeword_index = ?",
                               (model_id, codeword_index)).fetchone()
        if row is None:
            return None
        return self.issued_copy(row[0]), self._issue_files(row[0])

    def voided_issues(self) -> dict[int, int]:
        """{issued-copy entry: the issue-void entry saying that copy was never delivered}, from
        the signed void entries (their kind taken from the statement, their signature checked)."""
        index = self.signed_index(self.entry_count() - 1)
        voids = [i for i, kind in enumerate(index.kinds) if kind == "issue-void"]
        out: dict[int, int] = {}
        for idx, stmt in self.signed_statements(voids).items():
            issue = stmt["predicate"].get("issue_entry")
            if type(issue) is not int or issue not in index.issued:
                raise TableMismatch(f"signed entry {idx}: voids entry {tables.show(issue)}, which is not an issued copy")
            out.setdefault(issue, idx)
        return out

    def void_issue(self, issued: IssuedCopy, reason: str, signer: Signer) -> int:
        """Append a signed issue-void entry: the copy of entry `issued` was never delivered.

        The codeword stays reserved for it (scans still score it); the entry only records that
        no file left the lab under that issue. Voiding twice returns the first void entry.
        """
        predicate = {
            "issue_entry": issued.entry_idx,
            "model_id": issued.model_id,
            "licensee_id": issued.licensee_id,
            "codeword_index": issued.codeword_index,
            "reason": reason,
            "voided_at": now(),
        }
        subject = self.entry(issued.entry_idx)
        digest = hashlib.sha256(subject.payload).hexdigest()
        with self._write() as db:
            for idx, payload in db.execute("SELECT idx, payload FROM entries WHERE kind = 'issue-void'"):
                if json.loads(payload)["predicate"]["issue_entry"] == issued.entry_idx:
                    return idx
            return self._append(db, "issue-void",
                                statement("issue-void", f"entry-{issued.entry_idx}", digest, predicate), signer)


def _expected(derive: Any, *args: Any) -> Any:
    """Call a tables.* derivation, turning a signed entry that lacks a field into a clear error."""
    try:
        return derive(*args)
    except (KeyError, TypeError, IndexError) as exc:
        raise RegistryError(f"a signed entry lacks a field its table row needs ({exc}); "
                            "run `weightmark registry verify`") from None


def _check_row_keys(db: Database, index: SignedIndex) -> None:
    """Every licensee, model and issued-copy row has its signed entry, and every such entry its
    row, by key and entry index alone (no signature: cheap enough for every opening). A row
    added or deleted anywhere is refused by every command, not only by those that read it."""
    stored = {r[0]: r[1] for r in db.execute("SELECT id, entry_idx FROM licensees")}
    for lid, idx in stored.items():
        if index.licensees.get(lid, (None,))[0] != idx:
            raise TableMismatch(f"licensees row id={tables.show(lid)}: no signed licensee entry {tables.show(idx)} "
                                "has this id (an added or changed row)")
    for lid, (idx, _) in sorted(index.licensees.items(), key=lambda kv: kv[1][0]):
        if lid not in stored:
            raise TableMismatch(f"licensees: no row for the licensee of signed entry {idx} (a deleted row)")
    stored = {r[0]: r[1] for r in db.execute("SELECT model_id, entry_idx FROM models")}
    for model_id, idx in stored.items():
        if index.models.get(model_id) != idx:
            raise TableMismatch(f"models row model_id={tables.show(model_id)}: no signed model entry "
                                f"{tables.show(idx)} has this model id (an added or changed row)")
    for model_id, idx in sorted(index.models.items(), key=lambda kv: kv[1]):
        if model_id not in stored:
            raise TableMismatch(f"models: no row for the model of signed entry {idx} (a deleted row)")
    issued = {r[0] for r in db.execute("SELECT entry_idx FROM issued_copies")}
    for idx in sorted(issued - index.issued.keys(), key=str):
        raise TableMismatch(f"issued_copies row entry_idx={tables.show(idx)}: signed entry {tables.show(idx)} is not "
                            "an issued copy (an added row)")
    for idx in sorted(index.issued.keys() - issued):
        raise TableMismatch(f"issued_copies: no row for the issued copy of signed entry {idx} (a deleted row)")


def _nodes_of(leaves: Iterable[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """Every interior node (level, index, hash) of the perfect subtrees over these leaves."""
    stack: list[bytes] = []
    for idx, leaf in enumerate(leaves):
        h, n, level = leaf, idx, 0
        while n & 1:
            h = node_hash(stack.pop(), h)
            n >>= 1
            level += 1
            yield level, idx >> level, h
        stack.append(h)


def _store_all_nodes(db: Database) -> None:
    """Fill merkle_nodes from the entries' leaf hashes (a registry made before the table)."""
    leaves = [bytes(r[0]) for r in db.execute("SELECT leaf_hash FROM entries ORDER BY idx").fetchall()]
    db.executemany("INSERT INTO merkle_nodes VALUES (?, ?, ?)", list(_nodes_of(leaves)))


def _check_nodes(db: Database, entries: Sequence[LogEntry]) -> None:
    """The stored interior nodes are exactly those of the (verified) entries' tree."""
    expected = {(level, idx): h for level, idx, h in _nodes_of(leaf_hash(e.data) for e in entries)}
    seen = 0
    for level, idx, h in db.execute("SELECT level, idx, hash FROM merkle_nodes"):
        want = expected.get((level, idx))
        if want is None:
            raise TableMismatch(f"merkle_nodes row level={tables.show(level)} idx={tables.show(idx)}: "
                                "no such node in the log's tree (an added row)")
        if bytes(h) != want:
            raise TableMismatch(f"merkle_nodes row level={level} idx={idx}: hash is not the hash of entries "
                                f"{idx << level}..{((idx + 1) << level) - 1}")
        seen += 1
    if seen != len(expected):
        raise TableMismatch(f"merkle_nodes: {len(expected) - seen} of the log's {len(expected)} interior nodes "
                            "are missing (deleted rows)")
