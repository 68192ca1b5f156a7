"""The registry as a transparency log: verification, tampering, proofs, exports and key rotation.

Every test runs on both backends (`module_registry_location`: SQLite and a throwaway PostgreSQL
database). Tampering goes through tests/registry/rawdb.py: the same SQL edit on the SQLite file
or as a PostgreSQL superuser with the append-only triggers bypassed, then the same assertion.
Inherently SQLite-only cases (a physically truncated file) use a SQLite home and say so; tests
that read only export files run once, on the SQLite variant, and say so.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import run_cli
from tests.registry.rawdb import RawDB, copy_home, raw_db
from weightmark import Lab
from weightmark.cli import main as cli_main
from weightmark.errors import RegistryError, WeightmarkError
from weightmark.evidence import (
    CHECKPOINTS_FILE,
    ENTRIES_FILE,
    TRUST_FILE,
    EvidenceError,
    verify_export,
)
from weightmark.keys import NEXT_KEY_FILE, PUBLIC_KEY_FILE
from weightmark.registry.backend import LOCATION_FILE
from weightmark.registry.envelope import PAYLOAD_TYPE, canonical_json, pae, statement
from weightmark.registry.log import LogVerificationError, entry_bytes
from weightmark.registry.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion
from weightmark.registry.note import parse_note, sign_note, verify_note
from weightmark.registry.store import DB_FILE, now

LICENSEES = 12  # the small log: genesis (entry 0) + 12 licensees = entries 0..12
SIZE = LICENSEES + 1
COUNTRIES = ["GB", "DE", "JP", "FR", "US", "NL"]

Edit = Callable[[RawDB], None]
Location = Callable[[], str | None]


# -- fixtures and helpers -------------------------------------------------------------------------


def make_small_home(home: Path, location: str | None) -> Path:
    with Lab.init(home, passphrase=None, registry=location) as lab:
        for i in range(LICENSEES):
            lab.add_licensee(f"Licensee {i:02d} Ltd", COUNTRIES[i % len(COUNTRIES)])
    return home


@pytest.fixture(scope="module")
def small_home(tmp_path_factory: pytest.TempPathFactory, module_registry_location: Location) -> Path:
    """A closed lab home holding only licensee entries (fast to copy and to tamper with)."""
    return make_small_home(tmp_path_factory.mktemp("small") / "home", module_registry_location())


@pytest.fixture(scope="module")
def sqlite_small_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small home on SQLite only, for the cases that damage the database file itself."""
    return make_small_home(tmp_path_factory.mktemp("small-sqlite") / "home", None)


@pytest.fixture(scope="module")
def full_home(tmp_path_factory: pytest.TempPathFactory, minilm: Path, module_registry_location: Location) -> Path:
    """About 20 entries: licensees, the real MiniLM as a model, and one stamped copy."""
    work = tmp_path_factory.mktemp("full")
    home = work / "home"
    with Lab.init(home, passphrase=None, registry=module_registry_location()) as lab:
        ids = [lab.add_licensee(f"Full {i} GmbH", COUNTRIES[i % len(COUNTRIES)]).id for i in range(16)]
        lab.register_model(minilm, name="minilm")
        lab.stamp("minilm", ids[3], work / "copy")
    return home


def fresh_copy(src: Path, tmp_path: Path, name: str = "home") -> Path:
    """A copy of a home (with its own copy of a PostgreSQL database) or of an export folder."""
    return copy_home(src, tmp_path / name)


def edit_db(home: Path, edit: Edit) -> None:
    with raw_db(home) as db:
        edit(db)


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


def named(message: str) -> tuple[str, int]:
    """The first `entry N` / `checkpoint N` a verification message names."""
    m = re.search(r"\b(entry|checkpoint) (\d+)", message)
    assert m is not None, f"names no entry or checkpoint: {message!r}"
    return m.group(1), int(m.group(2))


