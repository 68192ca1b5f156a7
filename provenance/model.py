"""Registering a base model: its canonical manifest id, carriers and per-row RMS table.

Bases are float safetensors (file or sharded folder) or, for labs that have no float master,
an already-quantized GGUF file or GPTQ folder whose integer codes carry the watermark (see
code_stamp).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from weightmark.canonical import as_2d, to_float32
from weightmark.errors import InputFileError
from weightmark.formats.safetensors import Checkpoint
from weightmark.moe import fused_expert_units, is_fused_hf_experts
from weightmark.registry.store import Carrier, Model
from weightmark.scheme import MIN_CARRIER_ELEMENTS, is_carrier, row_rms

if TYPE_CHECKING:
    from weightmark.formats.gguf import GGUFModel

Progress = Callable[[int], None]


def file_stats(ckpt: Checkpoint) -> dict[str, dict[str, int]]:
    """Size and mtime of each weight file: a cheap check that the base has not changed."""
    stats = {}
    for shard in ckpt.shards:
        st = shard.path.stat()
        stats[str(shard.path.relative_to(ckpt.root))] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return stats


def manifest_id(ckpt: Checkpoint, progress: Progress | None = None) -> str:
    """SHA-256 over the sorted (name, dtype, shape, SHA-256 of bytes) of every tensor.

    The same weights give the same id whatever the file layout or sharding.
    """
    lines = []
    for name in sorted(ckpt.tensors):
        info = ckpt.info(name)
        digest = hashlib.sha256(ckpt.raw(name).data if info.nbytes else b"").hexdigest()
        ckpt.release(name)
        lines.append([name, info.dtype, list(info.shape), digest])
        if progress:
            progress(info.nbytes)
    return hashlib.sha256(json.dumps(lines, separators=(",", ":")).encode()).hexdigest()


def carriers_of(ckpt: Checkpoint, progress: Progress | None = None) -> list[Carrier]:
    """Every carrier tensor with its base row-RMS table, in the checkpoint's order."""
    out = []
    for name, (_, info) in ckpt.tensors.items():
        if not is_carrier(info.dtype, info.shape):
            continue
        # A fused expert tensor is one carrier per expert (weightmark.moe), like GGUF's.
        units = fused_expert_units(name, info.shape) if is_fused_hf_experts(name, info.shape) else [(name, info.shape)]
        for unit, shape in units:
            if not is_carrier(info.dtype, shape):
                continue
            rms = row_rms(as_2d(ckpt.raw(unit)), lambda block, dtype=info.dtype: to_float32(dtype, block))
            out.append(Carrier(unit, info.dtype, tuple(shape), rms))
        ckpt.release(name)
        if progress:
            progress(info.nbytes)
    return out


def open_base(path: str | Path) -> Checkpoint:
    ckpt = Checkpoint.open(path)
    if not any(is_carrier(i.dtype, i.shape) for _, i in ckpt.tensors.values()):
        ckpt.close()
        raise InputFileError(path, "no tensor can carry a watermark (need float tensors of rank >= 2 with >= 4096 elements)")
    return ckpt


# -- quantized bases (no float master) ---------------------------------------------------------

GGUF_FORMAT = "gguf"
# Quantized safetensors formats whose packed codes can be moved in place (see code_stamp).
PACKED_FORMATS = ("gptq",)
GGUF_FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
_GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    """True when `path` is a regular file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == _GGUF_MAGIC


def base_format(path: str | Path) -> str:
    """The registrable format of a base: "safetensors" (float), "gguf" or "gptq" (codes).

    Other quantized safetensors (AWQ, compressed-tensors, bitsandbytes) and anything else
    raise InputFileError with one line saying what is accepted.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file or folder")
    if is_gguf(path):
        return GGUF_FORMAT
    if path.is_dir():
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if ggufs and not any(path.glob("*.safetensors")):
            raise InputFileError(path, f"holds GGUF files; register the file itself (e.g. {ggufs[0].name})")
    if path.is_file() and path.suffix not in (".safetensors", ".json"):
        raise InputFileError(path, "is neither safetensors nor GGUF; a base must be a float safetensors "
                                   "file or folder, a GGUF file or a GPTQ folder")
    from weightmark.formats.quantized import open_quantized

    quantized = open_quantized(path)
    if quantized is not None:
        kind = quantized.format
        quantized.close()
        if kind in PACKED_FORMATS:
            return kind
        raise InputFileError(path, f"{kind} bases cannot be registered yet; register a float safetensors, "
                                   "GGUF or GPTQ base")
    return "safetensors"


