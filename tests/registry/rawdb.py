"""A home's registry database opened behind the tool's back, the same way on both backends.

Tamper tests run one edit and one assertion on SQLite and on PostgreSQL. The edit goes through
`raw_db(home)`, which speaks SQL with `?` placeholders on either backend:

- SQLite: the home's `registry.db` through plain sqlite3, as anyone who can write the file
  could (sqlite3 leaves foreign keys unenforced unless asked).
- PostgreSQL: a superuser psycopg connection that sets `session_replication_role = replica`
  for its session. That is how a database superuser bypasses every trigger honestly: the
  append-only triggers and the foreign-key triggers stay defined but do not fire for this
  session, exactly as a replication tool or an administrator could arrange. Only a superuser
  may set it; the registry's own roles cannot (tests/registry/test_backends.py shows that).

SQLite's `zeroblob(N)` is the one function the shared edits use that PostgreSQL lacks; the
PostgreSQL connection defines it (N zero bytes) in the database before an edit that uses it.

`copy_home` copies a closed home: its folder, and for PostgreSQL its database too
(`CREATE DATABASE ... TEMPLATE`, about 0.06 s), so each test tampers with its own copy;
`drop_copies` removes those databases again (tests/registry/conftest.py does after each test).
"""

from __future__ import annotations

import shutil
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from weightmark.registry.backend import LOCATION_FILE, recorded_location
from weightmark.registry.store import DB_FILE

_copies: list[str] = []  # URLs of the databases copy_home made and nobody dropped yet

ZEROBLOB = ("CREATE OR REPLACE FUNCTION public.zeroblob(n bigint) RETURNS bytea LANGUAGE sql IMMUTABLE "
            "AS $$ SELECT decode(repeat('00', n::int), 'hex') $$")


class RawDB:
    """One connection to a home's registry database that the registry's guards do not stop."""

    def __init__(self, home: Path) -> None:
        self.url = recorded_location(home)
        if self.url is None:
            self._db: Any = sqlite3.connect(home / DB_FILE)
            return
        import psycopg

        self._db = psycopg.connect(self.url)  # not autocommit: the edit is one transaction
        self._db.execute("SET session_replication_role = replica")
        self._zeroblob = False

    @property
    def backend(self) -> str:
        return "sqlite" if self.url is None else "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; `?` placeholders on both backends; returns a cursor."""
        if self.url is None:
            return self._db.execute(sql, tuple(params))
        if "zeroblob(" in sql and not self._zeroblob:
            self._db.execute(ZEROBLOB)
            self._zeroblob = True
        if params:
            return self._db.execute(sql.replace("%", "%%").replace("?", "%s").encode(), tuple(params))
        return self._db.execute(sql.encode())  # no parameters: a literal % stays as it is

    def commit(self) -> None:
        self._db.commit()

    def close(self) -> None:
        self._db.close()


@contextmanager
def raw_db(home: Path) -> Iterator[RawDB]:
    """The home's registry database behind the tool's back; committed when the block ends."""
    db = RawDB(home)
    try:
        yield db
        db.commit()
    finally:
        db.close()


def with_database(url: str, name: str) -> str:
    """The same server and user, another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def copy_home(src: Path, dst: Path) -> Path:
    """A copy of a closed home; a PostgreSQL registry is copied into a new database."""
    shutil.copytree(src, dst)
    url = recorded_location(src)
    if url is not None:
        import psycopg

        name = "wm_" + uuid.uuid4().hex[:12]
        with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {database_name(url)}".encode())
        (dst / LOCATION_FILE).write_text(with_database(url, name) + "\n")
        _copies.append(with_database(url, name))
    return dst


def drop_copies() -> None:
    """Drop the databases copy_home made (closing any connection a test left open)."""
    if not _copies:
        return
    import psycopg

    while _copies:
        url = _copies.pop()
        with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database_name(url)} WITH (FORCE)".encode())
