"""Kill `weightmark stamp` (a real subprocess) at random and at chosen moments, run one more
command, and check the lab: no copy without its entry, no entry without its copy (or a signed
void), no temp folder, a log that verifies."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import run_cli
from weightmark import Lab
from weightmark.issuing import PENDING_DIR
from weightmark.outputs import manifest_matches
from weightmark.registry.store import Registry

SEED = 20261205
PASSPHRASE = "kill-suite passphrase"


def write_sharded_base(root: Path) -> Path:
    """A 2-shard float32 folder of about 2 MB (8 carriers), with an index and a config file."""
    rng = np.random.default_rng(7)
    root.mkdir()
    weight_map = {}
    for shard in range(2):
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        tensors = {f"layers.{shard * 4 + i}.mlp.weight": rng.standard_normal((128, 512)).astype(np.float32)
                   for i in range(4)}
        tensors[f"layers.{shard}.norm.weight"] = np.ones(128, np.float32)
        save_file(tensors, str(root / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text('{"model_type": "toy"}')
    return root


def child_env(home: Path, passphrase: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTMARK_")}
    env["WEIGHTMARK_HOME"] = str(home)
    if passphrase is not None:
        env["WEIGHTMARK_PASSPHRASE"] = passphrase
    return env


# The child announces each named point of issuing.issue_copy on stderr ("@point") and, at
# `pause`, sleeps for `hold` seconds: the test hook replaced in the child process only.
CHILD = """
import sys, time
import weightmark.issuing as issuing
pause, hold = sys.argv[1], float(sys.argv[2])
def pause_at(point):
    print("@" + point, file=sys.stderr, flush=True)
    if point == pause:
        time.sleep(hold)
issuing.pause_at = pause_at
from weightmark.cli import main
main(sys.argv[3:])
"""


def start_stamp(home: Path, licensee: str, out: Path, *, force: bool = False, hooked: bool = True,
                pause: str = "-", hold: float = 0.0, passphrase: str | None = None) -> subprocess.Popen[str]:
    args = ["stamp", "toy", "--licensee", licensee, "--out", str(out), "--collusion", "1"]
    if force:
        args.append("--force")
    cmd = [sys.executable, "-c", CHILD, pause, str(hold), *args] if hooked else \
        [sys.executable, "-m", "weightmark", *args]
    return subprocess.Popen(cmd, env=child_env(home, passphrase), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(proc: subprocess.Popen[str], marker: str) -> bool:
    """Read the child's stderr up to `marker`; False if it ended first."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.strip() == marker:
            return True
    return False