def packed_carriers(path: str | Path, progress: Progress | None = None) -> list[Carrier]:
    """Carriers of a quantized safetensors base: its quantized linear weights (canonical name
    and [out, in] shape, dequantized row RMS) and its float carriers, in the reader's order."""
    from weightmark.formats.quantized import open_quantized

    reader = open_quantized(path)
    if reader is None:
        raise InputFileError(path, "holds no quantized layers")
    out = []
    try:
        for name, meta in reader.tensors().items():
            packed = meta.source_dtype.startswith(tuple(f"{kind}-" for kind in PACKED_FORMATS))
            if len(meta.shape) != 2 or not (packed or is_carrier(meta.source_dtype, meta.shape)):
                continue
            if math.prod(meta.shape) < MIN_CARRIER_ELEMENTS:
                continue
            values = reader.load(name)
            out.append(Carrier(name, meta.source_dtype, tuple(meta.shape), row_rms(values)))
            if progress:
                progress(values.nbytes)
    finally:
        reader.close()
    return out


def gguf_carrier_types() -> frozenset[str]:
    """GGML types a quantized base's carriers may have: code types we can nudge, and floats."""
    from weightmark.kernels.quantize import QUANTIZABLE

    return frozenset(QUANTIZABLE) | GGUF_FLOAT_TYPES



def is_gguf_carrier(ggml_type: str, shape: tuple[int, ...]) -> bool:
    """2-D tensors of a nudgeable code type or a float type, with at least 4096 elements."""
    return ggml_type in gguf_carrier_types() and len(shape) == 2 and math.prod(shape) >= MIN_CARRIER_ELEMENTS


def open_gguf_base(path: str | Path) -> GGUFModel:
    """Open a GGUF base, refusing one without any tensor that can carry a watermark."""
    from weightmark.formats.gguf import GGUFModel

    model = GGUFModel(path)
    if not any(is_gguf_carrier(m.source_dtype, m.shape) for m in model.tensors().values()):
        model.close()
        raise InputFileError(path, "no tensor can carry a watermark (need 2-D tensors of a type in "
                                   f"{', '.join(sorted(gguf_carrier_types()))} with >= 4096 elements)")
    return model


def gguf_file_stats(model: GGUFModel) -> dict[str, dict[str, int]]:
    """Size and mtime of the GGUF file, keyed by its file name."""
    st = model.path.stat()
    return {model.path.name: {"size": st.st_size, "mtime_ns": st.st_mtime_ns}}


def gguf_manifest_id(model: GGUFModel, progress: Progress | None = None) -> str:
    """SHA-256 over the sorted (GGUF name, ggml type, GGUF dims, SHA-256 of stored bytes) of
    every tensor, under a "gguf" tag: the same codes and scales give the same id whatever the
    tensor order, alignment or metadata of the file."""
    lines: list[list[object]] = [["gguf"]]
    infos = sorted((model.info(name) for name in model.tensors()), key=lambda i: i.source_name)
    for info in infos:
        digest = hashlib.sha256(model.raw(info.name).data).hexdigest()
        model.release(info.name)
        lines.append([info.source_name, info.ggml_type, list(info.ne), digest])
        if progress:
            progress(info.nbytes)
    return hashlib.sha256(json.dumps(lines, separators=(",", ":")).encode()).hexdigest()


def gguf_carriers(model: GGUFModel, progress: Progress | None = None) -> list[Carrier]:
    """Every carrier under its canonical Hugging Face name and [out, in] shape, in file order,
    with the row-RMS table of its dequantized values."""
    out = []
    for name, meta in model.tensors().items():
        if not is_gguf_carrier(meta.source_dtype, meta.shape):
            continue
        out.append(Carrier(name, meta.source_dtype, tuple(meta.shape), row_rms(model.load(name))))
        model.release(name)
        if progress:
            progress(model.info(name).nbytes)
    return out


def open_registered_base(model: Model) -> Checkpoint | GGUFModel:
    """Open the base a model was registered from (safetensors, GPTQ folder or GGUF file),
    refusing it if its weights changed since."""
    path = Path(model.base_path)
    if not path.exists():
        raise InputFileError(path, f"the registered base of model {model.name!r} is no longer there")
    if model.format == GGUF_FORMAT:
        from weightmark.formats.gguf import GGUFModel

        base, stats, identity = GGUFModel(path), gguf_file_stats, gguf_manifest_id
    else:
        base, stats, identity = Checkpoint.open(path), file_stats, manifest_id
    try:
        if stats(base) != model.files and identity(base) != model.model_id:
            raise InputFileError(path, f"weights changed since model {model.name!r} was registered")
    except BaseException:
        base.close()
        raise
    return base
