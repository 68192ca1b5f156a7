"""Stamping straight into a quantized copy (GGUF, GPTQ, AWQ, compressed-tensors, NF4), scales frozen.

The base's float weights are quantized once to fix every block's scales; each licensee's copy
is then `w + delta` quantized against those same scales, so copies share scales and differ
only in the codes the watermark moves. GGUF rows that are not whole K-quant super-blocks fall
back to the types llama.cpp falls back to; GPTQ, AWQ, compressed-tensors and bitsandbytes NF4
folders are written by weightmark.formats.packed_write (round-to-nearest quantizations in those
containers), with the float tensors they keep stamped in their own dtype.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from weightmark.canonical import as_2d, kind_of, to_float32
from weightmark.errors import InputFileError, UsageError
from weightmark.formats.packed_write import PACKED_FORMATS, write_packed_copy
from weightmark.formats.safetensors import Checkpoint, TensorInfo
from weightmark.fsutil import sha256_file, staged_output
from weightmark.kernels import FLOAT, embed
from weightmark.kernels.quant import BLOCK_LAYOUTS

# --format values and the llama.cpp file type each one names
GGUF_FORMATS = {"gguf:Q8_0": "Q8_0", "gguf:Q4_0": "Q4_0", "gguf:Q4_1": "Q4_1", "gguf:Q5_0": "Q5_0",
                "gguf:Q6_K": "Q6_K", "gguf:Q4_K_M": "Q4_K_M"}
# llama.cpp's fallback when a row is not a multiple of the 256-element K-quant super-block
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# GGUF tensors llama.cpp's quantizer leaves in their stored type (BERT's position and token-type
# embeddings): kept float here
_KEEP_FLOAT = ("position_embd.weight", "token_types.weight")
_LAYER = re.compile(r"^blk\.(\d+)\.")

CarrierEmbed = Callable[[str, np.ndarray], np.ndarray | None]
RawEmbed = Callable[[str, TensorInfo, np.ndarray], np.ndarray]

# every --format value: the base's own, GGUF file types, packed safetensors folders
FORMAT_CHOICES = ("same", *GGUF_FORMATS, *PACKED_FORMATS)


def parse_format(fmt: str) -> str | None:
    """None for the base's own format, the GGUF file type for gguf:..., or the packed format
    name itself (gptq:4bit-g128, awq:4bit-g128, ct:w4a16, ct:w8a16, bnb:nf4); UsageError for
    unknown values."""
    if fmt in ("", "same", "safetensors"):
        return None
    if fmt in PACKED_FORMATS:
        return fmt
    if fmt not in GGUF_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; choose from {', '.join(FORMAT_CHOICES)}")
    return GGUF_FORMATS[fmt]


def is_packed(file_type: str | None) -> bool:
    """Whether parse_format's result names a packed safetensors folder (not GGUF, not same)."""
    return file_type in PACKED_FORMATS


