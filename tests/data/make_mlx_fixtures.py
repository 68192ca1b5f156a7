"""Write the MLX fixtures under tests/data/mlx/ with real MLX (mlx.core.quantize / dequantize).

Run once, in an environment with MLX (not a dependency of weightmark):

    python -m venv /tmp/mlxenv && /tmp/mlxenv/bin/pip install "mlx[cpu]" numpy
    /tmp/mlxenv/bin/python -P tests/data/make_mlx_fixtures.py

- `affine.npz`: for bits {2, 3, 4, 5, 6, 8} x group {32, 64, 128} (float32 scales) and a few
  float16 / bfloat16 cases: `B_G_DT.q` (uint32 words), `.scales`, `.biases` (bf16 and f16 as
  uint16 bit patterns) and `.dequant` (mlx.core.dequantize, as float32).
- `folder/`: an mlx-lm style quantized folder: model.safetensors written by
  mx.save_safetensors, config.json with `quantization` (and `quantization_config`, as recent
  mlx-lm writes) holding a default, a per-layer override and an unquantized layer;
  `folder.npz` holds mlx.core.dequantize of each weight.
- `moe/`: 3-D mixture-of-experts weights (`switch_mlp`), float16 scales; `moe.npz` likewise.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

OUT = Path(__file__).resolve().parent / "mlx"


def as_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    if a.dtype == mx.float16:
        return np.array(a).view(np.uint16)
    return np.array(a)


def affine() -> None:
    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    cases = [(b, g, "f32") for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
    cases += [(3, 64, "f16"), (4, 64, "f16"), (6, 32, "bf16"), (4, 64, "bf16"), (8, 128, "bf16")]
    dtypes = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
    for bits, group, dt in cases:
        w = mx.array(rng.standard_normal((6, 256)).astype(np.float32) * 0.05).astype(dtypes[dt])
        q, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        deq = mx.dequantize(q, scales, biases, group_size=group, bits=bits)
        key = f"{bits}_{group}_{dt}"
        arrays[f"{key}.q"] = np.array(q)
        arrays[f"{key}.scales"] = as_numpy(scales)
        arrays[f"{key}.biases"] = as_numpy(biases)
        arrays[f"{key}.dequant"] = np.array(deq.astype(mx.float32))
    np.savez_compressed(OUT / "affine.npz", **arrays)


def folder() -> None:
    """A two-layer llama-shaped model quantized the way mlx-lm does (default 4-bit group 64,
    down_proj of layer 0 at 8 bits group 32, layer 1's down_proj left in bf16)."""
    rng = np.random.default_rng(8)
    dest = OUT / "folder"
    dest.mkdir(exist_ok=True)
    shapes = {
        "model.embed_tokens": (64, 128),
        "model.layers.0.self_attn.q_proj": (128, 128),
        "model.layers.0.mlp.down_proj": (128, 256),
        "model.layers.1.self_attn.q_proj": (128, 128),
        "model.layers.1.mlp.down_proj": (128, 256),
        "lm_head": (64, 128),
    }
    overrides: dict[str, object] = {
        "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8},
        "model.layers.1.mlp.down_proj": False,
    }
    weights: dict[str, mx.array] = {}
    expected: dict[str, np.ndarray] = {}
    for prefix, shape in shapes.items():
        w = mx.array(rng.standard_normal(shape).astype(np.float32) * 0.05).astype(mx.bfloat16)
        spec = overrides.get(prefix, {"group_size": 64, "bits": 4})
        if spec is False:
            weights[f"{prefix}.weight"] = w
            expected[f"{prefix}.weight"] = np.array(w.astype(mx.float32))
            continue
        q, scales, biases = mx.quantize(w, group_size=spec["group_size"], bits=spec["bits"])
        weights[f"{prefix}.weight"], weights[f"{prefix}.scales"], weights[f"{prefix}.biases"] = q, scales, biases
        deq = mx.dequantize(q, scales, biases, group_size=spec["group_size"], bits=spec["bits"])
        expected[f"{prefix}.weight"] = np.array(deq.astype(mx.float32))
    norm = mx.ones((128,), dtype=mx.bfloat16)
    weights["model.norm.weight"] = norm
    expected["model.norm.weight"] = np.ones(128, np.float32)
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    quantization = {"group_size": 64, "bits": 4, **overrides}
    config = {"model_type": "llama", "hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
              "vocab_size": 64, "quantization": quantization, "quantization_config": quantization}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    np.savez_compressed(OUT / "folder.npz", **expected)


def moe() -> None:
    """Mixture-of-experts layers as mlx-lm stores them: 3-D [experts, out, in] `switch_mlp`
    weights quantized per row of every expert (4-bit group 32), next to a 2-D router."""
    rng = np.random.default_rng(9)
    dest = OUT / "moe"
    dest.mkdir(exist_ok=True)
    weights: dict[str, mx.array] = {}
    expected: dict[str, np.ndarray] = {}
    for prefix, shape in {"model.layers.0.mlp.switch_mlp.gate_proj": (4, 48, 64),
                          "model.layers.0.mlp.switch_mlp.down_proj": (4, 64, 96),
                          "model.layers.0.mlp.gate": (4, 64)}.items():
        w = mx.array(rng.standard_normal(shape).astype(np.float32) * 0.05).astype(mx.float16)
        q, scales, biases = mx.quantize(w, group_size=32, bits=4)
        weights[f"{prefix}.weight"], weights[f"{prefix}.scales"], weights[f"{prefix}.biases"] = q, scales, biases
        deq = mx.dequantize(q, scales, biases, group_size=32, bits=4)
        expected[f"{prefix}.weight"] = np.array(deq.astype(mx.float32))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = {"model_type": "mixtral", "quantization": {"group_size": 32, "bits": 4}}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    np.savez_compressed(OUT / "moe.npz", **expected)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    affine()
    folder()
    moe()
    (OUT / "VERSION").write_text(f"written by mlx {mx.__version__} with tests/data/make_mlx_fixtures.py\n")


if __name__ == "__main__":
    main()
