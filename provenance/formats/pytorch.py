"""PyTorch checkpoints (torch.save zip archives) read without torch and without running anything.

A torch.save file (PyTorch >= 1.6) is a zip archive: `PREFIX/data.pkl` pickles the object
(for a state dict: an OrderedDict of tensors), each tensor's storage is a stored member
`PREFIX/data/KEY`, and the pickle refers to storages through persistent ids
`('storage', torch.FloatStorage, KEY, 'cpu', NUMEL)`.

The pickle is read by a restricted unpickler: a pre-pass over its opcodes (nothing executed)
refuses any opcode or global outside a short allow-list, and the unpickler's `find_class`
hands out only our own harmless stand-ins for the torch functions a state dict needs
(`_rebuild_tensor_v2` and friends build a `TensorRef`, storage classes and dtype objects are
plain descriptions). Nothing from the file is ever imported or called. Tensor bytes are then
read lazily, one tensor at a time, from the member, after checking offset, shape and strides
against the storage and the storage against the member.

Also read: sharded Hugging Face folders (`pytorch_model.bin.index.json` with
`pytorch_model-0000N-of-0000M.bin`), a folder holding one checkpoint, and Meta's
`consolidated.00.pth` (llama names mapped to Hugging Face names, q/k rows brought from Meta's
interleaved rope order to Hugging Face's with the head counts of `params.json`). Refused with
a message: the legacy pre-1.6 format, bare pickles, TorchScript archives, model-parallel
Meta shards (`consolidated.01.pth` ...).
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
import pickletools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..canonical import to_float32
from ..errors import FormatError, InputFileError
from . import looks_like_safetensors, register_sniffer
from ._zip import Member, read_member, stored_members, zip_names
from .base import TensorMeta
from .safetensors import DTYPES

__all__ = ["PyTorchModel", "TensorRef", "open_pytorch", "read_state_dict"]

INDEX = "pytorch_model.bin.index.json"
PICKLE_LIMIT = 256 << 20  # data.pkl of a state dict is KBs to a few MB
INDEX_LIMIT = 64 << 20
_MAX_NDIM = 64

# torch's legacy storage classes (as `torch.XStorage` globals in the pickle) -> our dtype name
STORAGE_DTYPES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
# torch dtype objects (`torch.float32` ... globals, given to _rebuild_tensor_v3) -> dtype name
TORCH_DTYPES = {
    "float64": "F64",
    "double": "F64",
    "float32": "F32",
    "float": "F32",
    "float16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "long": "I64",
    "int32": "I32",
    "int": "I32",
    "int16": "I16",
    "short": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}
# how each dtype's elements are read from the storage bytes (little-endian): safetensors' table,
# with torch's bool read as bytes (checked 0/1 values are never needed: bools are no carriers)
NUMPY_DTYPES = {**DTYPES, "BOOL": np.dtype("u1")}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# Opcodes a torch.save state dict uses (protocol 2, plus the framing and memo opcodes of
# newer protocols and the plain-container opcodes a training checkpoint's extras need).
# Deliberately absent: INST, OBJ, NEWOBJ, NEWOBJ_EX (build arbitrary classes), EXT1/2/4
# (extension registry), PERSID (text persistent ids), NEXT_BUFFER / READONLY_BUFFER /
# BYTEARRAY8 (out-of-band buffers).
ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1",
    "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE",
    "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "LIST", "APPEND",
    "APPENDS", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET",
})  # fmt: skip

# The legacy (pre-1.6) torch.save format opens with this number pickled as a long.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


# --------------------------------------------------------------------------------------------
# What the restricted unpickler builds instead of torch objects


# These are NamedTuples on purpose: they have no __dict__ and no __setstate__, so a pickle's
# BUILD opcode cannot change one after it was checked (BUILD on them fails).


class StorageRef(NamedTuple):
    """A storage named by the pickle: the archive member's key, element dtype and length."""

    key: str
    dtype: str
    numel: int


class TensorRef(NamedTuple):
    """A tensor as the pickle describes it: a strided view of a storage (nothing read yet)."""

    storage: StorageRef
    dtype: str
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements


class _StorageType(NamedTuple):
    name: str
    dtype: str | None  # None for UntypedStorage: bytes


