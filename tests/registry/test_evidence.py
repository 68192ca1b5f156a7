"""Evidence bundles: offline verification, single-byte tampering, foreign keys and grafted proofs.

The lab that writes the bundle runs on both backends (`module_registry_location`: SQLite and
PostgreSQL). The tests that only flip bytes of the bundle file run once, on the SQLite
variant: the file is checked with no database at all.
"""

from __future__ import annotations

import base64
import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tests.conftest import run_cli
from tests.registry.rawdb import copy_home
from weightmark import Lab
from weightmark.evidence import EVIDENCE_PAYLOAD_TYPE, EvidenceError, verify_bundle
from weightmark.keys import LabKeys
from weightmark.registry.backend import LOCATION_FILE
from weightmark.registry.envelope import canonical_json, envelope, pae
from weightmark.registry.merkle import inclusion_proof

FLIPS = 300


@dataclass
class Case:
    work: Path
    home: Path
    bundle: Path
    pubkey: Path
    accused_id: str
    other_id: str
    accused_entry: int
    other_entry: int


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, minilm: Path,
         module_registry_location: Callable[[], str | None]) -> Case:
    """Two stamped copies of the real MiniLM; copy A scanned through the CLI with --evidence."""
    work = tmp_path_factory.mktemp("evidence")
    home = work / "home"
    with Lab.init(home, passphrase=None, registry=module_registry_location()) as lab:
        lab.register_model(minilm, name="minilm")
        a = lab.add_licensee("Northwind Research Ltd", "GB")
        for i in range(3):
            lab.add_licensee(f"Filler {i} SARL", "FR")
        b = lab.add_licensee("Falkenstein KI GmbH", "DE")
        entry_a = lab.stamp("minilm", a.id, work / "copy-a").entry_idx
        entry_b = lab.stamp("minilm", b.id, work / "copy-b").entry_idx
    bundle = work / "B.json"
    r = run_cli("scan", str(work / "copy-a"), "--evidence", str(bundle), "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert [x["licensee_id"] for x in json.loads(r.stdout)["accused"]] == [a.id]
    pubkey = work / "LAB.pub"
    r = run_cli("keys", "export-public", "--out", str(pubkey), home=home)
    assert r.returncode == 0, r.stderr
    return Case(work, home, bundle, pubkey, a.id, b.id, entry_a, entry_b)


@pytest.fixture
def bundle_only(case: Case) -> Case:
    """The case, for tests of the bundle file alone: they run on the SQLite variant only."""
    if (case.home / LOCATION_FILE).exists():
        pytest.skip("checks only the bundle file, with no database; the backend plays no part")
    return case


def load_key(path: Path) -> Ed25519PublicKey:
    key = load_pem_public_key(path.read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    return key


def lab_keys(home: Path) -> LabKeys:
    with Lab(home) as lab:
        return lab.keys


def resign(content: dict[str, Any], keys: LabKeys) -> bytes:
    """Sign bundle content exactly as build_bundle does."""
    signature = keys.sign(pae(EVIDENCE_PAYLOAD_TYPE, canonical_json(content)))
    return canonical_json({"bundle": content,
                           "signature": {"keyid": keys.key_id, "sig": base64.b64encode(signature).decode()}})


def content_of(case: Case) -> dict[str, Any]:
    return copy.deepcopy(json.loads(case.bundle.read_bytes())["bundle"])


def one_line_error(r: Any) -> str:
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


# -- a genuine bundle verifies --------------------------------------------------------------------


def test_bundle_verifies_offline(case: Case) -> None:
    r = run_cli("evidence", "verify", str(case.bundle), "--pubkey", str(case.pubkey), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    (accused,) = doc["accused"]
    assert accused["licensee_id"] == case.accused_id and accused["legal_name"] == "Northwind Research Ltd"
    assert accused["log_index"] == case.accused_entry and accused["jurisdiction"] == "GB"
    with Lab(case.home) as lab:
        assert doc["tree_size"] == lab.registry.entry_count()
        assert doc["origin"] == lab.trust().origin
    r = run_cli("evidence", "verify", str(case.bundle), "--pubkey", str(case.pubkey))
    assert r.returncode == 0 and "Northwind Research Ltd" in r.stdout


def test_resigning_unchanged_content_still_verifies(case: Case) -> None:
    """The re-signing helper the forgery tests use is faithful: their failures are not its fault."""
    data = resign(content_of(case), lab_keys(case.home))
    assert data == case.bundle.read_bytes()  # Ed25519 is deterministic
    assert verify_bundle(data, load_key(case.pubkey)).accused[0]["licensee_id"] == case.accused_id


# -- any byte changed -----------------------------------------------------------------------------


def flip_positions(size: int) -> list[int]:
    rng = random.Random(20261126)
    return sorted({0, size - 1, *rng.sample(range(size), FLIPS)})


def test_every_single_byte_flip_is_rejected(bundle_only: Case) -> None:
    case = bundle_only
    data = case.bundle.read_bytes()
    key = load_key(case.pubkey)
    rng = random.Random(7)
    positions = flip_positions(len(data))
    assert len(positions) >= FLIPS and positions[0] == 0 and positions[-1] == len(data) - 1
    for pos in positions:
        tampered = bytearray(data)
        tampered[pos] ^= rng.randrange(1, 256)
        with pytest.raises(EvidenceError):
            verify_bundle(bytes(tampered), key)
    verify_bundle(data, key)  # and the untouched bytes still verify


def test_byte_flips_through_the_cli_exit_3(bundle_only: Case, tmp_path: Path) -> None:
    case = bundle_only
    data = case.bundle.read_bytes()
    for n, pos in enumerate([0, len(data) // 3, len(data) // 2, len(data) - 2, len(data) - 1]):
        tampered = bytearray(data)
        tampered[pos] ^= 0x01
        path = tmp_path / f"flipped-{n}.json"
        path.write_bytes(bytes(tampered))
        r = run_cli("evidence", "verify", str(path), "--pubkey", str(case.pubkey))
        assert r.returncode == 3, (pos, r.returncode, r.stderr)
        assert str(path) in one_line_error(r)
        assert r.stdout == ""


def test_another_labs_public_key_is_rejected(case: Case, tmp_path: Path) -> None:
    with Lab.init(tmp_path / "other", passphrase=None):
        pass
    other = tmp_path / "other" / "lab.pub"
    with pytest.raises(EvidenceError, match="not by the given public key"):
        verify_bundle(case.bundle.read_bytes(), load_key(other))
    r = run_cli("evidence", "verify", str(case.bundle), "--pubkey", str(other))
    assert r.returncode == 3
    one_line_error(r)


def test_bundle_signed_by_another_lab_is_rejected_even_with_its_key(case: Case, tmp_path: Path) -> None:
    """Another lab re-signs our content: its key is not one of the log's keys."""
    with Lab.init(tmp_path / "other", passphrase=None) as other:
        forged = resign(content_of(case), other.keys)
    with pytest.raises(EvidenceError, match="not one of the log's keys"):
        verify_bundle(forged, load_key(tmp_path / "other" / "lab.pub"))


@pytest.mark.parametrize("content", [[], "text", 7], ids=["list", "string", "number"])
def test_hostile_bundle_layout_is_a_clean_error(bundle_only: Case, tmp_path: Path, content: object) -> None:
    case = bundle_only
    data = canonical_json({"bundle": content, "signature": {"keyid": "00000000", "sig": "AAAA"}})
    path = tmp_path / "hostile.json"
    path.write_bytes(data)
    r = run_cli("evidence", "verify", str(path), "--pubkey", str(case.pubkey))
    assert r.returncode == 3, (r.returncode, r.stderr)
    one_line_error(r)
    with pytest.raises(EvidenceError):
        verify_bundle(data, load_key(case.pubkey))


# -- re-signed forgeries: the lab key signs, but the content lies ---------------------------------


def proof_of(home: Path, index: int, size: int) -> list[str]:
    with Lab(home) as lab:
        leaves = lab.registry.leaf_hashes(size)
    return [base64.b64encode(h).decode() for h in inclusion_proof(leaves, index, size)]


@pytest.mark.parametrize("other", ["previous", "next", "genesis", "last"])
def test_grafted_inclusion_proof_fails_on_the_proof(case: Case, other: str) -> None:
    content = content_of(case)
    (claim,) = content["accusations"]
    index, size = claim["entry_index"], content["tree_size"]
    assert index == case.accused_entry
    donor = {"previous": index - 1, "next": index + 1, "genesis": 0, "last": size - 1}[other]
    assert donor != index
    grafted = proof_of(case.home, donor, size)
    assert grafted != claim["inclusion_proof"]
    claim["inclusion_proof"] = grafted
    with pytest.raises(EvidenceError, match="inclusion proof"):
        verify_bundle(resign(content, lab_keys(case.home)), load_key(case.pubkey))


def test_grafted_envelope_and_proof_of_another_copy_fails_on_the_proof(case: Case) -> None:
    """Entry B's genuine envelope and proof presented as entry A: every signature is valid."""
    content = content_of(case)
    (claim,) = content["accusations"]
    with Lab(case.home) as lab:
        (entry,) = lab.registry.log_entries(case.other_entry, case.other_entry + 1)
    claim["envelope"] = envelope(entry.payload, entry.key_id, entry.signature)
    claim["inclusion_proof"] = proof_of(case.home, case.other_entry, content["tree_size"])
    with pytest.raises(EvidenceError, match="inclusion proof"):
        verify_bundle(resign(content, lab_keys(case.home)), load_key(case.pubkey))


@pytest.mark.parametrize(("field", "value"), [("name", "Someone Else Ltd"), ("jurisdiction", "DE"),
                                              ("licensee_id", "lic-00000000")])
def test_scan_claiming_another_licensee_than_the_signed_entry_fails(case: Case, field: str, value: str) -> None:
    content = content_of(case)
    assert content["scan"]["accused"][0][field] != value
    content["scan"]["accused"][0][field] = value
    with pytest.raises(EvidenceError, match="signed"):
        verify_bundle(resign(content, lab_keys(case.home)), load_key(case.pubkey))


def test_accusation_moved_to_another_copy_fails_on_the_licensee(case: Case) -> None:
    """Point a consistent accusation (index, envelope, proof) at copy B while the scan names A."""
    content = content_of(case)
    (claim,) = content["accusations"]
    with Lab(case.home) as lab:
        (entry,) = lab.registry.log_entries(case.other_entry, case.other_entry + 1)
    claim["entry_index"] = case.other_entry
    content["scan"]["accused"][0]["entry_id"] = case.other_entry
    claim["envelope"] = envelope(entry.payload, entry.key_id, entry.signature)
    claim["inclusion_proof"] = proof_of(case.home, case.other_entry, content["tree_size"])
    with pytest.raises(EvidenceError, match="signed licensee_id"):
        verify_bundle(resign(content, lab_keys(case.home)), load_key(case.pubkey))


def test_accusation_pointing_at_a_licensee_entry_fails(case: Case) -> None:
    """A genuine, included entry that is not an issued copy is no evidence of issue."""
    content = content_of(case)
    (claim,) = content["accusations"]
    with Lab(case.home) as lab:
        licensee_entry = lab.registry.licensee(case.accused_id).entry_idx
        (entry,) = lab.registry.log_entries(licensee_entry, licensee_entry + 1)
    claim["entry_index"] = licensee_entry
    content["scan"]["accused"][0]["entry_id"] = licensee_entry
    claim["envelope"] = envelope(entry.payload, entry.key_id, entry.signature)
    claim["inclusion_proof"] = proof_of(case.home, licensee_entry, content["tree_size"])
    with pytest.raises(EvidenceError, match="not the issued-copy entry"):
        verify_bundle(resign(content, lab_keys(case.home)), load_key(case.pubkey))


def test_tree_size_not_matching_the_checkpoint_fails(case: Case) -> None:
    content = content_of(case)
    content["tree_size"] -= 1
    with pytest.raises(EvidenceError, match="checkpoint"):
        verify_bundle(resign(content, lab_keys(case.home)), load_key(case.pubkey))


# -- after a key rotation -------------------------------------------------------------------------


def test_bundle_after_rotation_verifies_with_the_new_key(case: Case, tmp_path: Path) -> None:
    home = copy_home(case.home, tmp_path / "rotated")
    old_pub = load_key(case.pubkey)
    with Lab(home) as lab:
        new = lab.rotate_keys()
        report = lab.scan(case.work / "copy-a")
        bundle = lab.evidence(report, tmp_path / "after.json")
        accused_key = lab.registry.entry(case.accused_entry).key_id
    assert accused_key != new.key_id  # the accused entry predates the rotation
    new_pub = tmp_path / "NEW.pub"
    r = run_cli("keys", "export-public", "--out", str(new_pub), home=home)
    assert r.returncode == 0, r.stderr
    assert new_pub.read_text().strip() == new.public_pem.strip()
    result = verify_bundle(bundle.read_bytes(), load_key(new_pub))
    assert [p["licensee_id"] for p in result.accused] == [case.accused_id]
    assert len(json.loads(bundle.read_bytes())["bundle"]["trust"]["keys"]) == 2
    r = run_cli("evidence", "verify", str(bundle), "--pubkey", str(new_pub))
    assert r.returncode == 0, r.stderr
    with pytest.raises(EvidenceError):  # signed by the new key, so the old one does not verify it
        verify_bundle(bundle.read_bytes(), old_pub)
