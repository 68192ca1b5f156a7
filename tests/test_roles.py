"""Least-privilege homes: an investigator scans with one model's scan key and a read-only
registry; an auditor verifies with the trust file alone; neither can sign, append or stamp.

One lab (module-scoped) registers the real MiniLM model and its F16 cast as two models (same
tensor names and shapes, different weights) and stamps a copy of each; the homes under test
are made from it through the real CLI.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.conftest import run_cli
from weightmark import Lab, attacks
from weightmark.errors import KeyProblem
from weightmark.keys import MODEL_KEY_INFO
from weightmark.roles import RoleHome
from weightmark.scankey import unseal_scan_key

SCAN_PASS = "scan-key-passphrase"


@dataclass
class World:
    lab: Path
    trust: Path
    scan_key: Path
    copy: Path  # a stamped copy of "minilm"
    other_copy: Path  # a stamped copy of "minilm-f16"
    licensee: str
    model_id: str
    other_id: str
    model_key: bytes
    other_key: bytes
    signing_raw: bytes
    master: bytes
    work: Path


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, r.stderr
    return r


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with `code` and said so in exactly one `Error: ...` line."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> World:
    work = tmp_path_factory.mktemp("roles")
    f16 = attacks.cast(minilm, work / "f16-base", "F16")
    with Lab.init(work / "lab", passphrase=None) as lab:
        model = lab.register_model(minilm, name="minilm")
        other = lab.register_model(f16, name="minilm-f16")
        licensee = lab.add_licensee("Northwind Research Ltd", "GB").id
        lab.add_licensee("Falkenstein KI GmbH", "DE")
        lab.stamp("minilm", licensee, work / "copy")
        lab.stamp("minilm-f16", licensee, work / "other-copy")
        keys = lab.keys
        signing_raw = keys.signing_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption())
        w = World(work / "lab", work / "trust.json", work / "minilm.scankey", work / "copy", work / "other-copy",
                  licensee, model.model_id, other.model_id, keys.model_key(model.model_id),
                  keys.model_key(other.model_id), signing_raw, keys.master_secret, work)
    ok(run_cli("keys", "trust", "--out", str(w.trust), home=w.lab))
    ok(run_cli("keys", "export-scan-key", "--model", "minilm", "--out", str(w.scan_key), home=w.lab,
               env={"WEIGHTMARK_EXPORT_PASSPHRASE": SCAN_PASS}))
    return w


@pytest.fixture(scope="module")
def investigator(world: World) -> Path:
    home = world.work / "investigator"
    ok(run_cli("init", "--home", str(home), "--role", "investigator", "--scan-key", str(world.scan_key),
               "--trust", str(world.trust), "--registry", str(world.lab)))
    return home


@pytest.fixture(scope="module")
def auditor(world: World) -> Path:
    home = world.work / "auditor"
    ok(run_cli("init", "--home", str(home), "--role", "auditor", "--trust", str(world.trust),
               "--registry", str(world.lab / "registry.db")))
    return home


def as_investigator(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, home=home, env={"WEIGHTMARK_PASSPHRASE": SCAN_PASS})


# -- the scan key file ---------------------------------------------------------------------------

def test_scan_key_file_is_sealed_and_holds_only_that_models_key(world: World) -> None:
    doc = json.loads(world.scan_key.read_text())
    assert doc["kdf"] == "scrypt" and doc["model_id"] == world.model_id
    assert world.scan_key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeyProblem, match="wrong passphrase"):
        unseal_scan_key(world.scan_key, "not the passphrase")
    with pytest.raises(KeyProblem, match="passphrase-protected"):
        unseal_scan_key(world.scan_key, None)
    key = unseal_scan_key(world.scan_key, SCAN_PASS)
    assert key.model_key == world.model_key
    # By trying: the 32 bytes are not the signing key, cannot stand in for the master secret
    # to derive the other model's key, and are not the other model's key.
    lab_public = Ed25519PrivateKey.from_private_bytes(world.signing_raw).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    as_signer = Ed25519PrivateKey.from_private_bytes(key.model_key).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert as_signer != lab_public
    as_master = HKDF(hashes.SHA256(), 32, bytes.fromhex(world.other_id), MODEL_KEY_INFO).derive(key.model_key)
    assert as_master != world.other_key and key.model_key != world.other_key
    assert key.model_key not in (world.master, world.signing_raw)


def test_unencrypted_scan_key_file_contains_no_other_secret(world: World, tmp_path: Path) -> None:
    out = tmp_path / "plain.scankey"
    r = ok(run_cli("keys", "export-scan-key", "--model", "minilm", "--out", str(out), "--insecure-no-passphrase",
                   home=world.lab))
    assert "UNENCRYPTED" in r.stderr
    text = out.read_text()
    assert base64.b64decode(json.loads(text)["secret"]) == world.model_key
    for secret in (world.signing_raw, world.master, world.other_key):
        for form in (secret.hex(), base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode()):
            assert form not in text


def test_export_never_overwrites_without_force_and_force_replaces_only_the_same_models_key(
        world: World, tmp_path: Path) -> None:
    env = {"WEIGHTMARK_EXPORT_PASSPHRASE": SCAN_PASS}
    taken = tmp_path / "taken.txt"
    taken.write_text("not a key")
    assert "already exists; pass --force" in one_line_error(
        run_cli("keys", "export-scan-key", "--model", "minilm", "--out", str(taken), home=world.lab, env=env), 3)
    assert "is not an earlier scan key file" in one_line_error(run_cli(
        "keys", "export-scan-key", "--model", "minilm", "--out", str(taken), "--force", home=world.lab, env=env), 3)
    assert taken.read_text() == "not a key"
    other = tmp_path / "other.scankey"
    ok(run_cli("keys", "export-scan-key", "--model", "minilm-f16", "--out", str(other), home=world.lab, env=env))
    before = other.read_bytes()
    one_line_error(run_cli("keys", "export-scan-key", "--model", "minilm", "--out", str(other), "--force",
                           home=world.lab, env=env), 3)
    assert other.read_bytes() == before
    ok(run_cli("keys", "export-scan-key", "--model", "minilm-f16", "--out", str(other), "--force",
               home=world.lab, env=env))
    assert unseal_scan_key(other, SCAN_PASS).model_key == world.other_key


def test_export_needs_a_passphrase_for_the_file(world: World, tmp_path: Path) -> None:
    line = one_line_error(run_cli("keys", "export-scan-key", "--model", "minilm", "--out",
                                  str(tmp_path / "k"), home=world.lab), 4)
    assert "WEIGHTMARK_EXPORT_PASSPHRASE" in line
    assert not (tmp_path / "k").exists()


# -- the investigator --------------------------------------------------------------------------------

def test_investigator_home_holds_only_the_scan_key_trust_file_and_a_pointer(investigator: Path,
                                                                             world: World) -> None:
    files = sorted(p.relative_to(investigator).as_posix() for p in investigator.rglob("*") if p.is_file())
    assert files == ["role.json", f"scan-keys/{world.model_id}.json", "trust.json"]
    assert json.loads((investigator / "role.json").read_text())["registry"] == str(world.lab / "registry.db")


def test_investigator_accuses_with_the_same_p_values_as_the_lab(investigator: Path, world: World) -> None:
    mine = json.loads(ok(as_investigator("scan", str(world.copy), "--json", home=investigator)).stdout)
    labs = json.loads(ok(run_cli("scan", str(world.copy), "--json", home=world.lab)).stdout)
    assert [a["licensee_id"] for a in mine["accused"]] == [world.licensee]
    assert mine["accused"] == labs["accused"]
    assert mine["candidates"] == labs["candidates"]
    assert mine["watermark_present"] == labs["watermark_present"]
    assert mine["accused"][0]["log10_family_wise_p_value"] < -9


def test_investigator_cannot_scan_another_model(investigator: Path, world: World) -> None:
    for args in (["scan", str(world.other_copy)], ["scan", str(world.copy), "--model", "minilm-f16"]):
        line = one_line_error(as_investigator(*args, home=investigator), 4)
        assert "needs an investigator's scan key" in line and world.other_id[:16] in line, line
        assert "holds scan keys for: minilm" in line


@pytest.mark.parametrize(("args", "needs"), [
    (["licensee", "add", "Mallory Ltd", "--jurisdiction", "DE"], ["signer's signing key"]),
    (["stamp", "minilm", "--licensee", "LIC", "--out", "OUT"], ["stamper's watermark master secret",
                                                                "signer's signing key"]),
    (["scan", "COPY", "--evidence", "OUT"], ["signer's signing key"]),
    (["keys", "export-scan-key", "--model", "minilm", "--out", "OUT"], ["stamper's watermark master secret"]),
    (["keys", "rotate"], ["signer's signing key"]),
    (["policy", "set", "POLICY"], ["signer's signing key"]),
])
def test_investigator_cannot_sign_append_stamp_or_export(investigator: Path, world: World, tmp_path: Path,
                                                         args: list[str], needs: list[str]) -> None:
    policy = Path(__file__).resolve().parents[1] / "examples" / "policy.toml"
    subst = {"LIC": world.licensee, "OUT": str(tmp_path / "out"), "COPY": str(world.copy), "POLICY": str(policy)}
    before = sqlite3.connect(world.lab / "registry.db").execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    line = one_line_error(as_investigator(*[subst.get(a, a) for a in args], home=investigator), 4)
    assert f"{investigator}:" in line and "investigator home does not hold" in line
    for material in needs:
        assert material in line, line
    assert not (tmp_path / "out").exists()
    after = sqlite3.connect(world.lab / "registry.db").execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    assert after == before


def test_investigator_registry_connection_refuses_writes_even_with_a_stolen_signer(investigator: Path,
                                                                                   world: World) -> None:
    """The database connection itself is read-only: handing it the lab's own keys appends nothing."""
    with Lab(world.lab, passphrase=None) as lab, RoleHome(investigator, passphrase=SCAN_PASS) as home:
        assert home.registry.read_only
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            home.registry.add_licensee("Mallory Ltd", "DE", None, lab.keys)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            home.registry._db.execute("DELETE FROM licensees")
        assert len(home.registry.licensees()) == 2


