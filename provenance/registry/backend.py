"""Where the registry's rows live: SQLite (embedded, the default) or PostgreSQL, behind one interface.

`Registry` (store.py) holds all the logic and speaks one SQL, written with `?` placeholders
and types both databases accept. Everything that differs between them is here, one class per
dialect: connecting, the schema migrations, how a write transaction takes the log's lock
(SQLite: `BEGIN IMMEDIATE`; PostgreSQL: `SELECT ... FOR UPDATE` of the one coordination row),
how a read sees one snapshot, and the database's own health checks. A home records a
PostgreSQL registry as its URL in `registry.location`; a home without that file keeps its
registry in `registry.db`.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from weightmark.errors import RegistryError, UsageError

DB_FILE = "registry.db"
LOCATION_FILE = "registry.location"
REGISTRY_ENV = "WEIGHTMARK_REGISTRY"
URL_SCHEMES = ("postgresql", "postgres")
MAX_LOCATION_BYTES = 4096

# -- the schema, per dialect ----------------------------------------------------------------------

# Numbered SQLite migrations: each runs once, in order, inside a transaction; never edit a
# released one.
SQLITE_MIGRATIONS: list[tuple[int, str]] = [
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
    (
        6,
        # Interior Merkle nodes: the root of the perfect subtree of 2**level leaves starting at
        # leaf idx * 2**level (level 0 is entries.leaf_hash). A cache of the log, checked by verify.
        """
        CREATE TABLE merkle_nodes (
            level INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            hash BLOB NOT NULL,
            PRIMARY KEY (level, idx)
        );
        """,
    ),
]

# PostgreSQL: the same tables (BYTEA for BLOB, BIGINT for the integers an index can outgrow), then
# the coordination row and the append-only triggers.
_PG_TYPES = [(r"\bBLOB\b", "BYTEA"), (r"\bINTEGER\b", "BIGINT")]


def _pg(sql: str) -> str:
    for pattern, repl in _PG_TYPES:
        sql = re.sub(pattern, repl, sql)
    return sql


POSTGRES_MIGRATIONS: list[tuple[int, str]] = [(v, _pg(sql)) for v, sql in SQLITE_MIGRATIONS] + [
    (
        7,
        """
        CREATE TABLE log_coordination (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            created_at TEXT NOT NULL
        );
        INSERT INTO log_coordination VALUES (1, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
        CREATE FUNCTION weightmark_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'weightmark registry: % on % refused: the log is append-only', TG_OP, TG_TABLE_NAME
                USING ERRCODE = 'insufficient_privilege';
        END
        $$;
        CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
            FOR EACH ROW EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
            FOR EACH STATEMENT EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON checkpoints
            FOR EACH ROW EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints
            FOR EACH STATEMENT EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER merkle_nodes_append_only BEFORE UPDATE OR DELETE ON merkle_nodes
            FOR EACH ROW EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER log_meta_append_only BEFORE UPDATE OR DELETE ON log_meta
            FOR EACH ROW EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER licensees_append_only BEFORE UPDATE OR DELETE ON licensees
            FOR EACH ROW EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER issued_copies_append_only BEFORE UPDATE OR DELETE ON issued_copies
            FOR EACH ROW EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER carriers_append_only BEFORE UPDATE OR DELETE ON carriers
            FOR EACH ROW EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER model_facts_append_only BEFORE UPDATE OR DELETE ON model_facts
            FOR EACH ROW EXECUTE FUNCTION weightmark_append_only();
        CREATE TRIGGER models_no_delete BEFORE DELETE ON models
            FOR EACH ROW EXECUTE FUNCTION weightmark_append_only();
        """,
    ),
]

# The tables an appending role writes (INSERT), and the one UPDATE / DELETE each needs.
# Everything else is read-only to it; a read-only role gets SELECT on every table and nothing more.
APPEND_INSERTS = ("entries", "checkpoints", "merkle_nodes", "log_meta", "licensees", "models", "carriers",
                  "issued_copies", "codeword_reservations", "model_facts")
APPEND_UPDATES = (("models", "base_path, files"),  # a signed relocation moves a model's base
                  ("log_coordination", "created_at"))  # SELECT ... FOR UPDATE needs an UPDATE right
APPEND_DELETES = ("codeword_reservations",)  # a reservation ends when its copy is recorded
ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Foreign keys, checked by anti-joins on PostgreSQL (where the database enforces them, unless a
# superuser disabled its triggers): (table, key column, column, parent table, parent column).
FOREIGN_KEYS = [
    ("licensees", "id", "entry_idx", "entries", "idx"),
    ("models", "model_id", "entry_idx", "entries", "idx"),
    ("carriers", "name", "model_id", "models", "model_id"),
    ("codeword_reservations", "codeword_index", "model_id", "models", "model_id"),
    ("issued_copies", "entry_idx", "entry_idx", "entries", "idx"),
    ("issued_copies", "entry_idx", "model_id", "models", "model_id"),
    ("issued_copies", "entry_idx", "licensee_id", "licensees", "id"),
    ("model_facts", "entry_idx", "entry_idx", "entries", "idx"),
    ("model_facts", "entry_idx", "model_id", "models", "model_id"),
]


def tables_of(migrations: Sequence[tuple[int, str]], versions: Iterable[int]) -> set[str]:
    """The tables a weightmark registry holds once these migrations have run."""
    names = {"schema_migrations"}
    done = set(versions)
    for version, sql in migrations:
        if version in done:
            names.update(re.findall(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", sql, flags=re.IGNORECASE))
    return names


def check_schema(where: str, migrations: Sequence[tuple[int, str]], found: set[str], versions: set[Any]) -> None:
    """Refuse a database whose tables and schema versions are not a weightmark registry's."""
    known = [v for v, _ in migrations]
    if any(type(v) is not int for v in versions) or not versions:
        raise RegistryError(f"{where}: schema_migrations holds no weightmark schema version")
    if max(versions) > known[-1]:
        raise RegistryError(f"{where}: registry schema version {max(versions)} is newer than this weightmark "
                            f"knows ({known[-1]}); use a newer weightmark")
    if unknown := sorted(versions - set(known)):
        raise RegistryError(f"{where}: schema version {unknown[0]} is not one of weightmark's migrations {known}")
    expected = tables_of(migrations, versions)
    if foreign := sorted(found - expected):
        raise RegistryError(f"{where}: holds table {foreign[0]!r}, which is not part of a weightmark registry")
    if missing := sorted(expected - found):
        raise RegistryError(f"{where}: lacks the registry table {missing[0]!r}")


# -- where a home's registry lives --------------------------------------------------------------


def check_url(url: str) -> str:
    """A PostgreSQL URL fit to be recorded in a home: postgresql://, and no password in it.

    Passwords belong in libpq's password file (PGPASSFILE, default ~/.pgpass) or a client
    certificate, never in a file of the lab home that is copied between machines.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise UsageError(f"registry URL {redact(url)!r}: not a valid URL ({exc})") from None
    if parts.scheme not in URL_SCHEMES:
        raise UsageError(f"registry URL {redact(url)!r}: expected postgresql://[user@][host][:port]/database")
    if parts.password is not None or re.search(r"(?:^|[?&])password=", parts.query):
        raise UsageError(f"registry URL {redact(url)!r}: holds a password; put it in libpq's password file "
                         "(PGPASSFILE, default ~/.pgpass) instead, never in the URL")
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise UsageError(f"registry URL {redact(url)!r}: names no database (postgresql://host/DATABASE)")
    if "\n" in url or "\r" in url:
        raise UsageError("registry URL: holds a line break")
    return url


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages."""
    url = re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"((?:^|[?&])password=)[^&]*", r"\1***", url)


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0] in URL_SCHEMES and "://" in location


