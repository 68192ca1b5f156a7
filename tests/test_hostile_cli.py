"""Hostile input to the command line, and the conventions scripts rely on.

Names with rich markup, escape sequences and bidi overrides; key files, bundles, public keys and
policies that are devices, FIFOs, huge, deeply nested or ask scrypt for a terabyte; bytes that
are not UTF-8 in arguments and passphrases; a full disk; SIGINT and SIGTERM mid-stamp. Every
failure is one `Error:` line with its exit code, no traceback, and nothing on disk changed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli

NAMES = {
    "markup": "Acme [/bold] Ltd [link=http://x] :smile:",
    "osc-title": "Evil \x1b]0;pwned\x07 Co",
    "csi-clear": "Clear \x1b[2J\x1b[H Co",
    "c1-csi": "C1 \x9b31m Co",
    "bidi": "Invoice \u202egpj.exe Ltd",
    "newline": "Two\nLines Ltd",
}
RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e", "\r")


def error_line(r: subprocess.CompletedProcess[str], code: int) -> str:
    """The one `Error:` line of a failed command (asserting there is exactly one, no traceback)."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run the CLI entry point in this process (no interpreter start-up: for the long case
    tables); same arguments and result as run_cli."""
    from weightmark.cli import main
    from weightmark.cli.common import Settings

    def run(*args: str, home: Path | None = None, env: dict[str, str] | None = None):
        for name in [k for k in os.environ if k.startswith("WEIGHTMARK_")]:
            monkeypatch.delenv(name)
        if home is not None:
            monkeypatch.setenv("WEIGHTMARK_HOME", str(home))
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            Settings.quiet, Settings.registry_path = False, None
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (symlinks to devices and FIFOs are recorded, not read)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> dict:
    """An unencrypted lab with MiniLM registered, one licensee per hostile name, one copy."""
    from weightmark import Lab

    work = tmp_path_factory.mktemp("hostile-cli")
    home = work / "home"
    with Lab.init(home, passphrase=None) as setup:  # in-process: the CLI is what the tests run
        setup.register_model(minilm, "minilm")
        ids = {key: setup.add_licensee(name, "GB").id for key, name in NAMES.items()}
        setup.stamp("minilm", ids["markup"], work / "copy")
    base_digest = hashlib.sha256((minilm / "model.safetensors").read_bytes()).hexdigest()
    yield {"home": home, "work": work, "ids": ids, "copy": work / "copy", "minilm": minilm}
    assert hashlib.sha256((minilm / "model.safetensors").read_bytes()).hexdigest() == base_digest
    shutil.rmtree(work / "copy", ignore_errors=True)


@pytest.fixture
def home_copy(lab: dict, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the lab home, for cases that plant hostile files in it."""
    home = tmp_path / "home"
    shutil.copytree(lab["home"], home)
    yield home


# -- 1. names are printed as text ---------------------------------------------------------------


def test_markup_in_a_name_is_printed_literally_when_stamping(lab: dict, tmp_path: Path) -> None:
    r = run_cli("stamp", "minilm", "--licensee", lab["ids"]["markup"], "--out", str(tmp_path / "c"),
                home=lab["home"])
    assert r.returncode == 0, r.stderr
    assert NAMES["markup"] in r.stderr and "Traceback" not in r.stderr
    shutil.rmtree(tmp_path / "c")


@pytest.mark.parametrize("command", [["licensee", "list"], ["registry", "find", "--model", "minilm"]])
def test_listings_show_controls_as_visible_escapes(lab: dict, command: list[str]) -> None:
    r = run_cli(*command, home=lab["home"])
    assert r.returncode == 0, r.stderr
    for raw in RAW_CONTROLS:
        assert raw not in r.stdout, f"raw {raw!r} printed to the terminal"
    if command[0] == "licensee":
        assert "Evil \\x1b]0;pwned\\x07 Co" in r.stdout
        assert "Invoice \\u202egpj.exe Ltd" in r.stdout
        assert "C1 \\x9b31m Co" in r.stdout
        assert "Two\\x0aLines Ltd" in r.stdout
        assert len(r.stdout.strip().splitlines()) == len(NAMES)


