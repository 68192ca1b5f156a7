"""A throwaway PostgreSQL 15 cluster for the registry tests, and a fixture over both backends.

The cluster is made by `initdb` (run as the `postgres` user when the tests run as root) in a
temporary folder, listens on a Unix socket in that folder only, and is stopped and removed at
the end of the session, also when a test fails. Each test that asks for `pg_url` gets a fresh
database. Tests skip, saying why, only where no PostgreSQL server binaries are installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BINDIRS = ("/usr/lib/postgresql/15/bin",)
SUPERUSER = "postgres"


def _bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        candidates = [out, *PG_BINDIRS]
    except (OSError, subprocess.CalledProcessError):
        candidates = list(PG_BINDIRS)
    for c in candidates:
        if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


@dataclass(frozen=True)
class PgCluster:
    socket_dir: Path
    port: int

    def url(self, dbname: str, user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def psql(self, dbname: str, sql: str, user: str = SUPERUSER) -> subprocess.CompletedProcess[str]:
        """Run SQL through psycopg as `user`; returncode 0 or 1 with the error in stderr."""
        import psycopg

        try:
            with psycopg.connect(self.url(dbname, user), autocommit=True) as conn:
                conn.execute(sql.encode())
        except psycopg.Error as exc:
            return subprocess.CompletedProcess([], 1, "", str(exc))
        return subprocess.CompletedProcess([], 0, "", "")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'weightmark[postgres]')")
    root = Path(tempfile.mkdtemp(prefix="weightmark-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        shutil.chown(root, SUPERUSER)
        as_user = ["runuser", "-u", SUPERUSER, "--"]
    data = root / "data"
    port = 5432
    env = {**os.environ, "LC_ALL": "C"}
    started = False
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, env=env)
        options = (f"-c listen_addresses='' -c unix_socket_directories={root} -c port={port} "
                   "-c fsync=off -c max_connections=100")
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-t", "60",
                        "-l", str(root / "server.log"), "start"], check=True, capture_output=True, env=env)
        started = True
        yield PgCluster(root, port)
    finally:
        if started:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, env=env)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database in the session's cluster (superuser URL, no password)."""
    name = "wm_" + uuid.uuid4().hex[:12]
    r = pg_cluster.psql("postgres", f"CREATE DATABASE {name}")
    assert r.returncode == 0, r.stderr
    return pg_cluster.url(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_location(request: pytest.FixtureRequest) -> str | None:
    """Where a new home's registry goes: None (the home's SQLite file) or a fresh PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_url")
