"""Synthetic checkpoints of real models' layout: names, shapes, dtypes, shards, index and config.

Writes what a Hugging Face repository of Llama-3-8B, Llama-3.2-1B, a few layers of
Mixtral-8x7B or a few layers of a Qwen-MoE model holds: the real tensor names and shapes
(`block_sparse_moe.experts.N.w1/w2/w3` and the router `block_sparse_moe.gate`;
`mlp.experts.N.gate_proj/up_proj/down_proj`, `mlp.shared_expert.*` and `mlp.shared_expert_gate`),
BF16 by default, sharded at 5 GB with `model.safetensors.index.json`, and a config.json. Values
are Gaussian with a log-normal spread of row RMS, as trained weights have (a few rows far louder
than the rest), so the row-RMS shaping of the watermark sees what it sees on real models.

Streaming: tensors are generated and written a block of rows at a time, so memory stays near
`BLOCK_BYTES` whatever the model's size. The same preset, scale and seed give the same bytes.

    .venv/bin/python benchmarks/synth.py llama-3-8b /data/llama8b            # 16 GB, 4 shards
    .venv/bin/python benchmarks/synth.py qwen-moe /tmp/qm --scale 0.05 --layers 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import f32_to_bf16_bits  # noqa: E402

WEIGHT_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB" max_shard_size
BLOCK_BYTES = 64 << 20  # float32 bytes generated at once
ROW_RMS_SIGMA = 0.35  # log-normal spread of row RMS (trained Llama linears: about 0.2 to 0.5)
WIDTH_QUANTUM = 32  # scaled widths stay multiples of this (GGUF blocks are 32 wide)
STORAGE = {"BF16": 2, "F16": 2, "F32": 4}


@dataclass(frozen=True)
class Preset:
    """The shape of a model family: enough to name and size every tensor."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None
    experts: int = 0  # routed experts per layer (0: dense FFN)
    experts_per_token: int = 0
    expert_intermediate: int = 0  # width of each routed expert (Qwen-MoE: moe_intermediate_size)
    shared_intermediate: int = 0  # width of the shared expert (0: none)
    qkv_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads


PRESETS: dict[str, Preset] = {
    "llama-3-8b": Preset("llama", 4096, 14336, 32, 32, 8, 128256,
                         extra={"rope_theta": 500000.0, "max_position_embeddings": 8192}),
    "llama-3.2-1b": Preset("llama", 2048, 8192, 16, 32, 8, 128256, tied=True, head_dim=64,
                           extra={"rope_theta": 500000.0, "max_position_embeddings": 131072}),
    # Mixtral-8x7B has 32 layers; the preset is a slice of its first 4 (--layers for more).
    "mixtral-8x7b": Preset("mixtral", 4096, 14336, 4, 32, 8, 32000, experts=8, experts_per_token=2,
                           expert_intermediate=14336, extra={"rope_theta": 1000000.0}),
    # Qwen1.5-MoE-A2.7B's layout (60 experts of width 1408, a shared expert of 5632); 4 of 24 layers.
    "qwen-moe": Preset("qwen2_moe", 2048, 5632, 4, 16, 16, 151936, experts=60, experts_per_token=4,
                       expert_intermediate=1408, shared_intermediate=5632, qkv_bias=True,
                       extra={"rope_theta": 1000000.0}),
}


def _width(value: int, scale: float, least: int = 2 * WIDTH_QUANTUM) -> int:
    return max(least, int(round(value * scale / WIDTH_QUANTUM)) * WIDTH_QUANTUM)


