"""Stamping: deterministic, atomic, layout-preserving, and traceable in every file layout."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from weightmark import InputFileError, Lab
from weightmark.formats.safetensors import WEIGHT_INDEX, Checkpoint, SafetensorsFile, save_file
from weightmark.kernels import BF16, FLOAT, embed
from weightmark.registry.store import Registry


def _lab_with_model(work: Path, base: Path) -> tuple[Lab, str]:
    lab = Lab.init(work / "lab", passphrase=None)
    lab.register_model(base, name="minilm")
    return lab, lab.add_licensee("Acme Research Ltd", "GB").id


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_inputs_give_byte_identical_copies(tmp_path: Path, minilm_variants) -> None:
    lab, lid = _lab_with_model(tmp_path, minilm_variants["BF16"])
    lab.close()
    shutil.copytree(tmp_path / "lab", tmp_path / "lab2")
    one = Lab(tmp_path / "lab").stamp("minilm", lid, tmp_path / "one")
    two = Lab(tmp_path / "lab2").stamp("minilm", lid, tmp_path / "two")
    assert one.codeword_index == two.codeword_index and one.digest == two.digest
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_golden_digests_of_the_embed_kernel() -> None:
    """Pinned outputs: any change to the hash, the rounding or the layout shows up here."""
    rows, cols = 48, 160
    w = (np.sin(np.arange(rows * cols, dtype=np.float64)) * 0.05).astype(np.float32).reshape(rows, cols)
    scale = np.sqrt(np.mean(w.astype(np.float64) ** 2, axis=1)).astype(np.float32)
    code = np.where(np.arange(64) % 3 == 0, 1, -1).astype(np.int8)
    f32 = embed(w, FLOAT, scale, code, 0x0123456789ABCDEF, 0.002)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    bf16 = embed(bits, BF16, scale, code, 0x0123456789ABCDEF, 0.002)
    assert hashlib.sha256(f32.tobytes()).hexdigest() == GOLDEN_F32
    assert hashlib.sha256(bf16.tobytes()).hexdigest() == GOLDEN_BF16


GOLDEN_F32 = "77177b0651ec8726daf3640be31940df4d78ec12bf1810d022c85f2e62b28737"
GOLDEN_BF16 = "71a065f9c9c9809a5dd222b44a80cafea3133b1bd892472207efdbcd032466b8"


def _entries(lab_dir: Path) -> int:
    reg = Registry(lab_dir / "registry.db")
    try:
        return reg.entry_count()
    finally:
        reg.close()


@pytest.mark.parametrize("where", ["record", "write"])
def test_a_failed_stamp_leaves_nothing_behind(tmp_path: Path, minilm: Path, monkeypatch, where: str) -> None:
    lab, lid = _lab_with_model(tmp_path, minilm)
    before = _entries(tmp_path / "lab")
    if where == "record":
        def boom(*args, **kwargs):
            raise RuntimeError("simulated crash before the registry entry")
        monkeypatch.setattr(Registry, "record_issue", boom)
    else:
        import weightmark.stamp as stamp_module
        real = stamp_module.embed
        calls = {"n": 0}

        def boom(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("simulated crash half-way through the copy")
            return real(*args, **kwargs)
        monkeypatch.setattr(stamp_module, "embed", boom)
    with pytest.raises(RuntimeError):
        lab.stamp("minilm", lid, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lab"], "no temporary file may be left"
    assert _entries(tmp_path / "lab") == before


def _shard(minilm: Path, dest: Path, parts: int = 3) -> Path:
    """The real model split into shards with an index, plus its config and tokenizer files."""
    dest.mkdir()
    with Checkpoint.open(minilm) as ckpt:
        names = list(ckpt.tensors)
        weight_map = {}
        for i in range(parts):
            fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
            chunk = names[i::parts]
            save_file(dest / fname, [(n, ckpt.info(n).dtype, np.array(ckpt.raw(n))) for n in chunk],
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(chunk, fname))
        for rel in ckpt.other_files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(minilm / rel, dest / rel)
    (dest / WEIGHT_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return dest


def test_sharded_folder_keeps_its_layout_and_is_traced(tmp_path: Path, minilm: Path) -> None:
    base = _shard(minilm, tmp_path / "sharded")
    lab, lid = _lab_with_model(tmp_path, base)
    copy = lab.stamp("minilm", lid, tmp_path / "copy")
    out = tmp_path / "copy"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert json.loads((out / WEIGHT_INDEX).read_text()) == json.loads((base / WEIGHT_INDEX).read_text())
    for shard in base.glob("*.safetensors"):
        with SafetensorsFile(shard) as a, SafetensorsFile(out / shard.name) as b:
            assert a.header_order == b.header_order and a.metadata == b.metadata
            assert [(i.name, i.dtype, i.shape) for i in a.tensors.values()] == [
                (i.name, i.dtype, i.shape) for i in b.tensors.values()]
    report = lab.scan(out)
    assert [c.licensee_id for c in report.accused] == [lid]
    assert copy.digest == hashlib.sha256(
        json.dumps(json.loads(lab.registry.entry(copy.entry_idx).payload)["predicate"]["files"],
                   sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_single_file_base_and_model_identification(tmp_path: Path, minilm: Path) -> None:
    lab, lid = _lab_with_model(tmp_path, minilm / "model.safetensors")
    lab.stamp("minilm", lid, tmp_path / "copy.safetensors")
    leaked = tmp_path / "renamed-upload.safetensors"
    (tmp_path / "copy.safetensors").rename(leaked)
    report = lab.scan(leaked)  # no --model: found by carrier names and shapes
    assert report.model == "minilm" and [c.licensee_id for c in report.accused] == [lid]


def test_base_changed_after_registration_is_refused(tmp_path: Path, minilm: Path) -> None:
    base = tmp_path / "base.safetensors"
    shutil.copyfile(minilm / "model.safetensors", base)
    lab, lid = _lab_with_model(tmp_path, base)
    with SafetensorsFile(base) as f:
        name = next(n for n, i in f.tensors.items() if len(i.shape) == 2)
        offset = f.info(name).begin
    with open(base, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00\x00\x80\x7f")
    with pytest.raises(InputFileError, match="changed since"):
        lab.stamp("minilm", lid, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
