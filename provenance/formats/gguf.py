"""Read GGUF checkpoints as canonical Hugging Face float32 tensors, and write GGUF files tensor by tensor."""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import GGUFValue

from weightmark.kernels.quant import BLOCK_LAYOUTS, dequantize
from weightmark.moe import is_fused_experts, split_fused_experts

from ..errors import FormatError, InputFileError
from ..fsutil import fsync_dir, remove_path, start_writeback
from .base import TensorMeta

# Tensors at least this large start their writeback as soon as they are written.
_WRITEBACK_BYTES = 4 << 20

__all__ = [
    "ROPE_PERMUTED_ARCHS",
    "WRITABLE_TYPES",
    "GGUFArray",
    "GGUFModel",
    "GGUFTensorInfo",
    "LazyTensor",
    "TensorSource",
    "gguf_names",
    "rope_permute",
    "rope_unpermute",
    "write_gguf",
]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_HEADER_BYTES = 24  # magic, version, tensor count, KV count
_MIN_TENSOR_INFO = 24  # name length 8 + n_dims 4 + type 4 + offset 8 (plus 8 per dimension)
_MIN_KV = 13  # key length 8 + value type 4 + the smallest value (1 byte)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 2**62  # no tensor a file can hold has more
_MAX_ARRAY_DEPTH = 4  # arrays of arrays of ... deeper than this are refused
_KEPT_ARRAY = 4096  # metadata arrays up to this length are decoded; longer ones are skipped
_DEFAULT_ALIGNMENT = 32
_MAX_BLOCKS = 1024  # the name map is built per block; no real model has this many

# llama.cpp's converter (LlamaModel.permute) reorders the rows of q_proj and k_proj from the
# Hugging Face rotate-half layout into interleaved rope pairs for these architectures (the
# LlamaModel subclasses that keep undo_permute = True). Mistral, Llama 4 and Apertus do not.
ROPE_PERMUTED_ARCHS = frozenset({"llama", "granite", "granitemoe", "smollm3", "llama-embed"})
_ROPE_TENSORS = {gguf.MODEL_TENSOR.ATTN_Q: "head_count", gguf.MODEL_TENSOR.ATTN_K: "head_count_kv"}
# Tensors llama.cpp computes itself (no Hugging Face counterpart): they keep their GGUF name.
_DERIVED_TENSORS = frozenset({gguf.MODEL_TENSOR.ROPE_FREQS})
# Hugging Face names preferred, in order, among the candidates gguf's tensor map lists.
_PREFERRED_EXACT = ("model.embed_tokens", "model.norm", "lm_head")

# The types write_gguf can produce (gguf's numpy quantizers, plus the float types).
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

# GGUF metadata value types: id -> (struct format, size) for the fixed-size ones.
_UINT32, _BOOL, _STRING, _ARRAY = 4, 7, 8, 9
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<B", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY_SCALARS: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4",
    6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BLK = re.compile(r"^blk\.(\d{1,9})\.")


