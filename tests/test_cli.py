"""The command line as a user meets it: help, JSON shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from tests.conftest import run_cli
from weightmark.cli.app import app


def all_commands() -> list[list[str]]:
    group = typer.main.get_command(app)
    found = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            found.append(path)

    walk(group, [])
    return found


def test_every_command_has_help_with_an_example() -> None:
    from typer.testing import CliRunner

    commands = all_commands()
    assert {"init", "stamp", "scan"} <= {c[0] for c in commands}
    for path in commands:
        result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, path
        assert "Example" in result.output, f"{' '.join(path)} --help has no example"


@pytest.fixture(scope="module")
def cli_lab(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> dict:
    work = tmp_path_factory.mktemp("cli")
    home = work / "home"
    r = run_cli("init", "--insecure-no-passphrase", "--home", str(home))
    assert r.returncode == 0, r.stderr
    assert "UNENCRYPTED" in r.stderr
    r = run_cli("model", "register", str(minilm), "--name", "minilm", home=home)
    assert r.returncode == 0, r.stderr
    ids = {}
    for name, cc in [("Acme Research Ltd", "GB"), ("Beta KI GmbH", "DE")]:
        r = run_cli("licensee", "add", name, "--jurisdiction", cc, "--email", "ops@example.org", home=home)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().startswith("lic-") and len(r.stdout.strip().splitlines()) == 1
        ids[cc] = r.stdout.strip()
    r = run_cli("stamp", "minilm", "--licensee", ids["DE"], "--out", str(work / "de-copy"), home=home)
    assert r.returncode == 0, r.stderr
    return {"home": home, "work": work, "ids": ids}


def test_licensee_list_json(cli_lab) -> None:
    r = run_cli("licensee", "list", "--json", home=cli_lab["home"])
    rows = json.loads(r.stdout)
    assert {(x["id"], x["jurisdiction"]) for x in rows} == {(v, k) for k, v in cli_lab["ids"].items()}
    assert all({"id", "name", "jurisdiction"} <= set(x) for x in rows)


def test_scan_json_shape_and_accusation(cli_lab) -> None:
    r = run_cli("scan", str(cli_lab["work"] / "de-copy"), "--json", home=cli_lab["home"])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {"model", "scheme", "watermark_present", "accused", "candidates", "threshold"} <= set(doc)
    assert {"statistic", "p_value"} <= set(doc["watermark_present"])
    assert doc["model"] == "minilm" and doc["scheme"].startswith("tardos-v2;L=") and ";alpha=0.002;c=8;" in doc["scheme"]
    (who,) = doc["accused"]
    assert who["licensee_id"] == cli_lab["ids"]["DE"] and who["jurisdiction"] == "DE"
    assert {"licensee_id", "name", "jurisdiction", "entry_id", "score", "p_value", "family_wise_p_value"} <= set(who)
    assert who["family_wise_p_value"] <= 1e-12
    assert len(doc["candidates"]) == 1  # one copy issued so far: one codeword to score


def test_scan_of_base_exits_zero_and_accuses_nobody(cli_lab, minilm: Path) -> None:
    r = run_cli("scan", str(minilm), "--model", "minilm", "--json", home=cli_lab["home"])
    assert r.returncode == 0
    assert json.loads(r.stdout)["accused"] == []


def test_registry_show_and_find(cli_lab) -> None:
    r = run_cli("registry", "find", "--jurisdiction", "DE", "--json", home=cli_lab["home"])
    (row,) = json.loads(r.stdout)
    assert row["licensee_id"] == cli_lab["ids"]["DE"] and row["model"] == "minilm"
    assert json.loads(run_cli("registry", "find", "--jurisdiction", "GB", "--json", home=cli_lab["home"]).stdout) == []
    assert len(json.loads(run_cli("registry", "find", "--model", "minilm", "--json", home=cli_lab["home"]).stdout)) == 1
    r = run_cli("registry", "show", str(row["entry_id"]), "--json", home=cli_lab["home"])
    doc = json.loads(r.stdout)
    assert doc["signature"] == "valid" and doc["kind"] == "issued-copy"
    pred = doc["statement"]["predicate"]
    assert pred["licensee_id"] == cli_lab["ids"]["DE"] and pred["scheme"].startswith("tardos-v2;")


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["licensee", "add", "X", "--jurisdiction", "UK"], 2, "GB"),
        (["licensee", "add", "X", "--jurisdiction", "gb"], 2, "alpha-2"),
        (["licensee", "add", "X", "--jurisdiction", "ZZ"], 2, "ZZ"),
        (["stamp", "minilm", "--licensee", "lic-nobody", "--out", "x"], 4, "lic-nobody"),
        (["stamp", "nomodel", "--licensee", "lic-nobody", "--out", "x"], 4, "nomodel"),
        (["scan", "/nonexistent/suspect"], 3, "/nonexistent/suspect"),
        (["registry", "show", "999"], 4, "999"),
        (["model", "register", "/nonexistent/model", "--name", "m"], 3, "/nonexistent/model"),
        (["scan"], 2, ""),
    ],
)
def test_errors_are_one_line_with_the_right_exit_code(cli_lab, args, code, needle) -> None:
    r = run_cli(*args, home=cli_lab["home"])
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    if code != 2 or needle:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], r.stderr


def test_stamp_refuses_to_overwrite(cli_lab) -> None:
    out = cli_lab["work"] / "de-copy"
    before = sorted(p.name for p in out.iterdir())
    r = run_cli("stamp", "minilm", "--licensee", cli_lab["ids"]["GB"], "--out", str(out), home=cli_lab["home"])
    assert r.returncode == 3 and "already exists" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_no_home_is_a_registry_error(tmp_path: Path) -> None:
    r = run_cli("licensee", "list", home=tmp_path / "empty")
    assert r.returncode == 4 and r.stderr.startswith("Error: ")


def test_passphrase_protected_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = run_cli("init", "--home", str(home))  # no passphrase, no terminal
    assert r.returncode == 4 and "WEIGHTMARK_PASSPHRASE" in r.stderr
    secret = {"WEIGHTMARK_PASSPHRASE": "correct horse battery"}
    assert run_cli("init", "--home", str(home), env=secret).returncode == 0
    key_file = home / "lab-keys.json"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert "ciphertext" in key_file.read_text() and "secret" not in json.loads(key_file.read_text())
    assert run_cli("licensee", "add", "A", "--jurisdiction", "FR", home=home, env=secret).returncode == 0
    wrong = run_cli("licensee", "add", "B", "--jurisdiction", "FR", home=home, env={"WEIGHTMARK_PASSPHRASE": "wrong one!"})
    assert wrong.returncode == 4 and "wrong passphrase" in wrong.stderr
    missing = run_cli("licensee", "add", "B", "--jurisdiction", "FR", home=home)
    assert missing.returncode == 4 and "WEIGHTMARK_PASSPHRASE" in missing.stderr
    again = run_cli("init", "--home", str(home), env=secret)
    assert again.returncode == 4 and "already exist" in again.stderr


def _main_as_the_process(setup: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter that runs `setup` (Python source), then main() with no argv, as the
    console script does, on `weightmark ARGS`."""
    code = f"{setup}\nimport sys\nsys.argv = ['weightmark', *{list(args)!r}]\nfrom weightmark.cli import main\nmain()\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run


