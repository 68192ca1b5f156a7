"""Rows edited behind the tool's back: `registry verify` names them, and no command acts on them.

One real lab (MiniLM registered, four licensees, three stamped copies) is built per module and
per backend (`module_registry_location`: SQLite and a throwaway PostgreSQL database); each case
copies its home (and its PostgreSQL database), runs the same SQL behind the tool's back
(tests/registry/rawdb.py: sqlite3 on the file, or a PostgreSQL superuser with the append-only
triggers bypassed), and runs the real CLI: in-process for the whole matrix (fast), and as a
subprocess (`run_cli`) for a sample.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LICENSEES, make_stamped_lab, run_cli
from tests.registry import rawdb
from weightmark import Lab
from weightmark.cli import main as cli_main
from weightmark.errors import RegistryError

QUIET = ("Quiet Holdings SARL", "FR")  # a licensee with no copies: its row can go without a foreign key


@dataclass
class World:
    home: Path
    copies: list[Path]
    ids: list[str]  # licensees with copies, in LICENSEES order
    names: list[str]
    quiet_id: str
    issued: list[int]  # entry of each copy, same order
    base: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, minilm: Path,
          module_registry_location: Callable[[], str | None]) -> World:
    work = tmp_path_factory.mktemp("tamper")
    stamped = make_stamped_lab(work, minilm, "F32", collusion=1, registry=module_registry_location())
    lab = stamped.lab
    quiet = lab.add_licensee(*QUIET).id
    issued = [c.entry_idx for c, _ in lab.registry.find_issued()]
    lab.close()
    return World(work / "lab", stamped.copies, stamped.ids, [n for n, _ in LICENSEES], quiet, issued, minilm)


def copy_home(world: World, tmp_path: Path) -> Path:
    return rawdb.copy_home(world.home, tmp_path / "home")


def edit(home: Path, *sql: str) -> None:
    """Change the database as someone with write access to it would: plain sqlite3 on the file,
    or a PostgreSQL superuser who switched the triggers off; one transaction."""
    with rawdb.raw_db(home) as db:
        for statement in sql:
            db.execute(statement)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the real CLI in this process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = 0
    try:
        cli_main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    return lines[0]


# Each case: (id, SQL run behind the tool's back, text the verify error must contain). Subqueries
# pick rows by what they are (first licensee with a copy, codeword 0, carrier 0) not by number.
LIC0 = "(SELECT licensee_id FROM issued_copies WHERE codeword_index = 0)"
LIC1 = "(SELECT licensee_id FROM issued_copies WHERE codeword_index = 1)"
QUIET_ROW = f"(SELECT id FROM licensees WHERE name = '{QUIET[0]}')"
COPY0 = "(SELECT entry_idx FROM issued_copies WHERE codeword_index = 0)"

LICENSEE_CASES = [
    ("licensees.id swapped", [f"UPDATE licensees SET id = 'tmp' WHERE id = {LIC0}",
                              f"UPDATE licensees SET id = {LIC0} WHERE id = {LIC1}",
                              f"UPDATE licensees SET id = {LIC1} WHERE id = 'tmp'"],
     "licensees row id="),
    ("licensees.id changed", [f"UPDATE licensees SET id = 'lic-00000000' WHERE id = {QUIET_ROW}"],
     "licensees row id=lic-00000000"),
    ("licensees.name", [f"UPDATE licensees SET name = 'Mallory Ltd' WHERE id = {LIC0}"],
     "name is Mallory Ltd but the signed entry"),
    ("licensees.jurisdiction", [f"UPDATE licensees SET jurisdiction = 'FR' WHERE id = {LIC0}"],
     "jurisdiction is FR but the signed entry"),
    ("licensees.email", [f"UPDATE licensees SET email = 'x@example.org' WHERE id = {LIC0}"],
     "email is x@example.org but the signed entry"),
    ("licensees.created_at", [f"UPDATE licensees SET created_at = '2020-01-01T00:00:00.000000Z' WHERE id = {LIC0}"],
     "created_at is 2020-01-01T00:00:00.000000Z"),
    ("licensees.entry_idx", [f"UPDATE licensees SET entry_idx = 0 WHERE id = {LIC0}"],
     "entry_idx is 0 but the signed entry"),
    ("licensees row deleted", [f"DELETE FROM licensees WHERE id = {QUIET_ROW}"], "(a deleted row)"),
    ("licensees row with copies deleted", [f"DELETE FROM licensees WHERE id = {LIC0}"],
     "refers to a licensees row that does not exist"),
    ("licensees row added", ["INSERT INTO licensees VALUES ('lic-deadbeef', 'Mallory Ltd', 'FR', NULL, "
                             "'2026-01-01T00:00:00.000000Z', 2)"],
     "licensees row id=lic-deadbeef: no signed licensee entry"),
]
MODEL_CASES = [
    ("models.model_id", ["UPDATE models SET model_id = 'ff' || substr(model_id, 3)"],
     "refers to a models row that does not exist"),
    ("models.name", ["UPDATE models SET name = 'other'"], "name is other but the signed entry"),
    ("models.base_path", ["UPDATE models SET base_path = '/tmp/elsewhere'"],
     "base_path is /tmp/elsewhere but the signed entry"),
    ("models.format", ["UPDATE models SET format = 'gguf'"], "format is gguf"),
    ("models.files", ["UPDATE models SET files = '{}'"], "files is {} but the signed entry"),
    ("models.created_at", ["UPDATE models SET created_at = '2020-01-01T00:00:00.000000Z'"], "created_at is 2020"),
    ("models.entry_idx", ["UPDATE models SET entry_idx = 2"], "entry_idx is 2 but the signed entry"),
    ("models row deleted", ["DELETE FROM models"], "refers to a models row that does not exist"),
    ("models row deleted with its carriers and copies", ["DELETE FROM carriers", "DELETE FROM issued_copies",
                                                        "DELETE FROM models"], "models: no row for model"),
    ("models row added", ["INSERT INTO models SELECT 'ab' || substr(model_id, 3), 'other', base_path, format, "
                          "files, created_at, entry_idx FROM models"], "no signed model entry has this model id"),
]
CARRIER_CASES = [
    ("carriers.model_id", ["UPDATE carriers SET model_id = 'ab' WHERE ordinal = 0"],
     "refers to a models row that does not exist"),
    ("carriers.ordinal", ["UPDATE carriers SET ordinal = -1 WHERE ordinal = 0",
                          "UPDATE carriers SET ordinal = 0 WHERE ordinal = 1",
                          "UPDATE carriers SET ordinal = 1 WHERE ordinal = -1"], "row-scale table digest"),
    ("carriers.name", ["UPDATE carriers SET name = name || '.x' WHERE ordinal = 3"], "row-scale table digest"),
    ("carriers.dtype", ["UPDATE carriers SET dtype = 'F16' WHERE ordinal = 3"], "row-scale table digest"),
    ("carriers.shape", ["UPDATE carriers SET shape = '[1, 1]' WHERE ordinal = 3"], "elements but the signed"),
    ("carriers.row_scale", ["UPDATE carriers SET row_scale = zeroblob(length(row_scale)) WHERE ordinal = 3"],
     "row-scale table digest"),
    ("carriers row deleted", ["DELETE FROM carriers WHERE ordinal = 5"], "ordinal is 6 but the signed entry 1"),
    ("carriers row added", ["INSERT INTO carriers SELECT model_id, 1000, name || '.extra', dtype, shape, row_scale "
                            "FROM carriers WHERE ordinal = 0"], ".extra): ordinal is 1000"),
]
ISSUED_CASES = [
    ("issued_copies.entry_idx", [f"UPDATE issued_copies SET entry_idx = 2 WHERE entry_idx = {COPY0}"],
     "issued_copies row entry_idx=2: signed entry 2 is a licensee entry"),
    ("issued_copies.model_id", ["UPDATE issued_copies SET model_id = 'ab' WHERE codeword_index = 0"],
     "refers to a models row that does not exist"),
    ("issued_copies.licensee_id", [f"UPDATE issued_copies SET licensee_id = {LIC1} WHERE codeword_index = 0"],
     "licensee_id is "),
    ("issued_copies.codeword_index", ["UPDATE issued_copies SET codeword_index = 100 WHERE codeword_index = 0",
                                      "UPDATE issued_copies SET codeword_index = 0 WHERE codeword_index = 1",
                                      "UPDATE issued_copies SET codeword_index = 1 WHERE codeword_index = 100"],
     "codeword_index is 1 but the signed entry"),
    ("issued_copies.scheme", ["UPDATE issued_copies SET scheme = replace(scheme, 'alpha=', 'alpha=1')"],
     "scheme is "),
    ("issued_copies.output_format", ["UPDATE issued_copies SET output_format = 'gguf:Q8_0' WHERE codeword_index = 1"],
     "output_format is gguf:Q8_0"),
    ("issued_copies.variant", ["UPDATE issued_copies SET variant = 'Q4' WHERE codeword_index = 1"], "variant is Q4"),
    ("issued_copies.out_path", ["UPDATE issued_copies SET out_path = '/forged-by-mallory' WHERE codeword_index = 1"],
     "out_path is /forged-by-mallory"),
    ("issued_copies.digest", ["UPDATE issued_copies SET digest = 'ab' WHERE codeword_index = 1"], "digest is ab"),
    ("issued_copies.issued_at", ["UPDATE issued_copies SET issued_at = '2020-01-01' WHERE codeword_index = 1"],
     "issued_at is 2020-01-01"),
    ("issued_copies.jurisdiction", ["UPDATE issued_copies SET jurisdiction = 'FR' WHERE codeword_index = 1"],
     "jurisdiction is FR"),
    ("issued_copies.policy", ["UPDATE issued_copies SET policy = '{\"tier\": \"open\"}' WHERE codeword_index = 1"],
     "policy is "),
    ("issued_copies row deleted", ["DELETE FROM issued_copies WHERE codeword_index = 0"],
     "no row for the issued copy of signed entry"),
    ("issued_copies row added", ["INSERT INTO issued_copies SELECT 4, model_id, licensee_id, 50, scheme, "
                                 "output_format, variant, out_path, digest, issued_at, jurisdiction, policy "
                                 "FROM issued_copies WHERE codeword_index = 1"],
     "issued_copies row entry_idx=4: signed entry 4 is a licensee entry, not an issued copy"),
]
# Tables the scan reads: every case above must stop it.
SCAN_CASES = LICENSEE_CASES + MODEL_CASES + CARRIER_CASES + ISSUED_CASES
OTHER_CASES = [
    ("entries.kind", [f"UPDATE entries SET kind = 'licensee' WHERE idx = {COPY0}"],
     "kind is licensee but the signed entry"),
    ("log_meta.origin", ["UPDATE log_meta SET value = 'weightmark.lab/other'"], "log_meta"),
    ("checkpoints.root", ["UPDATE checkpoints SET root = zeroblob(32) WHERE size = (SELECT MAX(size) FROM checkpoints)"],
     "root is not the root its signed note states"),
    ("checkpoints.frontier", ["UPDATE checkpoints SET frontier = (SELECT frontier FROM checkpoints WHERE size = 1)"
                              " WHERE size = (SELECT MAX(size) FROM checkpoints)"], "checkpoints row size="),
]


def ids(cases: list) -> list[str]:
    return [c[0] for c in cases]


def test_untampered_lab_verifies_and_scan_accuses_the_holder(world: World, tmp_path: Path, capsys) -> None:
    home = copy_home(world, tmp_path)
    code, out, err = cli(capsys, "registry", "verify", "--home", str(home))
    assert code == 0 and out.startswith("Log verified"), err
    code, out, err = cli(capsys, "scan", str(world.copies[0]), "--home", str(home), "--json")
    assert code == 0, err
    accused = [c["licensee_id"] for c in json.loads(out)["accused"]]
    assert accused == [world.ids[0]]


@pytest.mark.parametrize(("case", "sql", "named"), SCAN_CASES + OTHER_CASES, ids=ids(SCAN_CASES + OTHER_CASES))
def test_verify_names_the_tampered_row(world: World, tmp_path: Path, capsys, case: str, sql: list[str],
                                       named: str) -> None:
    home = copy_home(world, tmp_path)
    edit(home, *sql)
    code, out, err = cli(capsys, "registry", "verify", "--home", str(home))
    line = one_error_line(err)
    assert code == 4 and out == ""
    assert named in line, line
    # The library call raises the same class of error (exit 4), never returns.
    with Lab(home) as lab, pytest.raises(RegistryError):
        lab.verify_log()


@pytest.mark.parametrize(("case", "sql", "named"), SCAN_CASES, ids=ids(SCAN_CASES))
def test_scan_refuses_rather_than_naming_anyone_else(world: World, tmp_path: Path, capsys, case: str,
                                                     sql: list[str], named: str) -> None:
    home = copy_home(world, tmp_path)
    edit(home, *sql)
    code, out, err = cli(capsys, "scan", str(world.copies[0]), "--home", str(home))
    assert code == 4, (out, err)
    one_error_line(err)
    for other in [*world.names[1:], QUIET[0], "Mallory"]:
        assert other not in out + err


@pytest.mark.parametrize(("case", "sql", "named"), LICENSEE_CASES + ISSUED_CASES,
                         ids=ids(LICENSEE_CASES + ISSUED_CASES))
def test_lookups_refuse_a_tampered_row(world: World, tmp_path: Path, capsys, case: str, sql: list[str],
                                       named: str) -> None:
    """licensee list/show and registry find print only checked rows; a tampered one is exit 4."""
    home = copy_home(world, tmp_path)
    edit(home, *sql)
    for args in (["licensee", "list"], ["registry", "find"], ["registry", "find", "--jurisdiction", "GB"],
                 ["licensee", "show", world.ids[0]]):
        code, out, err = cli(capsys, *args, "--home", str(home))
        if code == 0:
            # A look-up that does not touch the edited row may answer, from checked rows only.
            assert "Mallory" not in out and "x@example.org" not in out and "/forged-by-mallory" not in out, (args, out)
            continue
        assert code == 4 and out == "", (args, out, err)
        one_error_line(err)


def test_find_by_jurisdiction_does_not_lose_a_copy_whose_row_moved(world: World, tmp_path: Path, capsys) -> None:
    """Editing a licensee's jurisdiction would hide their copies from `find --jurisdiction GB`."""
    home = copy_home(world, tmp_path)
    edit(home, f"UPDATE licensees SET jurisdiction = 'FR' WHERE id = {LIC0}")
    code, out, err = cli(capsys, "registry", "find", "--jurisdiction", "GB", "--home", str(home))
    assert code == 4 and out == "", out
    assert "licensees row id=" in one_error_line(err)


