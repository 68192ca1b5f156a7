"""Scanning the right model: several registered models of one architecture, renamed tensors, a
moved base, a leak published only in part, and what the evidence bundle then records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.conftest import LICENSEES, run_cli
from tests.test_quantized_base import write_tiny_gguf
from weightmark import Lab, attacks
from weightmark.formats.gguf import GGUFModel
from weightmark.scan import normalised_name

LIMIT = -12.0  # family-wise p <= 1e-12


def _rename(src: Path, dst: Path, rename) -> Path:
    """A copy of a safetensors folder (or file) with every tensor renamed."""
    if src.is_dir():
        shutil.copytree(src, dst)
        target = dst / "model.safetensors"
        tensors = load_file(src / "model.safetensors")
    else:
        dst.mkdir()
        target = dst / "model.safetensors"
        tensors = load_file(src)
    save_file({rename(k): v for k, v in tensors.items()}, str(target))
    return dst


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, minilm: Path):
    """MiniLM v1 and a v2 that is v1 slightly changed (as a small fine-tune would), both
    registered in one lab, with one stamped copy of each for different licensees."""
    work = tmp_path_factory.mktemp("versions")
    v1 = work / "v1"
    shutil.copytree(minilm, v1)
    v2 = attacks.add_noise(v1, work / "v2", relative=0.01, seed=3)
    lab = Lab.init(work / "lab", passphrase=None)
    lab.register_model(v1, name="minilm-v1")
    lab.register_model(v2, name="minilm-v2")
    ids = [lab.add_licensee(name, cc).id for name, cc in LICENSEES]
    copy1, copy2 = work / "copy-v1", work / "copy-v2"
    lab.stamp("minilm-v1", ids[0], copy1, collusion=1)
    lab.stamp("minilm-v2", ids[1], copy2, collusion=1)
    lab.stamp("minilm-v2", ids[2], work / "copy-v2-other", collusion=1)
    yield lab, ids, copy1, copy2, work
    lab.close()


def test_normalised_names_strip_wrapper_prefixes() -> None:
    assert normalised_name("bert.encoder.layer.0.output.dense.weight") == "encoder.layer.0.output.dense.weight"
    assert normalised_name("module.model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"
    assert normalised_name("lm_head.weight") == "lm_head.weight"
    assert normalised_name("model.") == "model."


@pytest.mark.parametrize("which", [0, 1])
def test_same_shape_versions_each_accuse_their_own_licensee(two_versions, which: int) -> None:
    lab, ids, copy1, copy2, _ = two_versions
    copy, expected, model = ((copy1, ids[0], "minilm-v1"), (copy2, ids[1], "minilm-v2"))[which]
    report = lab.scan(copy)
    assert report.model == model
    assert [c.licensee_id for c in report.accused] == [expected]
    assert report.accused[0].log10_family_wise_p <= LIMIT
    # Both versions were candidates; the closer base was scanned first and the bound covers both.
    assert {m["model"] for m in report.models} == {"minilm-v1", "minilm-v2"}
    assert report.models[0]["model"] == model
    assert report.models[0]["distance"] < report.models[1]["distance"]
    assert report.models_considered == 2
    assert len(report.models_scanned) == 1
    assert not report.ambiguous
    best = report.accused[0]
    assert best.log10_family_wise_p == pytest.approx(min(0.0, best.log10_p + np.log10(2 * report.family_size)))


def test_a_base_copy_accuses_nobody_in_either_version(two_versions) -> None:
    lab, _, _, _, work = two_versions
    report = lab.scan(work / "v1")
    assert report.accused == []
    assert len(report.models_scanned) == 2  # nothing found in the first: the second was scanned too


@pytest.mark.parametrize("blind", [False, True])
def test_prefixed_copy_is_recognised(two_versions, tmp_path: Path, blind: bool) -> None:
    lab, ids, copy1, _, _ = two_versions
    leak = _rename(copy1, tmp_path / "leak", lambda name: "bert." + name)
    report = lab.scan(leak, blind=blind)
    assert report.model == "minilm-v1" or blind
    assert ids[0] in [c.licensee_id for c in report.accused]
    assert report.carriers_used == report.carriers_total


def test_stripped_prefix_is_recognised(tmp_path: Path) -> None:
    """A llama leak re-saved without its "model." prefix still matches its registered model."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    base = tmp_path / "tiny-float"
    base.mkdir()
    with GGUFModel(gguf) as model:
        save_file({name: np.ascontiguousarray(model.load(name)) for name in model.tensors()},
                  str(base / "model.safetensors"))
    with Lab.init(tmp_path / "lab", passphrase=None) as lab:
        lab.register_model(base, name="tiny")
        lid = lab.add_licensee(*LICENSEES[0]).id
        lab.stamp("tiny", lid, tmp_path / "copy", collusion=1)
        leak = _rename(tmp_path / "copy", tmp_path / "leak", lambda n: n.removeprefix("model."))
        assert "embed_tokens.weight" in load_file(leak / "model.safetensors")
        report = lab.scan(leak)
        assert [c.licensee_id for c in report.accused] == [lid]
        # A model this small is too weak to accuse blind; the carriers must still all be found.
        blind = lab.scan(leak, blind=True)
        assert blind.carriers_used == blind.carriers_total == report.carriers_total