def scaled(preset: Preset, scale: float, layers: int | None = None, experts: int | None = None) -> Preset:
    """The preset with widths (and, unless given, layers) times `scale`; expert counts kept.

    Head size shrinks to 32 when the hidden width falls below 512; the query/key-value head
    ratio is kept. Widths stay multiples of 32, so every scaled model still quantizes to GGUF.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    out = preset
    if scale < 1:
        hidden = _width(preset.hidden, scale)
        head_dim = min(preset.dim_per_head, 32 if hidden < 512 else 64)
        heads = max(2, hidden // head_dim)
        group = max(1, preset.heads // preset.kv_heads)
        while heads % group:
            group //= 2
        out = replace(
            preset, hidden=hidden, heads=heads, kv_heads=heads // group, head_dim=head_dim,
            intermediate=_width(preset.intermediate, scale), vocab=_width(preset.vocab, scale, 256),
            layers=max(1, int(round(preset.layers * scale))),
            expert_intermediate=_width(preset.expert_intermediate, scale) if preset.experts else 0,
            shared_intermediate=_width(preset.shared_intermediate, scale) if preset.shared_intermediate else 0,
        )
    if layers is not None:
        out = replace(out, layers=layers)
    if experts is not None and out.experts:
        out = replace(out, experts=experts, experts_per_token=min(out.experts_per_token, experts))
    return out


def tensor_specs(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in the order Hugging Face's save_pretrained writes them."""
    h, hd = p.hidden, p.dim_per_head
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (p.vocab, h))]
    for i in range(p.layers):
        L = f"model.layers.{i}."
        specs.append((L + "input_layernorm.weight", (h,)))
        if p.experts and p.model_type == "mixtral":
            for e in range(p.experts):
                E = f"{L}block_sparse_moe.experts.{e}."
                specs += [(E + "w1.weight", (p.expert_intermediate, h)),
                          (E + "w2.weight", (h, p.expert_intermediate)),
                          (E + "w3.weight", (p.expert_intermediate, h))]
            specs.append((L + "block_sparse_moe.gate.weight", (p.experts, h)))
        elif p.experts:
            for e in range(p.experts):
                E = f"{L}mlp.experts.{e}."
                specs += [(E + "down_proj.weight", (h, p.expert_intermediate)),
                          (E + "gate_proj.weight", (p.expert_intermediate, h)),
                          (E + "up_proj.weight", (p.expert_intermediate, h))]
            specs.append((L + "mlp.gate.weight", (p.experts, h)))
            if p.shared_intermediate:
                S = f"{L}mlp.shared_expert."
                specs += [(S + "down_proj.weight", (h, p.shared_intermediate)),
                          (S + "gate_proj.weight", (p.shared_intermediate, h)),
                          (S + "up_proj.weight", (p.shared_intermediate, h)),
                          (L + "mlp.shared_expert_gate.weight", (1, h))]
        else:
            specs += [(L + "mlp.down_proj.weight", (h, p.intermediate)),
                      (L + "mlp.gate_proj.weight", (p.intermediate, h)),
                      (L + "mlp.up_proj.weight", (p.intermediate, h))]
        specs.append((L + "post_attention_layernorm.weight", (h,)))
        A = L + "self_attn."
        specs += [(A + "k_proj.weight", (p.kv_heads * hd, h))]
        if p.qkv_bias:
            specs += [(A + "k_proj.bias", (p.kv_heads * hd,))]
        specs += [(A + "o_proj.weight", (h, p.heads * hd)), (A + "q_proj.weight", (p.heads * hd, h))]
        if p.qkv_bias:
            specs += [(A + "q_proj.bias", (p.heads * hd,))]
        specs += [(A + "v_proj.weight", (p.kv_heads * hd, h))]
        if p.qkv_bias:
            specs += [(A + "v_proj.bias", (p.kv_heads * hd,))]
    specs.append(("model.norm.weight", (h,)))
    if not p.tied:
        specs.append(("lm_head.weight", (p.vocab, h)))
    return specs


def hf_config(p: Preset, dtype: str) -> dict[str, Any]:
    """config.json as transformers writes it for this family (the fields readers use)."""
    arch = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM"}[p.model_type]
    config: dict[str, Any] = {
        "architectures": [arch], "model_type": p.model_type, "hidden_size": p.hidden,
        "intermediate_size": p.intermediate, "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads, "num_key_value_heads": p.kv_heads, "head_dim": p.dim_per_head,
        "vocab_size": p.vocab, "tie_word_embeddings": p.tied, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
        **p.extra,
    }
    if p.model_type == "mixtral":
        config.update(num_local_experts=p.experts, num_experts_per_tok=p.experts_per_token,
                      intermediate_size=p.expert_intermediate)
    elif p.model_type == "qwen2_moe":
        config.update(num_experts=p.experts, num_experts_per_tok=p.experts_per_token,
                      moe_intermediate_size=p.expert_intermediate,
                      shared_expert_intermediate_size=p.shared_intermediate, decoder_sparse_step=1,
                      norm_topk_prob=False)
    return config