class _DType(NamedTuple):
    dtype: str


class _Refused(Exception):
    """Raised inside the unpickler; becomes a FormatError naming the file."""


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > _MAX_NDIM:
        raise _Refused(f"tensor {what} {_short(value)} is not a tuple of at most {_MAX_NDIM} integers")
    if not all(type(v) is int for v in value):
        raise _Refused(f"tensor {what} {_short(value)} holds non-integers")
    return value


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise _Refused(f"tensor storage is a {type(storage).__name__}, not a storage of the archive")
    if type(offset) is not int or offset < 0:
        raise _Refused(f"tensor storage offset {_short(offset)} is not a non-negative integer")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise _Refused(f"tensor size {list(shape)} and stride {list(strides)} differ in length")
    if any(n < 0 for n in shape) or any(s < 0 for s in strides):
        raise _Refused(f"tensor size {list(shape)} / stride {list(strides)} has negative entries")
    dtype = dtype or storage.dtype
    numel = storage.numel
    if dtype != storage.dtype:  # an untyped (byte) storage viewed as `dtype`
        numel, rest = divmod(storage.numel, NUMPY_DTYPES[dtype].itemsize)
        if rest:
            raise _Refused(f"storage {storage.key!r} of {storage.numel} bytes is no whole number of {dtype}")
    if math.prod(shape) > 0:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= numel:
            raise _Refused(
                f"tensor of size {list(shape)}, stride {list(strides)} at offset {offset} reaches "
                f"element {last} of storage {storage.key!r}, which holds {numel}"
            )
    return TensorRef(storage, dtype, offset, shape, strides)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
    backward_hooks: Any = None, metadata: Any = None,
) -> TensorRef:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
    dtype: Any, metadata: Any = None,
) -> TensorRef:
    if not isinstance(dtype, _DType):
        raise _Refused(f"tensor dtype {_short(dtype)} is not a torch dtype")
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise _Refused(f"parameter data is a {type(data).__name__}, not a tensor")
    return data


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None),
        ("torch", "UntypedStorage"): _StorageType("UntypedStorage", None),
    }
    for name, dtype in STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    for name, dtype in TORCH_DTYPES.items():
        allowed[("torch", name)] = _DType(dtype)
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_global(module: str, name: str) -> _Refused:
    return _Refused(f"pickle global {_short(module, 100)[1:-1]}.{_short(name, 100)[1:-1]} is not allowed "
                    "(only tensors and plain containers are read)")


def check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes without executing any; refuse the first one outside the
    allow-list and every GLOBAL naming something outside it (STACK_GLOBAL operands are only
    known when unpickling: `find_class` checks those)."""
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name not in ALLOWED_OPCODES:
                raise _Refused(f"pickle opcode {op.name} is not allowed (only tensors and plain containers are read)")
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if (module, name) not in ALLOWED_GLOBALS:
                    raise _refuse_global(module, name)
    except _Refused:
        raise
    except Exception as exc:  # genops raises ValueError and friends on malformed input
        raise _Refused(f"data.pkl is not a valid pickle ({type(exc).__name__}: {_short(str(exc))})") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only tensors (as TensorRef) and plain containers; everything else is refused."""

    def __init__(self, data: bytes, storage_for: Callable[[str, str | None, int], StorageRef]) -> None:
        super().__init__(io.BytesIO(data))
        self._storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _refuse_global(str(module), str(name)) from None

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"persistent id {_short(pid)} is not a ('storage', type, key, location, numel) tuple")
        _tag, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise _Refused(f"persistent id names storage type {_short(kind)}, not a torch storage class")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Refused(f"persistent id {_short(pid)} has a bad key or length")
        return self._storage_for(key, kind.dtype, numel)


# --------------------------------------------------------------------------------------------
# One torch.save archive