def test_show_refuses_an_entry_whose_kind_column_lies(world: World, tmp_path: Path, capsys) -> None:
    home = copy_home(world, tmp_path)
    edit(home, "UPDATE entries SET kind = 'model' WHERE idx = 2")
    code, out, err = cli(capsys, "registry", "show", "2", "--home", str(home))
    assert code == 4 and out == ""
    assert "entries row idx=2: kind is model but the signed entry 2 says licensee" in one_error_line(err)
    code, out, _ = cli(capsys, "registry", "show", "3", "--home", str(home))
    assert code == 0 and "signature valid" in out


def test_issued_row_moved_to_another_licensee_subprocess(world: World, tmp_path: Path) -> None:
    """The attack this guards against, through the real console entry point: codeword 0's row
    says another licensee got it."""
    home = copy_home(world, tmp_path)
    edit(home, f"UPDATE issued_copies SET licensee_id = {LIC1} WHERE codeword_index = 0")
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4 and r.stdout == ""
    line = one_error_line(r.stderr)
    assert line == (f"Error: issued_copies row entry_idx={world.issued[0]}: licensee_id is {world.ids[1]} "
                    f"but the signed entry {world.issued[0]} says {world.ids[0]}")
    r = run_cli("scan", str(world.copies[0]), home=home)
    assert r.returncode == 4 and r.stdout == ""
    assert one_error_line(r.stderr) == (f"Error: issued_copies row entry_idx={world.issued[0]}: licensee_id does not "
                                        f"match the signed entry {world.issued[0]}; `weightmark registry verify` "
                                        "shows the difference")
    assert world.names[1] not in r.stderr and world.ids[1] not in r.stderr
    r = run_cli("licensee", "show", world.ids[1], home=home)
    assert r.returncode == 4 and r.stdout == ""