def verify_cli(home: Path) -> subprocess.CompletedProcess[str]:
    """`weightmark registry verify` on the home: a real subprocess for a SQLite home; for a
    PostgreSQL home the same console entry point in this process (the same code, exit code and
    output, without a second interpreter start for every case)."""
    if not (home / LOCATION_FILE).exists():
        return run_cli("registry", "verify", "--home", str(home))
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(["registry", "verify", "--home", str(home)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess([], code, out.getvalue(), err.getvalue())


def assert_rejected(home: Path, what: str, number: int, cli: bool = True) -> str:
    """verify_log raises naming `what number`; the CLI exits 4 with that one-line error."""
    with Lab(home) as lab, pytest.raises(LogVerificationError) as info:
        lab.verify_log()
    message = str(info.value)
    assert named(message) == (what, number), message
    assert message.startswith(f"{what} {number}:"), message
    if cli:
        r = verify_cli(home)
        assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
        assert named(lines[0]) == (what, number), lines[0]
        assert r.stdout == ""
    return message


def read_entry(home: Path, idx: int) -> tuple[bytes, str, bytes]:
    with raw_db(home) as db:
        payload, key_id, signature = db.execute(
            "SELECT payload, key_id, signature FROM entries WHERE idx = ?", (idx,)).fetchone()
    return bytes(payload), key_id, bytes(signature)


def set_column(idx: int, column: str, value: bytes | str) -> Edit:
    def edit(db: RawDB) -> None:
        db.execute(f"UPDATE entries SET {column} = ? WHERE idx = ?", (value, idx))

    return edit


def flip_entry(idx: int, column: str, pos: int, mask: int = 0x01, reseal_leaf: bool = False) -> Edit:
    """Flip one byte of a stored entry column; optionally fix up its stored leaf hash too."""

    def edit(db: RawDB) -> None:
        payload, key_id, signature = db.execute(
            "SELECT payload, key_id, signature FROM entries WHERE idx = ?", (idx,)).fetchone()
        if column == "payload":
            payload = flip(payload, pos, mask)
        else:
            signature = flip(signature, pos, mask)
        db.execute("UPDATE entries SET payload = ?, signature = ? WHERE idx = ?", (payload, signature, idx))
        if reseal_leaf:
            db.execute("UPDATE entries SET leaf_hash = ? WHERE idx = ?",
                       (leaf_hash(entry_bytes(payload, key_id, signature)), idx))

    return edit


# -- a clean log verifies -------------------------------------------------------------------------


def test_fresh_lab_with_model_and_copy_verifies(full_home: Path) -> None:
    with Lab(full_home) as lab:
        kinds = [lab.registry.entry(i).kind for i in range(lab.registry.entry_count())]
        result = lab.verify_log()
    assert kinds[0] == "log-genesis" and "model" in kinds and "issued-copy" in kinds
    assert kinds.count("licensee") == 16
    assert result.size == len(kinds) >= 19
    assert result.checkpoints == result.size  # a signed checkpoint after every append
    r = run_cli("registry", "verify", "--json", home=full_home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["entries"] == result.size and doc["checkpoints"] == result.size
    assert base64.b64decode(doc["root"]) == result.root
    r = run_cli("registry", "verify", home=full_home)
    assert r.returncode == 0 and f"{result.size} entries" in r.stdout


def test_small_lab_verifies(small_home: Path) -> None:
    with Lab(small_home) as lab:
        assert lab.verify_log().size == SIZE


# -- tampering with entries -----------------------------------------------------------------------

# (entry, text inside the payload whose first byte is flipped); every flip keeps the JSON valid.
IN_VALUE_FLIPS = [
    (0, '"origin":"weightmark.lab/'),
    (0, '"key_id":"'),
    (0, '"created_at":"'),
    (1, '"legal_name":"'),
    (1, '"sha256":"'),
    (6, '"licensee_id":"lic-'),
    (6, '"log_index":'),
    (7, '"jurisdiction":"'),
    (12, '"legal_name":"Licensee 1'),
    (12, '"created_at":"2'),
]


@pytest.mark.parametrize(("idx", "anchor"), IN_VALUE_FLIPS)
def test_payload_byte_flip_names_the_entry(small_home: Path, tmp_path: Path, idx: int, anchor: str) -> None:
    home = fresh_copy(small_home, tmp_path)
    payload = read_entry(home, idx)[0]
    pos = payload.index(anchor.encode()) + len(anchor)
    flipped = flip(payload, pos)
    json.loads(flipped)  # still JSON: only the signature and the leaf can tell
    edit_db(home, set_column(idx, "payload", flipped))
    assert_rejected(home, "entry", idx)


@pytest.mark.parametrize(("idx", "anchor"), [(1, '"legal_name":"'), (9, '"created_at":"')])
def test_payload_flip_with_recomputed_leaf_fails_the_signature(
        small_home: Path, tmp_path: Path, idx: int, anchor: str) -> None:
    home = fresh_copy(small_home, tmp_path)
    pos = read_entry(home, idx)[0].index(anchor.encode()) + len(anchor)
    edit_db(home, flip_entry(idx, "payload", pos, reseal_leaf=True))
    assert "signature does not verify" in assert_rejected(home, "entry", idx)


def test_genesis_flip_at_edges_names_entry_zero(small_home: Path, tmp_path: Path) -> None:
    for pos in (0, -1):
        home = fresh_copy(small_home, tmp_path, f"home{pos}")
        edit_db(home, flip_entry(0, "payload", pos))
        assert_rejected(home, "entry", 0, cli=pos == 0)


@pytest.mark.parametrize(("idx", "pos"), [(1, 0), (6, -1), (12, 0), (12, -1)])
def test_payload_flip_breaking_json_names_the_entry(small_home: Path, tmp_path: Path, idx: int, pos: int) -> None:
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, flip_entry(idx, "payload", pos))
    assert_rejected(home, "entry", idx, cli=False)


def test_genesis_public_key_flip_names_entry_zero(small_home: Path, tmp_path: Path) -> None:
    home = fresh_copy(small_home, tmp_path)
    payload = read_entry(home, 0)[0]
    pos = payload.index(b"MCow") + 20  # inside the base64 of the raw key (after the 16-char prefix)
    other = b"B" if payload[pos:pos + 1] == b"A" else b"A"  # still base64, still a loadable key
    edit_db(home, set_column(0, "payload", payload[:pos] + other + payload[pos + 1:]))
    assert_rejected(home, "entry", 0, cli=False)


def test_random_payload_flips_are_always_detected(small_home: Path, tmp_path: Path) -> None:
    """Three seeded random positions (and random masks) in every entry: verification always fails."""
    rng = random.Random(1234)
    home = fresh_copy(small_home, tmp_path)
    originals = {i: read_entry(home, i)[0] for i in range(SIZE)}
    for idx, payload in originals.items():
        for pos in rng.sample(range(len(payload)), 3):
            edit_db(home, set_column(idx, "payload", flip(payload, pos, rng.randrange(1, 256))))
            with Lab(home) as lab, pytest.raises(LogVerificationError):
                lab.verify_log()
            edit_db(home, set_column(idx, "payload", payload))
    with Lab(home) as lab:
        assert lab.verify_log().size == SIZE  # restoring the bytes restores the log


# Hostile statements that are valid JSON but not weightmark statements (entry 4 rewritten).
HOSTILE_STATEMENTS = [{"predicateType": "no-slash", "predicate": {}}, [1, 2], "just a string"]


@pytest.mark.parametrize("hostile", HOSTILE_STATEMENTS, ids=["no-slash", "list", "string"])
def test_hostile_statement_in_the_database_is_a_clean_error(
        small_home: Path, tmp_path: Path, hostile: object) -> None:
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, set_column(4, "payload", canonical_json(hostile)))
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr
    assert_rejected(home, "entry", 4, cli=False)


@pytest.mark.parametrize(("idx", "pos"), [(0, 0), (0, 63), (4, 31), (12, 0), (12, 63)])
def test_signature_byte_flip_names_the_entry(small_home: Path, tmp_path: Path, idx: int, pos: int) -> None:
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, flip_entry(idx, "signature", pos))
    assert_rejected(home, "entry", idx)


