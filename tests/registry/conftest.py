"""A throwaway PostgreSQL 15 cluster for the registry tests, and a fixture over both backends.

The cluster (tests/registry/pgcluster.py) is made by `initdb` (run as the `postgres` user when
the tests run as root) in a temporary folder, listens on a Unix socket in that folder only, and
is stopped and removed at the end of the session, also when a test fails. Each test that asks
for `pg_url` gets a fresh database. Tests skip, saying why, only where no PostgreSQL server
binaries are installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.registry.pgcluster import PgCluster, bindir, throwaway_cluster
from tests.registry.rawdb import drop_copies


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bin_dir = bindir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'weightmark[postgres]')")
    with throwaway_cluster(bin_dir) as cluster:
        yield cluster


def new_database(cluster: PgCluster) -> str:
    """A fresh, empty database in the cluster; its superuser URL (no password)."""
    name = "wm_" + uuid.uuid4().hex[:12]
    r = cluster.psql("postgres", f"CREATE DATABASE {name}")
    assert r.returncode == 0, r.stderr
    return cluster.url(name)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database in the session's cluster (superuser URL, no password)."""
    return new_database(pg_cluster)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_location(request: pytest.FixtureRequest) -> str | None:
    """Where a new home's registry goes: None (the home's SQLite file) or a fresh PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_registry_location(request: pytest.FixtureRequest) -> Callable[[], str | None]:
    """`registry_location` for a module's shared homes: a function giving where each new home's
    registry goes, None (its SQLite file) or a fresh PostgreSQL database kept for the module.
    Tests copy such a home before changing it (tests/registry/rawdb.py copy_home)."""
    if request.param == "sqlite":
        return lambda: None
    cluster = request.getfixturevalue("pg_cluster")
    return lambda: new_database(cluster)


@pytest.fixture(autouse=True)
def _drop_copied_databases() -> Iterator[None]:
    """Each test's copies of PostgreSQL registries (rawdb.copy_home) go when the test ends."""
    yield
    drop_copies()
