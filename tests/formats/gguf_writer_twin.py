"""The in-memory GGUF writer as it was before streaming: every tensor handed to gguf.GGUFWriter.

Kept as the reference the streaming writer (weightmark.formats.gguf.write_gguf) must match byte
for byte: gguf's own writer holds all tensors until `write_tensors_to_file`, computes the tensor
offsets from their sizes and pads with its own rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from weightmark.formats.gguf import (
    _ARCHES,
    _ROPE_TENSORS,
    ROPE_PERMUTED_ARCHS,
    WRITABLE_TYPES,
    Encoder,
    LazyTensor,
    _add_value,
    _full_key,
    _is_int,
    _layer_count,
    _storage_type,
    rope_permute,
)


def reference_write_gguf(
    path: Path,
    arch: str,
    tensors: Sequence[tuple[str, np.ndarray | LazyTensor]],
    qtype: str,
    metadata: dict[str, Any] | None = None,
    *,
    encode: Encoder | None = None,
    drop_unmapped: bool = False,
) -> list[str]:
    arch_enum = _ARCHES[arch]
    assert qtype in WRITABLE_TYPES
    meta = {_full_key(arch, k): v for k, v in (metadata or {}).items()}
    names = [name for name, _ in tensors]
    written: list[str] = []
    blocks = meta.setdefault(f"{arch}.block_count", _layer_count(names))
    tmap = gguf.get_tensor_name_map(arch_enum, int(blocks))
    mapped: list[tuple[str, gguf.MODEL_TENSOR, np.ndarray]] = []
    for hf_name, array in tensors:
        if isinstance(array, LazyTensor):  # the old writer's callers loaded everything first
            array = array.load()
        found = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None and drop_unmapped:
            continue
        assert found is not None
        kind, gguf_name = found
        mapped.append((gguf_name, kind, np.ascontiguousarray(array, dtype=np.float32)))
        written.append(hf_name)
    by_kind = {(kind, name.endswith(".weight")): a for name, kind, a in mapped}
    embed = by_kind.get((gguf.MODEL_TENSOR.TOKEN_EMBD, True))
    if embed is not None and embed.ndim == 2:
        meta.setdefault(f"{arch}.vocab_size", embed.shape[0])
        meta.setdefault(f"{arch}.embedding_length", embed.shape[1])
    gate = by_kind.get((gguf.MODEL_TENSOR.FFN_GATE, True))
    if gate is not None and gate.ndim == 2:
        meta.setdefault(f"{arch}.feed_forward_length", gate.shape[0])
    q = by_kind.get((gguf.MODEL_TENSOR.ATTN_Q, True))
    k = by_kind.get((gguf.MODEL_TENSOR.ATTN_K, True))
    n_head = meta.get(f"{arch}.attention.head_count")
    if q is not None and k is not None and _is_int(n_head) and q.shape[0] % n_head == 0:
        head_dim = q.shape[0] // n_head
        if k.shape[0] % head_dim == 0:
            meta.setdefault(f"{arch}.attention.head_count_kv", k.shape[0] // head_dim)

    writer = gguf.GGUFWriter(path, arch)
    for (gguf_name, kind, array), hf_name in zip(mapped, written, strict=True):
        heads = None
        if arch in ROPE_PERMUTED_ARCHS and kind in _ROPE_TENSORS:
            key = f"{arch}.attention.{_ROPE_TENSORS[kind]}"
            heads = meta.get(key, meta.get(f"{arch}.attention.head_count"))
        if encode is None:
            if heads is not None:
                array = rope_permute(array, heads)
            stored = _storage_type(qtype, array)
            data = gguf.quants.quantize(array, gguf.GGMLQuantizationType[stored])
        else:
            stored, data = encode(hf_name, array)
            if heads is not None:
                data = rope_permute(data.reshape(data.shape[0], -1), heads)
        ggml = gguf.GGMLQuantizationType[stored]
        if data.dtype == np.uint8:
            data = data.reshape(array.shape[:-1] + (-1,)) if array.ndim > 1 else data.reshape(-1)
        writer.add_tensor(gguf_name, data, raw_dtype=ggml if data.dtype == np.uint8 else None)
    if qtype not in ("F32", "F16", "BF16"):
        meta.setdefault("general.quantization_version", gguf.GGML_QUANT_VERSION)
    file_type = "ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}"
    meta.setdefault("general.file_type", int(gguf.LlamaFileType[file_type]))
    for key, value in meta.items():
        if key != "general.architecture":
            _add_value(writer, key, value)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return written
