"""`weightmark scan` over many suspects: one JSON line per suspect, corrupt ones reported, exit 3."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from benchmarks.synth import write_checkpoint
from tests.conftest import run_cli
from weightmark import Lab
from weightmark.sweep import find_suspects, is_checkpoint_folder

SUSPECTS = 20
CORRUPT = 3


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str | None]]:
    """A lab with a small llama registered and three copies issued, and a folder of 20 uploads:
    the copies under several names (hard links), the unstamped base, and 3 corrupt files.
    Returns (home, folder, upload name -> licensee id expected to be accused, None for none,
    "error" for a suspect that cannot be scanned)."""
    work = tmp_path_factory.mktemp("sweep")
    base = write_checkpoint(work / "base", "llama-3.2-1b", scale=0.05, layers=2).path
    home = work / "lab"
    with Lab.init(home, passphrase=None) as lab:
        lab.register_model(base, name="tiny-llama")
        ids = [lab.add_licensee(f"Licensee {i}", cc).id for i, cc in enumerate(("US", "DE", "JP"))]
        copies = {lid: work / f"issued-{i}" for i, lid in enumerate(ids)}
        for lid, out in copies.items():
            lab.stamp("tiny-llama", lid, out, collusion=1)  # ss-v1: the Tardos bound costs seconds per scan
    folder = work / "uploads"
    folder.mkdir()
    expected: dict[str, str | None] = {}
    k = 0
    while len(expected) < SUSPECTS - CORRUPT - 1:
        lid = ids[k % len(ids)]
        name = f"upload-{k:02d}"
        (folder / name).mkdir()
        for f in copies[lid].iterdir():
            os.link(f, folder / name / f.name)
        expected[name] = lid
        k += 1
    shutil.copytree(base, folder / "upload-base")
    expected["upload-base"] = None
    good = folder / "upload-00" / "model.safetensors"
    (folder / "broken-truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "broken-garbage.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    (folder / "broken-header.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    for name in ("broken-truncated.safetensors", "broken-garbage.gguf", "broken-header.safetensors"):
        expected[name] = "error"
    assert len(expected) == SUSPECTS
    return home, folder, expected


def test_find_suspects_treats_checkpoint_folders_as_one(uploads) -> None:
    _, folder, expected = uploads
    assert is_checkpoint_folder(folder / "upload-00") and not is_checkpoint_folder(folder)
    found = find_suspects([folder])
    assert [p.name for p in found] == sorted(expected)
    assert find_suspects([folder / "upload-00", folder / "broken-garbage.gguf"]) == [
        folder / "upload-00", folder / "broken-garbage.gguf"]


def _check_lines(lines: list[dict], folder: Path, expected: dict[str, str | None]) -> None:
    assert len(lines) == SUSPECTS
    assert [Path(line["suspect"]).name for line in lines] == sorted(expected)
    for line in lines:
        want = expected[Path(line["suspect"]).name]
        if want == "error":
            assert set(line) == {"suspect", "error"}
            assert line["error"]["exit_code"] == 3
            assert str(folder) in line["error"]["message"]
        else:
            assert [a["licensee_id"] for a in line["accused"]] == ([want] if want else [])


def test_sweep_json_lines_every_suspect_reported(uploads, tmp_path: Path) -> None:
    home, folder, expected = uploads
    out = tmp_path / "findings.jsonl"
    result = run_cli("scan", str(folder), "--json", "--out", str(out), home=home)
    assert result.returncode == 3, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    _check_lines(lines, folder, expected)
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
    assert f"{SUSPECTS} suspects: {SUSPECTS - CORRUPT - 1} with an accusation, 1 without, {CORRUPT} could not" \
        in result.stderr
    # --out never overwrites without --force
    again = run_cli("scan", str(folder / "upload-base"), "--out", str(out), home=home)
    assert again.returncode == 3 and again.stderr.startswith("Error: ") and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
    # --force replaces only an earlier sweep's results
    notes = tmp_path / "notes.txt"
    notes.write_text("not a sweep\n")
    refused = run_cli("scan", str(folder / "upload-base"), "--out", str(notes), "--force", home=home)
    assert refused.returncode == 3 and "is not an earlier sweep results file" in refused.stderr
    assert notes.read_text() == "not a sweep\n"
    forced = run_cli("scan", str(folder / "upload-base"), "--out", str(out), "--force", home=home)
    assert forced.returncode == 0, forced.stderr
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["accused"] == []


def test_sweep_human_lines_and_clean_exit(uploads) -> None:
    home, folder, expected = uploads
    paths = [folder / "upload-01", folder / "upload-base"]
    result = run_cli("scan", *map(str, paths), home=home)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{paths[0]}: ACCUSED Licensee 1 ({expected['upload-01']}, DE)")
    assert lines[1].startswith(f"{paths[1]}: no licensee accused [model tiny-llama, non-blind")


def test_single_path_output_unchanged(uploads) -> None:
    home, folder, expected = uploads
    result = run_cli("scan", str(folder / "upload-02"), "--json", home=home)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # one indented JSON document, as before
    assert result.stdout.startswith("{\n")
    assert [a["licensee_id"] for a in report["accused"]] == [expected["upload-02"]]
    bad = run_cli("scan", str(folder / "broken-garbage.gguf"), home=home)
    assert bad.returncode == 3 and bad.stderr.startswith("Error: ") and bad.stdout == ""


def test_sweep_stops_on_a_lab_problem(uploads) -> None:
    home, folder, _ = uploads
    result = run_cli("scan", str(folder / "upload-00"), str(folder / "upload-01"), "--model", "no-such-model",
                     home=home)
    assert result.returncode == 4 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    evidence = run_cli("scan", str(folder), "--evidence", str(folder / "e.json"), home=home)
    assert evidence.returncode == 2 and "single suspect" in evidence.stderr
    assert not (folder / "e.json").exists()
