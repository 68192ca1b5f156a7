"""Independent numpy quantizers that write GPTQ, AWQ, compressed-tensors and bitsandbytes layouts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from weightmark.formats.safetensors import WEIGHT_INDEX, save_file

Tensor = tuple[str, str, np.ndarray]

# AWQ GEMM: the word's 4-bit slot k carries output column ORDER[k] of its group of eight.
AWQ_SLOT_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

# NF4 levels as published with QLoRA / bitsandbytes; FP4 as bitsandbytes defines it, in
# twelfths of the largest magnitude.
NF4_LEVELS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
_FP4_TWELFTHS = [0, Fraction(1, 16), 8, 12, 4, 6, 2, 3]
FP4_LEVELS = [float(Fraction(v) / 12) for v in _FP4_TWELFTHS] + [
    -float(Fraction(v) / 12) for v in _FP4_TWELFTHS
]
CODE_BOOKS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}


@dataclass
class Layer:
    """One quantized linear layer: the tensors to store and the float values they represent."""

    name: str  # canonical "<prefix>.weight"
    tensors: list[Tensor]
    expected: np.ndarray  # float32 [out, in]
    extra: dict[str, Any] = field(default_factory=dict)


def pack_words(values: np.ndarray, bits: int, axis: int, slot_order: list[int] | None = None) -> np.ndarray:
    """Pack non-negative ints < 2**bits into int32 words along `axis` (zero-padded at the end).

    Slot k of a word (bits k*bits .. k*bits + bits - 1) receives element slot_order[k] of the
    word's run of 32 // bits elements (default: element k).
    """
    per = 32 // bits
    moved = np.moveaxis(np.asarray(values, dtype=np.int64), axis, -1)
    assert moved.min(initial=0) >= 0 and moved.max(initial=0) < 2**bits
    n = moved.shape[-1]
    words = -(-n // per)
    padded = np.zeros((*moved.shape[:-1], words * per), dtype=np.int64)
    padded[..., :n] = moved
    runs = padded.reshape(*moved.shape[:-1], words, per)
    packed = np.zeros(runs.shape[:-1], dtype=np.int64)
    for slot in range(per):
        element = slot if slot_order is None else slot_order[slot]
        packed += runs[..., element] * (2 ** (bits * slot))
    as_int32 = np.where(packed >= 2**31, packed - 2**32, packed).astype(np.int32)
    return np.ascontiguousarray(np.moveaxis(as_int32, -1, axis))


def write_checkpoint(
    folder: Path,
    tensors: list[Tensor],
    quantization_config: dict[str, Any] | None,
    shards: int = 1,
    config_name: str = "config.json",
) -> Path:
    """A Hugging Face style folder: config.json (+ quantization_config) and 1..n shards."""
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if quantization_config is not None:
        if config_name == "config.json":
            config["quantization_config"] = quantization_config
        else:
            (folder / config_name).write_text(json.dumps(quantization_config))
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(folder / "model.safetensors", tensors, {"format": "pt"})
        return folder
    per_shard = -(-len(tensors) // shards)
    weight_map: dict[str, str] = {}
    for index in range(shards):
        part = tensors[index * per_shard : (index + 1) * per_shard]
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(folder / file, part, {"format": "pt"})
        weight_map.update({name: file for name, _dtype, _array in part})
    (folder / WEIGHT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def f16(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float16)


def bf16_round_down(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bf16 bit patterns, their float64 values) by truncating float32 values."""
    bits32 = np.asarray(values, dtype=np.float32).view(np.uint32)
    top = (bits32 >> 16).astype(np.uint16)
    value = (top.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return top, value


# -------------------------------------------------------------------------------- GPTQ


def gptq_layer(
    prefix: str,
    w: np.ndarray,
    bits: int,
    group: int,
    act_order: bool,
    v2: bool,
    sym: bool,
    rng: np.random.Generator,
) -> Layer:
    """AutoGPTQ-style: qweight [in*bits/32, out] packed along in, qzeros [groups, out*bits/32]."""
    out_f, in_f = w.shape
    maxq = 2**bits - 1
    groups = in_f // group
    if act_order:
        order = rng.permutation(in_f)  # quantization order; column order[j] is in group j // group
        g_idx = np.empty(in_f, dtype=np.int64)
        g_idx[order] = np.arange(in_f) // group
    else:
        g_idx = np.arange(in_f) // group
    scales = np.zeros((groups, out_f), dtype=np.float16)
    zeros = np.zeros((groups, out_f), dtype=np.int64)
    q = np.zeros((in_f, out_f), dtype=np.int64)
    for k in range(groups):
        cols = np.flatnonzero(g_idx == k)
        block = w[:, cols].astype(np.float64)
        lo = np.minimum(block.min(axis=1), 0.0)
        hi = np.maximum(block.max(axis=1), 0.0)
        if sym:
            scale = f16(2 * np.maximum(-lo, hi) / maxq + 1e-3)
            zero = np.full(out_f, (maxq + 1) // 2)
        else:
            scale = f16((hi - lo) / maxq + 1e-3)
            zero = np.rint(-lo / scale.astype(np.float64)).astype(np.int64)
        zero = np.clip(zero, 0 if v2 else 1, maxq)  # v1 cannot store a zero point of 0
        scales[k] = scale
        zeros[k] = zero
        codes = np.rint(block / scale.astype(np.float64)[:, None]) + zero[:, None]
        q[cols, :] = np.clip(codes, 0, maxq).astype(np.int64).T
    expected = np.empty((out_f, in_f), dtype=np.float64)
    for i in range(in_f):
        k = g_idx[i]
        expected[:, i] = (q[i] - zeros[k]) * scales[k].astype(np.float64)
    stored_zeros = zeros if v2 else zeros - 1
    tensors: list[Tensor] = [
        (f"{prefix}.qweight", "I32", pack_words(q, bits, axis=0)),
        (f"{prefix}.qzeros", "I32", pack_words(stored_zeros, bits, axis=1)),
        (f"{prefix}.scales", "F16", scales),
    ]
    if act_order:
        tensors.append((f"{prefix}.g_idx", "I32", g_idx.astype(np.int32)))
    return Layer(f"{prefix}.weight", tensors, expected.astype(np.float32), {"g_idx": g_idx})


# -------------------------------------------------------------------------------- AWQ


def awq_layer(prefix: str, w: np.ndarray, group: int) -> Layer:
    """AWQ GEMM: qweight [in, out/8] with AWQ's slot order, qzeros [groups, out/8], scales f16."""
    out_f, in_f = w.shape
    groups = in_f // group
    wt = w.T.astype(np.float64)  # [in, out]
    scales = np.zeros((groups, out_f), dtype=np.float16)
    zeros = np.zeros((groups, out_f), dtype=np.int64)
    q = np.zeros((in_f, out_f), dtype=np.int64)
    expected = np.zeros((out_f, in_f), dtype=np.float64)
    for k in range(groups):
        rows = slice(k * group, (k + 1) * group)
        block = wt[rows]
        lo, hi = block.min(axis=0), block.max(axis=0)
        scale = f16((hi - lo) / 15 + 1e-3)
        zero = np.clip(np.rint(-lo / scale.astype(np.float64)), 0, 15).astype(np.int64)
        codes = np.clip(np.rint(block / scale.astype(np.float64)) + zero, 0, 15).astype(np.int64)
        scales[k], zeros[k], q[rows] = scale, zero, codes
        expected[:, rows] = ((codes - zero) * scale.astype(np.float64)).T
    tensors: list[Tensor] = [
        (f"{prefix}.qweight", "I32", pack_words(q, 4, axis=1, slot_order=AWQ_SLOT_ORDER)),
        (f"{prefix}.qzeros", "I32", pack_words(zeros, 4, axis=1, slot_order=AWQ_SLOT_ORDER)),
        (f"{prefix}.scales", "F16", scales),
    ]
    return Layer(f"{prefix}.weight", tensors, expected.astype(np.float32))


# -------------------------------------------------------------------------------- compressed-tensors


def _ct_qparams(
    block: np.ndarray, bits: int, symmetric: bool, scale_dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored scale, scale values, signed zero points) for rows of `block`, over its last axis."""
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = np.minimum(block.min(axis=-1), 0.0)
    hi = np.maximum(block.max(axis=-1), 0.0)
    if symmetric:
        raw = np.maximum(-lo, hi) / ((q_max - q_min) / 2) + 1e-3
    else:
        raw = (hi - lo) / (q_max - q_min) + 1e-3
    if scale_dtype == "BF16":
        stored, value = bf16_round_down(raw)
    elif scale_dtype == "F16":
        stored = f16(raw)
        value = stored.astype(np.float64)
    else:
        stored = raw.astype(np.float32)
        value = stored.astype(np.float64)
    if symmetric:
        zp = np.zeros_like(value, dtype=np.int64)
    else:
        zp = np.clip(np.rint(q_min - lo / value), q_min, q_max).astype(np.int64)
    return stored, value, zp


def ct_int_layer(
    prefix: str,
    w: np.ndarray,
    bits: int,
    strategy: str,
    group: int,
    symmetric: bool,
    scale_dtype: str,
    packed: bool,
) -> Layer:
    """compressed-tensors int weights: pack-quantized (int32 words) or int-quantized (int8)."""
    out_f, in_f = w.shape
    if strategy == "group":
        blocks = w.astype(np.float64).reshape(out_f, in_f // group, group)
    elif strategy == "channel":
        blocks = w.astype(np.float64).reshape(out_f, 1, in_f)
    else:  # tensor
        blocks = w.astype(np.float64).reshape(1, 1, out_f * in_f)
    stored, value, zp = _ct_qparams(blocks, bits, symmetric, scale_dtype)
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = np.clip(np.rint(blocks / value[..., None]) + zp[..., None], q_min, q_max).astype(np.int64)
    expected = ((codes - zp[..., None]) * value[..., None]).reshape(out_f, in_f)
    q = codes.reshape(out_f, in_f)
    scale_shape = (1,) if strategy == "tensor" else (out_f, stored.shape[1])
    tensors: list[Tensor] = []
    if packed:
        tensors.append((f"{prefix}.weight_packed", "I32", pack_words(q + 2 ** (bits - 1), bits, axis=1)))
        tensors.append((f"{prefix}.weight_shape", "I64", np.array([out_f, in_f], dtype=np.int64)))
    else:
        tensors.append((f"{prefix}.weight", "I8", q.astype(np.int8)))
    tensors.append((f"{prefix}.weight_scale", scale_dtype, stored.reshape(scale_shape)))
    if not symmetric:
        if packed and strategy in ("group", "channel"):
            tensors.append(
                (f"{prefix}.weight_zero_point", "I32", pack_words(zp + 2 ** (bits - 1), bits, axis=0))
            )
        else:
            tensors.append((f"{prefix}.weight_zero_point", "I8", zp.reshape(scale_shape).astype(np.int8)))
    return Layer(f"{prefix}.weight", tensors, expected.astype(np.float32))


def e4m3_reference(code: int) -> float:
    """Value of an FP8 E4M3 (fn) code from the bit fields, in exact rational arithmetic."""
    text = f"{code:08b}"
    sign, exponent, mantissa = text[0] == "1", int(text[1:5], 2), int(text[5:], 2)
    if exponent == 0b1111 and mantissa == 0b111:
        return math.nan
    if exponent == 0:
        value = Fraction(mantissa, 8) / 2**6
    else:
        value = (1 + Fraction(mantissa, 8)) * Fraction(2) ** (exponent - 7)
    return float(-value if sign else value)


E4M3_TABLE = np.array([e4m3_reference(c) for c in range(256)], dtype=np.float64)


def ct_fp8_layer(prefix: str, codes: np.ndarray, strategy: str, scale_dtype: str, rng: np.random.Generator) -> Layer:
    """compressed-tensors float-quantized: F8_E4M3 weight codes with per-tensor/channel scales."""
    out_f, in_f = codes.shape
    rows = 1 if strategy == "tensor" else out_f
    raw = rng.uniform(0.001, 0.1, size=rows)
    if scale_dtype == "BF16":
        stored, value = bf16_round_down(raw)
    else:
        stored = raw.astype(np.float32)
        value = stored.astype(np.float64)
    expected = E4M3_TABLE[codes] * (value[:, None] if rows > 1 else value[0])
    shape = (1,) if strategy == "tensor" else (out_f, 1)
    tensors: list[Tensor] = [
        (f"{prefix}.weight", "F8_E4M3", codes.astype(np.uint8)),
        (f"{prefix}.weight_scale", scale_dtype, stored.reshape(shape)),
    ]
    return Layer(f"{prefix}.weight", tensors, expected.astype(np.float32))


# -------------------------------------------------------------------------------- bitsandbytes


def bnb4_layer(
    prefix: str,
    w: np.ndarray,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    nested_blocksize: int = 256,
) -> Layer:
    """bitsandbytes Params4bit state dict: packed codes (high nibble first), absmax, quant_state."""
    shape = list(w.shape)
    flat = w.astype(np.float32).reshape(-1)
    n = flat.size
    nblocks = -(-n // blocksize)
    book = np.array(CODE_BOOKS[quant_type], dtype=np.float32)
    absmax = np.zeros(nblocks, dtype=np.float32)
    codes = np.zeros(n, dtype=np.int64)
    for b in range(nblocks):
        part = flat[b * blocksize : (b + 1) * blocksize]
        absmax[b] = np.float32(np.abs(part).max()) or np.float32(1.0)
        normalised = part.astype(np.float64) / float(absmax[b])
        codes[b * blocksize : (b + 1) * blocksize] = np.abs(normalised[:, None] - book[None, :]).argmin(axis=1)
    padded = np.zeros(n + (n % 2), dtype=np.int64)
    padded[:n] = codes
    packed = (padded[0::2] * 16 + padded[1::2]).astype(np.uint8).reshape(-1, 1)
    state: dict[str, Any] = {"quant_type": quant_type, "blocksize": blocksize, "dtype": "float32", "shape": shape}
    tensors: list[Tensor] = [(f"{prefix}.weight", "U8", packed)]
    if double_quant:
        offset = np.float32(absmax.astype(np.float64).mean())
        centred = absmax - offset
        n2 = -(-nblocks // nested_blocksize)
        nested_absmax = np.array(
            [np.abs(centred[j * nested_blocksize : (j + 1) * nested_blocksize]).max() for j in range(n2)],
            dtype=np.float32,
        )
        nested_absmax[nested_absmax == 0] = 1
        dynamic = np.linspace(-1.0, 1.0, 256).astype(np.float32)
        a_codes = np.zeros(nblocks, dtype=np.uint8)
        restored = np.zeros(nblocks, dtype=np.float32)
        for b in range(nblocks):
            m = nested_absmax[b // nested_blocksize]
            a_codes[b] = int(np.abs(float(centred[b]) / float(m) - dynamic.astype(np.float64)).argmin())
            # bitsandbytes' float32 arithmetic: code2[a] * absmax2, then + offset
            restored[b] = np.float32(np.float32(dynamic[a_codes[b]] * m) + offset)
        tensors += [
            (f"{prefix}.weight.absmax", "U8", a_codes),
            (f"{prefix}.weight.quant_map", "F32", book),
            (f"{prefix}.weight.nested_absmax", "F32", nested_absmax),
            (f"{prefix}.weight.nested_quant_map", "F32", dynamic),
        ]
        state.update(nested_blocksize=nested_blocksize, nested_dtype="float32", nested_offset=float(offset))
        block_scale = restored
    else:
        tensors += [
            (f"{prefix}.weight.absmax", "F32", absmax),
            (f"{prefix}.weight.quant_map", "F32", book),
        ]
        block_scale = absmax
    blob = np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8).copy()
    tensors.append((f"{prefix}.weight.quant_state.bitsandbytes__{quant_type}", "U8", blob))
    expected = np.array(
        [np.float32(book[codes[i]] * block_scale[i // blocksize]) for i in range(n)], dtype=np.float32
    ).reshape(shape)
    return Layer(f"{prefix}.weight", tensors, expected, {"codes": codes})


def bnb8_layer(prefix: str, w: np.ndarray, with_format: bool) -> Layer:
    """LLM.int8 row-wise: int8 weight and SCB = per-row absmax; w = q * SCB / 127."""
    scb = np.abs(w).max(axis=1).astype(np.float32)
    q = np.clip(np.rint(w.astype(np.float64) * 127 / scb[:, None].astype(np.float64)), -127, 127).astype(np.int8)
    expected = (q.astype(np.float64) * scb.astype(np.float64)[:, None] / 127).astype(np.float32)
    tensors: list[Tensor] = [(f"{prefix}.weight", "I8", q), (f"{prefix}.SCB", "F32", scb)]
    if with_format:
        tensors.append((f"{prefix}.weight_format", "U8", np.zeros((), dtype=np.uint8)))
    return Layer(f"{prefix}.weight", tensors, expected)


def float_extras(rng: np.random.Generator, hidden: int) -> tuple[list[Tensor], dict[str, np.ndarray]]:
    """Unquantized tensors every checkpoint carries (norm in BF16, embedding in F16, head in F32)."""
    norm_bits, norm_values = bf16_round_down(rng.standard_normal(hidden))
    embed = f16(rng.standard_normal((11, hidden)))
    head = rng.standard_normal((5, hidden)).astype(np.float32)
    tensors: list[Tensor] = [
        ("model.norm.weight", "BF16", norm_bits),
        ("model.embed_tokens.weight", "F16", embed),
        ("lm_head.weight", "F32", head),
    ]
    expected = {
        "model.norm.weight": norm_values.astype(np.float32),
        "model.embed_tokens.weight": embed.astype(np.float32),
        "lm_head.weight": head,
    }
    return tensors, expected
