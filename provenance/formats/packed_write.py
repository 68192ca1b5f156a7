"""Write a float safetensors base as a GPTQ, AWQ, compressed-tensors or bitsandbytes NF4 folder.

Scales (and zero points, and NF4 block absmax) are computed from the base's own float weights
by round-to-nearest min-max (absmax for symmetric schemes); the codes are then computed from
`perturb(name, w)` (the stamped weights, or w itself) against those frozen scales, so copies
written with different perturbations share every scale and differ only in codes.

These are round-to-nearest quantizations laid out in each tool's container: a GPTQ folder here
holds no Hessian-based GPTQ solution, and an AWQ folder no activation-aware scaling. The
layouts are the ones the tools write (AutoGPTQ v1, AutoAWQ GEMM, compressed-tensors
pack-quantized, bitsandbytes 4-bit as transformers saves it) so that those libraries load them.

Quantized: 2-D linear weights inside the transformer blocks (`...layers.N...`,
`...layer.N...`) whose shapes fit the format's groups. Everything else (embeddings, lm_head,
norms, biases, layers whose shapes do not fit) is passed through `transform` in its own dtype.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..canonical import to_float32
from ..errors import InputFileError
from ..fsutil import fsync_dir, sha256_file
from .quantized import AWQ_ORDER, NF4_CODE
from .safetensors import FLOAT_DTYPES, Checkpoint, SafetensorsWriter, TensorInfo

__all__ = ["PACKED_FORMATS", "PackedSpec", "is_quantized_layer", "write_packed_copy"]

WEIGHTS_FILE = "model.safetensors"
CONFIG = "config.json"


@dataclass(frozen=True)
class PackedSpec:
    """One --format value: container family, code width, group size and symmetry."""

    family: str  # "gptq", "awq", "ct", "bnb"
    bits: int
    group: int  # input elements per scale (bnb: values per absmax block of the flat tensor)
    symmetric: bool
    output_format: str  # the format name our readers report for such a folder

    @property
    def top(self) -> int:
        return (1 << self.bits) - 1


# GPTQ sym=True (AutoGPTQ's default); AWQ zero_point=True; compressed-tensors W4A16 and W8A16 as
# compressed-tensors 0.20's presets define them (int, symmetric, group 128; W8A16 was per
# channel in earlier releases); bitsandbytes NF4 with blocksize 64, no double quantization.
PACKED_FORMATS: dict[str, PackedSpec] = {
    "gptq:4bit-g128": PackedSpec("gptq", 4, 128, True, "gptq"),
    "awq:4bit-g128": PackedSpec("awq", 4, 128, False, "awq"),
    "ct:w4a16": PackedSpec("ct", 4, 128, True, "compressed-tensors:pack-quantized"),
    "ct:w8a16": PackedSpec("ct", 8, 128, True, "compressed-tensors:pack-quantized"),
    "bnb:nf4": PackedSpec("bnb", 4, 64, True, "bitsandbytes-nf4"),
}

_OUTPUT = "lm_head"  # transformers' name for the output projection of a causal LM
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\.")
_TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_SCALE_EPS = {"F32": float(np.finfo(np.float32).eps), "F16": float(np.finfo(np.float16).eps),
              "BF16": 2.0**-7}  # fmt: skip

Perturb = Callable[[str, np.ndarray], np.ndarray | None]
Transform = Callable[[str, TensorInfo, np.ndarray], np.ndarray]


def _is_embedding(name: str) -> bool:
    return "embed" in name or name.endswith((".wte.weight", ".wpe.weight"))


def is_quantized_layer(spec: PackedSpec, name: str, info: TensorInfo) -> bool:
    """Whether the tools quantize this tensor: a 2-D linear weight of a transformer block that fits."""
    if info.dtype not in _TORCH_DTYPE or len(info.shape) != 2 or not name.endswith(".weight"):
        return False
    if not _BLOCK.search(name) or _is_embedding(name) or "norm" in name.lower():
        return False
    out_features, in_features = info.shape
    if spec.family == "bnb":
        return True
    if in_features % spec.group:
        return False
    return spec.family == "ct" or out_features % 8 == 0  # GPTQ/AWQ pack out in eights


def _round_scale(dtype: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(storage array, float32 value it stores) for scales kept in `dtype`."""
    from ..canonical import from_float32

    stored = from_float32(dtype, values.astype(np.float32))
    return stored, np.asarray(to_float32(dtype, stored), dtype=np.float32)


