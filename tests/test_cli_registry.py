"""The registry, keys and policy commands as a user meets them: exit codes, records and filters."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_cli
from weightmark import Lab

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_POLICY = REPO / "examples" / "policy.toml"
OVERRIDE = "Humanitarian licence HL-2026-017 approved by export counsel"


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def entry_count(home: Path) -> int:
    return json.loads(ok(run_cli("registry", "verify", "--json", home=home)).stdout)["entries"]


def policy_variant(tmp: Path, version: int, replace: tuple[str, str] | None = None) -> Path:
    text = EXAMPLE_POLICY.read_text().replace("version = 3 ", f"version = {version} ", 1)
    assert f"version = {version} " in text
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp / f"policy-v{version}.toml"
    path.write_text(text)
    return path


@dataclass
class PolicyLab:
    work: Path
    home: Path
    ids: dict[str, str]  # jurisdiction -> licensee id


@pytest.fixture(scope="module")
def plab(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> PolicyLab:
    work = tmp_path_factory.mktemp("cli-registry")
    home = work / "home"
    ok(run_cli("init", "--insecure-no-passphrase", "--home", str(home)))
    ok(run_cli("model", "register", str(minilm), "--name", "minilm", home=home))
    ids = {}
    for name, cc in [("Albion Labs Ltd", "GB"), ("Pyongyang Compute", "KP"), ("Rio IA Ltda", "BR"),
                     ("Berlin KI GmbH", "DE")]:
        ids[cc] = ok(run_cli("licensee", "add", name, "--jurisdiction", cc, home=home)).stdout.strip()
    ok(run_cli("policy", "set", str(EXAMPLE_POLICY), home=home))
    return PolicyLab(work, home, ids)


@dataclass
class Issued:
    gb: dict
    kp: dict


@pytest.fixture(scope="module")
def issued(plab: PolicyLab) -> Issued:
    """Two copies: GB (allowed by tier-1) first, then KP (denied by 'restricted', overridden)."""
    gb = json.loads(ok(run_cli("stamp", "minilm", "--licensee", plab.ids["GB"], "--out",
                               str(plab.work / "gb-copy"), "--json", home=plab.home)).stdout)
    kp = json.loads(ok(run_cli("stamp", "minilm", "--licensee", plab.ids["KP"], "--out",
                               str(plab.work / "kp-copy"), "--override-reason", OVERRIDE, "--json",
                               home=plab.home)).stdout)
    return Issued(gb, kp)


def show(home: Path, entry: int) -> dict:
    return json.loads(ok(run_cli("registry", "show", str(entry), "--json", home=home)).stdout)


def find(home: Path, *args: str) -> list[int]:
    return [row["entry_id"] for row in json.loads(ok(run_cli("registry", "find", *args, "--json", home=home)).stdout)]


# -- policy ---------------------------------------------------------------------------------------


def test_installed_policy_is_the_example(plab: PolicyLab) -> None:
    doc = json.loads(ok(run_cli("policy", "show", "--json", home=plab.home)).stdout)
    assert doc["version"] == 3 and doc["date"] == "2026-11-01"
    assert doc["sha256"] == hashlib.sha256(EXAMPLE_POLICY.read_bytes()).hexdigest()
    assert {t["name"]: t["allow"] for t in doc["tiers"]}["restricted"] == "denied"


@pytest.mark.parametrize(("cc", "tier"), [("KP", "restricted"), ("BR", "quantized")])
def test_denied_stamp_exits_5_and_changes_nothing(plab: PolicyLab, cc: str, tier: str) -> None:
    before_entries = entry_count(plab.home)
    before_files = sorted(p.name for p in plab.work.iterdir())
    out = plab.work / f"denied-{cc}"
    r = run_cli("stamp", "minilm", "--licensee", plab.ids[cc], "--out", str(out), home=plab.home)
    line = one_line_error(r, 5)
    assert f"tier '{tier}'" in line and cc in line and "policy v3 (2026-11-01)" in line
    assert "--override-reason" in line
    assert not out.exists()
    assert sorted(p.name for p in plab.work.iterdir()) == before_files  # no staging leftovers either
    assert entry_count(plab.home) == before_entries


def test_blank_override_reason_is_no_override(plab: PolicyLab) -> None:
    before = entry_count(plab.home)
    r = run_cli("stamp", "minilm", "--licensee", plab.ids["KP"], "--out", str(plab.work / "blank"),
                "--override-reason", "   ", home=plab.home)
    one_line_error(r, 5)
    assert not (plab.work / "blank").exists() and entry_count(plab.home) == before


def test_override_is_issued_and_recorded_in_the_signed_entry(plab: PolicyLab, issued: Issued) -> None:
    assert (plab.work / "kp-copy").is_dir()
    doc = show(plab.home, issued.kp["entry_id"])
    assert doc["kind"] == "issued-copy" and doc["signature"] == "valid"
    pred = doc["statement"]["predicate"]
    assert pred["licensee_id"] == plab.ids["KP"] and pred["jurisdiction"] == "KP"
    pol = pred["policy"]
    assert pol["override_reason"] == OVERRIDE
    assert pol["decision"] == "overridden" and pol["allowed"] is False and pol["tier"] == "restricted"
    assert (pol["version"], pol["date"]) == (3, "2026-11-01")
    assert pol["sha256"] == hashlib.sha256(EXAMPLE_POLICY.read_bytes()).hexdigest()
    assert issued.kp["policy"] == pol  # the index row agrees with the signed statement


def test_allowed_issue_records_policy_version_and_date(plab: PolicyLab, issued: Issued) -> None:
    pol = show(plab.home, issued.gb["entry_id"])["statement"]["predicate"]["policy"]
    assert (pol["version"], pol["date"], pol["installed"]) == (3, "2026-11-01", True)
    assert pol["decision"] == "allowed" and pol["tier"] == "tier-1" and pol["override_reason"] is None
    assert "policy v3 (2026-11-01)" in pol["rule"]


def test_log_verifies_after_the_policy_decisions(plab: PolicyLab, issued: Issued) -> None:
    doc = json.loads(ok(run_cli("registry", "verify", "--json", home=plab.home)).stdout)
    assert doc["ok"] is True and doc["entries"] == issued.kp["entry_id"] + 1


@pytest.mark.parametrize("code", ["UK", "gb", "ZZ"])
@pytest.mark.parametrize("command", [["licensee", "add", "Someone"], ["licensee", "list"], ["registry", "find"]])
def test_invalid_country_codes_exit_2(plab: PolicyLab, code: str, command: list[str]) -> None:
    before = entry_count(plab.home) if command[1] == "add" else None
    line = one_line_error(run_cli(*command, "--jurisdiction", code, home=plab.home), 2)
    assert f"'{code}'" in line and "ISO 3166-1 alpha-2" in line
    if code == "UK":
        assert "GB" in line
    if before is not None:
        assert entry_count(plab.home) == before


@pytest.mark.parametrize("code", ["UK", "gb", "ZZ"])
def test_policy_file_with_an_invalid_country_is_refused(plab: PolicyLab, tmp_path: Path, code: str) -> None:
    bad = policy_variant(tmp_path, 9, ('"BR", "IN"', f'"{code}", "IN"'))
    line = one_line_error(run_cli("policy", "set", str(bad), home=plab.home), 3)
    assert f"'{code}'" in line and str(bad) in line
    assert json.loads(ok(run_cli("policy", "show", "--json", home=plab.home)).stdout)["version"] == 3


@pytest.mark.parametrize("version", [2, 3])
def test_policy_set_of_an_older_or_same_version_is_refused(plab: PolicyLab, tmp_path: Path, version: int) -> None:
    path = policy_variant(tmp_path, version) if version != 3 else EXAMPLE_POLICY
    line = one_line_error(run_cli("policy", "set", str(path), home=plab.home), 3)
    assert f"version {version} is not newer" in line and "v3" in line
    if version == 3:
        assert "the same file is already installed" in line
    doc = json.loads(ok(run_cli("policy", "show", "--json", home=plab.home)).stdout)
    assert doc["sha256"] == hashlib.sha256(EXAMPLE_POLICY.read_bytes()).hexdigest()


def test_policy_set_of_a_newer_version_archives_the_old_one(plab: PolicyLab, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(plab.home, home)
    ok(run_cli("policy", "set", str(policy_variant(tmp_path, 4)), home=home))
    assert json.loads(ok(run_cli("policy", "show", "--json", home=home)).stdout)["version"] == 4
    assert (home / "policies" / "v3.toml").read_bytes() == EXAMPLE_POLICY.read_bytes()


# -- registry find --------------------------------------------------------------------------------


@pytest.mark.parametrize(("tier", "expect"), [("tier-1", ["gb"]), ("restricted", ["kp"]), ("quantized", [])])
def test_find_by_tier(plab: PolicyLab, issued: Issued, tier: str, expect: list[str]) -> None:
    entries = {"gb": issued.gb["entry_id"], "kp": issued.kp["entry_id"]}
    assert find(plab.home, "--tier", tier) == [entries[e] for e in expect]


def test_find_by_unknown_tier_exits_2(plab: PolicyLab, issued: Issued) -> None:
    line = one_line_error(run_cli("registry", "find", "--tier", "tier-9", home=plab.home), 2)
    assert "tier-9" in line and "tier-1" in line


def test_find_by_tier_without_a_policy_exits_2(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok(run_cli("init", "--insecure-no-passphrase", "--home", str(home)))
    assert "policy set" in one_line_error(run_cli("registry", "find", "--tier", "tier-1", home=home), 2)


def test_find_since_and_until(plab: PolicyLab, issued: Issued) -> None:
    both = [issued.gb["entry_id"], issued.kp["entry_id"]]
    assert find(plab.home) == both
    assert find(plab.home, "--since", "2999-01-01") == []
    assert find(plab.home, "--since", "2000-01-01") == both
    assert find(plab.home, "--until", "2000-01-01") == []
    assert find(plab.home, "--until", "2999-01-01T00:00:00") == both
    assert find(plab.home, "--since", "2000-01-01", "--until", "2999-01-01") == both
    # The boundary: since is inclusive, until exclusive, at the second copy's issue time.
    second = issued.kp["issued_at"]
    assert issued.gb["issued_at"] < second
    assert find(plab.home, "--since", second) == [issued.kp["entry_id"]]
    assert find(plab.home, "--until", second) == [issued.gb["entry_id"]]
    # The same instant written with a UTC offset is converted to UTC before comparing.
    moment = dt.datetime.fromisoformat(second).astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert find(plab.home, "--since", moment.isoformat()) == [issued.kp["entry_id"]]
    # Filters combine.
    assert find(plab.home, "--since", "2000-01-01", "--tier", "restricted") == [issued.kp["entry_id"]]
    assert find(plab.home, "--jurisdiction", "GB", "--until", "2999-01-01") == [issued.gb["entry_id"]]


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01", "01/02/2026"])
def test_find_with_a_bad_time_exits_2(plab: PolicyLab, value: str) -> None:
    line = one_line_error(run_cli("registry", "find", "--since", value, home=plab.home), 2)
    assert "--since" in line and value in line


# -- registry command exit codes ------------------------------------------------------------------


def test_registry_verify_trust_without_from_exits_2(plab: PolicyLab, tmp_path: Path) -> None:
    line = one_line_error(run_cli("registry", "verify", "--trust", str(tmp_path / "t.json"), home=plab.home), 2)
    assert "--from" in line


def test_registry_verify_from_a_missing_folder_exits_3(tmp_path: Path) -> None:
    one_line_error(run_cli("registry", "verify", "--from", str(tmp_path / "nowhere")), 3)


def test_registry_export_refuses_an_existing_folder(plab: PolicyLab, tmp_path: Path) -> None:
    out = tmp_path / "export"
    ok(run_cli("registry", "export", "--out", str(out), home=plab.home))
    before = (out / "entries.jsonl").read_bytes()
    assert "already exists" in one_line_error(run_cli("registry", "export", "--out", str(out), home=plab.home), 3)
    assert (out / "entries.jsonl").read_bytes() == before
    ok(run_cli("registry", "verify", "--from", str(out)))


@pytest.mark.parametrize("args", [["proof", "9999"], ["consistency", "0"], ["consistency", "3", "2"],
                                  ["consistency", "1", "9999"]])
def test_registry_proof_and_consistency_bad_arguments_exit_2(plab: PolicyLab, args: list[str]) -> None:
    one_line_error(run_cli("registry", *args, home=plab.home), 2)


def test_registry_commands_without_a_home_exit_4(tmp_path: Path) -> None:
    for args in (["verify"], ["proof", "0"], ["consistency", "1"], ["export", "--out", str(tmp_path / "x")]):
        one_line_error(run_cli("registry", *args, home=tmp_path / "no-home"), 4)
    assert not (tmp_path / "x").exists()


# -- keys -----------------------------------------------------------------------------------------


def test_keys_rotation_through_the_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok(run_cli("init", "--insecure-no-passphrase", "--home", str(home)))
    for i in range(4):
        ok(run_cli("licensee", "add", f"Before {i}", "--jurisdiction", "FR", home=home))
    old_pub = tmp_path / "old.pub"
    ok(run_cli("keys", "export-public", "--out", str(old_pub), home=home))
    assert old_pub.read_bytes() == (home / "lab.pub").read_bytes()
    (old_id,) = json.loads(ok(run_cli("registry", "verify", "--json", home=home)).stdout)["keys"]

    r = ok(run_cli("keys", "rotate", home=home))
    new_id = r.stdout.strip()
    assert new_id != old_id and f"{old_id} -> {new_id}" in r.stderr
    rotation = 5  # genesis + 4 licensees, then the rotation entry
    after = ok(run_cli("licensee", "add", "After", "--jurisdiction", "DE", home=home)).stdout.strip()

    doc = json.loads(ok(run_cli("registry", "verify", "--json", home=home)).stdout)
    assert doc["ok"] is True and doc["keys"] == [old_id, new_id] and doc["entries"] == rotation + 2
    assert show(home, 2)["key_id"] == old_id
    assert show(home, rotation)["kind"] == "key-rotation" and show(home, rotation)["key_id"] == old_id
    newest = show(home, rotation + 1)
    assert newest["key_id"] == new_id and newest["signature"] == "valid"
    assert newest["statement"]["predicate"]["licensee_id"] == after

    new_pub = tmp_path / "new.pub"
    ok(run_cli("keys", "export-public", "--out", str(new_pub), home=home))
    assert new_pub.read_bytes() == (home / "lab.pub").read_bytes() != old_pub.read_bytes()

    trust_file = tmp_path / "trust.json"
    ok(run_cli("keys", "trust", "--out", str(trust_file), home=home))
    trust = json.loads(trust_file.read_text())
    ranges = [(k["key_id"], k["valid_from_index"], k["valid_until_index"]) for k in trust["keys"]]
    assert ranges == [(old_id, 0, rotation + 1), (new_id, rotation + 1, None)]
    assert trust["keys"][1]["public_key"].strip() == new_pub.read_text().strip()
    assert trust["keys"][0]["public_key"].strip() == old_pub.read_text().strip()
    assert all(len(k["note_key_id"]) == 8 for k in trust["keys"])

    with Lab(home) as lab:
        notes = dict(lab.registry.checkpoints())
    handover = notes[rotation + 1]
    assert len(handover[handover.index(b"\n\n") + 2:].splitlines()) == 2
    assert len(notes[rotation + 2][notes[rotation + 2].index(b"\n\n") + 2:].splitlines()) == 1

    out = tmp_path / "export"
    ok(run_cli("registry", "export", "--out", str(out), home=home))
    ok(run_cli("registry", "verify", "--from", str(out), "--trust", str(trust_file)))


def test_every_entry_records_the_policy_in_force(tmp_path: Path) -> None:
    """Licensee, model and issued-copy entries alike carry the policy version and date."""
    home = tmp_path / "home"
    assert run_cli("init", "--insecure-no-passphrase", "--home", str(home)).returncode == 0
    before = run_cli("licensee", "add", "Before Ltd", "--jurisdiction", "GB", home=home)
    assert before.returncode == 0
    assert run_cli("policy", "set", str(EXAMPLE_POLICY), home=home).returncode == 0
    assert run_cli("licensee", "add", "After Ltd", "--jurisdiction", "GB", home=home).returncode == 0
    first = json.loads(run_cli("registry", "show", "1", "--json", home=home).stdout)
    second = json.loads(run_cli("registry", "show", "2", "--json", home=home).stdout)
    assert first["statement"]["predicate"]["policy_in_force"] is None
    in_force = second["statement"]["predicate"]["policy_in_force"]
    assert in_force["version"] == 3 and in_force["date"] == "2026-11-01"


def test_registry_show_still_validates_entries_signed_before_a_rotation(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_cli("init", "--insecure-no-passphrase", "--home", str(home)).returncode == 0
    assert run_cli("licensee", "add", "Old Key Ltd", "--jurisdiction", "GB", home=home).returncode == 0
    assert run_cli("keys", "rotate", home=home).returncode == 0
    shown = json.loads(run_cli("registry", "show", "1", "--json", home=home).stdout)
    assert shown["signature"] == "valid"