class TorchArchive:
    """A torch.save zip archive: its tensors (TensorRef by name) and their storage members."""

    def __init__(self, path: Path) -> None:
        self.path = path
        names = zip_names(path) or []
        pickles = [name for name in names if name == "data.pkl" or name.endswith("/data.pkl")]
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            raise FormatError(path, "is a TorchScript archive (torch.jit.save), not a torch.save "
                                    "checkpoint; its weights are not read")
        if not pickles:
            raise FormatError(path, "is a zip archive without data.pkl: not a torch.save checkpoint")
        if len(pickles) > 1:
            raise FormatError(path, f"holds {len(pickles)} data.pkl members ({', '.join(pickles[:3])})")
        self.prefix = prefix = pickles[0][: -len("data.pkl")]
        # only the members read must be stored (TorchScript-like extras may be compressed)
        members = stored_members(path, lambda name: name.startswith(prefix) and (
            name[len(prefix):] in ("data.pkl", "byteorder") or name[len(prefix):].startswith("data/")))
        order = members.get(self.prefix + "byteorder")
        if order is not None and read_member(path, order, 16).strip() != b"little":
            raise FormatError(path, "stores big-endian tensors (byteorder member); only little-endian is read")
        self._members = members
        self._storages: dict[str, StorageRef] = {}
        self._map: np.memmap | None = None  # mapped on the first read; views never outlive read()
        data = read_member(path, members[pickles[0]], PICKLE_LIMIT)
        try:
            check_opcodes(data)
            obj = _RestrictedUnpickler(data, self._storage).load()
        except _Refused as exc:
            raise FormatError(path, str(exc)) from None
        except FormatError:
            raise
        except RecursionError:
            raise FormatError(path, "data.pkl nests containers too deeply") from None
        except Exception as exc:  # malformed pickles raise many types; none of them is ours
            raise FormatError(path, f"data.pkl cannot be read ({type(exc).__name__}: {_short(str(exc))})") from None
        self.tensors = _state_dict(path, obj)

    def _storage(self, key: str, dtype: str | None, numel: int) -> StorageRef:
        member = self._members.get(f"{self.prefix}data/{key}")
        if member is None:
            raise _Refused(f"storage {key!r} has no member {self.prefix}data/{key}")
        nbytes = numel if dtype is None else numel * NUMPY_DTYPES[dtype].itemsize
        if nbytes > member.size:
            raise _Refused(f"storage {key!r} of {numel} {dtype or 'bytes'} needs {nbytes} bytes but "
                           f"member {member.name} holds {member.size}")
        ref = StorageRef(key, dtype or "U8", numel)
        known = self._storages.setdefault(key, ref)
        if known != ref:
            raise _Refused(f"storage {key!r} is described twice, differently")
        return ref

    def close(self) -> None:
        self._map = None  # the np.memmap owns the mapping: it goes with the last view of it

    def member(self, ref: TensorRef) -> Member:
        return self._members[f"{self.prefix}data/{ref.storage.key}"]

    def read(self, name: str, ref: TensorRef) -> np.ndarray:
        """The tensor's elements in its own dtype (C-contiguous copy), read from the member."""
        dtype = NUMPY_DTYPES[ref.dtype]
        if ref.offset < 0 or any(n < 0 for n in ref.shape) or any(st < 0 for st in ref.stride):
            raise FormatError(self.path, f"tensor {name!r}: negative offset, size or stride")  # guard
        count = math.prod(ref.shape)
        if count == 0:
            return np.zeros(ref.shape, dtype)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
        span = last - ref.offset + 1
        member = self.member(ref)
        start = member.offset + ref.offset * dtype.itemsize
        if (last + 1) * dtype.itemsize > member.size:  # checked when unpickled; kept as a guard
            raise FormatError(self.path, f"tensor {name!r} runs past its storage member {member.name}")
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as exc:
                raise InputFileError(self.path, f"cannot map: {exc}") from None
        if start + span * dtype.itemsize > self._map.shape[0]:
            raise FormatError(self.path, f"tensor {name!r}: member {member.name} is truncated")
        flat = self._map[start : start + span * dtype.itemsize].view(dtype)
        strides = tuple(s * dtype.itemsize for s in ref.stride)
        view = np.lib.stride_tricks.as_strided(flat, shape=ref.shape, strides=strides, writeable=False)
        return np.array(view, order="C", copy=True)


