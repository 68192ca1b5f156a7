"""Function-preserving attacks leave the model's outputs unchanged and move its weights.

llama: a small numpy forward pass (RMSNorm, rope, GQA attention, SwiGLU) on a tiny random
checkpoint, logits compared before and after each transform. BERT: the real MiniLM through
the numpy encoder in benchmarks/minilm.py, sentence embeddings compared.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from benchmarks.minilm import load_encoder, load_weights
from weightmark.attacks.functional import (
    function_preserving,
    permute_ffn,
    permute_heads,
    rename_transpose_drop,
    rescale,
    rotate_residual,
)
from weightmark.errors import UsageError
from weightmark.formats.safetensors import load_file, save_file

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Export controls apply to model weights.",
    "A licensee leaked a quantized copy",
    "short",
]


def make_tiny_llama(folder: Path, seed: int = 0, config: dict | None = None) -> Path:
    """A random llama checkpoint (F32 safetensors + config.json) with non-trivial norm weights."""
    cfg = dict(TINY, **(config or {}))
    rng = np.random.default_rng(seed)
    h, inter, heads, kv = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    hd = h // heads

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return rng.uniform(0.5, 1.5, h).astype(np.float32)

    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": mat(cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "input_layernorm.weight": norm(),
                p + "self_attn.q_proj.weight": mat(heads * hd, h),
                p + "self_attn.k_proj.weight": mat(kv * hd, h),
                p + "self_attn.v_proj.weight": mat(kv * hd, h),
                p + "self_attn.o_proj.weight": mat(h, heads * hd),
                p + "post_attention_layernorm.weight": norm(),
                p + "mlp.gate_proj.weight": mat(inter, h),
                p + "mlp.up_proj.weight": mat(inter, h),
                p + "mlp.down_proj.weight": mat(h, inter),
            }
        )
    tensors["model.norm.weight"] = norm()
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = mat(cfg["vocab_size"], h)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Hugging Face rotate_half rope on [heads, tokens, head_dim]."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    angles = np.arange(x.shape[1])[:, None] * inv[None, :]
    cos, sin = (
        np.cos(np.concatenate([angles, angles], -1)),
        np.sin(np.concatenate([angles, angles], -1)),
    )
    rotated = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + rotated * sin


def llama_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    """Causal llama forward in float64 (RMSNorm, rope, GQA attention, SwiGLU): logits
    [tokens, vocab]."""
    cfg = json.loads((folder / "config.json").read_text())
    w = {
        name: array.astype(np.float64)
        for name, (_, array) in load_file(folder / "model.safetensors").items()
    }
    heads, kv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    hd = cfg["hidden_size"] // heads
    n = len(tokens)
    x = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (a @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, hd).transpose(1, 0, 2)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kv, hd).transpose(1, 0, 2)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kv, hd).transpose(1, 0, 2)
        q, k = _rope(q, cfg["rope_theta"]), _rope(k, cfg["rope_theta"])
        k, v = np.repeat(k, heads // kv, axis=0), np.repeat(v, heads // kv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = (
            x
            + (probs @ v).transpose(1, 0, 2).reshape(n, heads * hd)
            @ w[p + "self_attn.o_proj.weight"].T
        )
        m = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = m @ w[p + "mlp.gate_proj.weight"].T
        x = (
            x
            + (gate / (1 + np.exp(-gate)) * (m @ w[p + "mlp.up_proj.weight"].T))
            @ w[p + "mlp.down_proj.weight"].T
        )
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return _rms_norm(x, w["model.norm.weight"], eps) @ head.T


TOKENS = np.random.default_rng(7).integers(0, TINY["vocab_size"], 24)
TRANSFORMS: dict[str, Callable[[Path, Path], Path]] = {
    "permute_ffn": lambda a, b: permute_ffn(a, b, 1),
    "permute_heads": lambda a, b: permute_heads(a, b, 2),
    "rescale": lambda a, b: rescale(a, b, 3),
    "rotate_residual": lambda a, b: rotate_residual(a, b, 4),
    "function_preserving": lambda a, b: function_preserving(a, b, 5),
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "base")


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_llama_transform_keeps_logits_and_moves_weights(
    tiny_llama: Path, tmp_path: Path, transform: str
) -> None:
    out = TRANSFORMS[transform](tiny_llama, tmp_path / "out")
    before, after = llama_logits(tiny_llama, TOKENS), llama_logits(out, TOKENS)
    assert np.max(np.abs(after - before)) < 1e-4 * np.max(np.abs(before))
    assert (out / "config.json").read_text() == (tiny_llama / "config.json").read_text()
    old, new = load_file(tiny_llama / "model.safetensors"), load_file(out / "model.safetensors")
    assert list(old) == list(new)
    moved = [
        n
        for n in old
        if old[n][1].ndim == 2 and not np.allclose(old[n][1], new[n][1], rtol=0, atol=1e-6)
    ]
    touched = {
        "permute_ffn": "mlp.",
        "permute_heads": "self_attn.",
        "rescale": "_proj",
        "rotate_residual": "",
        "function_preserving": "",
    }[transform]
    expected = [
        n
        for n in old
        if old[n][1].ndim == 2 and (touched in n or (transform == "rescale" and "lm_head" in n))
    ]
    assert moved == expected


def test_llama_transforms_check_themselves(tiny_llama: Path, tmp_path: Path) -> None:
    """A broken transform (rows permuted without the matching columns) does change the logits."""
    from weightmark.attacks import map_floats

    perm = np.random.default_rng(0).permutation(TINY["intermediate_size"])
    broken = map_floats(
        tiny_llama, tmp_path / "broken", lambda n, w: w[perm] if "up_proj" in n else w
    )
    assert np.max(np.abs(llama_logits(broken, TOKENS) - llama_logits(tiny_llama, TOKENS))) > 1e-2


def test_rotation_unties_tied_embeddings_with_a_final_norm(tmp_path: Path) -> None:
    """A tied lm_head cannot stay tied under rotation when the final norm is not uniform: the
    rotated copy gets its own lm_head, and the logits are unchanged."""
    tied = make_tiny_llama(tmp_path / "tied", config={"tie_word_embeddings": True})
    out = rotate_residual(tied, tmp_path / "out", 0)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    new = load_file(out / "model.safetensors")
    assert "lm_head.weight" in new and "lm_head.weight" not in load_file(tied / "model.safetensors")
    assert np.allclose(new["model.norm.weight"][1], 1.0)
    before, after = llama_logits(tied, TOKENS), llama_logits(out, TOKENS)
    assert np.max(np.abs(after - before)) < 1e-4 * np.max(np.abs(before))


def test_rename_transpose_drop(tiny_llama: Path, tmp_path: Path) -> None:
    out = rename_transpose_drop(tiny_llama, tmp_path / "out", 3, drop=2)
    old, new = load_file(tiny_llama / "model.safetensors"), load_file(out / "model.safetensors")
    assert len(new) == len(old) - 2 and not set(new) & set(old)
    fingerprints = {np.sort(a.ravel()).tobytes() for _, a in old.values()}
    assert all(np.sort(a.ravel()).tobytes() in fingerprints for _, a in new.values())
    assert any(a.shape != old[n][1].shape for (_, a), n in zip(new.values(), old, strict=False))


@pytest.fixture(scope="module")
def minilm_sentences(minilm: Path) -> np.ndarray:
    return load_encoder(minilm).embed(SENTENCES)


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param("permute_ffn", marks=pytest.mark.slow),
        pytest.param("permute_heads", marks=pytest.mark.slow),
        pytest.param("rescale", marks=pytest.mark.slow),
        "function_preserving",
    ],
)
def test_minilm_transform_keeps_sentence_embeddings(
    minilm: Path, minilm_sentences: np.ndarray, tmp_path: Path, transform: str
) -> None:
    out = TRANSFORMS[transform](minilm, tmp_path / "out")
    after = load_encoder(out).embed(SENTENCES)
    assert np.max(np.abs(after - minilm_sentences)) < 1e-5
    old, new = load_weights(minilm), load_weights(out)
    moved = "intermediate.dense" if transform == "permute_ffn" else "attention.self.value"
    assert not np.array_equal(
        old[f"encoder.layer.0.{moved}.weight"], new[f"encoder.layer.0.{moved}.weight"]
    )


def test_minilm_rotation_is_refused(minilm: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="LayerNorm"):
        rotate_residual(minilm, tmp_path / "out", 0)