def test_investigator_looks_up_and_verifies(investigator: Path, world: World) -> None:
    found = json.loads(ok(as_investigator("registry", "find", "--licensee", world.licensee, "--json",
                                          home=investigator)).stdout)
    assert len(found) == 2
    ok(as_investigator("registry", "verify", home=investigator))


def test_investigator_needs_its_passphrase_to_scan(investigator: Path, world: World) -> None:
    line = one_line_error(run_cli("scan", str(world.copy), home=investigator,
                                  env={"WEIGHTMARK_PASSPHRASE": "wrong passphrase"}), 4)
    assert "wrong passphrase" in line and "scan-keys" in line


# -- the auditor -------------------------------------------------------------------------------------

def test_auditor_verifies_with_only_the_trust_file(auditor: Path, world: World) -> None:
    files = sorted(p.name for p in auditor.rglob("*") if p.is_file())
    assert files == ["role.json", "trust.json"]
    doc = json.loads(ok(run_cli("registry", "verify", "--json", home=auditor)).stdout)
    with Lab(world.lab, passphrase=None) as lab:
        assert doc["entries"] == lab.registry.entry_count()


def test_auditor_cannot_scan_or_sign(auditor: Path, world: World) -> None:
    line = one_line_error(run_cli("scan", str(world.copy), home=auditor), 4)
    assert "scanning needs an investigator's scan key" in line and "auditor home" in line
    line = one_line_error(run_cli("licensee", "add", "Mallory Ltd", "--jurisdiction", "DE", home=auditor), 4)
    assert "signer's signing key" in line


