"""Hostile safetensors files from strangers: exit code 3, one line naming the file, nothing written."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from tests.conftest import run_cli


def _file(header: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


W = {"dtype": "F32", "shape": [64, 64]}
GOOD_DATA = bytes(64 * 64 * 4)

HOSTILE = {
    "lying-header-length": _file({"a": {**W, "data_offsets": [0, len(GOOD_DATA)]}}, GOOD_DATA, length=10**9),
    "header-200mb": struct.pack("<Q", 200 * 1024 * 1024) + b"{" + b" " * 64,
    "non-json-header": _file(b"this is not json at all", GOOD_DATA),
    "overlapping-offsets": _file(
        {"a": {**W, "data_offsets": [0, 16384]}, "b": {**W, "data_offsets": [8192, 24576]}}, GOOD_DATA * 2
    ),
    "offsets-outside-file": _file({"a": {**W, "data_offsets": [10**12, 10**12 + 16384]}}, GOOD_DATA),
    "length-not-shape": _file({"a": {"dtype": "F32", "shape": [64, 65], "data_offsets": [0, 16384]}}, GOOD_DATA),
    "duplicate-names": _file(
        b'{"a": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]},'
        b' "a": {"dtype": "F32", "shape": [64, 64], "data_offsets": [16384, 32768]}}',
        GOOD_DATA * 2,
    ),
    "truncated-data": _file({"a": {**W, "data_offsets": [0, 16384]}}, GOOD_DATA[:5000]),
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Path:
    home = tmp_path_factory.mktemp("hostile") / "home"
    assert run_cli("init", "--insecure-no-passphrase", "--home", str(home)).returncode == 0
    assert run_cli("model", "register", str(minilm), "--name", "minilm", home=home).returncode == 0
    return home


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["scan", "register", "scan-folder"])
def test_hostile_file_is_refused_cleanly(case: str, command: str, home: Path, tmp_path: Path) -> None:
    if command == "scan-folder":
        target = tmp_path / "model"
        target.mkdir()
        (target / "model.safetensors").write_bytes(HOSTILE[case])
        (target / "config.json").write_text("{}")
        named = "model.safetensors"
    else:
        target = tmp_path / f"{case}.safetensors"
        target.write_bytes(HOSTILE[case])
        named = target.name
    before = _snapshot(tmp_path)
    registry_before = (home / "registry.db").read_bytes()
    if command == "register":
        r = run_cli("model", "register", str(target), "--name", f"m-{case}", home=home)
    else:
        r = run_cli("scan", str(target), "--model", "minilm", home=home)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and named in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert _snapshot(tmp_path) == before, "a hostile input must not change or add files"
    assert (home / "registry.db").read_bytes() == registry_before


# -- tensors under a carrier's name that no carrier can be, and symbolic-link loops ------------

CARRIER = "encoder.layer.0.attention.self.query.weight"  # a carrier of the registered MiniLM
CARRIER_CASES = {
    "scalar": _file({CARRIER: {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, bytes(4)),
    "one-element": _file({CARRIER: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "one-by-one": _file({CARRIER: {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}, bytes(4)),
    "zero-by-2^40": _file({CARRIER: {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}),
    "product-overflows-int64": _file({CARRIER: {"dtype": "F32", "shape": [2**32] * 3, "data_offsets": [0, 0]}}),
    "dim-2^63": _file({CARRIER: {"dtype": "F32", "shape": [2**63, 1], "data_offsets": [0, 0]}}),
    "dim-2^64": _file({CARRIER: {"dtype": "F32", "shape": [2**64, 384], "data_offsets": [0, 0]}}),
    "negative-dim": _file({CARRIER: {"dtype": "F32", "shape": [-1, 384], "data_offsets": [0, 0]}}),
    "float-dim": _file({CARRIER: {"dtype": "F32", "shape": [1.5, 384], "data_offsets": [0, 0]}}),
}


def _one_line_error(r, code: int, named: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and named in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("case", sorted(CARRIER_CASES))
@pytest.mark.parametrize("command", ["scan", "scan-any-model", "register"])
def test_impossible_tensor_under_a_carrier_name(case: str, command: str, home: Path, tmp_path: Path) -> None:
    target = tmp_path / f"{case}.safetensors"
    target.write_bytes(CARRIER_CASES[case])
    registry_before = (home / "registry.db").read_bytes()
    if command == "register":
        r = run_cli("model", "register", str(target), "--name", f"m-{case}", home=home)
    elif command == "scan":
        r = run_cli("scan", str(target), "--model", "minilm", home=home)
    else:
        r = run_cli("scan", str(target), home=home)
    _one_line_error(r, 3, target.name)
    assert target.read_bytes() == CARRIER_CASES[case] and sorted(tmp_path.iterdir()) == [target]
    assert (home / "registry.db").read_bytes() == registry_before


def _loops(folder: Path) -> None:
    folder.mkdir()
    (folder / "a.safetensors").symlink_to("b.safetensors")
    (folder / "b.safetensors").symlink_to("a.safetensors")
    (folder / "self.safetensors").symlink_to("self.safetensors")
    (folder / "config.json").write_text("{}")


@pytest.mark.parametrize("target", ["folder", "folder/a.safetensors", "folder/self.safetensors"])
@pytest.mark.parametrize("command", ["scan", "register"])
def test_symlink_loops(target: str, command: str, home: Path, tmp_path: Path) -> None:
    _loops(tmp_path / "folder")
    before = {p.name: os.readlink(p) for p in (tmp_path / "folder").iterdir() if p.is_symlink()}
    registry_before = (home / "registry.db").read_bytes()
    path = tmp_path / target
    if command == "register":
        r = run_cli("model", "register", str(path), "--name", "looped", home=home)
    else:
        r = run_cli("scan", str(path), "--model", "minilm", home=home)
    _one_line_error(r, 3, path.name)
    assert {p.name: os.readlink(p) for p in (tmp_path / "folder").iterdir() if p.is_symlink()} == before
    assert (home / "registry.db").read_bytes() == registry_before
