"""The registry on both backends: the same log, byte-identical proofs, and PostgreSQL's own guards.

Parametrised over SQLite and PostgreSQL (`registry_location`); the PostgreSQL-only tests use a
throwaway cluster (tests/registry/conftest.py): moving a SQLite registry into PostgreSQL,
roles and grants, tampering through the database, URLs that are wrong or unreachable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from weightmark import Lab
from weightmark.errors import RegistryError, UsageError
from weightmark.registry import merkle
from weightmark.registry.backend import LOCATION_FILE, check_url
from weightmark.registry.store import DB_FILE, Carrier, Registry

LICENSEES = 9


def _model(lab: Lab, name: str = "tiny") -> str:
    """Register a small synthetic model straight in the registry; return its id."""
    rng = np.random.default_rng(7)
    carriers = [Carrier(f"layer.{i}.weight", "F32", (4, 8), rng.random(4, dtype=np.float32) + 0.5) for i in range(3)]
    model = lab.registry.add_model(f"id-{name}", name, "/nowhere", "safetensors", {"model.safetensors": {"size": 1}},
                                   carriers, lab.keys)
    return model.model_id


def make_home(root: Path, location: str | None) -> Path:
    home = root / "home"
    with Lab.init(home, passphrase=None, registry=location) as lab:
        for i in range(LICENSEES):
            lab.add_licensee(f"licensee {i}", "GB" if i % 2 else "DE")
        model_id = _model(lab)
        for _ in range(3):
            lab.registry.reserve_codeword(model_id)
    return home


def test_the_log_verifies_and_proofs_equal_the_reference(tmp_path: Path, registry_location: str | None) -> None:
    home = make_home(tmp_path, registry_location)
    assert (home / LOCATION_FILE).exists() == (registry_location is not None)
    assert (home / DB_FILE).exists() == (registry_location is None)
    with Lab(home, passphrase=None) as lab:
        reg = lab.registry
        assert reg.backend == ("sqlite" if registry_location is None else "postgresql")
        result = lab.verify_log()
        size = LICENSEES + 2
        assert result.size == size and result.checkpoints == size
        leaves = reg.leaf_hashes(size)
        assert merkle.root(leaves) == result.root
        for n in range(1, size + 1):
            for i in range(n):
                assert reg.inclusion_proof(i, n) == merkle.inclusion_proof(leaves, i, n)
            for m in range(1, n + 1):
                assert reg.consistency_proof(m, n) == merkle.consistency_proof(leaves, m, n)
        assert [lic.name for lic in reg.licensees("GB")] == [f"licensee {i}" for i in range(1, LICENSEES, 2)]
        model_id = reg.model("tiny").model_id
        assert reg.reserve_codeword(model_id) == 3
        assert reg.find_issued(jurisdictions=frozenset()) == []


def test_cli_on_both_backends(tmp_path: Path, registry_location: str | None) -> None:
    home = tmp_path / "home"
    args = ["init", "--insecure-no-passphrase"] + ([] if registry_location is None else ["--registry", registry_location])
    r = run_cli(*args, home=home)
    assert r.returncode == 0, r.stderr
    r = run_cli("licensee", "add", "Acme GmbH", "--jurisdiction", "DE", home=home)
    assert r.returncode == 0, r.stderr
    r = run_cli("registry", "verify", "--json", home=home)
    assert r.returncode == 0 and '"entries": 2' in r.stdout, r.stderr
    r = run_cli("registry", "proof", "1", "--json", home=home)
    assert r.returncode == 0, r.stderr


# -- PostgreSQL only ------------------------------------------------------------------------------


def test_migrate_copies_byte_identical_verifies_and_switches(tmp_path: Path, pg_url: str) -> None:
    home = make_home(tmp_path, None)
    db = home / DB_FILE
    before = db.read_bytes()
    r = run_cli("registry", "migrate", "--to", pg_url, "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert (home / LOCATION_FILE).read_text().strip() == pg_url
    assert db.read_bytes() == before  # the SQLite file is left as it was
    sqlite_reg = Registry(db)
    with Registry.open(home) as pg:
        assert pg.backend == "postgresql"
        assert pg.log_entries() == sqlite_reg.log_entries()
        assert pg.checkpoints() == sqlite_reg.checkpoints()
        assert pg.latest_checkpoint() == sqlite_reg.latest_checkpoint()
    sqlite_reg.close()
    # The home now appends to PostgreSQL.
    r = run_cli("licensee", "add", "After Move", "--jurisdiction", "FR", home=home)
    assert r.returncode == 0, r.stderr
    with Lab(home, passphrase=None) as lab:
        assert lab.verify_log().size == LICENSEES + 3
    r = run_cli("registry", "migrate", "--to", pg_url, home=home)
    assert r.returncode == 4 and "already in PostgreSQL" in r.stderr


def test_migrate_refuses_a_database_that_is_not_empty(tmp_path: Path, pg_url: str) -> None:
    make_home(tmp_path / "other", pg_url)  # the database now holds another lab's registry
    home = make_home(tmp_path, None)
    r = run_cli("registry", "migrate", "--to", pg_url, home=home)
    assert r.returncode == 4 and r.stderr.startswith("Error: ") and "already holds tables" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (home / LOCATION_FILE).exists()


@pytest.mark.parametrize("url, words", [
    ("postgresql://alice:s3cret@db.example/reg", "holds a password"),
    ("postgresql://db.example/reg?password=s3cret", "holds a password"),
    ("mysql://db.example/reg", "expected postgresql://"),
    ("postgresql://db.example", "names no database"),
])
def test_init_refuses_a_bad_url_before_making_keys(tmp_path: Path, url: str, words: str) -> None:
    home = tmp_path / "home"
    r = run_cli("init", "--insecure-no-passphrase", "--registry", url, home=home)
    assert r.returncode == 2 and words in r.stderr and "s3cret" not in r.stderr, r.stderr
    assert not home.exists() or not any(home.iterdir())
    with pytest.raises(UsageError):
        check_url(url)


def test_unreachable_and_missing_databases_are_one_line_errors(tmp_path: Path, pg_cluster) -> None:
    nowhere = f"postgresql://postgres@/reg?host={tmp_path}&port=1"
    r = run_cli("init", "--insecure-no-passphrase", "--registry", nowhere, home=tmp_path / "a")
    error = [line for line in r.stderr.splitlines() if not line.startswith("Warning: ")]
    assert r.returncode == 4 and len(error) == 1 and error[0].startswith(f"Error: {nowhere}: cannot connect"), r.stderr
    assert not (tmp_path / "a" / "lab.pub").exists()  # no keys made for a registry that is not there
    missing = pg_cluster.url("no_such_database")
    r = run_cli("init", "--insecure-no-passphrase", "--registry", missing, home=tmp_path / "b")
    assert r.returncode == 4 and "no_such_database" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # A home whose recorded database went away.
    home = tmp_path / "c"
    Lab.init(home, passphrase=None).close()
    (home / LOCATION_FILE).write_text(nowhere + "\n")
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4 and r.stderr.startswith(f"Error: {nowhere}: cannot connect"), r.stderr


def _role_home(home: Path, tmp_path: Path, url: str, name: str) -> Path:
    """A copy of the home whose registry.location connects as another role."""
    copy = tmp_path / name
    shutil.copytree(home, copy)
    (copy / LOCATION_FILE).write_text(url + "\n")
    return copy


def test_roles_and_tampering_through_the_database(tmp_path: Path, pg_url: str, pg_cluster) -> None:
    home = make_home(tmp_path, pg_url)
    r = run_cli("registry", "grant", "--appender", "wm_appender", "--reader", "wm_reader", home=home)
    assert r.returncode == 0, r.stderr
    dbname = pg_url.split("/")[3].split("?")[0]
    appender = _role_home(home, tmp_path, pg_cluster.url(dbname, "wm_appender"), "appender")
    reader = _role_home(home, tmp_path, pg_cluster.url(dbname, "wm_reader"), "reader")
    # The appender appends; the reader reads and verifies but cannot append.
    r = run_cli("licensee", "add", "By Appender", "--jurisdiction", "DE", home=appender)
    assert r.returncode == 0, r.stderr
    r = run_cli("registry", "verify", "--json", home=reader)
    assert r.returncode == 0 and f'"entries": {LICENSEES + 3}' in r.stdout, r.stderr
    r = run_cli("licensee", "add", "By Reader", "--jurisdiction", "DE", home=reader)
    assert r.returncode == 4 and "permission denied" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # The appending role cannot rewrite or remove what the log holds.
    for sql in ("UPDATE entries SET kind = 'x' WHERE idx = 3", "DELETE FROM entries WHERE idx = 3",
                "DELETE FROM checkpoints WHERE size = 3", "UPDATE checkpoints SET note = 'x' WHERE size = 3",
                "TRUNCATE entries CASCADE", "DELETE FROM licensees"):
        r = pg_cluster.psql(dbname, sql, user="wm_appender")
        assert r.returncode == 1 and "permission denied" in r.stderr, (sql, r.stderr)
    # Nor can the superuser while the triggers stand.
    for sql in ("UPDATE entries SET kind = 'x' WHERE idx = 3", "DELETE FROM checkpoints WHERE size = 3"):
        r = pg_cluster.psql(dbname, sql)
        assert r.returncode == 1 and "append-only" in r.stderr, (sql, r.stderr)
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 0, r.stderr
    # A superuser who switches the triggers off is caught by verify, which names the entry.
    r = pg_cluster.psql(dbname, "SET session_replication_role = replica; "
                                "UPDATE entries SET payload = convert_to(replace(convert_from(payload, 'UTF8'), 'licensee 2', 'licensee X'), 'UTF8') "
                                "WHERE idx = 3")
    assert r.returncode == 0, r.stderr
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4 and "entry 3" in r.stderr, r.stderr


def test_tampered_stored_node_is_caught(tmp_path: Path, pg_url: str, pg_cluster) -> None:
    home = make_home(tmp_path, pg_url)
    dbname = pg_url.split("/")[3].split("?")[0]
    r = pg_cluster.psql(dbname, "SET session_replication_role = replica; "
                                "UPDATE merkle_nodes SET hash = sha256(hash) WHERE level = 2 AND idx = 1")
    assert r.returncode == 0, r.stderr
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4 and "merkle_nodes row level=2 idx=1" in r.stderr, r.stderr
    r = run_cli("registry", "proof", "1", home=home)
    assert r.returncode == 4 and "stored Merkle nodes" in r.stderr, r.stderr


def test_create_refuses_a_database_with_foreign_tables(tmp_path: Path, pg_url: str, pg_cluster) -> None:
    dbname = pg_url.split("/")[3].split("?")[0]
    assert pg_cluster.psql(dbname, "CREATE TABLE invoices (id int)").returncode == 0
    with pytest.raises(RegistryError, match="already holds tables"):
        Lab.init(tmp_path / "home", passphrase=None, registry=pg_url)


def test_issues_voids_rotation_and_export(tmp_path: Path, registry_location: str | None) -> None:
    """Issued copies, voids, a key rotation and an offline export behave the same on both."""
    from weightmark.evidence import verify_export

    home = make_home(tmp_path, registry_location)
    with Lab(home, passphrase=None) as lab:
        reg = lab.registry
        model = reg.model("tiny")
        alice = reg.licensees("DE")[0]
        codeword = reg.reserve_codeword(model.model_id)
        copy = reg.record_issue(model, alice, codeword, "scheme-v1", "safetensors", "F32", "/out/a",
                                {"model.safetensors": "00" * 32}, lab.keys)
        assert [c.entry_idx for c, _ in reg.find_issued(licensee_id=alice.id)] == [copy.entry_idx]
        assert reg.issue_for_codeword(model.model_id, codeword)[0] == copy
        void = reg.void_issue(copy, "never sent", lab.keys)
        assert reg.void_issue(copy, "again", lab.keys) == void
        assert reg.voided_issues() == {copy.entry_idx: void}
        lab.rotate_keys()
    with Lab(home, passphrase=None) as lab:
        lab.add_licensee("after rotation", "FR")
        result = lab.verify_log()
        assert len(result.trust.keys) == 2 and result.size == LICENSEES + 6
        lab.export_log(tmp_path / "export")
    assert verify_export(tmp_path / "export").root == result.root


def test_location_file_with_a_password_and_grant_on_sqlite(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Lab.init(home, passphrase=None).close()
    r = run_cli("registry", "grant", "--reader", "auditor", home=home)
    assert r.returncode == 2 and "only for a PostgreSQL registry" in r.stderr, r.stderr
    (home / LOCATION_FILE).write_text("postgresql://alice:s3cret@db.example/reg\n")
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4 and "holds a password" in r.stderr and "s3cret" not in r.stderr, r.stderr
    assert str(home / LOCATION_FILE) in r.stderr


def test_a_registry_from_before_stored_nodes_gets_them_when_opened(tmp_path: Path) -> None:
    import sqlite3

    home = make_home(tmp_path, None)
    db = sqlite3.connect(home / DB_FILE)
    with db:
        db.execute("DROP TABLE merkle_nodes")
        db.execute("DELETE FROM schema_migrations WHERE version = 6")
    db.close()
    with Lab(home, passphrase=None) as lab:
        assert lab.registry.schema_version == 6
        size = lab.verify_log().size  # verify checks every stored node against the tree
        leaves = lab.registry.leaf_hashes(size)
        assert all(lab.registry.inclusion_proof(i, size) == merkle.inclusion_proof(leaves, i, size)
                   for i in range(size))