def test_licensee_show_and_scan_escape_names(lab: dict) -> None:
    r = run_cli("licensee", "show", lab["ids"]["osc-title"], home=lab["home"])
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\\x1b]0;pwned" in r.stdout
    r = run_cli("scan", str(lab["copy"]), home=lab["home"])
    assert r.returncode == 0, r.stderr
    assert not any(raw in r.stdout + r.stderr for raw in RAW_CONTROLS)
    assert NAMES["markup"] in r.stdout


def test_json_keeps_names_exact_and_escapes_terminal_controls(lab: dict) -> None:
    r = run_cli("licensee", "list", "--json", home=lab["home"])
    assert r.returncode == 0, r.stderr
    for raw in RAW_CONTROLS + ("\x85",):
        assert raw not in r.stdout
    names = {row["name"] for row in json.loads(r.stdout)}
    assert names == set(NAMES.values())  # the values survive the escaping exactly
    assert "\\u202e" in r.stdout and "\\u009b" in r.stdout and "\\u001b" in r.stdout


def test_error_messages_escape_what_the_user_typed(lab: dict) -> None:
    line = error_line(run_cli("registry", "show", "1", "--home", str(lab["home"] / "\x1b[2Jnope")), 4)
    assert "\x1b" not in line and "\\x1b[2Jnope" in line


# -- 2. bounded, validated reads -----------------------------------------------------------------


def _scrypt_doc(**scrypt: int) -> dict:
    params = {"n": 2**15, "r": 8, "p": 1, "salt": base64.b64encode(b"s" * 16).decode()} | scrypt
    return {"format": "weightmark-lab-keys", "version": 1, "key_id": "00000000", "kdf": "scrypt",
            "scrypt": params, "cipher": "aes-256-gcm", "nonce": base64.b64encode(b"n" * 12).decode(),
            "ciphertext": base64.b64encode(b"c" * 80).decode()}


KEY_FILES = {
    "json-list": b"[]",
    "json-null": b"null",
    "json-string": b'"lab keys"',
    "json-number": b"1e999999",
    "not-json": b"\x00\xff binary",
    "nested-100000": b"[" * 100_000 + b"]" * 100_000,
    "nested-object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "huge-int": b'{"format": "weightmark-lab-keys", "version": ' + b"9" * 100_000 + b"}",
    "empty": b"",
    "version-string": json.dumps({**_scrypt_doc(), "version": "1"}).encode(),
    "version-bool": json.dumps({**_scrypt_doc(), "version": True}).encode(),
    "kdf-list": json.dumps({**_scrypt_doc(), "kdf": ["scrypt"]}).encode(),
    "kdf-unknown": json.dumps({**_scrypt_doc(), "kdf": "argon9"}).encode(),
    "scrypt-missing": json.dumps({k: v for k, v in _scrypt_doc().items() if k != "scrypt"}).encode(),
    "scrypt-n-2^40": json.dumps(_scrypt_doc(n=2**40)).encode(),
    "scrypt-n-2^21": json.dumps(_scrypt_doc(n=2**21)).encode(),
    "scrypt-n-not-pow2": json.dumps(_scrypt_doc(n=3 * 2**10)).encode(),
    "scrypt-n-zero": json.dumps(_scrypt_doc(n=0)).encode(),
    "scrypt-r-2^20": json.dumps(_scrypt_doc(r=2**20)).encode(),
    "scrypt-p-64": json.dumps(_scrypt_doc(p=64)).encode(),
    "scrypt-n-float": json.dumps(_scrypt_doc(n=32768.0)).encode(),
    "salt-not-base64": json.dumps({**_scrypt_doc(), "scrypt": {**_scrypt_doc()["scrypt"], "salt": "**"}}).encode(),
    "nonce-wrong-length": json.dumps({**_scrypt_doc(), "nonce": "AAAA"}).encode(),
    "cipher-unknown": json.dumps({**_scrypt_doc(), "cipher": "rot13"}).encode(),
    "secret-not-base64": json.dumps({"format": "weightmark-lab-keys", "version": 1, "key_id": "x",
                                     "kdf": "none", "secret": "not base64!"}).encode(),
    "secret-short": json.dumps({"format": "weightmark-lab-keys", "version": 1, "key_id": "x",
                                "kdf": "none", "secret": "AAAA"}).encode(),
    "over-64kib": b'{"pad": "' + b"x" * (70 << 10) + b'"}',
}