@pytest.mark.parametrize("idx", [2, 12])
def test_signature_flip_with_recomputed_leaf_fails_the_signature(small_home: Path, tmp_path: Path, idx: int) -> None:
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, flip_entry(idx, "signature", 10, reseal_leaf=True))
    assert "signature does not verify" in assert_rejected(home, "entry", idx, cli=False)


def test_key_id_changed_names_the_entry(small_home: Path, tmp_path: Path) -> None:
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, set_column(5, "key_id", "00000000"))
    assert_rejected(home, "entry", 5)


def test_middle_entry_deleted(small_home: Path, tmp_path: Path) -> None:
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, lambda db: db.execute("DELETE FROM entries WHERE idx = 5"))
    assert "missing" in assert_rejected(home, "entry", 5)


def test_last_entry_row_deleted(small_home: Path, tmp_path: Path) -> None:
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, lambda db: db.execute("DELETE FROM entries WHERE idx = ?", (SIZE - 1,)))
    assert "removed" in assert_rejected(home, "checkpoint", SIZE)


def swap_rows(i: int, j: int, with_leaf: bool) -> Edit:
    cols = ["payload", "signature", "key_id"] + (["leaf_hash"] if with_leaf else [])

    def edit(db: RawDB) -> None:
        sql = f"SELECT {', '.join(cols)} FROM entries WHERE idx = ?"
        a, b = db.execute(sql, (i,)).fetchone(), db.execute(sql, (j,)).fetchone()
        update = f"UPDATE entries SET {', '.join(c + ' = ?' for c in cols)} WHERE idx = ?"
        db.execute(update, (*b, i))
        db.execute(update, (*a, j))

    return edit