def quantized_variant(file_type: str) -> str:
    """The policy variant of a quantized output: quantized:gguf:Q4_K_M, quantized:gptq:4bit-g128."""
    return f"quantized:{file_type}" if is_packed(file_type) else f"quantized:gguf:{file_type}"


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth and every
    third layer between them."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(file_type: str, gguf_name: str, shape: tuple[int, ...], *, n_layers: int = 0,
                tied: bool = False) -> str:
    """The GGML type of a tensor in a `file_type` copy, as llama.cpp's llama-quantize picks it
    (llama_tensor_get_type for the file types weightmark writes, without an importance matrix).

    `gguf_name` is the tensor's GGUF name (blk.N.attn_v.weight, token_embd.weight, ...),
    `n_layers` the block count and `tied` whether the file has no output.weight (the token
    embedding then doubles as the output and gets the output's type). Vectors, and the
    tensors llama.cpp never quantizes, stay F32.
    """
    if len(shape) < 2 or not gguf_name.endswith("weight") or "_norm.weight" in gguf_name \
            or gguf_name in _KEEP_FLOAT:
        return "F32"
    default = "Q4_K" if file_type == "Q4_K_M" else file_type
    qtype = default
    cols = shape[-1]
    layer = _LAYER.match(gguf_name)
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        # the output projection: Q6_K unless the file is Q8_0, Q8_0 when a row is not whole blocks
        if cols % BLOCK_LAYOUTS[default][0]:
            qtype = "Q8_0"
        elif default != "Q8_0":
            qtype = "Q6_K"
    elif file_type == "Q4_K_M" and layer is not None and n_layers > 0:
        # value projections and FFN down projections of the use_more_bits layers get Q6_K
        if gguf_name.endswith((".attn_v.weight", ".ffn_down.weight")) \
                and _use_more_bits(int(layer.group(1)), n_layers):
            qtype = "Q6_K"
        elif gguf_name.endswith(".attn_qkv.weight"):
            qtype = "Q5_K"
    if cols % BLOCK_LAYOUTS[qtype][0]:
        qtype = K_FALLBACK.get(qtype, "F16")
        if qtype != "F16" and cols % BLOCK_LAYOUTS[qtype][0]:
            qtype = "F16"
    return qtype