def _state_dict(path: Path, obj: Any) -> dict[str, TensorRef]:
    """The tensors of the unpickled object: a state dict, or the state dict inside a training
    checkpoint's dict (`state_dict`, `model`, `module` ...); nested dicts give dotted names."""
    if not isinstance(obj, dict):
        raise FormatError(path, f"holds a {type(obj).__name__}, not a state dict of tensors")
    out: dict[str, TensorRef] = {}
    direct = {k: v for k, v in obj.items() if isinstance(v, TensorRef)}
    if direct:
        nested = obj
    else:
        wrappers = [v for k, v in obj.items()
                    if k in ("state_dict", "model", "module", "model_state_dict", "weights")
                    and isinstance(v, dict)]
        nested = wrappers[0] if len(wrappers) == 1 else obj

    def walk(prefix: str, value: Any, depth: int) -> None:
        if isinstance(value, TensorRef):
            out[prefix] = value
        elif isinstance(value, dict) and depth < 8:
            for key, item in value.items():
                if isinstance(key, str):
                    walk(f"{prefix}.{key}" if prefix else key, item, depth + 1)

    walk("", nested, 0)
    if not out:
        raise FormatError(path, "holds no tensors")
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one torch.save file as a numpy array in its stored dtype (bf16/f16 as
    uint16 bit patterns): for tests and tools, not for large models."""
    archive = TorchArchive(Path(path))
    return {name: archive.read(name, ref) for name, ref in archive.tensors.items()}


# --------------------------------------------------------------------------------------------
# Meta's consolidated.NN.pth names -> Hugging Face llama names

_META_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_META_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_META_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")


def meta_to_hf(name: str) -> str | None:
    """The Hugging Face llama name of a Meta checkpoint tensor, or None if it has none."""
    if name in _META_TOP:
        return _META_TOP[name]
    match = _META_RE.fullmatch(name)
    if match and match.group(2) in _META_LAYER:
        return f"model.layers.{match.group(1)}.{_META_LAYER[match.group(2)]}.{match.group(3)}"
    return None


def _is_meta(names: set[str]) -> bool:
    return "tok_embeddings.weight" in names or any(n.startswith("layers.0.attention.wq") for n in names)


def _meta_heads(path: Path) -> tuple[int, int] | None:
    """(n_heads, n_kv_heads) from params.json beside a Meta checkpoint, or None."""
    params = path.parent / "params.json"
    if not params.is_file():
        return None
    try:
        raw = json.loads(params.read_bytes()[:INDEX_LIMIT])
    except (OSError, ValueError) as exc:
        raise FormatError(params, f"is not readable JSON ({exc})") from None
    heads = raw.get("n_heads") if isinstance(raw, dict) else None
    kv = raw.get("n_kv_heads", heads) if isinstance(raw, dict) else None
    if type(heads) is not int or type(kv) is not int or heads <= 0 or kv <= 0:
        raise FormatError(params, "n_heads / n_kv_heads must be positive integers")
    return heads, kv


# --------------------------------------------------------------------------------------------
# The suspect reader


@dataclass(frozen=True)
class _Entry:
    archive: TorchArchive
    ref: TensorRef
    source_name: str
    rope_heads: int  # > 0: Meta q/k rows, brought to Hugging Face order on load


class PyTorchModel:
    """One or more torch.save archives seen through the suspect reader protocol (float32)."""

    format = "pytorch"

    def __init__(self, path: Path, files: list[Path], meta_heads: tuple[int, int] | None = None) -> None:
        self.path = path
        self._entries: dict[str, _Entry] = {}
        self._metas: dict[str, TensorMeta] = {}
        for file in files:
            archive = TorchArchive(file)
            meta_names = _is_meta(set(archive.tensors))
            heads = _meta_heads(file) if meta_names and meta_heads is None else meta_heads
            for source, ref in archive.tensors.items():
                if ref.dtype not in FLOAT_DTYPES:
                    continue  # integer buffers (position ids, step counters) are no weights
                name, rope = source, 0
                if meta_names:
                    self.format = "pytorch-meta"
                    hf = meta_to_hf(source)
                    if hf is not None:
                        name = hf
                    if heads is not None and source.endswith(("attention.wq.weight", "attention.wk.weight")):
                        rope = heads[0] if ".wq." in source else heads[1]
                    elif source.endswith(("attention.wq.weight", "attention.wk.weight")):
                        name = source  # q/k rows stay in Meta's order without params.json
                if name in self._entries:
                    raise FormatError(file, f"tensor {name!r} appears twice (also in {self._entries[name].archive.path.name})")
                self._entries[name] = _Entry(archive, ref, source, rope)
                self._metas[name] = TensorMeta(name, ref.shape, ref.dtype, source)

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def load(self, name: str) -> np.ndarray:
        try:
            entry = self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        raw = entry.archive.read(entry.source_name, entry.ref)
        if entry.ref.dtype in ("F8_E4M3", "F8_E5M2"):
            from ._quantized import _FP8_TABLES

            values = np.take(_FP8_TABLES[entry.ref.dtype], raw)
        else:
            values = to_float32(entry.ref.dtype, raw)
        out = np.ascontiguousarray(values, dtype=np.float32)
        if entry.rope_heads:
            from .gguf import rope_unpermute

            try:
                out = np.ascontiguousarray(rope_unpermute(out, entry.rope_heads))
            except (ValueError, InputFileError) as exc:
                raise FormatError(entry.archive.path, f"tensor {entry.source_name!r}: {exc}") from None
        return out

    def close(self) -> None:
        for entry in self._entries.values():
            entry.archive.close()
        self._entries.clear()

    def __enter__(self) -> PyTorchModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PyTorchModel({str(self.path)!r}, {len(self._metas)} tensors)"


# --------------------------------------------------------------------------------------------
# Recognising PyTorch files and folders

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _is_torch_zip(path: Path) -> bool:
    names = zip_names(path)
    return names is not None and any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)


def _refuse_pickle(path: Path) -> None:
    """Legacy torch.save files and bare pickles: say what they are and that they are not read."""
    if looks_like_safetensors(path):
        return  # an 8-byte length and a JSON header, whatever its first bytes
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        if head[2:4] == b"\x8a\x0a" and head[4:14] == _LEGACY_MAGIC:
            raise FormatError(path, "is a legacy (pre-1.6) torch.save pickle; weightmark reads only "
                                    "the zip format (re-save it with torch >= 1.6 in a sandbox)")
        raise FormatError(path, "is a bare pickle, not a torch.save zip archive; pickles outside "
                                "torch.save archives are not read")


def _sharded(folder: Path) -> list[Path]:
    index = folder / INDEX
    try:
        raw = index.read_bytes()
    except OSError as exc:
        raise FormatError(index, f"cannot read: {exc.strerror}") from None
    if len(raw) > INDEX_LIMIT:
        raise FormatError(index, f"is {len(raw)} bytes (limit {INDEX_LIMIT})")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(index, f"is not valid JSON ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(index, "has no weight_map object")
    files: list[Path] = []
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise FormatError(index, f"tensor {tensor!r} maps to {_short(shard)}, not a file name in the folder")
        file = folder / shard
        if file not in files:
            if not file.is_file():
                raise FormatError(index, f"names shard {shard!r}, which is missing")
            files.append(file)
    return files


def open_pytorch(path: str | Path) -> PyTorchModel | None:
    """A PyTorch checkpoint (file or folder) as a suspect reader; None if `path` holds none."""
    path = Path(path)
    if path.is_file():
        if _is_torch_zip(path):
            return PyTorchModel(path, [path])
        _refuse_pickle(path)
        return None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None  # safetensors take precedence in folders holding both
    if (path / INDEX).is_file():
        return PyTorchModel(path, _sharded(path))
    consolidated = sorted(p for p in path.glob("consolidated.*.pth") if p.is_file())
    if len(consolidated) > 1:
        raise FormatError(path, f"holds {len(consolidated)} model-parallel Meta shards "
                                "(consolidated.NN.pth); only single-file Meta checkpoints are read")
    files = consolidated or sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix in _TORCH_SUFFIXES and _is_torch_zip(p)
    )
    if not files:
        return None
    if len(files) > 1:
        raise FormatError(path, f"holds {len(files)} PyTorch checkpoints and no {INDEX}; scan one file")
    return PyTorchModel(path, files)


@register_sniffer("pytorch", 12)
def _sniff(path: Path) -> PyTorchModel | None:
    return open_pytorch(path)

