"""Read, validate and stream-write safetensors files and sharded safetensors checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import pathlib
import shutil
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from ..errors import FormatError, InputFileError
from ..fsutil import fsync_dir, sha256_file, staged_output, start_writeback

__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "HEADER_LIMIT",
    "WEIGHT_INDEX",
    "Checkpoint",
    "SafetensorsFile",
    "SafetensorsWriter",
    "TensorInfo",
    "load_file",
    "save_file",
    "write_like",
]

# safetensors dtype name -> numpy storage dtype. F16 and BF16 are kept as raw uint16 bit
# patterns (numpy has no bfloat16, and we never want an implicit float16 conversion).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<u2"),
    "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
HEADER_LIMIT = 100 * 1024 * 1024
WEIGHT_INDEX = "model.safetensors.index.json"

_METADATA_KEY = "__metadata__"
_MAX_NDIM = 64  # numpy's limit on array dimensions
_MAX_BYTES = 2**64  # no tensor that a file can hold is larger
_LEN = struct.Struct("<Q")
_PARALLEL_HASH_BYTES = 4 << 20  # tensors at least this large are hashed while being written

# numpy dtype -> safetensors name for save_file's dict form. uint16 is deliberately absent:
# it could mean U16, F16 bits or BF16 bits, so the caller must say which.
_INFER: dict[np.dtype, str] = {
    np.dtype("<f8"): "F64",
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64",
    np.dtype("<i4"): "I32",
    np.dtype("<i2"): "I16",
    np.dtype("i1"): "I8",
    np.dtype("<u8"): "U64",
    np.dtype("<u4"): "U32",
    np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}

# Files that hold model weights in some other format. A folder copy must never carry them
# along: they would hand the licensee an unmarked copy of the very weights we watermark.
_WEIGHT_SUFFIXES = frozenset(
    {
        ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".hdf5", ".msgpack", ".onnx",
        ".onnx_data", ".ot", ".gguf", ".ggml", ".pkl", ".pickle", ".pb", ".tflite", ".npz",
        ".npy", ".mlmodel", ".keras", ".joblib",
    }
)  # fmt: skip


def _show(value: Any, limit: int = 60) -> str:
    """A one-line, length-capped rendering of a value taken from an untrusted file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in its file: dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return 0 if 0 in self.shape else math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _parse_json(path: object, raw: bytes, what: str) -> Any:
    """Strict UTF-8 + JSON decode with duplicate-key detection; FormatError on any problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"{what} is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise FormatError(path, f"{what} has the key {_show(exc.key)} more than once") from None
    except json.JSONDecodeError as exc:
        raise FormatError(
            path, f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(path, f"{what} is not valid JSON ({_show(str(exc))})") from None


def _check_metadata(path: object, metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise FormatError(
            path, f"__metadata__ must be an object of strings, not {type(metadata).__name__}"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise FormatError(
                path,
                f"__metadata__ key {_show(key)} has a {type(value).__name__} value; "
                "only strings are allowed",
            )
    return dict(metadata)


def _needed_bytes(shape: list[int], itemsize: int) -> int:
    """numel * itemsize, but stops once past _MAX_BYTES so hostile shapes cannot stall us."""
    if 0 in shape:
        return 0
    needed = itemsize
    for dim in shape:
        needed *= dim
        if needed > _MAX_BYTES:
            break
    return needed


def _check_entry(path: object, name: str, entry: Any, data_start: int) -> TensorInfo:
    """Validate one tensor's header entry on its own (layout is checked afterwards)."""
    where = f"tensor {_show(name)}"
    if not isinstance(entry, dict):
        raise FormatError(path, f"{where}: entry must be an object, not {type(entry).__name__}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise FormatError(path, f"{where}: missing field {field!r}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str):
        raise FormatError(path, f"{where}: dtype must be a string, not {type(dtype).__name__}")
    if dtype not in DTYPES:
        raise FormatError(path, f"{where}: unknown dtype {_show(dtype)}")
    shape = entry["shape"]
    if not isinstance(shape, list):
        raise FormatError(path, f"{where}: shape must be a list, not {type(shape).__name__}")
    for dim in shape:
        if not _is_int(dim):
            raise FormatError(path, f"{where}: shape {_show(shape)} has a non-integer dimension")
        if dim < 0:
            raise FormatError(path, f"{where}: shape {_show(shape)} has a negative dimension")
    if len(shape) > _MAX_NDIM:
        raise FormatError(
            path, f"{where}: shape has {len(shape)} dimensions, more than the {_MAX_NDIM} allowed"
        )
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise FormatError(
            path, f"{where}: data_offsets must be a list of two integers, not {_show(offsets)}"
        )
    begin, end = offsets
    if begin < 0 or end < 0:
        raise FormatError(path, f"{where}: data_offsets {_show(offsets)} are negative")
    if begin > end:
        raise FormatError(path, f"{where}: data_offsets {_show(offsets)} end before they begin")
    needed = _needed_bytes(shape, DTYPES[dtype].itemsize)
    if end - begin != needed:
        needs = f"more than {_MAX_BYTES}" if needed > _MAX_BYTES else str(needed)
        raise FormatError(
            path,
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes "
            f"but shape {_show(shape)} of {dtype} needs {needs}",
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(path: object, infos: list[TensorInfo], data_start: int, data_len: int) -> None:
    """Offsets must tile the data region exactly: start at 0, no gap, no overlap, no tail."""
    cursor = 0
    previous: TensorInfo | None = None
    for info in infos:
        begin, end = info.begin - data_start, info.end - data_start
        if end > data_len:
            raise FormatError(
                path,
                f"tensor {_show(info.name)}: data_offsets [{begin}, {end}] run past the end of "
                f"the data region ({data_len} bytes); the file is truncated or the offsets lie",
            )
        if begin > cursor:
            if previous is None:
                after = "the start of the data region"
            else:
                after = f"tensor {_show(previous.name)}"
            raise FormatError(
                path,
                f"tensor {_show(info.name)}: gap of {begin - cursor} bytes between {after} "
                f"and data_offsets [{begin}, {end}]",
            )
        if begin < cursor:
            assert previous is not None
            raise FormatError(
                path,
                f"tensor {_show(info.name)}: data_offsets [{begin}, {end}] overlap tensor "
                f"{_show(previous.name)} which ends at {cursor}",
            )
        cursor = end
        previous = info
    if cursor != data_len:
        raise FormatError(
            path,
            f"data region length mismatch: tensors cover {cursor} bytes but the file holds "
            f"{data_len} bytes of data ({data_len - cursor} trailing bytes)",
        )


class SafetensorsFile:
    """Validated header + mmap of one .safetensors file. Context manager."""

    path: pathlib.Path
    tensors: dict[str, TensorInfo]
    header_order: list[str]
    metadata: dict[str, str] | None

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self._mm: mmap.mmap | None = None
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
                size = os.fstat(fh.fileno()).st_size
                self._parse_header(fh, size)
                if size:
                    self._mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise InputFileError(self.path, f"cannot read: {exc.strerror}") from None
        self._size = size

    def _parse_header(self, fh: BinaryIO, size: int) -> None:
        path = self.path
        if size < 8:
            raise FormatError(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (header_len,) = _LEN.unpack(_read_exact(fh, 8))
        if header_len > HEADER_LIMIT:
            raise FormatError(
                path, f"header length {header_len} exceeds the limit of {HEADER_LIMIT} bytes"
            )
        if 8 + header_len > size:
            raise FormatError(
                path, f"header length {header_len} runs past the end of the {size}-byte file"
            )
        raw = _read_exact(fh, header_len)
        if len(raw) != header_len:
            raise FormatError(path, "file shrank while its header was being read")
        header = _parse_json(path, raw, "header")
        if not isinstance(header, dict):
            raise FormatError(path, f"header must be a JSON object, not {type(header).__name__}")
        data_start = 8 + header_len
        data_len = size - data_start
        self.metadata = _check_metadata(path, header.get(_METADATA_KEY))
        self.header_order = [name for name in header if name != _METADATA_KEY]
        infos = [_check_entry(path, name, header[name], data_start) for name in self.header_order]
        # Stable sort: zero-byte tensors sharing an offset keep their header order.
        infos.sort(key=lambda info: (info.begin, info.end))
        _check_layout(path, infos, data_start, data_len)
        self.tensors = {info.name: info for info in infos}
        self.data_start = data_start

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        return self._mm

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """Read-only, zero-copy view of a tensor's bytes in its storage dtype and shape."""
        info = self.info(name)
        mm = self._map()
        dtype = DTYPES[info.dtype]
        if info.numel == 0:
            array = np.empty(info.shape, dtype=dtype)
            array.flags.writeable = False
            return array
        flat = np.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.begin)
        return flat.reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from memory; views stay valid and re-fault from the file."""
        self._advise(name, "MADV_DONTNEED")

    def prefetch(self, name: str) -> None:
        """Start reading the tensor's pages from disk in the background (the kernel's readahead),
        so they are in the page cache when the tensor is used. Maps nothing: RSS does not grow."""
        self._advise(name, "MADV_WILLNEED")

    def _advise(self, name: str, advice: str) -> None:
        info = self.info(name)
        if self._mm is None or info.nbytes == 0 or not hasattr(mmap, advice):
            return
        page = mmap.PAGESIZE
        start = info.begin - info.begin % page
        stop = min(-(-info.end // page) * page, self._size)
        try:
            self._mm.madvise(getattr(mmap, advice), start, stop - start)
        except (OSError, ValueError):
            pass  # advisory only

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views are still alive; the mapping goes away with the last of them

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    chunks = []
    remaining = n
    while remaining:
        chunk = fh.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _write_all(fileobj: BinaryIO, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = fileobj.write(view)
        if written is None or written >= view.nbytes:
            return
        view = view[written:]


class SafetensorsWriter:
    """Streams tensors into a new .safetensors file in a given order (header written first)."""

    def __init__(
        self,
        fileobj: BinaryIO,
        specs: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None,
        header_order: Sequence[str] | None = None,
    ) -> None:
        self._file = fileobj
        self._hash = hashlib.sha256()
        self._written = 0  # bytes of the file so far
        try:
            self._fd: int | None = fileobj.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            self._fd = None
        self._specs: list[tuple[str, str, tuple[int, ...], int]] = []
        entries: dict[str, dict[str, Any]] = {}
        offset = 0
        for name, dtype, shape in specs:
            if not isinstance(name, str) or name == _METADATA_KEY:
                raise ValueError(f"invalid tensor name {name!r}")
            if name in entries:
                raise ValueError(f"tensor {name!r} appears twice")
            if dtype not in DTYPES:
                raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
            shape = tuple(int(d) for d in shape)
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r}: negative dimension in shape {list(shape)}")
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            entries[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._specs.append((name, dtype, shape, nbytes))
            offset += nbytes
        order = list(entries) if header_order is None else list(header_order)
        if sorted(order) != sorted(entries) or len(set(order)) != len(order):
            raise ValueError("header_order must list exactly the tensors of specs")
        header: dict[str, Any] = {}
        if metadata is not None:
            for key, value in metadata.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise ValueError(f"metadata must map str to str; bad entry {key!r}")
            header[_METADATA_KEY] = dict(metadata)
        for name in order:
            header[name] = entries[name]
        blob = _encode_header(header)
        blob += b" " * (-(8 + len(blob)) % 8)
        self._emit(_LEN.pack(len(blob)))
        self._emit(blob)
        self._next = 0
        self._digest: str | None = None

    def _emit(self, data: memoryview | bytes) -> None:
        if len(data) < _PARALLEL_HASH_BYTES:
            self._hash.update(data)
            _write_all(self._file, data)
            self._written += len(data)
            return
        # Hash on a second thread while this one writes: both release the GIL.
        hasher = threading.Thread(target=self._hash.update, args=(data,))
        hasher.start()
        try:
            _write_all(self._file, data)
            if self._fd is not None:
                self._file.flush()
                start_writeback(self._fd, self._written, len(data))
            self._written += len(data)
        finally:
            hasher.join()

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor's bytes; tensors must come in spec (data) order."""
        if self._next >= len(self._specs):
            raise ValueError(f"tensor {name!r}: every tensor has already been written")
        expected, dtype, shape, nbytes = self._specs[self._next]
        if name != expected:
            raise ValueError(f"expected tensor {expected!r} next, got {name!r}")
        array = np.asarray(array)
        if array.dtype.itemsize != DTYPES[dtype].itemsize or array.nbytes != nbytes:
            raise ValueError(
                f"tensor {name!r}: got {array.nbytes} bytes of {array.dtype}, "
                f"need {nbytes} bytes for shape {list(shape)} of {dtype}"
            )
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._emit(memoryview(flat))
        self._next += 1

    def finish(self) -> None:
        """Check that every tensor was written and flush the file object."""
        if self._next != len(self._specs):
            missing = [spec[0] for spec in self._specs[self._next :]]
            raise ValueError(f"{len(missing)} tensors never written, first {missing[0]!r}")
        flush = getattr(self._file, "flush", None)
        if flush is not None:
            flush()
        self._digest = self._hash.hexdigest()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of every byte written; available after finish()."""
        if self._digest is None:
            raise RuntimeError("sha256 is available only after finish()")
        return self._digest


def _encode_header(header: dict[str, Any]) -> bytes:
    try:
        return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # Names with lone surrogates cannot be raw UTF-8; JSON \u escapes can carry them.
        return json.dumps(header, separators=(",", ":")).encode("ascii")


def _fsync(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _normalise(
    tensors: dict[str, np.ndarray] | Iterable[tuple[str, str, np.ndarray]],
) -> list[tuple[str, str, np.ndarray]]:
    if isinstance(tensors, dict):
        items = []
        for name, array in tensors.items():
            array = np.asarray(array)
            dtype = _INFER.get(array.dtype.newbyteorder("<"))
            if dtype is None:
                raise ValueError(
                    f"tensor {name!r}: cannot infer a safetensors dtype from {array.dtype}; "
                    "use the (name, dtype, array) list form"
                )
            items.append((name, dtype, array))
        return items
    items = []
    for name, dtype, array in tensors:
        array = np.asarray(array)
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        items.append((name, dtype, array))
    return items


def save_file(
    path: str | os.PathLike[str],
    tensors: dict[str, np.ndarray] | list[tuple[str, str, np.ndarray]],
    metadata: dict[str, str] | None = None,
    *,
    overwrite: bool = True,
) -> str:
    """Write tensors (in the given order) to `path` atomically; returns the file's SHA-256."""
    items = _normalise(tensors)
    specs = [(name, dtype, tuple(array.shape)) for name, dtype, array in items]
    with staged_output(pathlib.Path(path), is_dir=False, overwrite=overwrite) as staging:
        with open(staging.path, "wb") as fh:
            writer = SafetensorsWriter(fh, specs, metadata)
            for name, _dtype, array in items:
                writer.write(name, array)
            writer.finish()
            _fsync(fh)
        staging.publish()
    return writer.sha256