def gguf_tensor_types(file_type: str, arch: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """The GGML type of every Hugging Face-named tensor of a `file_type` copy (tensor_type with
    each tensor's GGUF name, the block count and whether the embedding is tied)."""
    from weightmark.formats.gguf import gguf_names

    names = gguf_names(arch, list(shapes))
    layers = [int(m.group(1)) for m in map(_LAYER.match, names.values()) if m]
    n_layers = max(layers) + 1 if layers else 0
    tied = "output.weight" not in names.values()
    return {hf: tensor_type(file_type, names.get(hf, hf), shape, n_layers=n_layers, tied=tied)
            for hf, shape in shapes.items()}


def _config(base: Path) -> tuple[Path, dict[str, Any]]:
    config_path = (base if base.is_dir() else base.parent) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise InputFileError(config_path, "a readable config.json is needed beside the base to write GGUF") from None
    if not isinstance(config, dict):
        raise InputFileError(config_path, "config.json is not a JSON object")
    return config_path, config


def _pooling_type(folder: Path) -> int | None:
    """sentence-transformers pooling (modules.json -> <pooling>/config.json) as llama.cpp's enum."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        pooling = next(m["path"] for m in modules if m.get("type", "").endswith("Pooling"))
        config = json.loads((folder / pooling / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    if config.get("pooling_mode_mean_tokens"):
        return int(gguf.PoolingType.MEAN)
    if config.get("pooling_mode_cls_token"):
        return int(gguf.PoolingType.CLS)
    return None


def _rope_theta(config: dict[str, Any]) -> float:
    """The rope base frequency: top-level `rope_theta`, or in `rope_parameters` (transformers 5
    writes it only there), else llama.cpp's default."""
    nested = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", nested.get("rope_theta") if isinstance(nested, dict) else None)
    return float(theta) if isinstance(theta, (int, float)) else 10000.0


def gguf_hparams(base: Path) -> tuple[str, dict[str, Any]]:
    """Architecture and hyper-parameters for the GGUF header, from the base's config.json
    (the keys llama.cpp's converter writes for the architecture)."""
    config_path, config = _config(base)
    kind = config.get("model_type")
    try:
        if kind in ("llama", "mistral", "smollm3"):
            arch = "llama"
            heads = config["num_attention_heads"]
            meta = {"attention.head_count": heads,
                    "attention.head_count_kv": config.get("num_key_value_heads", heads),
                    "context_length": config.get("max_position_embeddings", 2048),
                    "attention.layer_norm_rms_epsilon": config.get("rms_norm_eps", 1e-5),
                    "rope.freq_base": _rope_theta(config)}
            if "head_dim" in config or "hidden_size" in config:
                meta["rope.dimension_count"] = config.get("head_dim") or config["hidden_size"] // heads
        elif kind == "bert":
            arch = "bert"
            meta = {"attention.head_count": config["num_attention_heads"],
                    "context_length": config.get("max_position_embeddings", 512),
                    "attention.layer_norm_epsilon": config.get("layer_norm_eps", 1e-12),
                    "attention.causal": False}
            pooling = _pooling_type(config_path.parent)
            if pooling is not None:
                meta["pooling_type"] = pooling
        else:
            raise InputFileError(config_path, f"model_type {kind!r}: GGUF output supports llama-family and bert")
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        raise InputFileError(config_path, f"missing or invalid {exc} for the GGUF header") from None
    for key, hf_key in (("feed_forward_length", "intermediate_size"), ("embedding_length", "hidden_size"),
                        ("vocab_size", "vocab_size")):
        if isinstance(config.get(hf_key), int):
            meta[key] = config[hf_key]
    return arch, meta


def _embedding_rows(base: Checkpoint) -> int | None:
    for name, (_, info) in base.tensors.items():
        if name.endswith(("embed_tokens.weight", "word_embeddings.weight", "wte.weight")) and len(info.shape) == 2:
            return int(info.shape[0])
    return None


def gguf_metadata(base: Checkpoint, base_path: Path, file_type: str | None) -> tuple[str, dict[str, Any], str]:
    """(architecture, every metadata key of a GGUF copy, where the tokenizer came from).

    Hyper-parameters from config.json, tokenizer and descriptive keys from a donor GGUF or the
    tokenizer files (weightmark.formats.gguf_vocab), and the file type of `file_type` (None for
    an all-F32 file) with the quantization version llama-quantize writes. InputFileError, before
    anything is written, when llama.cpp could not run the result.
    """
    from weightmark.formats.gguf_vocab import runtime_metadata

    arch, meta = gguf_hparams(base_path)
    folder = base_path if base_path.is_dir() else base_path.parent
    _, config = _config(base_path)
    n_vocab = _embedding_rows(base) or config.get("vocab_size")
    if not isinstance(n_vocab, int):
        raise InputFileError(folder, "no token embedding and no vocab_size in config.json: cannot size the tokenizer")
    tokenizer, source = runtime_metadata(folder, arch, config, n_vocab)
    meta.update(tokenizer)
    if file_type is None:
        meta["general.file_type"] = int(gguf.LlamaFileType.ALL_F32)
    else:
        meta["general.file_type"] = int(gguf.LlamaFileType[f"MOSTLY_{file_type}"])
        meta["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    return arch, meta, source


def write_quantized_copy(
    base: Checkpoint,
    base_path: Path,
    target: Path,
    file_type: str,
    stamp_carrier: CarrierEmbed,
    progress: Callable[[int], None],
) -> list[str]:
    """Write the GGUF copy: carriers as frozen-scale quantizations of their stamped values."""
    from weightmark.formats.gguf import LazyTensor, write_gguf
    from weightmark.kernels.quantize import quantize, quantize_stamped

    arch, meta, _ = gguf_metadata(base, base_path, file_type)

    def reader(name: str, dtype: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            values = np.ascontiguousarray(to_float32(dtype, base.raw(name)), dtype=np.float32)
            base.release(name)  # the float32 copy is all the writer needs
            return values

        return load

    # One tensor at a time: each is read (and decoded to float32) only when the writer reaches it.
    tensors = [(name, LazyTensor(tuple(info.shape), reader(name, info.dtype)))
               for name, (_, info) in base.tensors.items() if info.dtype in ("F32", "F64", "F16", "BF16")]

    types = gguf_tensor_types(file_type, arch, {name: tuple(t.shape) for name, t in tensors})

    def encode(hf_name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
        qtype = types[hf_name]
        rows = w.reshape(w.shape[0], -1) if w.ndim > 1 else w
        stamped = stamp_carrier(hf_name, rows) if w.ndim > 1 else None
        progress(w.nbytes)
        if qtype == "F32":
            return "F32", (rows if stamped is None else stamped).astype(np.float32).reshape(w.shape)
        if qtype == "F16":
            return "F16", (rows if stamped is None else stamped).astype(np.float16).reshape(w.shape)
        if stamped is None:
            return qtype, quantize(qtype, np.ascontiguousarray(rows))
        # Scales of the unstamped rows, codes nearest the stamped values against them (one
        # pass): only codes the watermark pushes across a rounding boundary change.
        return qtype, quantize_stamped(qtype, np.ascontiguousarray(rows), np.ascontiguousarray(stamped))

    # file_type and quantization_version come with `meta`; "F32" only names the default encoder
    return write_gguf(target, arch, tensors, "F32", meta, encode=encode, drop_unmapped=True)


def write_stamped_copy(
    base: Checkpoint,
    base_path: Path,
    target: Path,
    out_name: str,
    file_type: str,
    stamper: CarrierEmbed,
    raw_stamper: RawEmbed,
    progress: Callable[[int], None],
) -> tuple[dict[str, str], str]:
    """Write a quantized stamped copy at `target`; ({file: sha256}, output format name).

    GGUF is one file (keyed by `out_name`); packed formats are folders whose output format is
    the name our readers give them (gptq, awq, compressed-tensors:pack-quantized,
    bitsandbytes-nf4).
    """
    if is_packed(file_type):
        files = write_packed_copy(base, base_path, target, file_type, stamper, raw_stamper, progress)
        return files, PACKED_FORMATS[file_type].output_format
    write_quantized_copy(base, base_path, target, file_type, stamper, lambda n: progress(n // 2))
    return {out_name: sha256_file(target)}, "gguf"


def write_reference_copy(base_path: str | Path, out: str | Path, fmt: str, overwrite: bool = False) -> Path:
    """The unstamped quantized copy of a base in `fmt` (the reference a non-blind scan of a
    directly stamped copy can use): the same writer, same frozen scales, no watermark."""
    file_type = parse_format(fmt)
    if file_type is None:
        raise UsageError("a reference copy needs a quantized --format")
    out = Path(out)
    with Checkpoint.open(base_path) as base, staged_output(out, is_dir=is_packed(file_type),
                                                           overwrite=overwrite) as staging:
        write_stamped_copy(base, Path(base_path), staging.path, out.name, file_type,
                           lambda name, rows: None, lambda name, info, raw: raw, lambda n: None)
        staging.publish()
    return out


def dtype_stamper(carriers: dict[str, Any], code: np.ndarray, seeds: dict[str, int], alpha: float,
                  root: Path) -> RawEmbed:
    """The stamp of a tensor kept in the base's own dtype (the raw array itself if no carrier)."""

    def stamp_raw(name: str, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
        carrier = carriers.get(name)
        if carrier is None:
            return raw
        if (info.dtype, tuple(info.shape)) != (carrier.dtype, carrier.shape):
            raise InputFileError(root, f"tensor {name!r} is not the registered {carrier.dtype} {list(carrier.shape)}")
        rows = as_2d(raw)
        return embed(rows, kind_of(info.dtype), carrier.row_scale, code, seeds[name], alpha).reshape(raw.shape)

    return stamp_raw


def float_stamper(carriers: dict[str, Any], code: np.ndarray, seeds: dict[str, int], alpha: float) -> CarrierEmbed:
    """The stamp of one carrier in float32 (None for tensors that carry nothing)."""

    def stamp_one(name: str, rows: np.ndarray) -> np.ndarray | None:
        carrier = carriers.get(name)
        if carrier is None or carrier.shape[0] != rows.shape[0] or int(np.prod(carrier.shape)) != rows.size:
            return None
        return embed(np.ascontiguousarray(rows, dtype=np.float32), FLOAT, carrier.row_scale, code, seeds[name], alpha)

    return stamp_one