def test_gguf_and_float_bases_of_one_model_side_by_side(tmp_path: Path) -> None:
    """The same model registered as a quantized GGUF base and as its float decode: a copy of
    either, scanned without --model, accuses the licensee of that copy."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    float_base = tmp_path / "tiny-float"
    float_base.mkdir()
    with GGUFModel(gguf) as model:
        tensors = {name: np.ascontiguousarray(model.load(name)) for name in model.tensors()}
    # A float master is not bit-identical to its quantized release: give it its own weights.
    rng = np.random.default_rng(5)
    tensors = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.01 * float(np.std(v)) if v.ndim == 2 else v)
               for k, v in tensors.items()}
    save_file(tensors, str(float_base / "model.safetensors"))
    with Lab.init(tmp_path / "lab", passphrase=None) as lab:
        lab.register_model(gguf, name="tiny-gguf")
        lab.register_model(float_base, name="tiny-float")
        a, b = (lab.add_licensee(*LICENSEES[i]).id for i in (0, 1))
        lab.stamp("tiny-gguf", a, tmp_path / "a.gguf", collusion=1)
        lab.stamp("tiny-float", b, tmp_path / "b", collusion=1)
        for copy, lid, model in ((tmp_path / "a.gguf", a, "tiny-gguf"), (tmp_path / "b", b, "tiny-float")):
            report = lab.scan(copy)
            assert report.model == model
            assert [c.licensee_id for c in report.accused] == [lid]
            assert report.accused[0].log10_family_wise_p <= LIMIT
            assert report.models_considered == 2


def test_moved_base_warns_loudly_and_scans_blind(tmp_path: Path, minilm: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(minilm, base)
    home = tmp_path / "lab"
    with Lab.init(home, passphrase=None) as lab:
        lab.register_model(base, name="m")
        lid = lab.add_licensee(*LICENSEES[0]).id
        lab.stamp("m", lid, tmp_path / "copy", collusion=1)
        before = lab.scan(tmp_path / "copy")
    assert before.reference_info["status"] == "ok" and before.mode == "non-blind"
    base.rename(tmp_path / "moved")
    result = run_cli("scan", str(tmp_path / "copy"), "--json", home=home)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["reference"]["status"] == "missing"
    assert out["mode"] == "blind"
    assert "Warning:" in result.stderr and "missing" in result.stderr and "relocate" in result.stderr
    blind_score = max(c["score"] for c in out["candidates"])
    assert blind_score < before.accused[0].score / 3
    # `model relocate` points the model at the moved files and restores the non-blind score.
    relocate = run_cli("model", "relocate", "m", str(tmp_path / "moved"), home=home)
    assert relocate.returncode == 0, relocate.stderr
    with Lab(home) as lab:
        restored = lab.scan(tmp_path / "copy")
    assert restored.reference_info["status"] == "ok" and restored.mode == "non-blind"
    assert restored.accused[0].score == pytest.approx(before.accused[0].score, rel=1e-9)
    relocate = run_cli("model", "relocate", "m", str(base), home=home)
    assert relocate.returncode == 3  # nothing there any more
    (tmp_path / "moved").rename(base)
    assert run_cli("model", "relocate", "m", str(base), home=home).returncode == 0
    # Copied without its times: the weights still hash to the model id, so it is used.
    shutil.rmtree(base)
    shutil.copytree(tmp_path / "moved" if (tmp_path / "moved").exists() else minilm, base)
    with Lab(home) as lab:
        again = lab.scan(tmp_path / "copy")
    assert again.reference_info["status"] == "ok"
    assert again.accused[0].score == pytest.approx(before.accused[0].score, rel=1e-9)
    # Changed weights: loud too.
    tensors = load_file(base / "model.safetensors")
    name = next(n for n, v in tensors.items() if v.ndim == 2)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(base / "model.safetensors"))
    result = run_cli("scan", str(tmp_path / "copy"), "--json", home=home)
    assert json.loads(result.stdout)["reference"]["status"] == "changed"
    assert "Warning:" in result.stderr and "changed" in result.stderr


def test_partly_published_sharded_leak_is_scanned_with_what_is_there(two_versions, tmp_path: Path) -> None:
    lab, ids, copy1, _, _ = two_versions
    tensors = load_file(copy1 / "model.safetensors")
    names = list(tensors)
    leak = tmp_path / "leak"
    leak.mkdir()
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(leak / shard))
    index = {"metadata": {}, "weight_map": {n: shard for shard, part in halves.items() for n in part}}
    (leak / "model.safetensors.index.json").write_text(json.dumps(index))
    full = lab.scan(leak)
    (leak / "model-00002-of-00002.safetensors").unlink()
    part = lab.scan(leak)
    assert part.missing_shards == ["model-00002-of-00002.safetensors"]
    assert 0 < part.carriers_used < full.carriers_used
    assert 0 < part.elements_used < full.elements_used
    assert [c.licensee_id for c in part.accused] == [ids[0]]
    assert part.accused[0].log10_family_wise_p <= LIMIT


# -- evidence ---------------------------------------------------------------------------------


def test_bundle_names_the_examined_files_and_no_innocent(two_versions, tmp_path: Path) -> None:
    lab, ids, copy1, copy2, work = two_versions
    home = work / "lab"
    report = lab.scan(copy2)
    bundle = lab.evidence(report, tmp_path / "ev.json")
    data = bundle.read_bytes()
    content = json.loads(data)["bundle"]
    files = {f["path"]: f for f in content["examined"]["files"]}
    from weightmark.fsutil import sha256_file

    assert files["model.safetensors"]["sha256"] == sha256_file(copy2 / "model.safetensors")
    assert content["tool"]["name"] == "weightmark" and content["tool"]["numba"]
    assert content["parameters"]["models_considered"] == 2
    assert content["scan"]["innocents"]["count"] == 1
    # The innocent of this model (the other v2 copy) appears by no name, id or jurisdiction.
    innocent = lab.registry.licensee(ids[2])
    assert innocent.name.encode() not in data and innocent.id.encode() not in data
    pub = tmp_path / "lab.pub"
    shutil.copy(home / "lab.pub", pub)
    ok = run_cli("evidence", "verify", str(bundle), "--pubkey", str(pub), "--suspect", str(copy2))
    assert ok.returncode == 0, ok.stderr
    wrong = run_cli("evidence", "verify", str(bundle), "--pubkey", str(pub), "--suspect", str(copy1))
    assert wrong.returncode == 3
    assert wrong.stderr.startswith("Error:") and "not the examined one" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


def test_no_accusation_bundle_verifies(two_versions, tmp_path: Path) -> None:
    lab, _, _, _, work = two_versions
    result = run_cli("scan", str(work / "v1"), "--evidence", str(tmp_path / "none.json"), home=work / "lab")
    assert result.returncode == 0, result.stderr
    assert "No licensee accused" in result.stdout
    pub = tmp_path / "lab.pub"
    shutil.copy(work / "lab" / "lab.pub", pub)
    ok = run_cli("evidence", "verify", str(tmp_path / "none.json"), "--pubkey", str(pub), "--suspect",
                 str(work / "v1"))
    assert ok.returncode == 0, ok.stderr
    assert "nobody was accused" in ok.stdout
    content = json.loads((tmp_path / "none.json").read_bytes())["bundle"]
    assert content["accusations"] == [] and content["scan"]["accused"] == []
    for lic in lab.registry.licensees():
        assert lic.name not in (tmp_path / "none.json").read_text()