def _tensor_seed(seed: int, name: str) -> int:
    return (seed << 32) ^ zlib.crc32(name.encode())


def tensor_blocks(name: str, shape: tuple[int, ...], dtype: str, seed: int,
                  block_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """The tensor's storage array, a block of rows at a time (deterministic per name and seed).

    Matrices: each row N(0, 1) times its RMS, log-normal around 0.02 (embeddings and heads
    around 0.01; routers 0.005); rank-1 norms near 1, biases near 0.
    """
    rng = np.random.default_rng(_tensor_seed(seed, name))
    if len(shape) == 1:
        if name.endswith("bias"):
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
        else:
            values = np.exp(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.2))
        yield _encode(values, dtype)
        return
    rows, cols = shape[0], math.prod(shape[1:])
    centre = 0.01 if name.endswith(("embed_tokens.weight", "lm_head.weight")) else 0.02
    if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")):
        centre = 0.005
    rms = (centre * np.exp(ROW_RMS_SIGMA * rng.standard_normal(rows))).astype(np.float32)
    step = max(1, block_bytes // (4 * cols))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        values = rng.standard_normal((stop - start, cols), dtype=np.float32)
        values *= rms[start:stop, None]
        yield _encode(values, dtype)


def _encode(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return f32_to_bf16_bits(values)
    if dtype == "F16":
        return values.astype(np.float16)
    return values


def shard_plan(specs: list[tuple[str, tuple[int, ...]]], dtype: str, shard_bytes: int
               ) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors split into shards in order, each at most `shard_bytes` unless one tensor is larger
    (how save_pretrained's max_shard_size splits)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * STORAGE[dtype]
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * STORAGE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    with open(path, "xb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for name, shape in tensors:
            for block in tensor_blocks(name, shape, dtype, seed):
                fh.write(memoryview(np.ascontiguousarray(block)).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())
    return offset


@dataclass(frozen=True)
class Written:
    """What `write_checkpoint` wrote."""

    path: Path
    preset: Preset
    dtype: str
    shards: list[str]
    tensor_bytes: int
    parameters: int
    carriers: int
    largest_tensor_bytes: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def write_checkpoint(out: str | os.PathLike[str], preset: str | Preset, *, scale: float = 1.0,
                     layers: int | None = None, experts: int | None = None, dtype: str = "BF16",
                     shard_bytes: int = DEFAULT_SHARD_BYTES, seed: int = 0, force: bool = False) -> Written:
    """Write a synthetic checkpoint folder at `out` (refused if it exists, unless `force`).

    One shard is written as `model.safetensors` without an index, as save_pretrained does.
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    p = scaled(p, scale, layers, experts)
    if dtype not in STORAGE:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE)}, got {dtype}")
    out = Path(out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists (pass force=True / --force to replace it)")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True)
    specs = tensor_specs(p)
    plan = shard_plan(specs, dtype, shard_bytes)
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    total = 0
    weight_map: dict[str, str] = {}
    for shard_name, tensors in zip(names, plan, strict=True):
        total += _write_shard(out / shard_name, tensors, dtype, seed)
        weight_map.update({name: shard_name for name, _ in tensors})
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(p, dtype), indent=2) + "\n")
    sizes = [math.prod(shape) for _, shape in specs]
    return Written(out, p, dtype, names, total, sum(sizes),
                   sum(1 for (_, shape), n in zip(specs, sizes, strict=True) if len(shape) >= 2 and n >= 4096),
                   max(sizes) * STORAGE[dtype])


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * units[unit])
    return int(upper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink widths and layers (0 < s <= 1)")
    parser.add_argument("--layers", type=int, help="number of layers (default: the preset's, times scale)")
    parser.add_argument("--experts", type=int, help="routed experts per layer (default: the preset's)")
    parser.add_argument("--dtype", default="BF16", choices=sorted(STORAGE))
    parser.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_BYTES, help="e.g. 5GB, 200MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        written = write_checkpoint(args.out, args.preset, scale=args.scale, layers=args.layers,
                                   experts=args.experts, dtype=args.dtype, shard_bytes=args.shard_size,
                                   seed=args.seed, force=args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(written.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