@pytest.mark.parametrize(("i", "j"), [(3, 9), (1, 2), (11, 12)])
def test_two_entries_swapped(small_home: Path, tmp_path: Path, i: int, j: int) -> None:
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, swap_rows(i, j, with_leaf=False))
    assert_rejected(home, "entry", i)


def test_two_entries_swapped_with_their_leaves(small_home: Path, tmp_path: Path) -> None:
    """Every row stays self-consistent; only the signed log_index gives the swap away."""
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, swap_rows(3, 9, with_leaf=True))
    assert "signed for log index 9" in assert_rejected(home, "entry", 3)


def shift_up_from(k: int) -> Edit:
    def edit(db: RawDB) -> None:
        db.execute("UPDATE entries SET idx = -idx - 1 WHERE idx >= ?", (k,))
        db.execute("UPDATE entries SET idx = -idx WHERE idx < 0")

    return edit


def test_copied_entry_inserted_in_the_middle(small_home: Path, tmp_path: Path) -> None:
    home = fresh_copy(small_home, tmp_path)
    k = 6
    payload, key_id, signature = read_entry(home, k - 1)

    def edit(db: RawDB) -> None:
        shift_up_from(k)(db)
        db.execute("INSERT INTO entries VALUES (?, 'licensee', ?, ?, ?, ?, ?, ?)",
                   (k, PAYLOAD_TYPE, payload, key_id, signature, now(),
                    leaf_hash(entry_bytes(payload, key_id, signature))))

    edit_db(home, edit)
    assert f"signed for log index {k - 1}" in assert_rejected(home, "entry", k)


def test_resigned_entry_inserted_in_the_middle(small_home: Path, tmp_path: Path) -> None:
    """A row signed with the lab's own key for its new index: the old checkpoints catch it."""
    home = fresh_copy(small_home, tmp_path)
    k = 6
    with Lab(home) as lab:
        keys = lab.keys
    predicate = {"licensee_id": "lic-0badf00d", "legal_name": "Inserted Ltd", "jurisdiction": "GB",
                 "email": None, "created_at": now(), "log_index": k}
    digest = hashlib.sha256(canonical_json(predicate)).hexdigest()
    payload = canonical_json(statement("licensee", "lic-0badf00d", digest, predicate))
    signature = keys.sign(pae(PAYLOAD_TYPE, payload))

    def edit(db: RawDB) -> None:
        shift_up_from(k)(db)
        db.execute("INSERT INTO entries VALUES (?, 'licensee', ?, ?, ?, ?, ?, ?)",
                   (k, PAYLOAD_TYPE, payload, keys.key_id, signature, now(),
                    leaf_hash(entry_bytes(payload, keys.key_id, signature))))

    edit_db(home, edit)
    assert "root does not match" in assert_rejected(home, "checkpoint", k + 1)


@pytest.mark.parametrize("k", [1, 3])
def test_last_entries_deleted_but_checkpoints_kept(small_home: Path, tmp_path: Path, k: int) -> None:
    home = fresh_copy(small_home, tmp_path)
    edit_db(home, lambda db: db.execute("DELETE FROM entries WHERE idx >= ?", (SIZE - k,)))
    assert "removed" in assert_rejected(home, "checkpoint", SIZE - k + 1)


def test_truncated_prefix_verifies_but_an_earlier_export_exposes_it(small_home: Path, tmp_path: Path) -> None:
    """Dropping the last entries with their checkpoints leaves a valid shorter log; a checkpoint
    published before (an export) is of a size the log no longer reaches."""
    home = fresh_copy(small_home, tmp_path)
    assert run_cli("registry", "export", "--out", str(tmp_path / "published"), home=home).returncode == 0
    k = 4
    edit_db(home, lambda db: (db.execute("DELETE FROM entries WHERE idx >= ?", (SIZE - k,)),
                              db.execute("DELETE FROM checkpoints WHERE size > ?", (SIZE - k,)),
                              db.execute("DELETE FROM licensees WHERE entry_idx >= ?", (SIZE - k,)),
                              db.execute("DELETE FROM merkle_nodes WHERE ((idx + 1) << CAST(level AS INTEGER)) > ?", (SIZE - k,))))
    with Lab(home) as lab:
        assert lab.verify_log().size == SIZE - k  # undetectable from the database alone
    published = verify_export(tmp_path / "published")
    assert published.size == SIZE
    r = run_cli("registry", "consistency", str(published.size), "--json", home=home)
    assert r.returncode == 2 and f"<= {SIZE - k}" in r.stderr


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.9])
def test_physically_truncated_database_is_a_clear_error(sqlite_small_home: Path, tmp_path: Path,
                                                        fraction: float) -> None:
    """SQLite only: a database file cut short (PostgreSQL has no single file to truncate)."""
    home = fresh_copy(sqlite_small_home, tmp_path)
    db = home / DB_FILE
    assert not (home / (DB_FILE + "-wal")).exists()  # everything is in the main file
    os.truncate(db, int(db.stat().st_size * fraction))
    with pytest.raises(RegistryError):
        with Lab(home) as lab:
            lab.verify_log()
    r = run_cli("registry", "verify", home=home)
    assert r.returncode in (3, 4), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and DB_FILE in lines[0]


