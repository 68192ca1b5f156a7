"""A registry file that is not a healthy weightmark registry is refused, and left byte-identical.

Every command that opens the registry is run (in-process, and `registry verify` also as a
subprocess) against: an empty file, a text file, a foreign SQLite database, a weightmark
registry from a newer schema, and one with a corrupted page.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.registry.test_tamper import cli, one_error_line
from weightmark import Lab
from weightmark.errors import RegistryError
from weightmark.registry.store import DB_FILE, Registry


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("file") / "lab"
    lab = Lab.init(home, passphrase=None)
    for i in range(40):
        lab.add_licensee(f"Licensee {i} " + "x" * 200, "GB")
    lab.close()
    assert not (home / (DB_FILE + "-wal")).exists()
    return home


def empty(db: Path) -> None:
    db.write_bytes(b"")


def text(db: Path) -> None:
    db.write_text("licensee,jurisdiction\nAcme,GB\n")


def foreign(db: Path) -> None:
    db.unlink()
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    con.execute("INSERT INTO invoices VALUES (1, 9.5)")
    con.commit()
    con.close()


def foreign_table_added(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.commit()
    con.close()


def future(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("INSERT INTO schema_migrations VALUES (99, '2030-01-01T00:00:00Z')")
    con.commit()
    con.close()


def corrupted(db: Path) -> None:
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) >= 6 * page
    data[3 * page : 5 * page] = bytes([0xA5]) * (2 * page)  # two b-tree pages of garbage
    db.write_bytes(bytes(data))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "empty": empty, "text": text, "foreign": foreign, "foreign-table-added": foreign_table_added,
    "future-schema": future, "corrupted-page": corrupted,
}
EXPECTED = {
    "empty": "empty file (0 bytes)", "text": "not an SQLite database", "foreign": "schema_migrations",
    "foreign-table-added": "table 'notes'", "future-schema": "schema version 99 is newer",
    "corrupted-page": "the database is corrupted",
}


def damaged_home(healthy: Path, tmp_path: Path, kind: str) -> Path:
    home = tmp_path / "home"
    shutil.copytree(healthy, home)
    DAMAGE[kind](home / DB_FILE)
    return home


def snapshot(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(home.iterdir()) if p.is_file()}


def commands(home: Path, tmp_path: Path, minilm: Path) -> list[list[str]]:
    return [
        ["registry", "verify"], ["registry", "show", "1"], ["registry", "find"], ["registry", "proof", "1"],
        ["registry", "consistency", "1"], ["registry", "export", "--out", str(tmp_path / "export")],
        ["licensee", "list"], ["licensee", "show", "lic-00000000"], ["licensee", "add", "New Ltd", "--jurisdiction", "GB"],
        ["model", "list"], ["model", "relocate", "minilm", str(minilm)],
        ["model", "register", str(minilm), "--name", "minilm2"],
        ["stamp", "minilm", "--licensee", "lic-00000000", "--out", str(tmp_path / "copy")],
        ["scan", str(minilm)], ["keys", "trust", "--out", str(tmp_path / "trust.json")], ["keys", "rotate"],
    ]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_command_refuses_and_writes_nothing(healthy: Path, tmp_path: Path, minilm: Path, capsys,
                                                  kind: str) -> None:
    home = damaged_home(healthy, tmp_path, kind)
    before = snapshot(home)
    for args in [*commands(home, tmp_path, minilm), ["init", "--insecure-no-passphrase"]]:
        code, out, err = cli(capsys, *args, "--home", str(home))
        assert code == 4, (args, code, out, err)
        if args[0] == "init":  # init warns about the unencrypted keys it was asked for first
            err = err.split("\n", 1)[1]
        line = one_error_line(err)
        assert DB_FILE in line and (EXPECTED[kind] in line or args[0] == "init"), (args, line)
        assert out == ""
        assert snapshot(home) == before, args  # the database and every other file in the home
    assert not any((tmp_path / name).exists() for name in ("export", "copy", "trust.json"))


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_registry_verify_subprocess(healthy: Path, tmp_path: Path, kind: str) -> None:
    home = damaged_home(healthy, tmp_path, kind)
    before = (home / DB_FILE).read_bytes()
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4 and r.stdout == ""
    assert DB_FILE in one_error_line(r.stderr)
    assert (home / DB_FILE).read_bytes() == before


def test_foreign_sqlite_file_gets_no_schema(tmp_path: Path) -> None:
    """Opening is what used to write our schema into any SQLite file; now only create() does."""
    db = tmp_path / DB_FILE
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(RegistryError, match="schema_migrations"):
        Registry(db)
    assert db.read_bytes() == before
    with pytest.raises(RegistryError, match="already there"):
        Registry.create(tmp_path)
    assert db.read_bytes() == before


def test_healthy_registry_still_opens(healthy: Path, tmp_path: Path, capsys) -> None:
    home = tmp_path / "home"
    shutil.copytree(healthy, home)
    code, out, err = cli(capsys, "licensee", "list", "--home", str(home))
    assert code == 0 and len(out.splitlines()) == 40, err