def load_file(path: str | os.PathLike[str]) -> dict[str, tuple[str, np.ndarray]]:
    """Read a whole file: name -> (dtype name, writable copy), in data order."""
    with SafetensorsFile(path) as f:
        return {name: (info.dtype, f.raw(name).copy()) for name, info in f.tensors.items()}


class Checkpoint:
    """A model's safetensors weights: one file, or a folder (one file, or shards + index)."""

    root: pathlib.Path
    is_folder: bool
    shards: list[SafetensorsFile]
    tensors: dict[str, tuple[SafetensorsFile, TensorInfo]]
    index: dict[str, Any] | None
    other_files: list[pathlib.Path]
    skipped_files: list[pathlib.Path]
    missing_shards: list[str]

    def __init__(self) -> None:
        self.shards = []
        self.tensors = {}
        self.index = None
        self.other_files = []
        self.skipped_files = []
        self.missing_shards = []

    @classmethod
    def open(cls, path: str | os.PathLike[str], partial: bool = False) -> Checkpoint:
        """Open a file or folder. `partial` (for suspects, never for bases): shards that the
        index lists but that are absent are skipped and named in `missing_shards`, as for a
        leak published only in part."""
        path = pathlib.Path(path)
        self = cls()
        try:
            if path.is_dir():
                self.root = path
                self.is_folder = True
                self._open_folder(partial)
            elif path.exists():
                self.root = path.parent
                self.is_folder = False
                self.shards = [SafetensorsFile(path)]
                self._collect_tensors(None)
            else:
                raise InputFileError(path, "no such file or folder")
        except BaseException:
            self.close()
            raise
        return self

    def _open_folder(self, partial: bool = False) -> None:
        root = self.root
        index_path = root / WEIGHT_INDEX
        if index_path.exists():
            weight_map = self._read_index(index_path)
            names = sorted(set(weight_map.values()))
            for name in names:
                shard = root / name
                if not shard.is_file():
                    if partial:
                        self.missing_shards.append(name)
                        continue
                    raise FormatError(index_path, f"shard {name!r} is listed but missing")
                self.shards.append(SafetensorsFile(shard))
            if self.missing_shards:
                if not self.shards:
                    raise FormatError(index_path, f"none of the {len(names)} shards it lists is here")
                gone = set(self.missing_shards)
                weight_map = {t: f for t, f in weight_map.items() if f not in gone}
            self._collect_tensors(weight_map)
            used = {WEIGHT_INDEX, *names}
        else:
            try:
                names = sorted(
                    entry.name
                    for entry in os.scandir(root)
                    if entry.name.endswith(".safetensors")
                    and not entry.name.startswith(".")
                    and entry.is_file()
                )
            except OSError as exc:
                raise InputFileError(root, f"cannot list folder: {exc.strerror}") from None
            if not names:
                raise InputFileError(root, "no .safetensors files in this folder")
            self.shards = [SafetensorsFile(root / name) for name in names]
            self._collect_tensors(None)
            used = set(names)
        self._collect_other_files(used)

    def _read_index(self, index_path: pathlib.Path) -> dict[str, str]:
        try:
            raw = index_path.read_bytes()
        except OSError as exc:
            raise InputFileError(index_path, f"cannot read: {exc.strerror}") from None
        index = _parse_json(index_path, raw, "index")
        if not isinstance(index, dict):
            raise FormatError(
                index_path, f"index must be a JSON object, not {type(index).__name__}"
            )
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise FormatError(index_path, "weight_map is missing or not an object")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise FormatError(
                    index_path, f"weight_map[{_show(tensor)}] must be a file name string"
                )
            if (
                not shard
                or shard in (".", "..")
                or "/" in shard
                or "\\" in shard
                or "\x00" in shard
                or os.path.isabs(shard)
            ):
                raise FormatError(
                    index_path,
                    f"weight_map[{_show(tensor)}] = {_show(shard)} is not a plain file name "
                    "inside the folder",
                )
        self.index = index
        return weight_map

    def _collect_tensors(self, weight_map: dict[str, str] | None) -> None:
        owner: dict[str, str] = {}
        for shard in self.shards:
            for name, info in shard.tensors.items():
                if name in self.tensors:
                    raise FormatError(
                        shard.path,
                        f"tensor {_show(name)} is also in {self.tensors[name][0].path.name}",
                    )
                if weight_map is not None and weight_map.get(name) != shard.path.name:
                    where = weight_map.get(name)
                    if where is None:
                        problem = "is not in the index weight_map"
                    else:
                        problem = f"is mapped to {_show(where)} by the index"
                    raise FormatError(shard.path, f"tensor {_show(name)} {problem}")
                self.tensors[name] = (shard, info)
                owner[name] = shard.path.name
        if weight_map is not None:
            for name, shard_name in weight_map.items():
                if name not in owner:
                    raise FormatError(
                        self.root / WEIGHT_INDEX,
                        f"tensor {_show(name)} is listed in shard {_show(shard_name)} "
                        "but that shard does not contain it",
                    )

    def _collect_other_files(self, used: set[str]) -> None:
        root = self.root
        real_root = root.resolve()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames
                if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d))
            )  # fmt: skip
            here = pathlib.Path(dirpath)
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                full = here / filename
                rel = full.relative_to(root)
                if here == root and filename in used:
                    continue
                if full.is_symlink():
                    target = full.resolve()
                    if not target.is_relative_to(real_root):
                        self.skipped_files.append(rel)
                        continue
                if not full.is_file():
                    continue
                if full.suffix.lower() in _WEIGHT_SUFFIXES:
                    self.skipped_files.append(rel)
                    continue
                self.other_files.append(rel)

    def info(self, name: str) -> TensorInfo:
        """A tensor's info; for an expert unit `<fused>[e]` (weightmark.moe), its slice's."""
        return self._entry(name)[1]

    def raw(self, name: str) -> np.ndarray:
        shard, info = self._entry(name)
        unit = self._unit(name)
        return shard.raw(name) if unit is None else shard.raw(unit[0])[unit[1]]

    def shard_of(self, name: str) -> SafetensorsFile:
        """The shard file holding a tensor (or the fused tensor of an expert unit)."""
        return self._entry(name)[0]

    def release(self, name: str) -> None:
        shard, _info = self._entry(name)
        unit = self._unit(name)
        shard.release(name if unit is None else unit[0])

    def prefetch(self, name: str) -> None:
        """Start reading a tensor (an expert unit: its whole fused tensor) from disk in the
        background; see SafetensorsFile.prefetch."""
        shard, _info = self._entry(name)
        unit = self._unit(name)
        shard.prefetch(name if unit is None else unit[0])

    def _unit(self, name: str) -> tuple[str, int] | None:
        if name in self.tensors:
            return None
        from weightmark.moe import is_fused_hf_experts, split_unit

        unit = split_unit(name)
        if unit is None or unit[0] not in self.tensors:
            return None
        info = self.tensors[unit[0]][1]
        return unit if is_fused_hf_experts(unit[0], info.shape) and unit[1] < info.shape[0] else None

    def _entry(self, name: str) -> tuple[SafetensorsFile, TensorInfo]:
        found = self.tensors.get(name)
        if found is not None:
            return found
        unit = self._unit(name)
        if unit is None:
            raise KeyError(f"{self.root}: no tensor named {name!r}")
        shard, info = self.tensors[unit[0]]
        step = info.nbytes // info.shape[0]
        begin = info.begin + unit[1] * step
        return shard, TensorInfo(name, info.dtype, tuple(info.shape[1:]), begin, begin + step)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _ScratchBuffers:
    """Output buffers reused across tensors of the same size.

    A fresh multi-megabyte array costs a page fault per 4 KiB page on every tensor; with at
    most one tensor being written while the next is transformed, two buffers per size suffice.
    """

    def __init__(self) -> None:
        self._free: dict[int, list[np.ndarray]] = {}

    def take(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        free = self._free.get(nbytes)
        raw = free.pop() if free else np.empty(nbytes, dtype=np.uint8)
        return raw.view(dtype).reshape(shape)

    def give(self, array: np.ndarray | None) -> None:
        if array is not None:
            raw = array.reshape(-1).view(np.uint8)
            self._free.setdefault(raw.size, []).append(raw)


def _write_shard(
    src: Checkpoint,
    shard: SafetensorsFile,
    target: pathlib.Path,
    transform: Callable[..., np.ndarray],
    progress: Callable[[int], None] | None,
    out_dtype: Callable[[TensorInfo], str] | None = None,
    scratch: _ScratchBuffers | None = None,
    syncs: tuple[ThreadPoolExecutor, list[Future[None]]] | None = None,
) -> str:
    """Write one shard and return its SHA-256. The file is fsynced here, or, with `syncs`
    (executor, futures), on the executor's thread while the caller goes on with the next shard;
    the future is appended, and the caller must wait for it before the shard counts as written."""
    dtype_of = out_dtype or (lambda info: info.dtype)
    specs = [(info.name, dtype_of(info), info.shape) for info in shard.tensors.values()]

    def emit(name: str, info: TensorInfo, out: np.ndarray) -> None:
        writer.write(name, out)
        src.release(name)
        if progress is not None:
            progress(info.nbytes)

    # Tensor i is hashed and written on a worker thread while tensor i + 1 is transformed:
    # the kernels, hashlib and file writes all release the GIL. At most two outputs are alive.
    with open(target, "xb") as fh, ThreadPoolExecutor(max_workers=1) as pool:
        writer = SafetensorsWriter(fh, specs, shard.metadata, shard.header_order)
        pending: Future[None] | None = None
        pending_buffer: np.ndarray | None = None
        names = list(shard.tensors)
        for i, (name, info) in enumerate(shard.tensors.items()):
            if i + 1 < len(names):  # read ahead from disk while this tensor is transformed
                shard.prefetch(names[i + 1])
            want = DTYPES[dtype_of(info)]
            if scratch is None:
                buffer = None
                out = np.asarray(transform(name, info, shard.raw(name)))
            else:
                buffer = scratch.take(want, tuple(info.shape))
                out = np.asarray(transform(name, info, shard.raw(name), buffer))
                if not np.shares_memory(out, buffer):
                    scratch.give(buffer)
                    buffer = None
            if out.dtype != want or out.shape != info.shape:
                raise ValueError(
                    f"tensor {name!r}: transform returned {out.dtype} {list(out.shape)}, "
                    f"expected {want} {list(info.shape)}"
                )
            if pending is not None:
                pending.result()
                if scratch is not None:
                    scratch.give(pending_buffer)
            pending, pending_buffer = pool.submit(emit, name, info, out), buffer
            del out
        if pending is not None:
            pending.result()
        writer.finish()
        if syncs is None:
            _fsync(fh)
    if syncs is not None:
        syncer, futures = syncs
        futures.append(syncer.submit(_fsync_path, target))
    return writer.sha256


def _fsync_path(path: pathlib.Path) -> None:
    # fsync through a new descriptor flushes the file's data as one through the writer's would.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_like(
    src: Checkpoint,
    staging: pathlib.Path,
    transform: Callable[..., np.ndarray],
    progress: Callable[[int], None] | None = None,
    out_dtype: Callable[[TensorInfo], str] | None = None,
    scratch: bool = False,
    write_shards: Callable[[list[tuple[SafetensorsFile, pathlib.Path]]], list[str]] | None = None,
) -> dict[str, str]:
    """Write a copy of `src` at `staging` with each tensor passed through `transform`.

    Returns {relative file name: sha256 hex} for every file written. For a single file the
    key is the source file's name. `out_dtype` gives each tensor's output dtype (default: its
    own); the transform must then return arrays of that dtype's storage type. With
    `scratch=True` the transform gets a fourth argument, an uninitialised output array of the
    right dtype and shape that it may fill and return (it is reused for later tensors).
    `write_shards`, given (source shard, target path) pairs, writes the shards some other way
    (e.g. one task per shard on a cluster) and returns their SHA-256s in the same order.
    """
    buffers = _ScratchBuffers() if scratch else None
    staging = pathlib.Path(staging)
    manifest: dict[str, str] = {}
    if not src.is_folder:
        (shard,) = src.shards
        if write_shards is not None:
            (manifest[shard.path.name],) = write_shards([(shard, staging)])
            return manifest
        manifest[shard.path.name] = _write_shard(
            src, shard, staging, transform, progress, out_dtype, buffers
        )
        return manifest
    staging.mkdir(exist_ok=True)
    if write_shards is not None:
        pairs = [(shard, staging / shard.path.name) for shard in src.shards]
        manifest.update(zip([s.path.name for s in src.shards], write_shards(pairs), strict=True))
    # Each finished shard is fsynced on a thread of its own while the next one is computed; on an
    # error the executor still waits for those in flight before the staging folder is removed.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightmark-fsync") as syncer:
        syncs: list[Future[None]] = []
        for shard in src.shards if write_shards is None else ():
            manifest[shard.path.name] = _write_shard(
                src, shard, staging / shard.path.name, transform, progress, out_dtype, buffers, (syncer, syncs)
            )
        for done in syncs:  # every shard is on disk before anything counts as written
            done.result()
    if src.index is not None:
        blob = json.dumps(src.index, indent=2).encode("utf-8")
        with open(staging / WEIGHT_INDEX, "xb") as fh:
            _write_all(fh, blob)
            _fsync(fh)
        manifest[WEIGHT_INDEX] = hashlib.sha256(blob).hexdigest()
    made_dirs: set[pathlib.Path] = set()
    for rel in src.other_files:
        target = staging / rel
        if target.parent != staging and target.parent not in made_dirs:
            target.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.update([target.parent, *target.parent.parents])
        shutil.copyfile(src.root / rel, target)
        with open(target, "rb") as fh:
            os.fsync(fh.fileno())
        manifest[rel.as_posix()] = sha256_file(target)
    for folder in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
        if folder != staging and folder.is_relative_to(staging):
            fsync_dir(folder)
    fsync_dir(staging)
    return manifest