def test_jurisdiction_edit_subprocess(world: World, tmp_path: Path) -> None:
    home = copy_home(world, tmp_path)
    edit(home, f"UPDATE licensees SET jurisdiction = 'US' WHERE id = {LIC0}")
    r = run_cli("licensee", "list", home=home)
    assert r.returncode == 4 and r.stdout == ""
    assert one_error_line(r.stderr) == (f"Error: licensees row id={world.ids[0]}: jurisdiction does not match the "
                                        "signed entry 2; `weightmark registry verify` shows the difference")
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4
    assert one_error_line(r.stderr) == (f"Error: licensees row id={world.ids[0]}: jurisdiction is US but the signed "
                                        "entry 2 says GB")


def test_each_signature_is_checked_once_per_registry(tmp_path: Path, registry_location: str | None) -> None:
    """Checked reads verify an entry's signature the first time it is read, then reuse it."""
    import time

    lab = Lab.init(tmp_path / "big", passphrase=None, registry=registry_location)
    for i in range(200):
        lab.add_licensee(f"Licensee {i}", "GB")
    lab.close()
    with Lab(tmp_path / "big") as lab:
        start = time.perf_counter()
        assert len(lab.registry.licensees()) == 200
        first = time.perf_counter() - start
        start = time.perf_counter()
        assert len(lab.registry.licensees()) == 200
        again = time.perf_counter() - start
        assert len(lab.registry._statements) == 200
    print(f"licensees(): first {first * 1e3:.1f} ms, again {again * 1e3:.1f} ms", file=sys.stderr)
    assert again < first