# -- tampering with checkpoints -------------------------------------------------------------------


def note_positions(note: bytes) -> dict[str, int]:
    body_end = note.index(b"\n\n")
    lines = note[:body_end].split(b"\n")
    size_at = len(lines[0]) + 1
    root_at = size_at + len(lines[1]) + 1
    sig_at = body_end + 2
    return {"origin": 0, "origin-end": size_at - 2, "size": size_at, "root": root_at + 5,
            "body-newline": body_end, "em-dash": sig_at, "key-name": sig_at + 5,
            "signature": len(note) - 20, "last": len(note) - 1}


@pytest.mark.parametrize("size", [1, 7, SIZE])
@pytest.mark.parametrize("where", ["origin", "origin-end", "size", "root", "body-newline", "em-dash",
                                   "key-name", "signature", "last"])
def test_checkpoint_note_byte_flip(small_home: Path, tmp_path: Path, size: int, where: str) -> None:
    home = fresh_copy(small_home, tmp_path)

    def edit(db: RawDB) -> None:
        (note,) = db.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        db.execute("UPDATE checkpoints SET note = ? WHERE size = ?",
                   (flip(note, note_positions(note)[where]), size))

    edit_db(home, edit)
    assert_rejected(home, "checkpoint", size, cli=where in ("root", "signature"))


@pytest.mark.parametrize("size", [1, 7, SIZE])
def test_checkpoint_signed_by_another_key(small_home: Path, tmp_path: Path, size: int) -> None:
    home = fresh_copy(small_home, tmp_path)

    def edit(db: RawDB) -> None:
        (note,) = db.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        body = note[: note.index(b"\n\n") + 1]
        origin = body.split(b"\n", 1)[0].decode()
        forged = sign_note(body, [(origin, Ed25519PrivateKey.generate())])
        assert forged != note and forged.startswith(body)
        db.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (forged, size))

    edit_db(home, edit)
    assert "no signature by a trusted key" in assert_rejected(home, "checkpoint", size)


def test_extra_signature_by_an_unknown_key_is_ignored(small_home: Path, tmp_path: Path) -> None:
    """C2SP: a note co-signed by a key nobody trusts still verifies (the check can pass)."""
    home = fresh_copy(small_home, tmp_path)

    def edit(db: RawDB) -> None:
        (note,) = db.execute("SELECT note FROM checkpoints WHERE size = 5").fetchone()
        body = note[: note.index(b"\n\n") + 1]
        witness = sign_note(body, [("some-witness", Ed25519PrivateKey.generate())])
        db.execute("UPDATE checkpoints SET note = ? WHERE size = 5", (note + witness[len(body) + 1:],))

    edit_db(home, edit)
    with Lab(home) as lab:
        assert lab.verify_log().size == SIZE


# -- proofs -----------------------------------------------------------------------------------------