@pytest.mark.parametrize("case", sorted(KEY_FILES))
def test_hostile_key_file(case: str, home_copy: Path, run_main) -> None:
    key_file = home_copy / "lab-keys.json"
    key_file.write_bytes(KEY_FILES[case])
    before = snapshot(home_copy)
    started = time.monotonic()
    r = run_main("licensee", "add", "Someone", "--jurisdiction", "GB", home=home_copy,
                 env={"WEIGHTMARK_PASSPHRASE": "a passphrase"})
    line = error_line(r, 4)
    assert "lab-keys.json" in line
    assert time.monotonic() - started < 60, "a hostile key file must fail fast"
    if case.startswith("scrypt-"):
        assert "scrypt" in line
    assert snapshot(home_copy) == before


def _special(kind: str, path: Path) -> None:
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-loop":
        path.symlink_to(path.name)
    elif kind == "folder":
        path.mkdir()
    else:
        raise AssertionError(kind)


SPECIAL = ["dev-zero", "fifo", "symlink-loop", "folder"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_key_file_that_is_not_a_regular_file(kind: str, home_copy: Path, run_main) -> None:
    key_file = home_copy / "lab-keys.json"
    key_file.unlink()
    _special(kind, key_file)
    before = snapshot(home_copy)
    r = run_main("licensee", "add", "Someone", "--jurisdiction", "GB", home=home_copy)
    assert "lab-keys.json" in error_line(r, 4)
    assert snapshot(home_copy) == before


@pytest.mark.parametrize("what", ["bundle", "pubkey", "policy", "report-bundle", "report-pubkey", "show-bundle"])
@pytest.mark.parametrize("kind", SPECIAL + ["deep-json", "huge"])
def test_bundle_pubkey_and_policy_files_are_read_with_a_cap(lab: dict, tmp_path: Path, what: str,
                                                            kind: str, run_main) -> None:
    target = tmp_path / f"hostile-{what}"
    if kind == "deep-json":
        target.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    elif kind == "huge":
        with open(target, "wb") as fh:  # sparse: 100 MiB of zeros that take no disk
            fh.truncate(100 << 20)
    else:
        _special(kind, target)
    pub = lab["home"] / "lab.pub"
    registry_before = (lab["home"] / "registry.db").read_bytes()
    started = time.monotonic()
    if what == "bundle":
        r = run_main("evidence", "verify", str(target), "--pubkey", str(pub))
    elif what == "pubkey":
        r = run_main("evidence", "verify", str(pub), "--pubkey", str(target))
    elif what == "policy":
        r = run_main("policy", "set", str(target), home=lab["home"])
    elif what == "report-bundle":
        r = run_main("report", str(target), "--pubkey", str(pub), "--out", str(tmp_path / "case.html"))
    elif what == "report-pubkey":
        r = run_main("report", str(pub), "--pubkey", str(target), "--out", str(tmp_path / "case.html"))
    else:
        r = run_main("evidence", "show", str(target), "--pubkey", str(pub))
    assert target.name in error_line(r, 3)
    assert not (tmp_path / "case.html").exists()
    assert time.monotonic() - started < 60
    assert (lab["home"] / "registry.db").read_bytes() == registry_before


# -- 3. bytes that are not UTF-8 ------------------------------------------------------------------

NOT_UTF8 = os.fsdecode(b"Acme \xff\xfe Ltd")  # how Python hands such an argv to us


@pytest.mark.parametrize("args", [
    ["licensee", "add", NOT_UTF8, "--jurisdiction", "GB"],
    ["model", "register", "/tmp/" + NOT_UTF8, "--name", "m"],
    ["model", "register", "/nonexistent", "--name", NOT_UTF8],
    ["registry", "find", "--licensee", NOT_UTF8],
    ["scan", NOT_UTF8, "--json"],
])
def test_arguments_that_are_not_utf8(lab: dict, args: list[str]) -> None:
    registry_before = (lab["home"] / "registry.db").read_bytes()
    line = error_line(run_cli(*args, home=lab["home"]), 2)
    assert "not valid UTF-8" in line and "\\xff\\xfe" in line
    assert (lab["home"] / "registry.db").read_bytes() == registry_before


@pytest.fixture(scope="module")
def encrypted_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("encrypted") / "home"
    r = run_cli("init", "--home", str(home), env={"WEIGHTMARK_PASSPHRASE": "correct horse battery"})
    assert r.returncode == 0, r.stderr
    return home


def test_passphrase_that_is_not_utf8(encrypted_home: Path) -> None:
    before = snapshot(encrypted_home)
    r = run_cli("licensee", "add", "X", "--jurisdiction", "GB", home=encrypted_home,
                env={"WEIGHTMARK_PASSPHRASE": os.fsdecode(b"pass\xffword")})
    assert "passphrase is not valid UTF-8" in error_line(r, 4)
    assert snapshot(encrypted_home) == before


def test_init_with_a_passphrase_that_is_not_utf8(tmp_path: Path) -> None:
    r = run_cli("init", "--home", str(tmp_path / "h"), env={"WEIGHTMARK_PASSPHRASE": os.fsdecode(b"\xff" * 12)})
    assert "passphrase" in error_line(r, 4)
    assert not (tmp_path / "h" / "lab-keys.json").exists()


def test_lab_accepts_a_passphrase_string_or_function(encrypted_home: Path) -> None:
    from weightmark import KeyProblem, Lab

    assert Lab(encrypted_home, passphrase="correct horse battery").keys.key_id
    assert Lab(encrypted_home, passphrase=lambda: "correct horse battery").keys.key_id
    with pytest.raises(KeyProblem, match="wrong passphrase"):
        Lab(encrypted_home, passphrase="wrong horse").keys  # noqa: B018
    with pytest.raises(TypeError):
        Lab(encrypted_home, passphrase=b"bytes")  # type: ignore[arg-type]


# -- 4. a full disk --------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root, or a mount namespace that allows it)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount_point)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def test_registry_on_a_full_disk(tiny_fs: Path) -> None:
    home = tiny_fs / "home"
    assert run_cli("init", "--insecure-no-passphrase", "--home", str(home)).returncode == 0
    assert run_cli("licensee", "add", "First", "--jurisdiction", "GB", home=home).returncode == 0
    _fill(tiny_fs)
    before = {name: (home / name).read_bytes() for name in ("registry.db", "lab-keys.json", "lab.pub")}
    line = error_line(run_cli("licensee", "add", "Second", "--jurisdiction", "GB", home=home), 4)
    assert "registry.db" in line and "no space left on device" in line
    assert {name: (home / name).read_bytes() for name in before} == before
    (tiny_fs / "filler").unlink()
    r = run_cli("registry", "verify", "--json", home=home)
    assert r.returncode == 0 and json.loads(r.stdout)["entries"] == 2, r.stderr  # genesis + First


def test_stamp_output_on_a_full_disk(lab: dict, tiny_fs: Path) -> None:
    out = tiny_fs / "copy"  # MiniLM is 90 MB: it cannot fit in 2 MiB
    entries = json.loads(run_cli("registry", "verify", "--json", home=lab["home"]).stdout)["entries"]
    r = run_cli("stamp", "minilm", "--licensee", lab["ids"]["bidi"], "--out", str(out), home=lab["home"])
    line = error_line(r, 3)
    assert str(out) in line and "no space left on device" in line
    assert list(tiny_fs.iterdir()) == [], "a partial copy was left behind"
    r = run_cli("registry", "verify", "--json", home=lab["home"])
    assert r.returncode == 0 and json.loads(r.stdout)["entries"] == entries, "an entry for an unwritten copy"


# -- 6. signals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_stamp(lab: dict, tmp_path: Path, signum: int, code: int) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTMARK_")}
    env["WEIGHTMARK_HOME"] = str(lab["home"])
    proc = subprocess.Popen([sys.executable, "-m", "weightmark", "stamp", "minilm", "--licensee",
                             lab["ids"]["c1-csi"], "--out", str(out_dir / "copy")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(out_dir.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)  # wait until the copy is being written
    assert proc.poll() is None, "stamp finished before it could be interrupted"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, stderr)
    assert stderr == "Error: interrupted\n" and stdout == ""
    assert list(out_dir.iterdir()) == [], "the staged copy was left behind"
    assert run_cli("registry", "verify", home=lab["home"]).returncode == 0


# -- 7. conventions ------------------------------------------------------------------------------


def test_version() -> None:
    from importlib.metadata import version

    import weightmark

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"weightmark {weightmark.__version__}"
    assert weightmark.__version__ == version("weightmark")


@pytest.mark.parametrize(("args", "needle"), [
    (["bogus"], "No such command 'bogus'"),
    (["scan"], "Missing argument"),
    (["scan", "x", "--threshold", "abc"], "--threshold"),
    (["stamp", "minilm", "--licensee", "x", "--out", "y", "--collusion", "0"], "--collusion"),
    (["licensee", "add", "X", "--jurisdiction", "GB", "--no-such-option"], "--no-such-option"),
    (["registry", "show", "9" * 30], "entry_id"),
    (["registry", "proof", "9" * 30], "entry_id"),
    (["registry", "consistency", "1", "9" * 30], "new_size"),
    (["stamp", "minilm", "--licensee", "x", "--out", "y", "--collusion", "9" * 30], "--collusion"),
])
def test_usage_errors_are_one_line(lab: dict, args: list[str], needle: str) -> None:
    r = run_cli(*args, home=lab["home"])
    assert needle in error_line(r, 2)
    assert "╭" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize(("args", "code", "kind"), [
    (["scan", "x", "--threshold", "abc", "--json"], 2, "UsageError"),
    (["scan", "/nonexistent/suspect", "--json"], 3, "InputFileError"),
    (["registry", "show", "999", "--json"], 4, "NotFound"),
])
def test_json_errors_are_also_json_on_stdout(lab: dict, args: list[str], code: int, kind: str) -> None:
    r = run_cli(*args, home=lab["home"])
    line = error_line(r, code)
    doc = json.loads(r.stdout)
    assert doc == {"error": {"message": line.removeprefix("Error: "), "exit_code": code, "type": kind}}


def test_quiet_silences_information_but_not_errors(lab: dict, tmp_path: Path) -> None:
    r = run_cli("stamp", "minilm", "--licensee", lab["ids"]["markup"], "--out", str(tmp_path / "c"), "-q",
                home=lab["home"])
    assert r.returncode == 0 and r.stderr == "" and r.stdout.strip() == str(tmp_path / "c")
    shutil.rmtree(tmp_path / "c")
    r = run_cli("--quiet", "registry", "show", "999", home=lab["home"])
    error_line(r, 4)


def test_fail_on_accuse(lab: dict) -> None:
    r = run_cli("scan", str(lab["copy"]), "--fail-on-accuse", "--json", home=lab["home"])
    assert r.returncode == 10, r.stderr
    assert [c["licensee_id"] for c in json.loads(r.stdout)["accused"]] == [lab["ids"]["markup"]]
    r = run_cli("scan", str(lab["minilm"]), "--fail-on-accuse", home=lab["home"])
    assert r.returncode == 0 and "No licensee accused" in r.stdout, r.stderr


def test_repeated_licensee_name_warns_and_find_takes_names(home_copy: Path) -> None:
    r = run_cli("licensee", "add", "  acme [/BOLD]   ltd [LINK=http://x]  :SMILE: ", "--jurisdiction", "DE",
                home=home_copy)
    assert r.returncode == 0
    new_id = r.stdout.strip()
    assert r.stderr.startswith("Warning: a licensee with this name already exists (lic-")
    first = run_cli("licensee", "list", "--json", home=home_copy)
    markup_id = next(x["id"] for x in json.loads(first.stdout) if x["name"] == NAMES["markup"])
    line = error_line(run_cli("registry", "find", "--licensee", "ACME [/bold] LTD [link=http://x] :smile:",
                              home=home_copy), 2)
    assert markup_id in line and new_id in line
    r = run_cli("registry", "find", "--licensee", "evil \x1b]0;PWNED\x07 co", "--json", home=home_copy)
    assert r.returncode == 0 and json.loads(r.stdout) == []  # found, and nothing issued to them
    r = run_cli("registry", "find", "--licensee", markup_id, "--json", home=home_copy)
    assert r.returncode == 0 and {row["licensee_id"] for row in json.loads(r.stdout)} == {markup_id}
    error_line(run_cli("registry", "find", "--licensee", "Nobody At All", home=home_copy), 4)
    r = run_cli("licensee", "add", "Unique Name GmbH", "--jurisdiction", "DE", home=home_copy)
    assert r.returncode == 0 and r.stderr == ""


def test_lab_public_methods_have_docstrings_and_types_ship() -> None:
    import inspect
    from importlib.resources import files

    from weightmark import Lab

    def doc(name: str) -> str:
        member = inspect.getattr_static(Lab, name)
        func = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        return (func.__doc__ or "").strip()

    public = [n for n in vars(Lab) if not n.startswith("_")]
    assert {"init", "keys", "registry", "stamp", "scan", "add_licensee", "close"} <= set(public)
    assert [n for n in public if not doc(n)] == []
    assert files("weightmark").joinpath("py.typed").is_file()


@pytest.fixture(scope="module")
def export(lab: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from weightmark import Lab

    out = tmp_path_factory.mktemp("export") / "log"
    with Lab(lab["home"], passphrase=None) as opened:
        opened.export_log(out)
    return out


@pytest.mark.parametrize("name", ["trust.json", "entries.jsonl", "checkpoints.jsonl"])
@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "symlink-loop", "deep-json"])
def test_hostile_log_export(export: Path, tmp_path: Path, name: str, kind: str, run_main) -> None:
    folder = tmp_path / "log"
    shutil.copytree(export, folder)
    (folder / name).unlink()
    if kind == "deep-json":
        (folder / name).write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    else:
        _special(kind, folder / name)
    before = snapshot(folder)
    assert name in error_line(run_main("registry", "verify", "--from", str(folder)), 3)
    assert snapshot(folder) == before
    assert run_main("registry", "verify", "--from", str(export)).returncode == 0


def test_json_depth_check_skips_brackets_inside_strings() -> None:
    from weightmark.bounded import MAX_JSON_DEPTH, json_depth_ok, loads_json
    from weightmark.errors import InputFileError

    assert json_depth_ok(json.dumps({"name": "[" * 1000 + '\\"{' * 1000}).encode())
    assert json_depth_ok(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    assert not json_depth_ok(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert loads_json(json.dumps({"a": "[[[{{{"}).encode(), "f") == {"a": "[[[{{{"}
    big = b"[" * 3_000_000 + b"]" * 3_000_000  # above the pre-scan size: the parser's own limit
    with pytest.raises(InputFileError, match="nested deeper"):
        loads_json(big, "big.json")


def test_passphrase_typed_on_a_terminal_that_is_not_text(encrypted_home: Path) -> None:
    """Bytes that are not UTF-8 typed at the passphrase prompt (a real pseudo-terminal)."""
    import pty
    import select

    before = snapshot(encrypted_home)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, with the pseudo-terminal as its terminal
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTMARK_")}
        env["WEIGHTMARK_HOME"] = str(encrypted_home)
        os.execve(sys.executable, [sys.executable, "-m", "weightmark", "licensee", "add", "X",
                                   "--jurisdiction", "GB"], env)
    seen, typed = b"", False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.5)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
        if b"Passphrase" in seen and not typed:
            os.write(fd, b"pass\xff\xfeword\n")
            typed = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert typed, seen
    assert os.waitstatus_to_exitcode(status) == 4, seen
    after_prompt = seen.split(b": ", 1)[1].decode()
    assert after_prompt.strip().splitlines() == [
        "Error: the passphrase typed is not valid text in the terminal's encoding"]
    assert snapshot(encrypted_home) == before