def _show(value: Any, limit: int = 60) -> str:
    """A one-line, length-capped rendering of a value taken from an untrusted file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array too long to keep (tokenizer vocabularies): its item type and length."""

    item_type: int
    count: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file: where its bytes are and how they map to the canonical tensor."""

    source_name: str  # the GGUF name, e.g. "blk.0.attn_q.weight"
    name: str  # the canonical (Hugging Face) name, or the GGUF name when none is known
    candidates: tuple[str, ...]  # every Hugging Face name gguf's tensor map knows for it
    ggml_type: str  # "Q4_K", "F32", ...
    ne: tuple[int, ...]  # GGUF dimensions, fastest first (ne[0] = in_features)
    begin: int  # absolute byte offset of the data in the file
    nbytes: int
    rope_heads: int  # > 0: rows were rope-permuted over this many heads and are un-permuted

    @property
    def shape(self) -> tuple[int, ...]:
        """Canonical shape: the GGUF dimensions reversed ([out, in] for linear weights)."""
        return tuple(reversed(self.ne))

    @property
    def numel(self) -> int:
        return math.prod(self.ne)


# --------------------------------------------------------------------------- rope permutation


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows: HF rotate-half -> interleaved pairs."""
    rows = w.shape[0]
    _check_heads(rows, n_head)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of rope_permute: interleaved pairs (GGUF) -> HF rotate-half row order."""
    rows = w.shape[0]
    _check_heads(rows, n_head)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_heads(rows: int, n_head: int) -> None:
    if not _is_int(n_head) or n_head <= 0 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of row pairs")


# ------------------------------------------------------------------------------ name mapping


@lru_cache(maxsize=16)
def _name_table(arch: str, n_blocks: int) -> dict[str, tuple[gguf.MODEL_TENSOR, tuple[str, ...]]]:
    """GGUF base name -> (tensor kind, Hugging Face candidates, preferred first)."""
    arch_enum = _ARCHES.get(arch)
    if arch_enum is None:
        return {}
    mapping = gguf.get_tensor_name_map(arch_enum, n_blocks).mapping
    found: dict[str, tuple[gguf.MODEL_TENSOR, list[str]]] = {}
    for hf_name, (kind, gguf_name) in mapping.items():
        entry = found.setdefault(gguf_name, (kind, []))
        if hf_name != gguf_name and hf_name not in entry[1]:
            entry[1].append(hf_name)
    return {
        gguf_name: (kind, tuple(sorted(names, key=lambda n: _preference(n, gguf_name))))
        for gguf_name, (kind, names) in found.items()
    }


_ARCHES: dict[str, gguf.MODEL_ARCH] = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def _preference(hf_name: str, gguf_name: str) -> int:
    """Rank of a candidate: HF transformers llama-family conventions first (stable sort)."""
    if hf_name in _PREFERRED_EXACT:
        return 0
    block = _BLK.match(gguf_name)
    if block is not None and hf_name.startswith(f"model.layers.{block.group(1)}."):
        return 1
    if hf_name.startswith("model."):
        return 2
    return 3


def _map_name(
    table: dict[str, tuple[gguf.MODEL_TENSOR, tuple[str, ...]]], gguf_name: str
) -> tuple[gguf.MODEL_TENSOR | None, str | None, tuple[str, ...]]:
    """(kind, preferred HF name, all HF candidates) of a GGUF tensor name."""
    entry = table.get(gguf_name)
    suffix = ""
    if entry is None:
        base, dot, tail = gguf_name.rpartition(".")
        if dot:
            entry = table.get(base)
            suffix = "." + tail
    if entry is None:
        return None, None, ()
    kind, names = entry
    candidates = tuple(name + suffix for name in names)
    if kind in _DERIVED_TENSORS or not candidates:
        return kind, None, candidates
    return kind, candidates[0], candidates


# --------------------------------------------------------------------------- header parsing


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file; FormatError past the end."""

    def __init__(self, path: Path, data: mmap.mmap | bytes | memoryview, size: int) -> None:
        self.path = path
        self.data = data
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise FormatError(
                self.path,
                f"header is truncated: {what} at byte {self.pos} needs {n} bytes "
                f"but the file ends at byte {self.size}",
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return value

    def raw_string(self, what: str) -> bytes:
        length = self.u64(f"length of {what}")
        self.need(length, what)
        start = self.pos
        self.pos += length
        return bytes(self.data[start : self.pos])

    def string(self, what: str) -> str:
        start = self.pos
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(self.path, f"{what} at byte {start} is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        length = self.u64(f"length of {what}")
        self.need(length, what)
        self.pos += length

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """Read one metadata value of type `vtype` (arrays: kept if short, else GGUFArray)."""
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            fmt, size = scalar
            self.need(size, what)
            (value,) = struct.unpack_from(fmt, self.data, self.pos)
            self.pos += size
            return bool(value) if vtype == _BOOL else value
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise FormatError(self.path, f"{what} has unknown value type {vtype}")
        if depth >= _MAX_ARRAY_DEPTH:
            raise FormatError(
                self.path, f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} levels deep"
            )
        item_type = self.u32(f"item type of {what}")
        count = self.u64(f"length of {what}")
        item = _SCALARS.get(item_type)
        if item is not None:
            nbytes = count * item[1]
            self.need(nbytes, f"{count} items of {what}")
            start = self.pos
            self.pos += nbytes
            if count > _KEPT_ARRAY:
                return GGUFArray(item_type, count)
            items = np.frombuffer(self.data, _NUMPY_SCALARS[item_type], count, start).tolist()
            return tuple(bool(v) for v in items) if item_type == _BOOL else tuple(items)
        if item_type == _STRING:
            self.need(count * 8, f"{count} strings of {what}")
            if count > _KEPT_ARRAY:
                for _ in range(count):
                    self.skip_string(f"a string of {what}")
                return GGUFArray(item_type, count)
            return tuple(self.string(f"a string of {what}") for _ in range(count))
        if item_type == _ARRAY:
            self.need(count * 12, f"{count} arrays of {what}")
            items = [self.value(_ARRAY, what, depth + 1) for _ in range(count)]
            return GGUFArray(item_type, count) if count > _KEPT_ARRAY else tuple(items)
        raise FormatError(self.path, f"{what} is an array of unknown value type {item_type}")


@dataclass(frozen=True)
class _RawTensor:
    name: str
    ne: tuple[int, ...]
    type_id: int
    offset: int  # relative to the data section


def _ggml_type(type_id: int) -> gguf.GGMLQuantizationType | None:
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        return None
    return qtype if qtype in gguf.GGML_QUANT_SIZES else None


def _parse_header(
    path: Path, data: mmap.mmap | bytes | memoryview, size: int
) -> tuple[int, dict[str, Any], list[_RawTensor], int]:
    """Validate the header; return (version, metadata, tensor infos, data section start)."""
    if size < _HEADER_BYTES:
        raise FormatError(
            path, f"file is {size} bytes, shorter than the {_HEADER_BYTES}-byte GGUF header"
        )
    if bytes(data[:4]) != _MAGIC:
        raise FormatError(path, f"bad magic {bytes(data[:4])!r}: not a GGUF file")
    cur = _Cursor(path, data, size)
    cur.pos = 4
    version = cur.u32("version")
    if version not in _VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version & 0xFFFF == 0 and swapped in _VERSIONS:
            raise FormatError(path, "big-endian GGUF files are not supported")
        raise FormatError(path, f"GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("KV count")
    room = size - _HEADER_BYTES
    if n_tensors * _MIN_TENSOR_INFO > room:
        raise FormatError(
            path,
            f"tensor count {n_tensors} cannot fit: each tensor info needs at least "
            f"{_MIN_TENSOR_INFO} bytes but the file has {room} bytes after its header",
        )
    if n_kv * _MIN_KV > room:
        raise FormatError(
            path,
            f"KV count {n_kv} cannot fit: each key/value needs at least {_MIN_KV} bytes "
            f"but the file has {room} bytes after its header",
        )
    if n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > room:
        raise FormatError(
            path,
            f"{n_tensors} tensor infos and {n_kv} key/values cannot fit in the {room} bytes "
            "after the header",
        )
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        if key in metadata:
            raise FormatError(path, f"metadata key {_show(key)} appears more than once")
        vtype = cur.u32(f"value type of key {_show(key)}")
        if key == "general.alignment" and vtype != _UINT32:
            raise FormatError(path, f"general.alignment has value type {vtype}, not uint32 (4)")
        metadata[key] = cur.value(vtype, f"value of key {_show(key)}")
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(
            path, f"general.alignment {_show(alignment)} is not a positive power of two"
        )
    tensors: list[_RawTensor] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        where = f"tensor {_show(name)}"
        if name in seen:
            raise FormatError(path, f"{where} appears more than once")
        seen.add(name)
        n_dims = cur.u32(f"dimension count of {where}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise FormatError(
                path, f"{where} has {n_dims} dimensions; GGUF allows 1 to {_MAX_DIMS}"
            )
        ne = tuple(cur.u64(f"dimension {j} of {where}") for j in range(n_dims))
        type_id = cur.u32(f"type of {where}")
        offset = cur.u64(f"data offset of {where}")
        tensors.append(_RawTensor(name, ne, type_id, offset))
    data_start = -(-cur.pos // alignment) * alignment
    return version, metadata, tensors, data_start


def _check_tensor(
    path: Path, raw: _RawTensor, data_start: int, size: int, alignment: int
) -> tuple[gguf.GGMLQuantizationType, int, int]:
    """Validate one tensor on its own: dims, type, block fit, alignment and file bounds."""
    where = f"tensor {_show(raw.name)}"
    dims = list(raw.ne)
    if any(d <= 0 for d in raw.ne):
        raise FormatError(path, f"{where} has shape {dims} with a dimension that is not positive")
    numel = 1
    for d in raw.ne:
        numel *= d
        if numel > _MAX_ELEMENTS:
            raise FormatError(path, f"{where} has shape {dims}: more than 2^62 elements")
    qtype = _ggml_type(raw.type_id)
    if qtype is None:
        raise FormatError(path, f"{where} has unknown ggml type {raw.type_id}")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if raw.ne[0] % block:
        raise FormatError(
            path,
            f"{where}: rows of {raw.ne[0]} elements are not a multiple of the {qtype.name} "
            f"block size {block}, so shape {dims} has no byte length",
        )
    if raw.offset % alignment:
        raise FormatError(
            path,
            f"{where}: data offset {raw.offset} is not a multiple of the alignment {alignment}",
        )
    nbytes = numel // block * type_size
    begin = data_start + raw.offset
    if begin + nbytes > size:
        raise FormatError(
            path,
            f"{where}: data [{begin}, {begin + nbytes}) ({nbytes} bytes for shape {dims} of "
            f"{qtype.name}) runs past the end of the {size}-byte file; the file is truncated or "
            "the offset lies",
        )
    return qtype, begin, nbytes


def _check_overlaps(path: Path, infos: Iterable[GGUFTensorInfo]) -> None:
    previous: GGUFTensorInfo | None = None
    for info in sorted(infos, key=lambda t: (t.begin, t.nbytes)):
        if previous is not None and info.begin < previous.begin + previous.nbytes:
            raise FormatError(
                path,
                f"tensor {_show(info.source_name)}: data [{info.begin}, {info.begin + info.nbytes})"
                f" ({info.nbytes} bytes for shape {list(info.ne)} of {info.ggml_type}) overlaps "
                f"tensor {_show(previous.source_name)} at [{previous.begin}, "
                f"{previous.begin + previous.nbytes}) ({previous.nbytes} bytes for shape "
                f"{list(previous.ne)} of {previous.ggml_type})",
            )
        previous = info


def _positive_int(path: Path, metadata: dict[str, Any], key: str, block: int | None) -> int | None:
    """A per-model (or per-layer, when the value is an array) positive integer hyperparameter."""
    value = metadata.get(key)
    if isinstance(value, tuple) and block is not None:
        value = value[block] if block < len(value) else None
    if value is None:
        return None
    if not _is_int(value) or value <= 0:
        raise FormatError(path, f"{key} is {_show(value)}, not a positive integer")
    return value


# ------------------------------------------------------------------------------------ reader


class GGUFModel:
    """A validated, memory-mapped GGUF file seen as canonical Hugging Face float32 tensors."""

    format = "gguf"

    def __init__(self, path: str | os.PathLike[str], offset: int = 0, length: int | None = None) -> None:
        """Open the GGUF file at `path`, or the GGUF stored in bytes [offset, offset + length)
        of it (a container such as a llamafile): offsets in it are relative to `offset`."""
        self.path = Path(path)
        self.offset = offset
        self._data: np.ndarray | None = None
        self._map: mmap.mmap | None = None
        self._map_start = 0
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise InputFileError(self.path, "no such file") from None
        except OSError as exc:
            raise InputFileError(self.path, f"cannot read: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(self.path, "not a regular file")
        try:
            with open(self.path, "rb") as fh:
                file_size = os.fstat(fh.fileno()).st_size
                size = file_size - offset if length is None else length
                if offset < 0 or size < 0 or offset + size > file_size:
                    raise FormatError(self.path, f"GGUF window of {size} bytes at offset {offset} lies "
                                                 f"outside the file ({file_size} bytes)")
                if size == 0:
                    raise FormatError(self.path, "file is empty, not a GGUF file")
                with mmap.mmap(fh.fileno(), file_size, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
                    window = view[offset : offset + size]
                    try:
                        self.version, self.metadata, raw, self.data_start = _parse_header(
                            self.path, window, size
                        )
                    finally:
                        window.release()
        except OSError as exc:
            raise InputFileError(self.path, f"cannot read: {exc.strerror}") from None
        self.size = size
        self.alignment: int = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        arch = self.metadata.get("general.architecture")
        self.architecture: str | None = arch if isinstance(arch, str) else None
        self._infos = self._build_infos(raw)
        self._by_source = {info.source_name: info for info in self._infos.values()}
        self._open_data()

    def _build_infos(self, raw: list[_RawTensor]) -> dict[str, GGUFTensorInfo]:
        path, arch = self.path, self.architecture or ""
        # The map is built for the blocks this file names: a lying block_count cannot blow it up.
        n_blocks = 0
        for t in raw:
            if (m := _BLK.match(t.name)) is not None:
                if int(m.group(1)) >= _MAX_BLOCKS:
                    raise FormatError(
                        path,
                        f"tensor {_show(t.name)}: block {m.group(1)} is implausible "
                        f"(at most {_MAX_BLOCKS} blocks are supported)",
                    )
                n_blocks = max(n_blocks, int(m.group(1)) + 1)
        table = _name_table(arch, n_blocks) if arch else {}
        permuted = arch in ROPE_PERMUTED_ARCHS
        checked = [_check_tensor(path, t, self.data_start, self.size, self.alignment) for t in raw]
        infos: list[GGUFTensorInfo] = []
        taken = {t.name for t in raw}
        used: set[str] = set()
        for t, (qtype, begin, nbytes) in zip(raw, checked, strict=True):
            kind, hf_name, candidates = _map_name(table, t.name)
            if hf_name is None or hf_name in used or (hf_name in taken and hf_name != t.name):
                hf_name = t.name
            used.add(hf_name)
            rope_heads = 0
            if permuted and kind in _ROPE_TENSORS:
                rope_heads = self._rope_heads(t, _ROPE_TENSORS[kind])
            info = GGUFTensorInfo(
                t.name, hf_name, candidates, qtype.name, t.ne, begin, nbytes, rope_heads
            )
            if is_fused_experts(t.name, t.ne):  # one 2-D tensor per expert (weightmark.moe)
                parts = split_fused_experts(info, arch)
                parts = [p if p.name not in used and p.name not in taken
                         else replace(p, name=p.source_name) for p in parts]
                used.update(p.name for p in parts)
                infos.extend(parts)
                continue
            infos.append(info)
        _check_overlaps(path, infos)
        return {info.name: info for info in infos}

    def _rope_heads(self, t: _RawTensor, which: str) -> int:
        arch = self.architecture
        match = _BLK.match(t.name)
        block = int(match.group(1)) if match else None
        heads = _positive_int(self.path, self.metadata, f"{arch}.attention.head_count", block)
        if heads is None:
            raise FormatError(
                self.path,
                f"{arch}.attention.head_count is missing; it is needed to undo the rope "
                f"permutation of tensor {_show(t.name)}",
            )
        if which == "head_count_kv":
            kv = _positive_int(self.path, self.metadata, f"{arch}.attention.head_count_kv", block)
            heads = kv if kv is not None else heads
        rows = t.ne[-1]  # canonical axis 0: out_features, or the length of a bias
        if rows % (2 * heads):
            raise FormatError(
                self.path,
                f"tensor {_show(t.name)}: {rows} rows cannot be split into {heads} heads of row "
                "pairs to undo the rope permutation",
            )
        return heads

    def _open_data(self) -> None:
        """Map the file for tensor reads; offsets were validated against its size by the
        header parser, so views into the map cannot run past the end."""
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), self.offset - start + self.size, offset=start, access=mmap.ACCESS_READ)
        except ValueError:  # the map would run past the end of the file
            raise FormatError(self.path, "file changed size while being opened") from None
        except OSError as exc:
            raise InputFileError(self.path, f"cannot map: {exc}") from None
        self._map, self._map_start = mm, start
        self._data = np.frombuffer(mm, dtype=np.uint8, count=self.size, offset=self.offset - start)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from memory once read (views stay valid and re-fault from the
        file): a scan or a registration then holds one tensor's pages, not the whole file's."""
        info = self.info(name)
        if self._map is None or info.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = self.offset - self._map_start + info.begin
        page = mmap.PAGESIZE
        begin = first - first % page
        end = min(-(-(first + info.nbytes) // page) * page, len(self._map))
        try:
            self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)
        except (OSError, ValueError):
            pass  # advisory only

    # ---------------------------------------------------------------------- QuantizedModel

    def tensors(self) -> dict[str, TensorMeta]:
        return {
            name: TensorMeta(name, info.shape, info.ggml_type, info.source_name)
            for name, info in self._infos.items()
        }

    @property
    def name_candidates(self) -> dict[str, tuple[str, ...]]:
        """Canonical name -> every Hugging Face name the tensor could have (empty if unknown)."""
        return {name: info.candidates for name, info in self._infos.items()}

    def info(self, name: str) -> GGUFTensorInfo:
        """The tensor named `name` (canonical name, or its GGUF name)."""
        info = self._infos.get(name) or self._by_source.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return info

    def raw(self, name: str) -> np.ndarray:
        """Read-only, zero-copy view of a tensor's stored bytes (uint8, 1-D)."""
        info = self.info(name)
        if self._data is None:
            raise ValueError(f"{self.path}: file is closed")
        return np.asarray(self._data[info.begin : info.begin + info.nbytes])

    def load(self, name: str) -> np.ndarray:
        """Canonical float32 values: dequantized, reshaped to [out, in...], rope rows restored."""
        info = self.info(name)
        raw = self.raw(name)
        cols = info.ne[0]
        rows = info.numel // cols
        if info.ggml_type in BLOCK_LAYOUTS:
            values = dequantize(info.ggml_type, raw, rows, cols)
        elif info.ggml_type == "F64":
            values = raw.view("<f8").astype(np.float32)
        elif info.ggml_type in ("I8", "I16", "I32", "I64"):
            itemsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[info.ggml_type]][1]
            values = raw.view(f"<i{itemsize}").astype(np.float32)
        else:
            values = self._fallback(info, raw, rows)
        values = values.reshape(info.shape)
        if info.rope_heads:
            values = rope_unpermute(values, info.rope_heads)
        return np.ascontiguousarray(values, dtype=np.float32)

    def extract_into(
        self,
        name: str,
        reference: np.ndarray | None,
        reference_kind: int,
        row_scale: np.ndarray,
        seed: int,
        num: np.ndarray,
        den: np.ndarray,
    ) -> bool:
        """Add a 2-D carrier's extraction sums straight from its blocks (or its F32/F16/BF16
        values as stored), as `extract` on `load` would, with no float32 copy of the tensor;
        False when its type has no kernel here."""
        from weightmark.kernels import BF16, F16, FLOAT, extract
        from weightmark.kernels.fused import FUSED_GGML, extract_ggml

        info = self.info(name)
        dense = {"F32": ("<f4", FLOAT), "F16": ("<u2", F16), "BF16": ("<u2", BF16)}.get(info.ggml_type)
        if (info.ggml_type not in FUSED_GGML and dense is None) or len(info.ne) != 2:
            return False
        cols, rows = info.ne
        row_map = None
        if info.rope_heads:
            row_map = rope_unpermute(np.arange(rows, dtype=np.int64)[:, None], info.rope_heads)[:, 0].copy()
        if dense is not None:  # the stored values, decoded exactly by the kernel
            values = self.raw(name).view(dense[0]).reshape(rows, cols)
            if row_map is not None:
                values = np.take(values, row_map, axis=0)
            extract(values, dense[1], reference, reference_kind, row_scale, seed, num, den)
            return True
        extract_ggml(info.ggml_type, self.raw(name), rows, cols, row_map, reference, reference_kind, row_scale,
                     seed, num, den)  # fmt: skip
        return True

    def _fallback(self, info: GGUFTensorInfo, raw: np.ndarray, rows: int) -> np.ndarray:
        """Types without a kernel here (IQ1_*, IQ2_*, IQ3_*, TQ*, MXFP4, ...): gguf's numpy code."""
        qtype = gguf.GGMLQuantizationType[info.ggml_type]
        try:
            values = gguf.quants.dequantize(raw.reshape(rows, -1), qtype)
        except NotImplementedError:
            raise InputFileError(
                self.path,
                f"tensor {_show(info.source_name)}: ggml type {info.ggml_type} cannot be "
                "dequantized",
            ) from None
        return np.asarray(values, dtype=np.float32)

    def close(self) -> None:
        # The mapping goes away with the last view of it (arrays handed out keep it alive).
        self._data = None
        self._map = None

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFModel({str(self.path)!r}, {self.architecture!r}, {len(self._infos)} tensors)"


# ------------------------------------------------------------------------------------ writer


def _full_key(arch: str, key: str) -> str:
    if key.startswith((f"{arch}.", "general.", "tokenizer.", "split.", "adapter.")):
        return key
    return f"{arch}.{key}"


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, GGUFValue):  # already typed (copied from another GGUF file)
        writer.add_key_value(key, value.value, value.type, value.sub_type)
        return
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if 0 <= value < 2**32:
            writer.add_uint32(key, value)
        elif 0 <= value < 2**64:
            writer.add_uint64(key, value)
        else:
            writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, Sequence):
        writer.add_array(key, list(value))
    else:
        raise ValueError(f"metadata {key!r}: cannot store a {type(value).__name__}")