def test_the_command_line_process_freezes_its_objects_but_a_caller_of_main_keeps_its_collector() -> None:
    """As the process's own command (no argv) main leaves its objects out of the collections
    of the interpreter's exit; called with argv from a longer-lived program it changes nothing."""
    import gc

    from weightmark.cli import main

    r = _main_as_the_process("import atexit, gc, sys\n"
                             "atexit.register(lambda: print(gc.get_freeze_count(), file=sys.stderr))",
                             "--version")
    assert r.stdout.startswith("weightmark ")
    assert int(r.stderr.strip().splitlines()[-1]) > 10_000  # typer's and weightmark's objects

    before = gc.get_freeze_count()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code in (0, None)
    assert gc.get_freeze_count() == before


def test_cycles_a_command_leaves_are_finalized_before_the_process_freezes_its_objects() -> None:
    """What a command drops in a reference cycle (say a registry connection) is still finalized
    at exit, as the interpreter's own collections would have done before the freeze."""
    r = _main_as_the_process("import sys\n"
                             "import weightmark.cli.app as cli_app\n"
                             "class Held:\n"
                             "    def __del__(self):\n"
                             "        print('finalized', file=sys.stderr)\n"
                             "@cli_app.app.command('cycle-probe')\n"
                             "def probe() -> None:\n"
                             "    held = Held()\n"
                             "    held.me = held",
                             "cycle-probe")
    assert "finalized" in r.stderr
