"""No writing command clobbers anything: each --out/--evidence target that exists is refused
without --force, and with --force is replaced only when it is an earlier output of that kind;
the lab home, its registry and keys, and registered bases are never touched."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import run_cli
from weightmark import Lab
from weightmark.cli import main


@dataclass
class Site:
    work: Path      # holds the lab home, the base and an unrelated file (and nothing else)
    home: Path
    base: Path
    outdir: Path    # where allowed outputs go, outside `work`
    licensee: str


def tree_digest(path: Path) -> str:
    """SHA-256 over every name and byte under `path` (a file's own bytes if it is a file)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = Path(folder) / name
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    work = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(3)
    base = work / "base.safetensors"
    save_file({f"layers.{i}.weight": rng.standard_normal((128, 256)).astype(np.float32) for i in range(3)},
              str(base))
    (work / "notes.txt").write_text("quarterly numbers, not a model\n")
    with Lab.init(work / "lab", passphrase=None) as lab:
        lab.register_model(base, name="toy")
        licensee = lab.add_licensee("Sakura Compute KK", "JP").id
    outdir = tmp_path_factory.mktemp("outputs")
    return Site(work, work / "lab", base, outdir, licensee)


def cli(site: Site, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the real entry point in this process; (exit code, stderr)."""
    os.environ["WEIGHTMARK_HOME"] = str(site.home)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        del os.environ["WEIGHTMARK_HOME"]
    return code, capsys.readouterr().err


def writers(site: Site) -> dict[str, list[str]]:
    """Each writing command, its output option last (the target is appended)."""
    copy = site.outdir / "suspect"
    return {
        "stamp": ["stamp", "toy", "--licensee", site.licensee, "--collusion", "1", "--out"],
        "scan --evidence": ["scan", str(copy), "--model", "toy", "--evidence"],
        "keys export-public": ["keys", "export-public", "--out"],
        "keys trust": ["keys", "trust", "--out"],
        "registry export": ["registry", "export", "--out"],
    }


TARGETS = {
    "unrelated file": lambda s: s.work / "notes.txt",
    "registry db": lambda s: s.home / "registry.db",
    "key file": lambda s: s.home / "lab-keys.json",
    "lab home": lambda s: s.home,
    "registered base": lambda s: s.base,
    "folder containing the home": lambda s: s.work,
}


@pytest.fixture(scope="module")
def suspect(site: Site) -> Path:
    with Lab(site.home) as lab:
        lab.stamp("toy", site.licensee, site.outdir / "suspect", collusion=1)
    return site.outdir / "suspect"


@pytest.fixture
def unchanged(site: Site) -> Iterator[None]:
    """The whole site (home, base, unrelated file) is byte-identical after the test."""
    before = tree_digest(site.work)
    yield
    assert tree_digest(site.work) == before


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("command", ["stamp", "scan --evidence", "keys export-public", "keys trust",
                                     "registry export"])
def test_existing_targets_are_never_clobbered(site: Site, suspect: Path, unchanged: None, command: str,
                                              target: str, force: bool,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = TARGETS[target](site)
    before = tree_digest(path)
    code, err = cli(site, *writers(site)[command], str(path), *(["--force"] if force else []), capsys=capsys)
    assert code == 3, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"Error: {path}: ")
    if target == "unrelated file":
        expected = "replaces only that" if force else "already exists; pass --force to replace it"
    else:
        expected = {"registry db": "registry database", "key file": "key file", "lab home": "lab home",
                    "registered base": "registered base", "folder containing the home": "contains the lab home"}[target]
    assert expected in line
    assert tree_digest(path) == before


def test_the_real_process_refuses_with_one_line(site: Site, unchanged: None) -> None:
    db = site.home / "registry.db"
    for args in (["keys", "export-public", "--out", str(db), "--force"],
                 ["stamp", "toy", "--licensee", site.licensee, "--out", str(site.work), "--force"]):
        result = run_cli(*args, home=site.home)
        assert result.returncode == 3
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("Error: ") and "no command replaces it" in line
        assert result.stdout == ""


def test_symlinks_are_resolved(site: Site, unchanged: None, capsys: pytest.CaptureFixture[str]) -> None:
    """A link to the registry (or to a folder inside the home) is judged by what it points at."""
    link = site.outdir / "innocent.json"
    link.symlink_to(site.home / "registry.db")
    linked_dir = site.outdir / "linked"
    linked_dir.symlink_to(site.home, target_is_directory=True)
    try:
        code, err = cli(site, "keys", "trust", "--out", str(link), "--force", capsys=capsys)
        assert code == 3 and "registry database" in err
        code, err = cli(site, "keys", "trust", "--out", str(linked_dir / "new-trust.json"), capsys=capsys)
        assert code == 3 and "inside the lab home" in err
        assert not (site.home / "new-trust.json").exists()
    finally:
        link.unlink()
        linked_dir.unlink()


def test_nothing_new_goes_inside_the_home(site: Site, unchanged: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli(site, "keys", "export-public", "--out", str(site.home / "extra.pub"), capsys=capsys)
    assert code == 3 and "inside the lab home" in err
    assert not (site.home / "extra.pub").exists()


@pytest.mark.parametrize("command", ["keys export-public", "keys trust", "registry export", "stamp",
                                     "scan --evidence"])
def test_force_replaces_an_earlier_output_of_the_same_kind(site: Site, suspect: Path, command: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = site.outdir / f"earlier-{command.replace(' ', '-')}"
    args = writers(site)[command]
    code, err = cli(site, *args, str(out), capsys=capsys)
    assert code == 0, err
    first = tree_digest(out)
    code, err = cli(site, *args, str(out), capsys=capsys)
    assert code == 3 and f"Error: {out}: already exists; pass --force to replace it" == err.strip()
    assert tree_digest(out) == first
    code, err = cli(site, *args, str(out), "--force", capsys=capsys)
    assert code == 0, err
    if command == "stamp":
        assert tree_digest(out) != first  # a new licensee codeword: a different copy
    assert not [p for p in site.outdir.iterdir() if p.name.startswith(".")]


def test_force_does_not_cross_kinds(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """An exported public key is not a trust file, an evidence bundle or a stamped copy."""
    pub = site.outdir / "lab-export.pub"
    assert cli(site, "keys", "export-public", "--out", str(pub), capsys=capsys)[0] == 0
    before = tree_digest(pub)
    for args in (["keys", "trust", "--out"], ["registry", "export", "--out"],
                 ["stamp", "toy", "--licensee", site.licensee, "--out"]):
        code, err = cli(site, *args, str(pub), "--force", capsys=capsys)
        assert code == 3 and "replaces only that" in err, err
    assert tree_digest(pub) == before


def test_a_modified_copy_is_not_replaced(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """--force on a stamped copy needs its files to match the signed manifest exactly."""
    out = site.outdir / "edited"
    assert cli(site, *writers(site)["stamp"], str(out), capsys=capsys)[0] == 0
    with open(out, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x00")
    before = tree_digest(out)
    code, err = cli(site, *writers(site)["stamp"], str(out), "--force", capsys=capsys)
    assert code == 3 and "is not an earlier stamped copy" in err
    assert tree_digest(out) == before