def temp_names(*roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            found += [Path(folder) / n for n in dirs + files if ".tmp-" in n or ".old-" in n]
    return found


def check_lab(home: Path, outdir: Path) -> None:
    """Every copy on disk is the newest delivered copy recorded for its path; every such entry's
    copy is on disk; no journal and no temp name is left; the log verifies."""
    assert not list((home / PENDING_DIR).iterdir()), "a journal was left unresolved"
    assert temp_names(home, outdir) == []
    registry = Registry.open(home)
    try:
        voided = registry.voided_issues()
        newest: dict[str, tuple[int, dict[str, str]]] = {}
        for model in registry.models():
            for copy in registry.issued(model.model_id):
                if copy.entry_idx in voided:
                    continue
                files = registry.issue_for_codeword(copy.model_id, copy.codeword_index)[1]
                if copy.out_path not in newest or newest[copy.out_path][0] < copy.entry_idx:
                    newest[copy.out_path] = (copy.entry_idx, files)
    finally:
        registry.close()
    for out_path, (idx, files) in newest.items():
        assert manifest_matches(Path(out_path), files), f"entry {idx}: its copy at {out_path} is missing or differs"
    on_disk = {str(p) for p in outdir.iterdir()}
    assert on_disk <= set(newest), f"untracked copies: {sorted(on_disk - set(newest))}"
    with Lab(home) as lab:
        lab.verify_log()


@pytest.fixture(scope="module")
def kill_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    work = tmp_path_factory.mktemp("kill")
    base = write_sharded_base(work / "base")
    with Lab.init(work / "lab", passphrase=None) as lab:
        lab.register_model(base, name="toy")
        licensee = lab.add_licensee("Northwind Research Ltd", "GB").id
    outdir = work / "out"
    outdir.mkdir()
    return work / "lab", outdir, licensee


def entries_at(home: Path, out: Path) -> list[int]:
    """The issued-copy entries recorded for `out`, oldest first."""
    registry = Registry.open(home)
    try:
        return [c.entry_idx for m in registry.models() for c in registry.issued(m.model_id)
                if c.out_path == str(out)]
    finally:
        registry.close()


def outcome(home: Path, out: Path, before: int = 0) -> str:
    """What became of the stamp aimed at `out`, given `before` entries there already."""
    entries = entries_at(home, out)
    if len(entries) == before:
        return "rolled back"
    assert len(entries) == before + 1
    registry = Registry.open(home)
    try:
        return "voided" if entries[-1] in registry.voided_issues() else "delivered"
    finally:
        registry.close()


def test_kill_suite(kill_lab: tuple[Path, Path, str]) -> None:
    home, outdir, licensee = kill_lab
    rng = random.Random(SEED)
    suite_started = time.monotonic()
    # One full run, timed, to place the random kills.
    t0 = time.monotonic()
    proc = start_stamp(home, licensee, outdir / "copy-0")
    assert wait_for(proc, "@journal-written")
    t_journal = time.monotonic() - t0
    assert proc.wait(60) == 0
    t_total = time.monotonic() - t0
    check_lab(home, outdir)
    plan: list[tuple[signal.Signals, str]] = (
        [(signal.SIGKILL, "after-commit")] * 5 + [(signal.SIGKILL, "before-rename")] * 5
        + [(signal.SIGKILL, "anywhere")] * 10 + [(signal.SIGKILL, "while-issuing")] * 30
        + [(signal.SIGTERM, "journal-written")] * 2 + [(signal.SIGTERM, "after-commit")] * 2
        + [(signal.SIGTERM, "while-issuing")] * 6
    )
    rng.shuffle(plan)
    tally: Counter[str] = Counter()
    exits: Counter[int] = Counter()
    for n, (sig, when) in enumerate(plan, start=1):
        out = outdir / f"copy-{n}"
        force = n % 5 == 0 and (outdir / f"copy-{n - 1}").exists()
        if force:
            out = outdir / f"copy-{n - 1}"
        before = len(entries_at(home, out))
        if when == "anywhere":  # plain `python -m weightmark stamp`, killed after a random delay
            proc = start_stamp(home, licensee, out, force=force, hooked=False)
            time.sleep(rng.uniform(0.0, t_total))
        elif when == "while-issuing":  # a random delay after the journal exists
            proc = start_stamp(home, licensee, out, force=force)
            started = wait_for(proc, "@journal-written")
            if started:
                time.sleep(rng.uniform(0.0, max(0.05, t_total - t_journal)))
        else:  # paused at a named point (SIGTERM there is held until the rename is done)
            hold = 60.0 if sig == signal.SIGKILL else 0.5
            proc = start_stamp(home, licensee, out, force=force, pause=when, hold=hold)
            assert wait_for(proc, f"@{when}"), proc.communicate()
        proc.send_signal(sig)
        rc = proc.wait(60)
        stderr = proc.stderr.read() if proc.stderr else ""
        exits[rc] += 1
        if sig == signal.SIGTERM and rc != 0:
            assert rc == 143, stderr
            assert stderr.strip().splitlines()[-1] == "Error: interrupted"
        if sig == signal.SIGTERM and when == "after-commit":
            assert rc == 143 and manifest_matches(out, _latest_files(home, out)), "a held SIGTERM lost the copy"
        # The next command that opens the lab finishes or rolls back whatever was interrupted.
        follow = run_cli("registry", "find", "--json", home=home)
        assert follow.returncode == 0, follow.stderr
        check_lab(home, outdir)
        tally[f"{sig.name} {when}{' --force' if force else ''}: {outcome(home, out, before)}"] += 1
    verify = run_cli("registry", "verify", "--json", home=home)
    assert verify.returncode == 0, verify.stderr
    kills = sum(1 for sig, _ in plan if sig == signal.SIGKILL)
    print(f"\nkills tried: {kills} SIGKILL + {len(plan) - kills} SIGTERM; all {len(plan)} left a consistent lab")
    print(f"exit codes: {dict(sorted(exits.items()))}; {time.monotonic() - suite_started:.0f} s in all")
    for key, count in sorted(tally.items()):
        print(f"  {count:3d}  {key}")
    # The deterministic kills after the commit must have been finished by the next command.
    for point in ("after-commit", "before-rename"):
        assert sum(v for k, v in tally.items() if k.startswith(f"SIGKILL {point}") and k.endswith("delivered")) == 5


def _latest_files(home: Path, out: Path) -> dict[str, str]:
    registry = Registry.open(home)
    try:
        copies = [c for m in registry.models() for c in registry.issued(m.model_id) if c.out_path == str(out)]
        assert copies, f"no entry for {out}"
        found = registry.issue_for_codeword(copies[-1].model_id, copies[-1].codeword_index)
        assert found is not None
        return found[1]
    finally:
        registry.close()


def test_lost_copy_is_voided_when_keys_unlock(tmp_path: Path) -> None:
    """A copy whose staging vanished after its entry was committed is recorded as never
    delivered: while the keys are locked the journal waits (and says so), then it is voided."""
    base = write_sharded_base(tmp_path / "base")
    with Lab.init(tmp_path / "lab", passphrase=PASSPHRASE) as lab:
        lab.register_model(base, name="toy")
        licensee = lab.add_licensee("Falkenstein KI GmbH", "DE").id
    home, outdir = tmp_path / "lab", tmp_path / "out"
    outdir.mkdir()
    out = outdir / "copy"
    proc = start_stamp(home, licensee, out, pause="after-commit", hold=60.0, passphrase=PASSPHRASE)
    assert wait_for(proc, "@after-commit")
    proc.kill()
    proc.wait(60)
    (staging,) = temp_names(outdir)
    import shutil

    leaked = tmp_path / "leaked"
    shutil.copytree(staging, leaked)  # it got out anyway, before it was lost
    shutil.rmtree(staging)  # the staged copy is lost (a disk failure, an operator's rm)
    locked = run_cli("registry", "find", "--json", home=home)
    assert locked.returncode == 0, locked.stderr
    assert "once the lab keys are unlocked" in locked.stderr
    assert len(list((home / PENDING_DIR).iterdir())) == 1
    assert json.loads(locked.stdout)[0]["delivered"] is True  # not yet voided: nothing signed it
    unlocked = run_cli("registry", "find", "--json", home=home, env={"WEIGHTMARK_PASSPHRASE": PASSPHRASE})
    assert unlocked.returncode == 0, unlocked.stderr
    (row,) = json.loads(unlocked.stdout)
    assert row["delivered"] is False and isinstance(row["void_entry_id"], int)
    check_lab(home, outdir)
    shown = run_cli("registry", "show", str(row["void_entry_id"]), "--json", home=home)
    doc = json.loads(shown.stdout)
    assert doc["kind"] == "issue-void" and doc["signature"] == "valid"
    assert doc["statement"]["predicate"]["issue_entry"] == row["entry_id"]
    assert not out.exists()
    # The voided codeword is still scored, and the accusation says the copy was never delivered.
    scan = run_cli("scan", str(leaked), "--model", "toy", "--json", home=home,
                   env={"WEIGHTMARK_PASSPHRASE": PASSPHRASE})
    assert scan.returncode == 0, scan.stderr
    (accused,) = json.loads(scan.stdout)["accused"]
    assert accused["entry_id"] == row["entry_id"] and accused["delivered"] is False


def test_sigint_before_commit_rolls_back(kill_lab: tuple[Path, Path, str]) -> None:
    """Ctrl-C while the copy is written: nothing recorded, nothing left, exit 130."""
    home, outdir, licensee = kill_lab
    out = outdir / "interrupted"
    proc = start_stamp(home, licensee, out, pause="copy-written", hold=0.5)
    assert wait_for(proc, "@copy-written")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    assert proc.stderr is not None and proc.stderr.read().strip().splitlines()[-1] == "Error: interrupted"
    assert not out.exists() and temp_names(home, outdir) == []
    assert not list((home / PENDING_DIR).iterdir())
    assert outcome(home, out) == "rolled back"


def test_a_stamp_in_progress_is_left_alone(kill_lab: tuple[Path, Path, str]) -> None:
    """Another command opening the lab mid-stamp must not roll back a journal its owner holds."""
    home, outdir, licensee = kill_lab
    out = outdir / "concurrent"
    proc = start_stamp(home, licensee, out, pause="copy-written", hold=3.0)
    assert wait_for(proc, "@copy-written")
    assert len(list((home / PENDING_DIR).iterdir())) == 1
    other = run_cli("registry", "find", "--json", home=home)
    assert other.returncode == 0, other.stderr
    assert len(list((home / PENDING_DIR).iterdir())) == 1 and len(temp_names(outdir)) == 1
    assert proc.wait(60) == 0
    assert outcome(home, out) == "delivered"
    check_lab(home, outdir)


def test_replacement_killed_between_its_two_renames(kill_lab: tuple[Path, Path, str]) -> None:
    """--force over an earlier copy moves it aside, then moves the new one in; a kill between
    the two is finished by the next command (the new copy in place, the old one gone)."""
    home, outdir, licensee = kill_lab
    out = outdir / "replaced"
    first = start_stamp(home, licensee, out)
    assert first.wait(60) == 0
    earlier = _latest_files(home, out)
    proc = start_stamp(home, licensee, out, force=True, pause="before-rename", hold=60.0)
    assert wait_for(proc, "@before-rename")
    proc.kill()
    proc.wait(60)
    (staging,) = temp_names(outdir)
    backup = staging.with_name(staging.name.replace(".tmp-", ".old-"))
    os.rename(out, backup)  # as the first rename of the replacement does
    follow = run_cli("registry", "find", "--json", home=home)
    assert follow.returncode == 0, follow.stderr
    assert "finished an interrupted stamp" in follow.stderr
    assert len(entries_at(home, out)) == 2
    newer = _latest_files(home, out)
    assert newer != earlier and manifest_matches(out, newer)
    check_lab(home, outdir)


def test_lost_replacement_restores_the_earlier_copy(tmp_path: Path) -> None:
    """A replacement whose new copy is lost after its entry is voided, and the earlier copy,
    already moved aside, is put back."""
    base = write_sharded_base(tmp_path / "base")
    with Lab.init(tmp_path / "lab", passphrase=None) as lab:
        lab.register_model(base, name="toy")
        licensee = lab.add_licensee("Northwind Research Ltd", "GB").id
    home, outdir = tmp_path / "lab", tmp_path / "out"
    outdir.mkdir()
    out = outdir / "copy"
    assert start_stamp(home, licensee, out).wait(60) == 0
    earlier = _latest_files(home, out)
    proc = start_stamp(home, licensee, out, force=True, pause="before-rename", hold=60.0)
    assert wait_for(proc, "@before-rename")
    proc.kill()
    proc.wait(60)
    (staging,) = temp_names(outdir)
    import shutil

    shutil.rmtree(staging)
    os.rename(out, staging.with_name(staging.name.replace(".tmp-", ".old-")))
    follow = run_cli("registry", "find", "--json", home=home)
    assert follow.returncode == 0, follow.stderr
    rows = json.loads(follow.stdout)
    assert [r["delivered"] for r in rows] == [True, False]
    assert manifest_matches(out, earlier)
    check_lab(home, outdir)


def test_a_file_appearing_at_the_output_meanwhile_is_not_clobbered(kill_lab: tuple[Path, Path, str]) -> None:
    """Something created at --out while the copy is written stays; the signed entry is voided
    on the spot (its copy was never delivered) and nothing is left behind."""
    home, outdir, licensee = kill_lab
    out = outdir / "raced"
    proc = start_stamp(home, licensee, out, pause="copy-written", hold=1.0)
    assert wait_for(proc, "@copy-written")
    out.write_bytes(b"someone else's file\n")
    assert proc.wait(60) == 3
    assert proc.stderr is not None
    lines = [line for line in proc.stderr.read().strip().splitlines() if not line.startswith("@")]
    assert lines == [f"Error: {out}: appeared while writing; pass --force to replace it"]
    assert out.read_bytes() == b"someone else's file\n"
    assert outcome(home, out) == "voided"
    out.unlink()
    check_lab(home, outdir)
