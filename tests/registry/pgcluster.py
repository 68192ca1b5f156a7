"""A throwaway PostgreSQL cluster: initdb in a temporary folder, a Unix socket only, removed after.

Used by the registry tests' fixtures and by benchmarks/bench_registry_backends.py. When run as
root, the server runs as the `postgres` user (initdb refuses root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PG_BINDIRS = ("/usr/lib/postgresql/15/bin",)
SUPERUSER = "postgres"


def bindir() -> Path | None:
    """The folder of initdb and pg_ctl (pg_config --bindir, else Debian's PostgreSQL 15), or None."""
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


@contextmanager
def throwaway_cluster(bin_dir: Path, fsync: bool = False) -> Iterator[PgCluster]:
    """A running cluster on a Unix socket in a temporary folder; stopped and removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="weightmark-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, SUPERUSER)
        as_user = ["runuser", "-u", SUPERUSER, "--"]
    data = root / "data"
    port = 5432
    env = {**os.environ, "LC_ALL": "C"}
    started = False
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, env=env)
        options = (f"-c listen_addresses='' -c unix_socket_directories={root} -c port={port} "
                   f"-c fsync={'on' if fsync else 'off'} -c max_connections=100")
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-t", "60",
                        "-l", str(root / "server.log"), "start"], check=True, capture_output=True, env=env)
        started = True
        yield PgCluster(root, port)
    finally:
        if started:
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, env=env)
        shutil.rmtree(root, ignore_errors=True)