def recorded_location(home: Path) -> str | None:
    """The PostgreSQL URL a home records, or None when its registry is the SQLite file."""
    path = home / LOCATION_FILE
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LOCATION_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read where the registry lives ({exc.strerror})") from None
    if len(data) > MAX_LOCATION_BYTES:
        raise RegistryError(f"{path}: larger than {MAX_LOCATION_BYTES} bytes, not a registry location")
    try:
        url = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RegistryError(f"{path}: not UTF-8 text, not a registry location") from None
    try:
        return check_url(url)
    except UsageError as exc:
        raise RegistryError(f"{path}: {exc}") from None


# -- connections ----------------------------------------------------------------------------------


class Database:
    """One connection, in autocommit mode: transactions are opened and closed explicitly."""

    dialect = ""
    migrations: list[tuple[int, str]] = []

    def __init__(self, where: str) -> None:
        self.where = where  # how messages name the registry: a file path or a URL (no password)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError

    def run_script(self, sql: str) -> None:
        """Run a migration's statements, in the caller's transaction."""
        raise NotImplementedError

    @property
    def in_transaction(self) -> bool:
        raise NotImplementedError

    def begin_write(self) -> None:
        """Open a write transaction holding the log's lock: one writer at a time."""
        raise NotImplementedError

    def begin_read(self) -> None:
        """Open a read transaction: every query in it sees the same committed state."""
        raise NotImplementedError

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        self.execute("ROLLBACK")

    def close(self) -> None:
        raise NotImplementedError

    def check_integrity(self) -> None:
        raise NotImplementedError

    def foreign_key_violation(self) -> tuple[str, str, Any, str] | None:
        """(table, key column, key value, parent table) of the first row referring to nothing."""
        raise NotImplementedError

    def table_names(self) -> set[str]:
        raise NotImplementedError


