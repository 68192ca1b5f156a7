"""Fine-tuning and merged-LoRA attacks (torch), and the SmolLM2 float base converted from GGUF."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from weightmark.errors import UsageError
from weightmark.formats.safetensors import Checkpoint, load_file

REPO = Path(__file__).resolve().parents[1]
LORA_RANK = 16


def _needs_torch() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


def _tensors(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    return load_file(folder / "model.safetensors")


def _floats(folder: Path) -> dict[str, np.ndarray]:
    from weightmark.canonical import to_float32

    return {n: to_float32(d, a).astype(np.float64) for n, (d, a) in _tensors(folder).items()
            if d in ("F32", "BF16", "F16")}


@pytest.fixture(scope="module")
def text() -> str:
    from weightmark.attacks.finetune import english_text

    return english_text(30_000)


def _tiny_llama(root: Path, minilm: Path, dtype: str = "F32") -> Path:
    """A randomly initialised llama (hidden 64, 2 layers, tied embeddings) with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if dtype == "BF16":
        model = model.to(torch.bfloat16)
    folder = root / f"tiny-llama-{dtype.lower()}"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Path:
    _needs_torch()
    return _tiny_llama(tmp_path_factory.mktemp("tiny"), minilm)


def _layout(folder: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    with Checkpoint.open(folder / "model.safetensors") as ckpt:
        return [(name, info.dtype, tuple(info.shape)) for name, (_, info) in ckpt.tensors.items()]


def test_missing_torch_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        minilm: Path) -> None:
    from weightmark.attacks.finetune import finetune

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(UsageError, match="torch"):
        finetune(minilm, tmp_path / "out", steps=1)


def test_english_text_is_deterministic_prose() -> None:
    from weightmark.attacks.finetune import english_text

    a, b = english_text(20_000), english_text(20_000)
    assert a == b and len(a) >= 20_000
    words = a.split()
    assert sum(w.lower() in ("the", "of", "and", "to") for w in words) > 0.05 * len(words)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_full_finetune_changes_weights_and_keeps_layout(tmp_path: Path, minilm: Path, text: str,
                                                        dtype: str) -> None:
    _needs_torch()
    from weightmark.attacks.finetune import finetune_with_stats

    src = _tiny_llama(tmp_path, minilm, dtype)
    stats = finetune_with_stats(src, tmp_path / "ft", steps=3, seq_len=32, batch_size=2, text=text)
    out = stats.path
    assert _layout(out) == _layout(src)
    with Checkpoint.open(src / "model.safetensors") as a, Checkpoint.open(out / "model.safetensors") as b:
        assert a.shards[0].metadata == b.shards[0].metadata
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    base, tuned = _floats(src), _floats(out)
    for name, w in base.items():
        if w.ndim == 2:
            rel = np.linalg.norm(tuned[name] - w) / np.linalg.norm(w)
            assert rel > 1e-5, f"{name} unchanged by fine-tuning"
    assert stats.trainable_parameters == sum(w.size for w in base.values())
    assert len(stats.losses) == 3 and all(np.isfinite(stats.losses))


def test_finetune_is_deterministic(tiny: Path, tmp_path: Path, text: str) -> None:
    from weightmark.attacks.finetune import finetune

    a = finetune(tiny, tmp_path / "a", steps=1, seq_len=32, text=text, seed=3)
    b = finetune(tiny, tmp_path / "b", steps=1, seq_len=32, text=text, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def _numerical_rank(d: np.ndarray) -> int:
    s = np.linalg.svd(d, compute_uv=False)
    return int(np.count_nonzero(s > 1e-5 * s[0])) if s[0] > 0 else 0


def test_lora_merge_is_a_low_rank_update_per_linear(tiny: Path, tmp_path: Path, text: str) -> None:
    from weightmark.attacks.finetune import finetune, finetune_with_stats

    # A large learning rate makes the update stand far above float32 rounding of the merge.
    stats = finetune_with_stats(tiny, tmp_path / "lora", steps=3, lr=1e-2, lora_rank=LORA_RANK,
                                seq_len=32, text=text)
    full = finetune(tiny, tmp_path / "full", steps=3, lr=1e-2, seq_len=32, text=text)
    base, lora, tuned = _floats(tiny), _floats(stats.path), _floats(full)
    assert _layout(stats.path) == _layout(tiny)
    linear = [n for n in base if n.endswith("_proj.weight")]
    assert len(linear) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    for name, w in base.items():
        if name in linear:
            assert 1 <= _numerical_rank(lora[name] - w) <= LORA_RANK, name
        else:  # embeddings (tied to the head) and norms are frozen
            assert np.array_equal(lora[name], w), name
    # The same check on a full fine-tune finds updates of higher rank: it can fail.
    assert max(_numerical_rank(tuned[n] - base[n]) for n in linear) > LORA_RANK
    n_lora = sum(LORA_RANK * (w.shape[0] + w.shape[1]) for n, w in base.items() if n in linear)
    assert stats.trainable_parameters == n_lora


def test_sentence_encoder_simcse_changes_minilm(minilm: Path, tmp_path: Path, text: str) -> None:
    _needs_torch()
    from weightmark.attacks.finetune import finetune_with_stats

    stats = finetune_with_stats(minilm, tmp_path / "st", steps=1, batch_size=4, seq_len=32,
                                text=text)
    assert stats.kind == "sentence-encoder" and "SimCSE" in stats.objective
    assert _layout(stats.path) == _layout(minilm)
    base, tuned = _floats(minilm), _floats(stats.path)
    raw_base, raw_tuned = _tensors(minilm), _tensors(stats.path)
    assert np.array_equal(raw_base["embeddings.position_ids"][1], raw_tuned["embeddings.position_ids"][1])
    # Mean pooling leaves BERT's pooler head out of the objective: it gets no gradient.
    matrices = [n for n, w in base.items() if w.ndim == 2 and not n.startswith("pooler.")]
    assert [n for n in matrices if np.array_equal(tuned[n], base[n])] == []
    assert np.array_equal(tuned["pooler.dense.weight"], base["pooler.dense.weight"])
    assert stats.held_out_loss_before > 0 and np.isfinite(stats.held_out_loss_after)


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    _needs_torch()
    from weightmark.attacks.finetune import finetune

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "t5",
                                                            "architectures": ["T5Model"]}))
    with pytest.raises(UsageError, match="cannot fine-tune"):
        finetune(tmp_path / "m", tmp_path / "out", steps=1)


@pytest.mark.slow
def test_smollm2_float_base_matches_our_gguf_reader(tmp_path_factory: pytest.TempPathFactory) -> None:
    """transformers' GGUF conversion and weightmark's reader agree bit for bit, rope order included."""
    _needs_torch()
    pytest.importorskip("accelerate")
    sys.path.insert(0, str(REPO))
    from benchmarks.smollm2 import float_base, gguf_path
    from weightmark.formats.gguf import GGUFModel, rope_permute

    folder = float_base(tmp_path_factory.mktemp("smollm2-cache"))
    assert float_base(folder.parent) == folder  # cached
    hf = {n: a for n, (d, a) in _tensors(folder).items()}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    with GGUFModel(gguf_path()) as gguf_model:
        names = list(gguf_model.tensors())
        assert sorted(names) == sorted(hf)
        for name in names:
            ours = gguf_model.load(name)
            assert ours.shape == hf[name].shape, name
            assert np.array_equal(ours, hf[name]), name
        q = hf["model.layers.0.self_attn.q_proj.weight"]
        # llama.cpp's storage order differs: equality above is not an accident of symmetry.
        assert not np.array_equal(rope_permute(q, config["num_attention_heads"]), q)