@dataclass
class _Layer:
    """Frozen quantization parameters of one layer, from the unstamped weights."""

    scale: np.ndarray  # float32 values as stored: [out, groups] (bnb: [blocks])
    zero: np.ndarray  # float32 unsigned code of 0 per group, [out, groups] (bnb: unused)
    scale_storage: np.ndarray  # what the file stores


def _frozen_params(spec: PackedSpec, w: np.ndarray, dtype: str) -> _Layer:
    if spec.family == "bnb":
        flat = w.reshape(-1)
        blocks = -(-flat.size // spec.group)
        padded = np.zeros(blocks * spec.group, np.float32)
        padded[: flat.size] = np.abs(flat)
        absmax = padded.reshape(blocks, spec.group).max(axis=1).astype(np.float32)
        return _Layer(absmax, np.zeros(0, np.float32), absmax)
    rows, cols = w.shape
    g = w.reshape(rows, cols // spec.group, spec.group)
    lo, hi = g.min(axis=2), g.max(axis=2)
    if spec.family == "gptq":  # AutoGPTQ sym: range [-absmax, absmax] over maxq steps, zero 8
        absmax = np.maximum(np.abs(np.minimum(lo, 0)), np.maximum(hi, 0))
        absmax[absmax == 0] = 1.0
        storage, scale = _round_scale("F16", 2 * absmax / spec.top)
        zero = np.full_like(scale, (spec.top + 1) // 2)
    elif spec.family == "awq":  # AutoAWQ: (max - min) / 15 clamped at 1e-5, zero = -round(min / s)
        storage, scale = _round_scale("F16", np.maximum(hi - lo, 1e-5) / spec.top)
        zero = np.clip(-np.rint(lo / scale), 0, spec.top).astype(np.float32)
    else:  # compressed-tensors symmetric: absmax / (range / 2), zero-point 0 (unsigned 2**(b-1))
        absmax = np.maximum(np.abs(np.minimum(lo, 0)), np.maximum(hi, 0))
        storage, scale = _round_scale(dtype, absmax / ((spec.top) / 2))
        tiny = scale == 0
        if tiny.any():  # compressed-tensors replaces zero scales by the dtype's eps
            scale[tiny] = _SCALE_EPS[dtype]
            storage, scale = _round_scale(dtype, scale)
        zero = np.full_like(scale, 1 << (spec.bits - 1))
    return _Layer(scale.astype(np.float32), zero.astype(np.float32), storage)


def _codes(spec: PackedSpec, layer: _Layer, x: np.ndarray) -> np.ndarray:
    from weightmark.kernels.quantize_int import affine_codes, codebook_codes

    if spec.family == "bnb":
        return codebook_codes(np.ascontiguousarray(x, np.float32), layer.scale, spec.group, NF4_CODE)
    return affine_codes(np.ascontiguousarray(x, np.float32), layer.scale, layer.zero, spec.group, spec.bits)


def _layer_specs(spec: PackedSpec, prefix: str, info: TensorInfo) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor a quantized layer is stored as, in file order."""
    out_features, in_features = info.shape
    groups = in_features // spec.group
    per = 32 // spec.bits
    if spec.family == "gptq":
        return [(f"{prefix}.qweight", "I32", (in_features // per, out_features)),
                (f"{prefix}.qzeros", "I32", (groups, out_features // per)),
                (f"{prefix}.scales", "F16", (groups, out_features)),
                (f"{prefix}.g_idx", "I32", (in_features,))]  # fmt: skip
    if spec.family == "awq":
        return [(f"{prefix}.qweight", "I32", (in_features, out_features // per)),
                (f"{prefix}.qzeros", "I32", (groups, out_features // per)),
                (f"{prefix}.scales", "F16", (groups, out_features))]  # fmt: skip
    if spec.family == "ct":
        return [(f"{prefix}.weight_packed", "I32", (out_features, -(-in_features // per))),
                (f"{prefix}.weight_scale", info.dtype, (out_features, groups)),
                (f"{prefix}.weight_shape", "I64", (2,))]  # fmt: skip
    numel = out_features * in_features
    blob = _bnb_state(info)
    return [(f"{prefix}.weight", "U8", ((numel + 1) // 2, 1)),
            (f"{prefix}.weight.absmax", "F32", (-(-numel // spec.group),)),
            (f"{prefix}.weight.quant_map", "F32", (16,)),
            (f"{prefix}.weight.quant_state.bitsandbytes__nf4", "U8", (len(blob),))]  # fmt: skip


def _bnb_state(info: TensorInfo) -> bytes:
    """The quant_state JSON blob bitsandbytes packs into a uint8 tensor (json.dumps defaults)."""
    state = {"quant_type": "nf4", "blocksize": PACKED_FORMATS["bnb:nf4"].group,
             "dtype": _TORCH_DTYPE[info.dtype], "shape": list(info.shape)}  # fmt: skip
    return json.dumps(state).encode("utf-8")


def _layer_arrays(spec: PackedSpec, info: TensorInfo, layer: _Layer, codes: np.ndarray) -> list[np.ndarray]:
    """The stored arrays of one layer, in _layer_specs order, from its codes and frozen params."""
    from weightmark.kernels.quantize_int import pack_fields

    out_features, in_features = info.shape
    if spec.family == "gptq":
        qweight = np.ascontiguousarray(pack_fields(codes, spec.bits).T)  # packed along in
        qzeros = pack_fields(np.ascontiguousarray((layer.zero - 1).T.astype(np.uint8)), spec.bits)
        g_idx = (np.arange(in_features, dtype=np.int32) // spec.group).astype(np.int32)
        return [qweight, qzeros, np.ascontiguousarray(layer.scale_storage.T), g_idx]
    if spec.family == "awq":
        qweight = pack_fields(np.ascontiguousarray(codes.T), spec.bits, AWQ_ORDER)  # along out
        qzeros = pack_fields(np.ascontiguousarray(layer.zero.T.astype(np.uint8)), spec.bits, AWQ_ORDER)
        return [qweight, qzeros, np.ascontiguousarray(layer.scale_storage.T)]
    if spec.family == "ct":
        shape = np.array([out_features, in_features], dtype=np.int64)
        return [pack_fields(codes, spec.bits), layer.scale_storage, shape]
    blob = np.frombuffer(_bnb_state(info), dtype=np.uint8)
    return [codes.reshape(-1, 1), layer.scale_storage, NF4_CODE.astype(np.float32), blob]


def _quantization_config(spec: PackedSpec, base_dtype: str, kept_linear: list[str],
                         block_modules: list[str]) -> dict[str, Any]:
    """The config.json `quantization_config` each tool writes for such a folder."""
    skip = kept_linear or None
    if spec.family == "gptq":
        return {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group,
                "desc_act": False, "sym": spec.symmetric, "damp_percent": 0.01,
                "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq",
                "modules_in_block_to_quantize": [block_modules] if block_modules else None}  # fmt: skip
    if spec.family == "awq":
        return {"quant_method": "awq", "bits": spec.bits, "group_size": spec.group,
                "version": "gemm", "zero_point": True, "modules_to_not_convert": skip}  # fmt: skip
    if spec.family == "ct":
        weights = {"num_bits": spec.bits, "type": "int", "symmetric": True, "group_size": spec.group,
                   "strategy": "group", "block_structure": None, "dynamic": False,
                   "actorder": None, "observer": "minmax", "observer_kwargs": {}}  # fmt: skip
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": None, "output_activations": None,
                                              "format": "pack-quantized"}},
                "ignore": kept_linear, "kv_cache_scheme": None, "global_compression_ratio": None}  # fmt: skip
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
            "bnb_4bit_compute_dtype": _TORCH_DTYPE.get(base_dtype, "float32"),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_skip_modules": skip}  # fmt: skip


def _read_config(base: Checkpoint, base_path: Path) -> dict[str, Any]:
    config_path = (base_path if base_path.is_dir() else base_path.parent) / CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise InputFileError(config_path, "a readable config.json is needed beside the base to write this format") from None
    if not isinstance(config, dict):
        raise InputFileError(config_path, "config.json must hold a JSON object")
    return config


def _write_file(path: Path, data: bytes) -> str:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return sha256_file(path)


def write_packed_copy(
    base: Checkpoint,
    base_path: Path,
    target: Path,
    fmt: str,
    perturb: Perturb | None = None,
    transform: Transform | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Write the `fmt` folder at `target` (a new or empty folder); {file: sha256} of its files.

    perturb(name, w) gives the float32 values to quantize for a quantized layer (None: w itself);
    transform(name, info, raw) gives the stored array of a tensor kept in its own dtype.
    """
    spec = PACKED_FORMATS[fmt]
    config = _read_config(base, base_path)
    quantized = {name for name, (_, info) in base.tensors.items() if is_quantized_layer(spec, name, info)}
    if not quantized:
        raise InputFileError(base.root, f"no linear layer of a transformer block fits {fmt}")
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    kept_linear: list[str] = []
    block_modules: set[str] = set()
    dtypes = {info.dtype for name, (_, info) in base.tensors.items() if name in quantized}
    for name, (_, info) in base.tensors.items():
        prefix = name[: -len(".weight")]
        if name in quantized:
            specs += _layer_specs(spec, prefix, info)
            block_modules.add(_BLOCK.split(prefix)[-1])
            continue
        if len(info.shape) == 2 and name.endswith(".weight") and info.dtype in FLOAT_DTYPES and not _is_embedding(name):
            kept_linear.append(prefix)
        specs.append((name, info.dtype, tuple(info.shape)))
    skipped_in_blocks = any(_BLOCK.search(p) for p in kept_linear)
    if spec.family == "ct" and f"{_OUTPUT}.weight" not in base.tensors:
        # A tied output projection (sharing the embedding's tensor) is still a Linear module:
        # compressed-tensors would quantize it as a "Linear" target and transformers then finds
        # no `weight` to tie ("Linear has no attribute `weight`"). llm-compressor's recipes
        # ignore it by this name; so does our config.
        kept_linear.append(_OUTPUT)
    qc = _quantization_config(spec, min(dtypes), kept_linear,
                              sorted(block_modules) if skipped_in_blocks else [])
    config["quantization_config"] = qc

    target.mkdir(exist_ok=True)
    manifest: dict[str, str] = {}
    with open(target / WEIGHTS_FILE, "xb") as fh:
        writer = SafetensorsWriter(fh, specs, {"format": "pt"})
        for name, (_, info) in base.tensors.items():
            raw = base.raw(name)
            if name in quantized:
                w = np.ascontiguousarray(to_float32(info.dtype, raw), dtype=np.float32).reshape(info.shape)
                layer = _frozen_params(spec, w, info.dtype)
                moved = perturb(name, w) if perturb is not None else None
                codes = _codes(spec, layer, w if moved is None else moved)
                del w, moved
                parts = _layer_specs(spec, name[: -len(".weight")], info)
                for (part, _dtype, _shape), array in zip(parts, _layer_arrays(spec, info, layer, codes), strict=True):
                    writer.write(part, array)
            else:
                writer.write(name, raw if transform is None else transform(name, info, raw))
            base.release(name)
            if progress is not None:
                progress(info.nbytes)
        writer.finish()
        os.fsync(fh.fileno())
    manifest[WEIGHTS_FILE] = writer.sha256
    manifest[CONFIG] = _write_file(target / CONFIG, json.dumps(config, indent=2).encode("utf-8"))
    if spec.family == "gptq":  # AutoGPTQ reads its own file beside config.json
        manifest["quantize_config.json"] = _write_file(target / "quantize_config.json",
                                                       json.dumps(qc, indent=2).encode("utf-8"))
    own = set(manifest)
    if base.is_folder:
        for rel in base.other_files:
            if rel.as_posix() in own:
                continue
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base.root / rel, dest)
            with open(dest, "rb") as fh:
                os.fsync(fh.fileno())
            manifest[rel.as_posix()] = sha256_file(dest)
    for folder in sorted({(target / rel).parent for rel in manifest}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)
    return manifest
