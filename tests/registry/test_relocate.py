"""`weightmark model relocate`: a moved base is checked against the signed model id, and its new
place is signed, so that `registry verify` re-derives models.base_path from the latest entry.

Runs on both backends (`module_registry_location`, `registry_location`); rows are edited behind
the tool's back through tests/registry/rawdb.py, the same SQL on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.registry.rawdb import copy_home, raw_db
from weightmark import Lab


@dataclass
class Moved:
    home: Path
    old: Path
    new: Path
    copy: Path
    licensee: str
    entries: int  # before the relocation


def models_row(home: Path) -> tuple[str, str]:
    with raw_db(home) as db:
        return tuple(db.execute("SELECT base_path, files FROM models").fetchone())


def entry_count(home: Path) -> int:
    with raw_db(home) as db:
        return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]


def set_base_path(home: Path, value: str) -> None:
    with raw_db(home) as db:
        db.execute("UPDATE models SET base_path = ?", (value,))


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory, minilm: Path,
          module_registry_location: Callable[[], str | None]) -> Moved:
    work = tmp_path_factory.mktemp("relocate")
    old = work / "base"
    shutil.copytree(minilm, old)
    lab = Lab.init(work / "lab", passphrase=None, registry=module_registry_location())
    lab.register_model(old, name="minilm")
    lid = lab.add_licensee("Northwind Research Ltd", "GB").id
    lab.stamp("minilm", lid, work / "copy", collusion=1)
    lab.close()
    new = work / "moved" / "all-MiniLM"
    new.parent.mkdir()
    shutil.move(old, new)
    return Moved(work / "lab", old, new, work / "copy", lid, entry_count(work / "lab"))


@pytest.fixture(scope="module")
def relocated(moved: Moved) -> Moved:
    r = run_cli("model", "relocate", "minilm", str(moved.new), "--json", home=moved.home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["base_path"] == str(moved.new.resolve())
    return moved


def test_relocation_is_a_signed_entry_and_verify_passes(relocated: Moved) -> None:
    home = relocated.home
    assert entry_count(home) == relocated.entries + 1
    r = run_cli("registry", "show", str(relocated.entries), "--json", home=home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "model-relocation" and doc["signature"] == "valid"
    assert doc["statement"]["predicate"]["base_path"] == str(relocated.new.resolve())
    assert models_row(home)[0] == str(relocated.new.resolve())
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 0 and r.stdout.startswith("Log verified"), r.stderr
    listed = json.loads(run_cli("model", "list", "--json", home=home).stdout)
    assert [m["base_path"] for m in listed] == [str(relocated.new.resolve())]


def test_scan_uses_the_relocated_base_as_reference(relocated: Moved) -> None:
    r = run_cli("scan", str(relocated.copy), "--json", home=relocated.home)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["mode"] == "non-blind"
    assert report["reference"]["status"] == "ok" and report["reference"]["path"] == str(relocated.new.resolve())
    assert [c["licensee_id"] for c in report["accused"]] == [relocated.licensee]


def test_models_row_pointed_back_is_refused(relocated: Moved, tmp_path: Path) -> None:
    """verify re-derives base_path from the latest signed location, not the registration."""
    home = copy_home(relocated.home, tmp_path / "home")
    set_base_path(home, str(relocated.old.resolve()))
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4
    assert r.stderr.strip() == (f"Error: models row model_id={_model_id(home)}: base_path is {relocated.old.resolve()} "
                                f"but the signed entry {relocated.entries} says {relocated.new.resolve()}")
    r = run_cli("model", "list", home=home)
    assert r.returncode == 4 and r.stdout == ""


def _model_id(home: Path) -> str:
    with raw_db(home) as db:
        return db.execute("SELECT model_id FROM models").fetchone()[0]


def test_relocate_to_different_weights_is_refused(relocated: Moved, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(relocated.new, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    before = (entry_count(relocated.home), models_row(relocated.home))
    r = run_cli("model", "relocate", "minilm", str(other), home=relocated.home)
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip()
    assert line.startswith(f"Error: {other}") and "weights differ from model 'minilm'" in line
    assert (entry_count(relocated.home), models_row(relocated.home)) == before


@pytest.mark.parametrize("target", ["missing", "a-file"])
def test_relocate_to_nothing_usable_is_refused(relocated: Moved, tmp_path: Path, target: str) -> None:
    path = tmp_path / target
    if target == "a-file":
        path.write_text("not weights")
    before = entry_count(relocated.home)
    r = run_cli("model", "relocate", "minilm", str(path), home=relocated.home)
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
    assert entry_count(relocated.home) == before


def test_relocate_unknown_model_is_exit_4(relocated: Moved) -> None:
    r = run_cli("model", "relocate", "nope", str(relocated.new), home=relocated.home)
    assert r.returncode == 4 and "no model named 'nope'" in r.stderr


def legacy_home(tmp_path: Path, base: Path, location: str | None) -> tuple[Path, str]:
    """A lab whose model entry is signed as before `base_path` and `files` were in the predicate."""
    from weightmark.formats.safetensors import Checkpoint
    from weightmark.model import file_stats, manifest_id
    from weightmark.registry.envelope import statement
    from weightmark.registry.store import now
    from weightmark.registry.tables import row_scale_sha256

    lab = Lab.init(tmp_path / "lab", passphrase=None, registry=location)
    reg, keys = lab.registry, lab.keys
    with Checkpoint.open(base) as ckpt:
        model_id, stats = manifest_id(ckpt), file_stats(ckpt)
    scale = np.ones(4, dtype="<f4").tobytes()
    digest, count, elements = row_scale_sha256([("w", "F32", (4, 1024), scale)])
    created = now()
    predicate = {"model_id": model_id, "name": "old", "format": "safetensors", "carriers": count,
                 "carrier_elements": elements, "row_scale_sha256": digest, "registered_at": created}
    with reg._write() as db:  # the registration of an earlier version, byte for byte
        idx = reg._append(db, "model", statement("model", "old", model_id, predicate), keys)
        db.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (model_id, "old", str(base), "safetensors", json.dumps(stats), created, idx))
        db.execute("INSERT INTO carriers VALUES (?, 0, 'w', 'F32', '[4, 1024]', ?)", (model_id, scale))
    lab.close()
    return tmp_path / "lab", model_id


def test_model_registered_before_base_path_was_signed(tmp_path: Path, minilm: Path,
                                                       registry_location: str | None) -> None:
    """Its base_path cannot be checked from the log (documented); relocating it signs one."""
    base = tmp_path / "base"
    shutil.copytree(minilm, base)
    home, model_id = legacy_home(tmp_path, base, registry_location)
    assert run_cli("registry", "verify", home=home).returncode == 0
    set_base_path(home, "/elsewhere")
    assert run_cli("registry", "verify", home=home).returncode == 0  # nothing signed to compare with
    r = run_cli("model", "relocate", "old", str(base), home=home)
    assert r.returncode == 0, r.stderr
    assert run_cli("registry", "verify", home=home).returncode == 0
    set_base_path(home, "/elsewhere")
    r = run_cli("registry", "verify", home=home)
    assert r.returncode == 4 and f"models row model_id={model_id}: base_path is /elsewhere" in r.stderr