def _layer_count(names: Iterable[str]) -> int:
    found = [int(m.group(1)) for n in names if (m := re.search(r"\.(\d+)\.", n))]
    return max(found) + 1 if found else 0


def gguf_names(arch: str, hf_names: Sequence[str]) -> dict[str, str]:
    """The GGUF name write_gguf gives each Hugging Face name it can map (unmapped ones left out)."""
    arch_enum = _ARCHES.get(arch)
    if arch_enum is None:
        raise ValueError(f"unknown architecture {arch!r} (not in gguf.MODEL_ARCH_NAMES)")
    tmap = gguf.get_tensor_name_map(arch_enum, _layer_count(hf_names))
    found = {hf: tmap.get_type_and_name(hf, try_suffixes=(".weight", ".bias")) for hf in hf_names}
    return {hf: name for hf, hit in found.items() if hit is not None for _, name in (hit,)}


def _storage_type(qtype: str, array: np.ndarray) -> str:
    """llama.cpp's choice: 1-D tensors stay F32; rows that are not whole blocks fall back to F16."""
    if array.ndim < 2:
        return "F32"
    if qtype in ("F32", "F16", "BF16"):
        return qtype
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    return qtype if array.shape[-1] % block == 0 else "F16"


Encoder = Callable[[str, np.ndarray], tuple[str, np.ndarray]]


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by its shape until its turn to be written comes: `load()` then gives its
    values (float32 or convertible), so a writer holds one tensor at a time."""

    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)


TensorSource = np.ndarray | LazyTensor


def _materialise(source: TensorSource) -> np.ndarray:
    values = source.load() if isinstance(source, LazyTensor) else source
    return np.ascontiguousarray(values, dtype=np.float32)


_NUMPY_GGML = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
               np.dtype(np.int8): "I8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32",
               np.dtype(np.int64): "I64"}  # fmt: skip


def _tensor_info_bytes(name: str, shape: Sequence[int], type_id: int, offset: int) -> bytes:
    """One tensor info as GGUF stores it: name, dimension count, dimensions fastest first, type,
    offset of the data relative to the data section."""
    raw = name.encode("utf-8")
    return b"".join((_U64.pack(len(raw)), raw, _U32.pack(len(shape)),
                     *(_U64.pack(int(d)) for d in reversed(shape)), _U32.pack(type_id), _U64.pack(offset)))


class _Writer(gguf.GGUFWriter):
    """gguf's writer, packing a typed metadata array of strings or numbers in one go: item by
    item, a donor's vocabulary (~10^5 strings and as many token types) took ~0.1 s of every
    GGUF copy. The bytes are those of GGUFWriter._pack_val; anything else goes to it."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        simple = self._simple_value_packing.get(sub_type) if sub_type is not None else None
        if (vtype != gguf.GGUFValueType.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE
                or not isinstance(val, Sequence) or not val or sub_type == gguf.GGUFValueType.BOOL
                or (sub_type != gguf.GGUFValueType.STRING and simple is None)):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        parts = [_U32.pack(vtype)] if add_vtype else []
        parts += [_U32.pack(sub_type), _U64.pack(len(val))]
        if simple is not None:
            parts.append(struct.pack(f"<{len(val)}{simple}", *val))
        else:
            for item in val:
                encoded = item.encode("utf-8") if isinstance(item, str) else item
                parts += [_U64.pack(len(encoded)), encoded]
        return b"".join(parts)