class SQLiteDatabase(Database):
    """The embedded registry file: WAL, synchronous=FULL, foreign keys on."""

    dialect = "sqlite"
    migrations = SQLITE_MIGRATIONS

    def __init__(self, path: Path, read_only: bool = False) -> None:
        super().__init__(str(path))
        if read_only:  # SQLite refuses every write; errors are left to the caller to explain
            self._db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=60.0,
                                       isolation_level=None)
            return
        try:
            self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"{path}: not a usable registry database ({exc})") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def run_script(self, sql: str) -> None:
        for stmt in sql.split(";"):
            if stmt.strip():
                self._db.execute(stmt)

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def begin_write(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def begin_read(self) -> None:
        self._db.execute("BEGIN")

    def close(self) -> None:
        self._db.close()

    def check_integrity(self) -> None:
        problems = [r[0] for r in self._db.execute("PRAGMA integrity_check(1)")]
        if problems != ["ok"]:
            raise RegistryError(f"{self.where}: the database is corrupted ({' '.join(str(problems[0]).split())})")

    def foreign_key_violation(self) -> tuple[str, str, Any, str] | None:
        bad = self._db.execute("PRAGMA foreign_key_check").fetchone()
        if bad is None:
            return None
        table, rowid, parent, _ = bad
        key = next((k for t, k, *_ in FOREIGN_KEYS if t == table), "rowid")
        value = self._db.execute(f"SELECT {key} FROM {table} WHERE rowid = ?", (rowid,)).fetchone()
        return table, key, value[0] if value else rowid, parent

    def table_names(self) -> set[str]:
        return {r[0] for r in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}


class PostgresDatabase(Database):
    """A PostgreSQL registry through psycopg 3; every database error becomes a RegistryError
    naming the registry's URL (which never holds a password: check_url refuses one)."""

    dialect = "postgresql"
    migrations = POSTGRES_MIGRATIONS

    def __init__(self, url: str, read_only: bool = False) -> None:
        """Connect; with read_only, every transaction of the session is READ ONLY, so PostgreSQL
        refuses any write (and the write lock, SELECT ... FOR UPDATE) whatever the role may do."""
        super().__init__(redact(url))
        try:
            import psycopg
        except ImportError:
            raise RegistryError(f"{self.where}: a PostgreSQL registry needs psycopg 3 "
                                "(pip install 'weightmark[postgres]')") from None
        self._psycopg = psycopg
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10,
                                       application_name="weightmark")
        except psycopg.Error as exc:
            raise RegistryError(f"{self.where}: cannot connect to the registry ({_first_line(exc)})") from None
        if read_only:
            try:
                self.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            except RegistryError:
                self._db.close()
                raise

    def _fail(self, exc: Exception) -> RegistryError:
        return RegistryError(f"{self.where}: database error ({_first_line(exc)})")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            if params:
                return self._db.execute(_placeholders(sql), tuple(params))
            return self._db.execute(sql.encode())  # bytes: no placeholder parsing of a literal %
        except self._psycopg.Error as exc:
            raise self._fail(exc) from None

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            with self._db.cursor() as cur:
                cur.executemany(_placeholders(sql), [tuple(r) for r in rows])
        except self._psycopg.Error as exc:
            raise self._fail(exc) from None

    def run_script(self, sql: str) -> None:
        self.execute(sql)  # no parameters: sent whole (the plpgsql bodies hold semicolons)

    @property
    def in_transaction(self) -> bool:
        return self._db.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE

    def begin_write(self) -> None:
        self.execute("BEGIN")
        # The coordination row: every writer of this log queues here, as SQLite writers queue
        # on BEGIN IMMEDIATE. Statements after it (READ COMMITTED) see every earlier append.
        try:
            row = self.execute("SELECT id FROM log_coordination WHERE id = 1 FOR UPDATE").fetchone()
        except RegistryError:  # refused (a read-only role or session): leave no aborted transaction
            self.rollback()
            raise
        if row is None:
            self.rollback()
            raise RegistryError(f"{self.where}: the log's coordination row is missing; "
                                "run `weightmark registry verify`")

    def begin_read(self) -> None:
        self.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def rollback(self) -> None:
        try:
            self._db.execute(b"ROLLBACK")
        except self._psycopg.Error:
            pass  # a broken connection rolls back on the server by itself

    def close(self) -> None:
        self._db.close()

    def check_integrity(self) -> None:
        """None on PostgreSQL: it has no PRAGMA integrity_check (amcheck needs an extension a
        superuser installs); `registry verify` recomputes every hash and row from the entries."""

    def foreign_key_violation(self) -> tuple[str, str, Any, str] | None:
        for table, key, column, parent, pcol in FOREIGN_KEYS:
            row = self.execute(f"SELECT c.{key} FROM {table} c LEFT JOIN {parent} p ON p.{pcol} = c.{column} "
                               f"WHERE p.{pcol} IS NULL ORDER BY 1 LIMIT 1").fetchone()
            if row is not None:
                return table, key, row[0], parent
        return None

    def grant(self, appender: str | None, reader: str | None) -> list[str]:
        database, schema = self.execute("SELECT current_database(), current_schema()").fetchone()
        statements = _grant_statements(database, schema, sorted(self.table_names()), appender, reader)
        self.execute("BEGIN")
        try:
            for stmt in statements:
                self.execute(stmt)
        except BaseException:
            self.rollback()
            raise
        self.commit()
        return statements

    def table_names(self) -> set[str]:
        return {r[0] for r in self.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            " AND table_type = 'BASE TABLE'")}