def test_checked_reads_follow_a_key_rotation_and_anchor_on_lab_pub(world: World, tmp_path: Path, capsys) -> None:
    home = copy_home(world, tmp_path)
    code, out, err = cli(capsys, "keys", "rotate", "--home", str(home))
    assert code == 0, err
    code, out, err = cli(capsys, "licensee", "list", "--home", str(home))
    assert code == 0 and len(out.splitlines()) == 4, err
    # Another lab's public key in this home: the log's key chain no longer ends in the anchor.
    other = Lab.init(tmp_path / "other", passphrase=None)
    other.close()
    shutil.copy(tmp_path / "other" / "lab.pub", home / "lab.pub")
    for args in (["licensee", "list"], ["scan", str(world.copies[0])], ["registry", "verify"]):
        code, out, err = cli(capsys, *args, "--home", str(home))
        assert code == 4 and out == "", (args, err)
        assert "lab.pub: is not the log's current signing key" in one_error_line(err)


def test_reads_see_entries_appended_after_the_first_read(world: World, tmp_path: Path) -> None:
    """The cached pass over the log is extended, not trusted stale, when rows name newer entries."""
    home = copy_home(world, tmp_path)
    with Lab(home) as reader, Lab(home) as writer:
        assert len(reader.registry.licensees()) == 4
        size = reader.registry.signed_index().size
        added = writer.add_licensee("Late Arrival GmbH", "DE")
        same = reader.add_licensee("Own Append Ltd", "GB")
        names = [lic.name for lic in reader.registry.licensees()]
        assert names[-2:] == ["Late Arrival GmbH", "Own Append Ltd"]
        assert reader.registry.signed_index().size == size + 2
        assert reader.registry.licensee(added.id).name == "Late Arrival GmbH"
        assert reader.registry.licensee(same.id).jurisdiction == "GB"
    edit(home, f"UPDATE licensees SET name = 'Mallory' WHERE id = '{added.id}'")
    with Lab(home) as lab, pytest.raises(RegistryError, match=f"licensees row id={added.id}: name does not match"):
        lab.registry.licensees()


def test_a_kind_column_edited_to_void_is_not_believed(world: World, tmp_path: Path, capsys) -> None:
    """Whether an issued copy was voided comes from signed void entries, not the kind column."""
    home = copy_home(world, tmp_path)
    edit(home, f"UPDATE entries SET kind = 'issue-void' WHERE idx = {world.issued[1]}")
    code, out, err = cli(capsys, "registry", "find", "--json", "--home", str(home))
    assert code == 0, err
    rows = json.loads(out)
    assert [r["entry_id"] for r in rows] == world.issued
    assert all(r.get("delivered", True) for r in rows)
    code, out, err = cli(capsys, "registry", "verify", "--home", str(home))
    assert code == 4 and f"entries row idx={world.issued[1]}: kind is issue-void" in one_error_line(err)