def _pad(n: int, alignment: int) -> int:
    return (alignment - n % alignment) % alignment


def write_gguf(
    path: str | os.PathLike[str],
    arch: str,
    tensors: Sequence[tuple[str, TensorSource]],
    qtype: str,
    metadata: dict[str, Any] | None = None,
    *,
    encode: Encoder | None = None,
    drop_unmapped: bool = False,
) -> list[str]:
    """Write Hugging Face-named float32 tensors as a GGUF file the way llama.cpp's converter does.

    q/k rows get the rope permutation for ROPE_PERMUTED_ARCHS, names are mapped HF -> GGUF,
    2-D tensors are stored as `qtype` (one of WRITABLE_TYPES; rows that are not whole blocks as
    F16) and 1-D ones as F32. `metadata` keys without an architecture or "general." prefix get
    "<arch>." prepended; block_count, embedding_length, feed_forward_length, vocab_size and
    head_count_kv are derived from the tensors' shapes when absent. head_count is required when
    q/k must be permuted.

    `encode(hf_name, canonical float32)` replaces the default quantizer: it returns the stored
    type and the data in CANONICAL row order (uint8 [rows, bytes per row] for block types);
    rows are permuted afterwards, which commutes with row-wise block quantization. With
    `drop_unmapped`, tensors llama.cpp has no name for (e.g. BERT's pooler) are left out, as its
    converter does. Returns the Hugging Face names that were written.

    Streaming: a tensor may be a LazyTensor, loaded only when its turn comes, and only one
    tensor (its float32 values and their encoding) is in memory at a time. The header and the
    tensor infos are written first with placeholder types and offsets (both fixed-width), the
    data follows tensor by tensor with its alignment padding, and the infos are then rewritten
    in place, as llama.cpp's quantizer does. The file is written under a temporary name beside
    `path`, synced and renamed: a crash never leaves a partial file under `path`. The bytes are
    those gguf.GGUFWriter gives when handed every tensor at once.
    """
    arch_enum = _ARCHES.get(arch)
    if arch_enum is None:
        raise ValueError(f"unknown architecture {arch!r} (not in gguf.MODEL_ARCH_NAMES)")
    if qtype not in WRITABLE_TYPES:
        raise ValueError(f"cannot write {qtype!r}; write_gguf writes {', '.join(WRITABLE_TYPES)}")
    meta = {_full_key(arch, k): v for k, v in (metadata or {}).items()}
    names = [name for name, _ in tensors]
    blocks = meta.setdefault(f"{arch}.block_count", _layer_count(names))
    tmap = gguf.get_tensor_name_map(arch_enum, int(blocks))
    mapped: list[tuple[str, str, gguf.MODEL_TENSOR, TensorSource]] = []  # gguf name, HF name, kind, values
    for hf_name, source in tensors:
        found = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None and drop_unmapped:
            continue
        if found is None:
            raise ValueError(f"{hf_name!r} has no GGUF name for architecture {arch!r}")
        kind, gguf_name = found
        mapped.append((gguf_name, hf_name, kind, source))
    shapes = {(kind, name.endswith(".weight")): tuple(source.shape) for name, _, kind, source in mapped}
    embed = shapes.get((gguf.MODEL_TENSOR.TOKEN_EMBD, True))
    if embed is not None and len(embed) == 2:
        meta.setdefault(f"{arch}.vocab_size", embed[0])
        meta.setdefault(f"{arch}.embedding_length", embed[1])
    gate = shapes.get((gguf.MODEL_TENSOR.FFN_GATE, True))
    if gate is not None and len(gate) == 2:
        meta.setdefault(f"{arch}.feed_forward_length", gate[0])
    q = shapes.get((gguf.MODEL_TENSOR.ATTN_Q, True))
    k = shapes.get((gguf.MODEL_TENSOR.ATTN_K, True))
    n_head = meta.get(f"{arch}.attention.head_count")
    if q is not None and k is not None and _is_int(n_head) and q[0] % n_head == 0:
        head_dim = q[0] // n_head
        if k[0] % head_dim == 0:
            meta.setdefault(f"{arch}.attention.head_count_kv", k[0] // head_dim)
    heads_of: list[int | None] = []
    for gguf_name, _, kind, _ in mapped:
        heads = None
        if arch in ROPE_PERMUTED_ARCHS and kind in _ROPE_TENSORS:
            key = f"{arch}.attention.{_ROPE_TENSORS[kind]}"
            heads = meta.get(key, meta.get(f"{arch}.attention.head_count"))
            if not _is_int(heads):
                raise ValueError(f"{gguf_name}: metadata {key} is needed to permute its rows")
        heads_of.append(heads)
    if qtype not in ("F32", "F16", "BF16"):
        meta.setdefault("general.quantization_version", gguf.GGML_QUANT_VERSION)
    file_type = "ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}"
    meta.setdefault("general.file_type", int(gguf.LlamaFileType[file_type]))

    final = Path(path)
    temp = final.parent / f".{final.name}.tmp-{os.urandom(6).hex()}"
    # gguf's writer lays out the header, the key/values and (placeholder) tensor infos.
    writer = _Writer(temp, arch)
    try:
        for gguf_name, _, _, source in mapped:
            writer.add_tensor_info(gguf_name, tuple(source.shape), np.dtype(np.float32), 0,
                                   raw_dtype=gguf.GGMLQuantizationType.F32)
        for key, value in meta.items():
            if key != "general.architecture":
                _add_value(writer, key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        assert writer.fout is not None
        fh = writer.fout[0]
        infos_at = fh.tell()
        writer.write_ti_data_to_file()
        infos_end = fh.tell()
        alignment = writer.data_alignment
        fh.write(bytes(_pad(infos_end, alignment)))
        data_start = fh.tell()
        infos: list[bytes] = []
        for (gguf_name, hf_name, _, source), heads in zip(mapped, heads_of, strict=True):
            array = _materialise(source)
            if encode is None:
                if heads is not None:
                    array = rope_permute(array, heads)
                stored = _storage_type(qtype, array)
                data = gguf.quants.quantize(array, gguf.GGMLQuantizationType[stored])
            else:
                stored, data = encode(hf_name, array)
                if heads is not None:
                    data = rope_permute(data.reshape(data.shape[0], -1), heads)
            if data.dtype == np.uint8:
                ggml = gguf.GGMLQuantizationType[stored]
                data = data.reshape(array.shape[:-1] + (-1,)) if array.ndim > 1 else data.reshape(-1)
                shape = gguf.quants.quant_shape_from_byte_shape(data.shape, ggml)
            elif data.dtype in _NUMPY_GGML:
                ggml = gguf.GGMLQuantizationType[_NUMPY_GGML[data.dtype]]
                shape = data.shape
            else:
                raise ValueError(f"{gguf_name}: cannot store {data.dtype} data")
            if len(shape) != len(source.shape):
                raise ValueError(f"{gguf_name}: encoded as {len(shape)}-D data, not {len(source.shape)}-D")
            offset = fh.tell() - data_start
            infos.append(_tensor_info_bytes(gguf_name, shape, int(ggml), offset))
            fh.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            fh.write(bytes(_pad(data.nbytes, alignment)))
            if data.nbytes >= _WRITEBACK_BYTES:  # to disk while the next tensor is encoded
                fh.flush()
                start_writeback(fh.fileno(), data_start + offset, data.nbytes)
            del array, data
        block = b"".join(infos)
        if len(block) != infos_end - infos_at:  # cannot happen: names and ranks are unchanged
            raise ValueError(f"{final}: tensor infos changed size ({len(block)} != {infos_end - infos_at})")
        fh.seek(infos_at)
        fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
        writer.close()
        os.replace(temp, final)
    except BaseException:
        writer.close()
        remove_path(temp)
        raise
    fsync_dir(final.parent)
    return [hf_name for _, hf_name, _, _ in mapped]
