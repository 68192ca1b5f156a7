"""Mixture-of-Experts models: experts carry the watermark (per-expert safetensors and GGUF's fused
3-D expert tensors), and a copy whose experts were permuted with their router rows is traced."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from benchmarks.synth import PRESETS, scaled, tensor_specs, write_checkpoint
from weightmark import Lab
from weightmark.attacks import permute_experts
from weightmark.attacks.functional import expert_permutations
from weightmark.canonical import to_float32
from weightmark.formats.gguf import GGUFModel, write_gguf
from weightmark.formats.safetensors import Checkpoint
from weightmark.moe import expert_layers, fuse_experts, moe_forward

EXPERTS = 60  # Qwen-MoE has 60 routed experts per layer


def _floats(path: Path) -> list[tuple[str, np.ndarray]]:
    with Checkpoint.open(path) as ckpt:
        return [(name, to_float32(info.dtype, np.array(ckpt.raw(name)))) for name, (_, info) in ckpt.tensors.items()]


@pytest.fixture(scope="module")
def qwen_lab(tmp_path_factory: pytest.TempPathFactory):
    """A 1-layer Qwen-MoE slice (60 experts, a shared expert, sharded), registered and stamped
    for two licensees."""
    work = tmp_path_factory.mktemp("qwen-moe")
    base = write_checkpoint(work / "base", "qwen-moe", scale=0.05, layers=1, shard_bytes=2_000_000).path
    lab = Lab.init(work / "lab", passphrase=None)
    lab.register_model(base, name="qwen-moe")
    ids = [lab.add_licensee(name, cc).id for name, cc in (("Acme Robotics", "US"), ("Birch Analytics", "CA"))]
    copies = [work / f"copy-{i}" for i in range(2)]
    for lid, out in zip(ids, copies, strict=True):
        lab.stamp("qwen-moe", lid, out, collusion=1)
    yield lab, base, ids, copies, work
    lab.close()


def test_synth_writes_real_moe_layouts(tmp_path: Path) -> None:
    mixtral = scaled(PRESETS["mixtral-8x7b"], 0.05, layers=1)
    names = dict(tensor_specs(mixtral))
    h, inter = mixtral.hidden, mixtral.expert_intermediate
    assert names["model.layers.0.block_sparse_moe.experts.7.w1.weight"] == (inter, h)
    assert names["model.layers.0.block_sparse_moe.experts.7.w2.weight"] == (h, inter)
    assert names["model.layers.0.block_sparse_moe.gate.weight"] == (8, h)
    assert "model.layers.0.block_sparse_moe.experts.8.w1.weight" not in names
    written = write_checkpoint(tmp_path / "q", "qwen-moe", scale=0.05, layers=1, shard_bytes=1_000_000)
    assert len(written.shards) > 1
    index = json.loads((written.path / "model.safetensors.index.json").read_text())
    config = json.loads((written.path / "config.json").read_text())
    assert config["num_experts"] == EXPERTS and config["model_type"] == "qwen2_moe"
    with Checkpoint.open(written.path) as ckpt:
        assert set(ckpt.tensors) == set(index["weight_map"])
        assert ckpt.info("model.layers.0.mlp.shared_expert.up_proj.weight").shape == (
            config["shared_expert_intermediate_size"], config["hidden_size"])
        assert ckpt.info("model.layers.0.mlp.experts.59.down_proj.weight").dtype == "BF16"
        w = to_float32("BF16", ckpt.raw("model.layers.0.mlp.experts.3.gate_proj.weight"))
    rms = np.sqrt(np.mean(w.astype(np.float64) ** 2, axis=1))
    # log-normal row RMS (sigma 0.35): a 95th/5th percentile ratio near exp(2 * 1.645 * 0.35) = 3.2
    spread = np.percentile(rms, 95) / np.percentile(rms, 5)
    assert 2.0 < spread < 5.0
    # deterministic: the same preset and seed give the same bytes
    again = write_checkpoint(tmp_path / "q2", "qwen-moe", scale=0.05, layers=1, shard_bytes=1_000_000)
    for shard in written.shards:
        assert (written.path / shard).read_bytes() == (again.path / shard).read_bytes()


def test_per_expert_tensors_are_carriers_and_traced(qwen_lab) -> None:
    lab, base, ids, copies, _ = qwen_lab
    carriers = {c.name for c in lab.registry.carriers(lab.registry.model("qwen-moe").model_id)}
    layer = expert_layers(carriers)[0]
    assert layer.count == EXPERTS and layer.router == "model.layers.0.mlp.gate.weight"
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in carriers
    report = lab.scan(copies[1])
    assert [c.licensee_id for c in report.accused] == [ids[1]]
    assert report.carriers_used == report.carriers_total
    # the per-expert carriers alone carry the accused's codeword (scan just the experts' signal)
    expert_signal = [row["scores"][0] for row in report.carrier_signal if ".mlp.experts." in row["name"]]
    assert len(expert_signal) == 3 * EXPERTS and np.mean(expert_signal) > 1.0


def test_mixtral_slice_stamped_scanned_accused(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", "mixtral-8x7b", scale=0.03, layers=1).path
    with Lab.init(tmp_path / "lab", passphrase=None) as lab:
        lab.register_model(base, name="mixtral")
        lid = lab.add_licensee("Cobalt Systems", "FR").id
        lab.stamp("mixtral", lid, tmp_path / "copy", collusion=1)
        carriers = {c.name for c in lab.registry.carriers(lab.registry.model("mixtral").model_id)}
        assert {f"model.layers.0.block_sparse_moe.experts.{e}.w{k}.weight" for e in range(8) for k in (1, 2, 3)} <= carriers
        report = lab.scan(tmp_path / "copy")
        assert [c.licensee_id for c in report.accused] == [lid]


def _write_moe_gguf(src: Path, out: Path, qtype: str) -> None:
    """A Qwen-MoE checkpoint converted the way llama.cpp does: experts fused per layer."""
    config = json.loads((src / "config.json").read_text())
    tensors = [(n, a) for n, a in _floats(src) if "shared_expert_gate" not in n]
    write_gguf(out, "qwen2moe", fuse_experts(tensors), qtype,
               {"attention.head_count": config["num_attention_heads"], "expert_count": config["num_experts"],
                "expert_used_count": config["num_experts_per_tok"]})


def test_gguf_fused_experts_read_as_per_expert_tensors(qwen_lab) -> None:
    _, base, _, _, work = qwen_lab
    path = work / "base-q8.gguf"
    _write_moe_gguf(base, path, "Q8_0")
    reader = gguf.GGUFReader(path)
    fused = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert fused.data.ndim >= 3  # stored as one 3-D tensor
    independent = gguf.quants.dequantize(fused.data, fused.tensor_type)  # [E, out, in]
    with GGUFModel(path) as model:
        metas = model.tensors()
        name = "model.layers.0.mlp.experts.17.down_proj.weight"
        assert metas[name].shape == independent.shape[1:]
        assert metas[name].source_name == "blk.0.ffn_down_exps.weight[17]"
        np.testing.assert_array_equal(model.load(name), independent[17])
        assert not any(len(m.shape) == 3 for m in metas.values())


def test_gguf_q4_0_moe_leak_traced(qwen_lab) -> None:
    lab, _, ids, copies, work = qwen_lab
    leak = work / "leak-q4_0.gguf"
    _write_moe_gguf(copies[0], leak, "Q4_0")
    report = lab.scan(leak)
    assert report.format == "gguf"
    assert [c.licensee_id for c in report.accused] == [ids[0]]
    used_experts = [row for row in report.carrier_signal if ".mlp.experts." in row["name"]]
    assert len(used_experts) == 3 * EXPERTS


def test_permute_experts_preserves_the_function(qwen_lab, tmp_path: Path) -> None:
    _, base, _, _, _ = qwen_lab
    out = permute_experts(base, tmp_path / "permuted", seed=5)
    before, after = dict(_floats(base)), dict(_floats(out))
    perm = expert_permutations(base, seed=5)[0]
    assert np.count_nonzero(perm != np.arange(EXPERTS)) > EXPERTS // 2
    prefix = "model.layers.0.mlp."

    def block(w: dict[str, np.ndarray]) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
        experts = [{p: w[f"{prefix}experts.{e}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
                   for e in range(EXPERTS)]
        return w[prefix + "gate.weight"], experts

    x = np.random.default_rng(0).standard_normal((6, before[prefix + "gate.weight"].shape[1])).astype(np.float32)
    x *= 30  # routers are quiet (RMS 0.005): make the routing decisive
    kwargs = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", "top_k": 4}
    y0 = moe_forward(x, *block(before), **kwargs)
    y1 = moe_forward(x, *block(after), **kwargs)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-7)
    assert not np.array_equal(after[prefix + "experts.0.up_proj.weight"], before[prefix + "experts.0.up_proj.weight"])
    # a non-preserving change (router rows not moved) does change the function
    broken = dict(after)
    broken[prefix + "gate.weight"] = before[prefix + "gate.weight"]
    assert not np.allclose(moe_forward(x, *block(broken), **kwargs), y0, rtol=1e-3)


def test_permuted_experts_realigned_and_traced(qwen_lab, tmp_path: Path) -> None:
    lab, _, ids, copies, _ = qwen_lab
    leak = permute_experts(copies[1], tmp_path / "leak", seed=11)
    perm = expert_permutations(copies[1], seed=11)[0]
    report = lab.scan(leak)
    moved = int(np.count_nonzero(perm != np.arange(EXPERTS)))
    assert f"experts of layer 0: permuted ({moved} of {EXPERTS} moved)" in report.aligned
    assert [c.licensee_id for c in report.accused] == [ids[1]]
    assert not any("not found" in line or "still" in line for line in report.aligned)
    # the experts' own signal is back: read without re-alignment they carry none of it
    aligned = [r["scores"][0] for r in report.carrier_signal if ".mlp.experts." in r["name"]]
    blind_to_order = lab.scan(leak, realign=False)
    by_name = {c.entry_id: c.score for c in blind_to_order.candidates}
    assert np.mean(aligned) > 1.0
    assert report.candidates[0].score > by_name[report.candidates[0].entry_id] + 3.0


def test_gguf_moe_base_stamped_in_place_and_traced(qwen_lab, tmp_path: Path) -> None:
    """A lab whose master is a GGUF MoE: per-expert carriers registered from the fused tensors,
    copies stamped slice by slice, a copy traced."""
    _, base, _, _, _ = qwen_lab
    _write_moe_gguf(base, tmp_path / "base.gguf", "Q8_0")
    with Lab.init(tmp_path / "lab", passphrase=None) as lab:
        model = lab.register_model(tmp_path / "base.gguf", name="qwen-gguf")
        carriers = {c.name: c.shape for c in lab.registry.carriers(model.model_id)}
        assert len(expert_layers(carriers)[0].experts) == EXPERTS
        lids = [lab.add_licensee(name, "NL").id for name in ("Delft Data BV", "Ede Compute BV")]
        for lid in lids:
            lab.stamp("qwen-gguf", lid, tmp_path / f"{lid}.gguf", collusion=1)
        report = lab.scan(tmp_path / f"{lids[1]}.gguf")
        assert [c.licensee_id for c in report.accused] == [lids[1]]
        assert report.carriers_used == len(carriers)
        with GGUFModel(tmp_path / f"{lids[1]}.gguf") as copy, GGUFModel(tmp_path / "base.gguf") as orig:
            name = "model.layers.0.mlp.experts.42.up_proj.weight"
            assert not np.array_equal(copy.raw(name), orig.raw(name))  # the expert slice itself moved


def test_permute_experts_refuses_a_dense_model(tmp_path: Path) -> None:
    from weightmark.errors import UsageError

    dense = write_checkpoint(tmp_path / "dense", "llama-3.2-1b", scale=0.05, layers=1).path
    with pytest.raises(UsageError, match="no Mixture-of-Experts layer"):
        permute_experts(dense, tmp_path / "out", seed=1)
    assert not (tmp_path / "out").exists()


def test_units_permuted_inside_experts_realigned(qwen_lab, tmp_path: Path) -> None:
    """Each expert is an FFN: its hidden units can be permuted too (gate/up rows with down
    columns). Experts whose units moved still find their partner and are unscrambled."""
    from weightmark.attacks import map_floats

    lab, _, ids, copies, _ = qwen_lab
    scrambled = {3, 9, 17, 25, 33, 40, 51, 58}

    def fn(name: str, w: np.ndarray) -> np.ndarray:
        parts = name.split(".")
        if ".mlp.experts." not in name or int(parts[5]) not in scrambled:
            return w
        perm = np.random.default_rng(int(parts[5])).permutation(w.shape[1] if "down_proj" in name else w.shape[0])
        return w[:, perm] if "down_proj" in name else w[perm]

    inside = map_floats(copies[0], tmp_path / "inside", fn)
    leak = permute_experts(inside, tmp_path / "leak", seed=2)
    report = lab.scan(leak)
    assert [c.licensee_id for c in report.accused] == [ids[0]]
    unit_lines = [line for line in report.aligned if line.startswith("expert ") and "rows permuted" in line]
    assert len(unit_lines) == len(scrambled)
    assert any(line.startswith("experts of layer 0: permuted") for line in report.aligned)
    signal = {r["name"]: r["scores"][0] for r in report.carrier_signal}
    # the scrambled experts carry the codeword again once unscrambled
    inside_signal = [signal[f"model.layers.0.mlp.experts.{e}.{p}.weight"] for e in scrambled
                     for p in ("gate_proj", "up_proj", "down_proj")]
    # (a carrier read at the wrong place scores about N(0, 1); these copies are unquantized, so a
    # carrier read in place scores far above that)
    assert min(inside_signal) > 10.0
