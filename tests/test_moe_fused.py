"""Fused Hugging Face expert tensors (gpt-oss / Llama-4 / fused Qwen3-MoE layouts): every
expert's slice is a carrier unit, stamped and traced, and a copy whose experts were permuted
together with the router's rows is re-aligned and traced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from weightmark import Lab
from weightmark.canonical import to_float32
from weightmark.errors import UsageError
from weightmark.formats.safetensors import Checkpoint, save_file
from weightmark.moe import expert_layers, moe_forward

HIDDEN, INTER, EXPERTS, LAYERS, VOCAB = 128, 128, 8, 3, 512


def _bf16(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_fused(folder: Path, seed: int = 0, shards: int = 1) -> Path:
    """A Llama-4-style MoE in BF16: `feed_forward.experts.gate_up_proj` [E, hidden, 2 * inter]
    (gate then up along the last axis), `down_proj` [E, inter, hidden], `router` [E, hidden];
    with `shards` > 1, layers split over that many files with a Hugging Face index."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        rows = np.exp(rng.normal(0.0, 0.35, shape[:-1]))[..., None]  # row RMS spread as trained weights
        return _bf16(rng.standard_normal(shape) * 0.02 * rows)

    items = [("model.embed_tokens.weight", "BF16", w(VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        items += [(p + f"self_attn.{k}_proj.weight", "BF16", w(HIDDEN, HIDDEN)) for k in "qkvo"]
        items += [(p + "feed_forward.router.weight", "BF16", w(EXPERTS, HIDDEN)),
                  (p + "feed_forward.experts.gate_up_proj", "BF16", w(EXPERTS, HIDDEN, 2 * INTER)),
                  (p + "feed_forward.experts.down_proj", "BF16", w(EXPERTS, INTER, HIDDEN)),
                  (p + "input_layernorm.weight", "BF16", _bf16(np.ones(HIDDEN)))]
    folder.mkdir()
    if shards == 1:
        save_file(folder / "model.safetensors", items)
        return folder
    parts = np.array_split(np.arange(len(items)), shards)
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(folder / name, [items[j] for j in part])
        weight_map.update({items[j][0]: name for j in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _tensors(path: Path) -> dict[str, np.ndarray]:
    with Checkpoint.open(path) as ckpt:
        return {name: to_float32(info.dtype, np.array(ckpt.raw(name))) for name, (_, info) in ckpt.tensors.items()}


def _forward(t: dict[str, np.ndarray], layer: int, x: np.ndarray) -> np.ndarray:
    p = f"model.layers.{layer}.feed_forward."
    gate_up, down = t[p + "experts.gate_up_proj"], t[p + "experts.down_proj"]
    experts = [{"w1": gate_up[e][:, :INTER].T, "w3": gate_up[e][:, INTER:].T, "w2": down[e].T} for e in range(EXPERTS)]
    return moe_forward(x, t[p + "router.weight"], experts, top_k=2)


def permute_fused_experts(src: Path, dst: Path, seed: int) -> dict[int, np.ndarray]:
    """Expert j of the copy is expert perm[j] of `src` in every fused tensor, router row j its row
    perm[j]: the same function."""
    rng = np.random.default_rng(seed)
    perms = {i: rng.permutation(EXPERTS) for i in range(LAYERS)}
    with Checkpoint.open(src) as ckpt:
        items = []
        for name, (_, info) in ckpt.tensors.items():
            raw = np.array(ckpt.raw(name))
            if ".feed_forward." in name and (".experts." in name or name.endswith("router.weight")):
                raw = raw[perms[int(name.split(".")[2])]]
            items.append((name, info.dtype, raw))
    dst.mkdir()
    save_file(dst / "model.safetensors", items)
    return perms


@pytest.fixture(scope="module")
def fused_lab(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("fused-moe")
    base = write_fused(work / "base")
    lab = Lab.init(work / "lab", passphrase=None)
    lab.register_model(base, name="fused")
    ids = [lab.add_licensee(name, cc).id for name, cc in (("Acme Robotics", "US"), ("Birch Analytics", "CA"))]
    copies = [work / f"copy-{i}" for i in range(2)]
    for lid, out in zip(ids, copies, strict=True):
        lab.stamp("fused", lid, out, collusion=1)
    yield lab, base, ids, copies, work
    lab.close()


def test_each_expert_slice_is_a_carrier(fused_lab) -> None:
    lab, base, _, copies, _ = fused_lab
    carriers = {c.name: c for c in lab.registry.carriers(lab.registry.model("fused").model_id)}
    fused = "model.layers.0.feed_forward.experts.gate_up_proj"
    assert fused not in carriers  # not one carrier with one row per expert
    for e in range(EXPERTS):
        unit = carriers[f"{fused}[{e}]"]
        assert unit.shape == (HIDDEN, 2 * INTER) and unit.row_scale.shape == (HIDDEN,)
        assert carriers[f"model.layers.2.feed_forward.experts.down_proj[{e}]"].shape == (INTER, HIDDEN)
    # the row scales are each slice's own rows, not the fused tensor flattened per expert
    base_t = _tensors(base)
    rms = np.sqrt(np.mean(base_t[fused][3].astype(np.float64) ** 2, axis=1))
    assert np.allclose(carriers[f"{fused}[3]"].row_scale, rms, rtol=1e-6)
    layers = expert_layers([*carriers, *base_t])  # the router is too small to carry, but moves with them
    assert sorted(layers) == [0, 1, 2] and layers[0].count == EXPERTS
    assert layers[0].router == "model.layers.0.feed_forward.router.weight"
    # stamping moved elements of every expert's slice, and nothing else about the tensor
    copy_t = _tensors(copies[0])
    for e in range(EXPERTS):
        moved = np.mean(copy_t[fused][e] != base_t[fused][e])
        assert 0.2 < moved < 0.95, f"expert {e}: {moved:.2f} of its elements moved"
    assert np.array_equal(copy_t["model.layers.0.feed_forward.router.weight"],
                          base_t["model.layers.0.feed_forward.router.weight"])


def test_stamped_copies_are_traced(fused_lab) -> None:
    lab, _, ids, copies, _ = fused_lab
    for lid, copy in zip(ids, copies, strict=True):
        report = lab.scan(copy)
        assert [c.licensee_id for c in report.accused] == [lid]
        assert report.carriers_used == report.carriers_total
        signal = [r["scores"][0] for r in report.carrier_signal if ".experts." in r["name"]]
        assert len(signal) == 2 * EXPERTS * LAYERS and np.mean(signal) > 1.0


def test_expert_permutation_is_undone_and_traced(fused_lab) -> None:
    lab, _, ids, copies, work = fused_lab
    permuted = work / "permuted"
    perms = permute_fused_experts(copies[1], permuted, seed=4)
    assert all((p != np.arange(EXPERTS)).any() for p in perms.values())
    before, after = _tensors(copies[1]), _tensors(permuted)
    x = np.random.default_rng(9).standard_normal((6, HIDDEN)).astype(np.float32)
    for layer in range(LAYERS):  # function-preserving
        assert np.allclose(_forward(before, layer, x), _forward(after, layer, x), rtol=1e-4, atol=1e-6)
    report = lab.scan(permuted)
    assert [c.licensee_id for c in report.accused] == [ids[1]]
    for layer in range(LAYERS):
        moved = int((perms[layer] != np.arange(EXPERTS)).sum())
        assert f"experts of layer {layer}: permuted ({moved} of {EXPERTS} moved)" in report.aligned
    # without re-alignment the permuted experts read as noise: the score falls
    unaligned = lab.scan(permuted, realign=False)
    assert unaligned.candidates[0].score < report.candidates[0].score / 2


def test_quantized_copies_of_a_fused_base_are_refused_before_anything_is_written(fused_lab) -> None:
    lab, _, ids, _, work = fused_lab
    entries = lab.registry.entry_count()
    for fmt in ("gguf:Q8_0", "gptq:4bit-g128"):
        out = work / f"refused-{fmt.replace(':', '-')}"
        with pytest.raises(UsageError, match="fused expert tensors"):
            lab.stamp("fused", ids[0], out, fmt=fmt, collusion=1)
        assert not out.exists()
    assert lab.registry.entry_count() == entries