def test_auditor_refuses_a_registry_whose_keys_are_not_the_trusted_ones(world: World, tmp_path: Path) -> None:
    """A trust file of another lab: refused when the home is made, and when the pinned file is
    swapped afterwards, by registry verify."""
    with Lab.init(tmp_path / "other-lab", passphrase=None) as other:
        other.write_trust(tmp_path / "other-trust.json")
    line = one_line_error(run_cli("init", "--home", str(tmp_path / "a"), "--role", "auditor", "--trust",
                                  str(tmp_path / "other-trust.json"), "--registry", str(world.lab)), 4)
    assert "other-trust.json" in line and not (tmp_path / "a").exists()
    home = tmp_path / "b"
    ok(run_cli("init", "--home", str(home), "--role", "auditor", "--trust", str(world.trust),
               "--registry", str(world.lab)))
    (home / "trust.json").write_bytes((tmp_path / "other-trust.json").read_bytes())
    assert "the registry is the log" in one_line_error(run_cli("registry", "verify", home=home), 4)


def test_auditor_follows_a_key_rotation_signed_by_the_trusted_key(world: World, tmp_path: Path,
                                                                  minilm: Path) -> None:
    """A chain that extends the pinned one by a rotation is accepted; a tampered row is caught."""
    lab_home = tmp_path / "lab"
    with Lab.init(lab_home, passphrase=None) as lab:
        lab.add_licensee("Northwind Research Ltd", "GB")
        lab.write_trust(tmp_path / "trust.json")
    home = tmp_path / "auditor"
    ok(run_cli("init", "--home", str(home), "--role", "auditor", "--trust", str(tmp_path / "trust.json"),
               "--registry", str(lab_home)))
    ok(run_cli("keys", "rotate", home=lab_home))
    ok(run_cli("licensee", "add", "Falkenstein KI GmbH", "--jurisdiction", "DE", home=lab_home))
    doc = json.loads(ok(run_cli("registry", "verify", "--json", home=home)).stdout)
    assert len(doc["keys"]) == 2
    db = sqlite3.connect(lab_home / "registry.db")
    db.execute("UPDATE licensees SET jurisdiction = 'FR' WHERE jurisdiction = 'DE'")
    db.commit()
    db.close()
    assert "jurisdiction" in one_line_error(run_cli("registry", "verify", home=home), 4)


