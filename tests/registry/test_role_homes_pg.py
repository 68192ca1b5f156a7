"""Role homes on a PostgreSQL registry: an auditor verifies with only the trust file, an
investigator scans with only its scan key (in process, and on Dask workers when distributed is
installed), both reading the lab's database read-only.

The lab home appends to a fresh database of the throwaway cluster (tests/registry/conftest.py)
and grants a read-only role (`weightmark registry grant --reader`); the role homes connect as
that role, and their sessions are READ ONLY besides, so even a role that may write cannot
through them. The model is a tiny synthetic one (4 tensors, 1 MB) to keep the test quick.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import run_cli
from tests.registry.pgcluster import PgCluster
from tests.registry.rawdb import database_name
from tests.test_roles import ok, one_line_error
from weightmark import Lab
from weightmark.errors import RegistryError
from weightmark.registry.backend import LOCATION_FILE
from weightmark.roles import PinnedTrust, RoleHome, read_trust

SCAN_PASS = "scan-key-passphrase"


def write_tiny_model(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir()
    tensors = {f"layers.{i}.mlp.weight": rng.standard_normal((128, 512)).astype(np.float32) for i in range(4)}
    tensors["layers.0.norm.weight"] = np.ones(128, np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_auditor_and_investigator_homes_read_a_postgresql_registry(tmp_path: Path, pg_url: str,
                                                                  pg_cluster: PgCluster) -> None:
    lab_home = tmp_path / "lab"
    with Lab.init(lab_home, passphrase=None, registry=pg_url) as lab:
        lab.register_model(write_tiny_model(tmp_path / "tiny", 1), name="tiny")
        lab.register_model(write_tiny_model(tmp_path / "other", 2), name="other")
        holder = lab.add_licensee("Northwind Research Ltd", "GB").id
        lab.add_licensee("Falkenstein KI GmbH", "DE")
        lab.stamp("tiny", holder, tmp_path / "copy")
        lab.stamp("other", holder, tmp_path / "other-copy")
        size = lab.registry.entry_count()
    ok(run_cli("registry", "grant", "--reader", "wm_reader", home=lab_home))
    reader_url = pg_cluster.url(database_name(pg_url), "wm_reader")
    trust = tmp_path / "trust.json"
    ok(run_cli("keys", "trust", "--out", str(trust), home=lab_home))
    scan_key = tmp_path / "tiny.scankey"
    ok(run_cli("keys", "export-scan-key", "--model", "tiny", "--out", str(scan_key), home=lab_home,
               env={"WEIGHTMARK_EXPORT_PASSPHRASE": SCAN_PASS}))

    # The auditor: the trust file and the reader's URL, nothing else.
    auditor = tmp_path / "auditor"
    ok(run_cli("init", "--home", str(auditor), "--role", "auditor", "--trust", str(trust), "--registry", reader_url))
    assert sorted(p.name for p in auditor.iterdir()) == ["role.json", "trust.json"]
    assert json.loads((auditor / "role.json").read_text())["registry"] == reader_url
    doc = json.loads(ok(run_cli("registry", "verify", "--json", home=auditor)).stdout)
    assert doc["ok"] is True and doc["entries"] == size

    # The investigator: one model's scan key; it names the holder of the stamped copy.
    investigator = tmp_path / "investigator"
    ok(run_cli("init", "--home", str(investigator), "--role", "investigator", "--scan-key", str(scan_key),
               "--trust", str(trust), "--registry", reader_url))
    env = {"WEIGHTMARK_PASSPHRASE": SCAN_PASS}
    report = json.loads(ok(run_cli("scan", str(tmp_path / "copy"), "--json", home=investigator, env=env)).stdout)
    assert [c["licensee_id"] for c in report["accused"]] == [holder]
    # Cluster workers reopen the registry from its URL, read-only, anchored as the home is.
    if importlib.util.find_spec("distributed") is not None:
        r = ok(run_cli("scan", str(tmp_path / "copy"), "--out", str(tmp_path / "sweep.jsonl"), "--workers", "1",
                       "--json", home=investigator, env=env))
        (item,) = [json.loads(line) for line in r.stdout.splitlines()]
        assert [c["licensee_id"] for c in item["accused"]] == [holder], item
    # It cannot scan the other model, nor append (it holds no signing key, and its database
    # role may only read).
    r = run_cli("scan", str(tmp_path / "other-copy"), "--model", "other", home=investigator, env=env)
    line = one_line_error(r, 4)
    assert holder not in r.stdout + line and "scan key" in line, line
    line = one_line_error(run_cli("licensee", "add", "Mallory Ltd", "--jurisdiction", "FR", home=investigator), 4)
    assert "signing key" in line and "investigator home does not hold" in line, line
    with Lab(lab_home, passphrase=None) as lab:
        assert lab.registry.entry_count() == size and lab.verify_log().size == size

    # The read-only session refuses writes whatever the role: here connected as the superuser.
    anchor = PinnedTrust(read_trust(trust), str(trust))
    with RoleHome(auditor, passphrase=None) as home:
        assert home.registry.backend == "postgresql" and home.verify_log().size == size
    for url in (reader_url, pg_url):
        from weightmark.registry.store import Registry

        with Registry.open_read_only(url, anchor) as reg:
            assert reg.signed_index().size == size
            with pytest.raises(RegistryError, match="read-only transaction"):
                reg._db.begin_write()  # SELECT ... FOR UPDATE of the coordination row
            with pytest.raises(RegistryError, match="read-only transaction"):
                reg._db.execute("INSERT INTO log_meta VALUES (?, ?)", ("x", "y"))
    assert not (auditor / LOCATION_FILE).exists()