def b64d(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@pytest.mark.parametrize("which", ["first", "second", "middle", "last"])
def test_inclusion_proof_from_cli_verifies(full_home: Path, which: str) -> None:
    with Lab(full_home) as lab:
        size, root, note = lab.registry.latest_checkpoint()
        trust = lab.trust()
        index = {"first": 0, "second": 1, "middle": size // 2, "last": size - 1}[which]
        (entry,) = lab.registry.log_entries(index, index + 1)
    r = run_cli("registry", "proof", str(index), "--json", home=full_home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["entry_id"] == index and doc["tree_size"] == size
    checkpoint = verify_note(doc["checkpoint"].encode(), trust.note_keys(size), origin=trust.origin)
    assert checkpoint.root == root == b64d(doc["root"]) and checkpoint.size == size
    leaf = b64d(doc["leaf_hash"])
    assert leaf == leaf_hash(entry.data)
    proof = [b64d(h) for h in doc["proof"]]
    verify_inclusion(leaf, index, size, proof, checkpoint.root)
    with pytest.raises(ProofError):  # the same check rejects a wrong leaf or a wrong node
        verify_inclusion(leaf_hash(b"another entry"), index, size, proof, checkpoint.root)
    if proof:
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, size, [flip(proof[0], 0), *proof[1:]], checkpoint.root)


@pytest.mark.parametrize(("old", "new"), [(1, None), (5, 12), (7, 8), (8, 8), (16, None)])
def test_consistency_proof_from_cli_verifies(full_home: Path, old: int, new: int | None) -> None:
    with Lab(full_home) as lab:
        latest = lab.registry.latest_checkpoint()[0]
        trust = lab.trust()
    target = latest if new is None else new
    args = [str(old)] + ([] if new is None else [str(new)])
    r = run_cli("registry", "consistency", *args, "--json", home=full_home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["old_size"], doc["new_size"]) == (old, target)
    with Lab(full_home) as lab:
        old_note = lab.registry.checkpoint(old)[1]
    assert parse_note(old_note)[0].root == b64d(doc["old_root"])
    new_cp = verify_note(doc["new_checkpoint"].encode(), trust.note_keys(target), origin=trust.origin)
    assert new_cp.root == b64d(doc["new_root"]) and new_cp.size == target
    proof = [b64d(h) for h in doc["proof"]]
    verify_consistency(old, target, proof, b64d(doc["old_root"]), new_cp.root)
    if old < target:
        with pytest.raises(ProofError):
            verify_consistency(old, target, proof, hashlib.sha256(b"other").digest(), new_cp.root)


@pytest.mark.parametrize("args", [["0", "5"], ["6", "5"], ["1", "999"], ["999"], ["-1", "5"]])
def test_consistency_bad_sizes_exit_2(full_home: Path, args: list[str]) -> None:
    r = run_cli("registry", "consistency", *args, home=full_home)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("args", [["999"], ["-1"], ["abc"]])
def test_proof_bad_entry_exit_2(full_home: Path, args: list[str]) -> None:
    r = run_cli("registry", "proof", *args, home=full_home)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""


# -- exports --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(full_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "log"
    r = run_cli("registry", "export", "--out", str(out), home=full_home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    return out


@pytest.fixture
def export_files(exported: Path, full_home: Path) -> Path:
    """The export, for tests that read only its files (no registry): they run once, on the SQLite
    variant; the export from each backend is verified by test_export_verifies_without_any_home."""
    if (full_home / LOCATION_FILE).exists():
        pytest.skip("reads only an export's files; the backend plays no part")
    return exported


def no_home_env(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "nothing-here"
    empty.mkdir(exist_ok=True)
    return {"HOME": str(empty), "XDG_DATA_HOME": str(empty)}


def test_export_verifies_without_any_home(exported: Path, full_home: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == sorted([ENTRIES_FILE, CHECKPOINTS_FILE, TRUST_FILE])
    with Lab(full_home) as lab:
        size = lab.registry.entry_count()
    r = run_cli("registry", "verify", "--from", str(exported), "--json", env=no_home_env(tmp_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["entries"] == size and doc["checkpoints"] == size
    assert not any((tmp_path / "nothing-here").iterdir())  # no home was created
    trust = tmp_path / "trust.json"
    assert run_cli("keys", "trust", "--out", str(trust), home=full_home).returncode == 0
    r = run_cli("registry", "verify", "--from", str(exported), "--trust", str(trust), env=no_home_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert verify_export(exported, trust).size == size


def export_lines(folder: Path, name: str) -> list[bytes]:
    return (folder / name).read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("name", [ENTRIES_FILE, CHECKPOINTS_FILE])
def test_any_line_of_an_export_tampered_fails(export_files: Path, tmp_path: Path, name: str) -> None:
    rng = random.Random(name)
    lines = export_lines(export_files, name)
    assert len(lines) >= 19
    copy = tmp_path / "copy"
    for number, line in enumerate(lines):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(export_files, copy)
        pos = rng.randrange(len(line) - 1)  # any byte but the newline
        tampered = lines[:number] + [flip(line, pos, rng.randrange(1, 256))] + lines[number + 1:]
        (copy / name).write_bytes(b"".join(tampered))
        with pytest.raises((EvidenceError, LogVerificationError)):
            verify_export(copy)
        if number in (0, len(lines) // 2, len(lines) - 1):
            r = run_cli("registry", "verify", "--from", str(copy), env=no_home_env(tmp_path))
            assert r.returncode in (3, 4), (number, r.returncode, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("Error: ")


@pytest.mark.parametrize(("name", "number"), [(ENTRIES_FILE, 0), (ENTRIES_FILE, 4), (ENTRIES_FILE, -1),
                                               (CHECKPOINTS_FILE, -1)])
def test_export_line_dropped_fails(export_files: Path, tmp_path: Path, name: str, number: int) -> None:
    copy = fresh_copy(export_files, tmp_path, "copy")
    lines = export_lines(export_files, name)
    del lines[number]
    (copy / name).write_bytes(b"".join(lines))
    with pytest.raises(LogVerificationError):
        verify_export(copy)


@pytest.mark.parametrize("hostile", HOSTILE_STATEMENTS, ids=["no-slash", "list", "string"])
def test_hostile_statement_in_an_export_is_a_clean_error(export_files: Path, tmp_path: Path, hostile: object) -> None:
    copy = fresh_copy(export_files, tmp_path, "copy")
    lines = export_lines(export_files, ENTRIES_FILE)
    row = json.loads(lines[4])
    row["envelope"]["payload"] = base64.b64encode(canonical_json(hostile)).decode()
    lines[4] = canonical_json(row) + b"\n"
    (copy / ENTRIES_FILE).write_bytes(b"".join(lines))
    r = run_cli("registry", "verify", "--from", str(copy), env=no_home_env(tmp_path))
    assert r.returncode in (3, 4) and "Traceback" not in r.stderr, r.stderr
    with pytest.raises((EvidenceError, LogVerificationError)):
        verify_export(copy)


def test_export_without_an_intermediate_checkpoint_still_verifies(export_files: Path, tmp_path: Path) -> None:
    """Only the checkpoint over the whole log is required; dropping an older one falsifies nothing."""
    copy = fresh_copy(export_files, tmp_path, "copy")
    lines = export_lines(export_files, CHECKPOINTS_FILE)
    del lines[4]
    (copy / CHECKPOINTS_FILE).write_bytes(b"".join(lines))
    result = verify_export(copy)
    assert result.checkpoints == len(lines) and result.size == len(lines) + 1


def test_export_with_another_labs_trust_fails(export_files: Path, small_home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-trust.json"
    assert run_cli("keys", "trust", "--out", str(other), home=small_home).returncode == 0
    r = run_cli("registry", "verify", "--from", str(export_files), "--trust", str(other), env=no_home_env(tmp_path))
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "trust" in r.stderr
    with pytest.raises(LogVerificationError):
        verify_export(export_files, other)
    # The same attack through the export's own trust file.
    copy = fresh_copy(export_files, tmp_path, "copy")
    shutil.copy(other, copy / TRUST_FILE)
    with pytest.raises(LogVerificationError):
        verify_export(copy)


# -- key rotation ---------------------------------------------------------------------------------


def signature_lines(note: bytes) -> list[bytes]:
    return note[note.index(b"\n\n") + 2:].splitlines()


def test_rotation_keeps_old_entries_valid_and_signs_new_ones_with_the_new_key(
        small_home: Path, tmp_path: Path) -> None:
    home = fresh_copy(small_home, tmp_path)
    with Lab(home) as lab:
        old = lab.keys
        new = lab.rotate_keys()
        assert new.key_id != old.key_id and new.master_secret == old.master_secret
        later = [lab.add_licensee(f"After {i}", "FR").entry_idx for i in range(3)]
        result = lab.verify_log()
        reg = lab.registry
        rot = SIZE  # the rotation is the entry right after the small log
        assert reg.entry(rot).kind == "key-rotation"
        assert [reg.entry(i).key_id for i in range(rot + 1)] == [old.key_id] * (rot + 1)
        assert later == [rot + 1, rot + 2, rot + 3]
        assert {reg.entry(i).key_id for i in later} == {new.key_id}
        notes = dict(reg.checkpoints())
        trust = lab.trust()
    assert result.size == rot + 4 and [k.key_id for k in result.trust.keys] == [old.key_id, new.key_id]
    assert len(signature_lines(notes[rot + 1])) == 2  # the handover checkpoint: both keys
    assert all(len(signature_lines(n)) == 1 for s, n in notes.items() if s != rot + 1)
    handover = trust.note_keys(rot + 1)
    assert len(handover) == 2
    for key_id, value in handover.items():  # each of the two signatures verifies on its own
        assert verify_note(notes[rot + 1], {key_id: value}, origin=trust.origin).size == rot + 1
    (k0, k1) = trust.keys
    assert (k0.valid_from, k0.valid_until, k1.valid_from, k1.valid_until) == (0, rot + 1, rot + 1, None)
    assert (home / PUBLIC_KEY_FILE).read_text().strip() == new.public_pem.strip()
    assert not (home / NEXT_KEY_FILE).exists()


def test_new_key_cannot_sign_before_the_rotation(small_home: Path, tmp_path: Path) -> None:
    """A pre-rotation entry re-signed by the new key is refused: keys only cover their range."""
    home = fresh_copy(small_home, tmp_path)
    with Lab(home) as lab:
        new = lab.rotate_keys()
    payload = read_entry(home, 4)[0]
    signature = new.sign(pae(PAYLOAD_TYPE, payload))
    edit_db(home, lambda db: db.execute(
        "UPDATE entries SET key_id = ?, signature = ?, leaf_hash = ? WHERE idx = 4",
        (new.key_id, signature, leaf_hash(entry_bytes(payload, new.key_id, signature)))))
    assert "not valid for that index" in assert_rejected(home, "entry", 4, cli=False)


def crash_rotation(home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """rotate_keys with _finish_rotation failing once: the log has the rotation, the files do not."""
    calls = {"n": 0}
    real = Lab._finish_rotation

    def crash_once(self: Lab) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("simulated crash before the key file was replaced")
        real(self)

    with Lab(home) as lab:
        old = lab.keys.key_id
        monkeypatch.setattr(Lab, "_finish_rotation", crash_once)
        with pytest.raises(OSError, match="simulated crash"):
            lab.rotate_keys()
        new = lab.trust().current.key_id
    monkeypatch.setattr(Lab, "_finish_rotation", real)
    assert calls["n"] == 1 and old != new
    assert (home / NEXT_KEY_FILE).exists()
    return old, new


def test_interrupted_rotation_completes_when_the_keys_are_next_used(
        small_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = fresh_copy(small_home, tmp_path)
    _old, new = crash_rotation(home, monkeypatch)
    with Lab(home) as lab:
        assert lab.keys.key_id == new
        assert not (home / NEXT_KEY_FILE).exists()
        lab.verify_log()
        idx = lab.add_licensee("After the crash", "DE").entry_idx
        assert lab.registry.entry(idx).key_id == new
        assert lab.verify_log().size == SIZE + 2


def test_interrupted_rotation_completes_on_opening_a_new_lab(
        small_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = fresh_copy(small_home, tmp_path)
    _old, new = crash_rotation(home, monkeypatch)
    with Lab(home) as lab:
        result = lab.verify_log()
    assert result.trust.current.key_id == new


def test_rotation_crash_before_the_log_append_drops_the_pending_key(
        small_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = fresh_copy(small_home, tmp_path)
    from weightmark.registry.store import Registry

    def fail(*args: object, **kwargs: object) -> int:
        raise OSError("simulated crash before the log append")

    monkeypatch.setattr(Registry, "rotate_key", fail)
    with Lab(home) as lab:
        old = lab.keys.key_id
        with pytest.raises(OSError):
            lab.rotate_keys()
    monkeypatch.undo()
    assert (home / NEXT_KEY_FILE).exists()
    with Lab(home) as lab:
        assert lab.keys.key_id == old
        assert not (home / NEXT_KEY_FILE).exists()
        assert lab.verify_log().size == SIZE


# -- licensee ids --------------------------------------------------------------------------------


def scripted_token_hex(monkeypatch: pytest.MonkeyPatch, values: list[str]) -> None:
    """Make the registry's random licensee ids come from `values`, in order."""
    import weightmark.registry.store as store

    queue = list(values)
    monkeypatch.setattr(store.secrets, "token_hex", lambda n=None: queue.pop(0))


def test_a_colliding_licensee_id_leaves_the_log_intact(
        small_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = fresh_copy(small_home, tmp_path)
    scripted_token_hex(monkeypatch, ["deadbeef", "deadbeef", "cafef00d"])
    with Lab(home) as lab:
        lab.add_licensee("First Ltd", "GB")
        try:  # retried or refused: either way nothing may be half-written
            lab.add_licensee("Second Ltd", "DE")
            added = 1
        except Exception:
            added = 0
        assert lab.registry.entry_count() == SIZE + 1 + added
        assert len(lab.registry.licensees()) == LICENSEES + 1 + added
        assert lab.verify_log().size == SIZE + 1 + added


def test_a_colliding_licensee_id_is_retried(
        small_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = fresh_copy(small_home, tmp_path)
    scripted_token_hex(monkeypatch, ["deadbeef", "deadbeef", "cafef00d", "0badc0de"])
    with Lab(home) as lab:
        first = lab.add_licensee("First Ltd", "GB")
        second = lab.add_licensee("Second Ltd", "DE")
        assert first.id != second.id
        assert lab.verify_log().size == SIZE + 2


def test_verification_errors_are_registry_errors() -> None:
    assert issubclass(LogVerificationError, RegistryError)
    assert LogVerificationError("x").exit_code == 4
    assert issubclass(EvidenceError, WeightmarkError) and EvidenceError("f", "p").exit_code == 3