def test_role_home_init_errors_are_one_line(world: World, tmp_path: Path) -> None:
    base = ["init", "--home", str(tmp_path / "h")]
    assert "--registry" in one_line_error(run_cli(*base, "--role", "investigator"), 2)
    assert "--scan-key" in one_line_error(run_cli(*base, "--role", "investigator", "--trust", str(world.trust),
                                                  "--registry", str(world.lab)), 2)
    assert "lab home" in one_line_error(run_cli(*base, "--role", "signer", "--trust", str(world.trust),
                                                "--registry", str(world.lab)), 2)
    assert "no registry database" in one_line_error(run_cli(*base, "--role", "auditor", "--trust",
                                                            str(world.trust), "--registry", str(tmp_path)), 4)
    assert "not a weightmark key file" in one_line_error(run_cli(
        *base, "--role", "investigator", "--trust", str(world.trust), "--registry", str(world.lab),
        "--scan-key", str(world.trust)), 4)
    assert not (tmp_path / "h").exists()


def test_a_role_home_does_not_become_a_lab_home(auditor: Path) -> None:
    before = sorted(p.name for p in auditor.iterdir())
    assert "investigator's or auditor's home" in one_line_error(
        run_cli("init", "--home", str(auditor), "--insecure-no-passphrase"), 2)
    assert sorted(p.name for p in auditor.iterdir()) == before


def test_investigator_on_a_bare_registry_copy_scans_in_process_and_on_cluster_workers(world: World,
                                                                                   tmp_path: Path) -> None:
    """A registry database copied alone (no lab.pub beside it) is read anchored on the home's
    trust file, by the scan and by cluster workers (which open it read-only as the home does)."""
    pytest.importorskip("distributed")
    replica = tmp_path / "replica" / "registry.db"
    replica.parent.mkdir()
    src, dst = sqlite3.connect(world.lab / "registry.db"), sqlite3.connect(replica)
    src.backup(dst)
    src.close()
    dst.close()
    home = tmp_path / "investigator"
    ok(run_cli("init", "--home", str(home), "--role", "investigator", "--scan-key", str(world.scan_key),
               "--trust", str(world.trust), "--registry", str(replica)))
    single = json.loads(ok(as_investigator("scan", str(world.copy), "--json", home=home)).stdout)
    assert [a["licensee_id"] for a in single["accused"]] == [world.licensee]
    r = ok(as_investigator("scan", str(world.copy), "--out", str(tmp_path / "sweep.jsonl"), "--workers", "1",
                           "--json", home=home))
    (item,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["licensee_id"] for a in item["accused"]] == [world.licensee], item
    assert not (replica.parent / "lab.pub").exists()