def _grant_statements(database: str, schema: str, tables: Sequence[str], appender: str | None,
                      reader: str | None) -> list[str]:
    """The SQL giving each role what it needs and nothing more (roles are made if missing)."""
    out: list[str] = []
    for role in (appender, reader):
        if role is None:
            continue
        if not ROLE_NAME.fullmatch(role):
            raise UsageError(f"role name {role!r}: use lower-case letters, digits and _ (at most 63)")
        out.append(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
                   f"THEN CREATE ROLE {role} LOGIN; END IF; END $$")
        out.append(f"GRANT CONNECT ON DATABASE {_quoted(database)} TO {role}")
        out.append(f"GRANT USAGE ON SCHEMA {_quoted(schema)} TO {role}")
        out.append(f"REVOKE ALL ON {', '.join(tables)} FROM {role}")
        out.append(f"GRANT SELECT ON {', '.join(tables)} TO {role}")
    if appender is not None:
        out.append(f"GRANT INSERT ON {', '.join(APPEND_INSERTS)} TO {appender}")
        for table, columns in APPEND_UPDATES:
            out.append(f"GRANT UPDATE ({columns}) ON {table} TO {appender}")
        out.append(f"GRANT DELETE ON {', '.join(APPEND_DELETES)} TO {appender}")
    return out


def _quoted(name: str) -> str:
    """An SQL identifier, double-quoted (a database may be named anything)."""
    return '"' + name.replace('"', '""') + '"'


def _placeholders(sql: str) -> bytes:
    return sql.replace("%", "%%").replace("?", "%s").encode()


def _first_line(exc: Exception) -> str:
    text = " ".join(str(exc).split("\n")[0].split())
    return text or type(exc).__name__


def connect(location: Path | str) -> Database:
    """A connection to the registry at a file path or a postgresql:// URL."""
    if is_url(location):
        return PostgresDatabase(check_url(str(location)))
    return SQLiteDatabase(Path(location))
