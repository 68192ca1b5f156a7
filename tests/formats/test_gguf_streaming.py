"""The streaming GGUF writer: the same bytes as gguf's in-memory writer, one tensor in memory at a
time, and never a partial file under the final name."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tests.formats.gguf_writer_twin import reference_write_gguf
from tests.formats.test_gguf import LLAMA_META, llama_tensors
from weightmark.formats.gguf import GGUFModel, LazyTensor, write_gguf
from weightmark.kernels.quantize import quantize
from weightmark.moe import fuse_experts

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _same_file(a: Path, b: Path) -> None:
    x, y = a.read_bytes(), b.read_bytes()
    if x != y:
        first = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        pytest.fail(f"{a.name}: {len(x)} bytes vs the reference's {len(y)}; first difference at byte {first}")


def _lazy(tensors: list[tuple[str, np.ndarray]], log: list[str]) -> list[tuple[str, LazyTensor]]:
    def loader(name: str, array: np.ndarray):
        def load() -> np.ndarray:
            log.append(name)
            return array.copy()
        return load

    return [(name, LazyTensor(array.shape, loader(name, array))) for name, array in tensors]


@pytest.fixture(scope="module")
def tensors() -> list[tuple[str, np.ndarray]]:
    # ffn 320 is not a whole number of 256-element super-blocks: the F16 fallback is exercised too
    return llama_tensors(hidden=256, ffn=320, vocab=384)


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_equal_gguf_writer(tmp_path: Path, tensors, qtype: str) -> None:
    log: list[str] = []
    written = write_gguf(tmp_path / "stream.gguf", "llama", _lazy(tensors, log), qtype, LLAMA_META)
    reference_write_gguf(tmp_path / "reference.gguf", "llama", tensors, qtype, LLAMA_META)
    _same_file(tmp_path / "stream.gguf", tmp_path / "reference.gguf")
    assert log == written == [name for name, _ in tensors]  # each tensor loaded once, in order
    with GGUFModel(tmp_path / "stream.gguf") as model:  # and our reader takes it
        assert set(model.tensors()) == set(written)


def test_bytes_equal_with_an_encoder_and_mixed_types(tmp_path: Path, tensors) -> None:
    def encode(name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
        if w.ndim != 2 or "down_proj" in name:
            return "F32", w
        if "v_proj" in name:
            return "F16", w.astype(np.float16)
        return ("Q6_K" if "k_proj" in name else "Q4_K"), quantize("Q6_K" if "k_proj" in name else "Q4_K", w)

    write_gguf(tmp_path / "stream.gguf", "llama", tensors, "F32", LLAMA_META, encode=encode)
    reference_write_gguf(tmp_path / "reference.gguf", "llama", tensors, "F32", LLAMA_META, encode=encode)
    _same_file(tmp_path / "stream.gguf", tmp_path / "reference.gguf")
    with GGUFModel(tmp_path / "stream.gguf") as model:
        assert model.info("model.layers.0.self_attn.k_proj.weight").ggml_type == "Q6_K"
        assert model.info("model.layers.1.mlp.down_proj.weight").ggml_type == "F32"


def test_bytes_equal_with_fused_experts(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hidden, ffn, experts = 64, 96, 4
    tensors = [("model.embed_tokens.weight", rng.standard_normal((128, hidden), dtype=np.float32))]
    p = "model.layers.0."
    tensors += [(p + "mlp.gate.weight", rng.standard_normal((experts, hidden), dtype=np.float32))]
    for e in range(experts):
        for part, shape in (("gate_proj", (ffn, hidden)), ("up_proj", (ffn, hidden)), ("down_proj", (hidden, ffn))):
            tensors.append((f"{p}mlp.experts.{e}.{part}.weight", rng.standard_normal(shape, dtype=np.float32)))
    fused = fuse_experts(tensors)
    meta = {"attention.head_count": 4, "expert_count": experts, "expert_used_count": 2}
    write_gguf(tmp_path / "stream.gguf", "qwen2moe", _lazy(fused, []), "Q8_0", meta)
    reference_write_gguf(tmp_path / "reference.gguf", "qwen2moe", fused, "Q8_0", meta)
    _same_file(tmp_path / "stream.gguf", tmp_path / "reference.gguf")


@pytest.mark.parametrize("fmt", ["gguf:Q4_0", "gguf:Q6_K"])
def test_stamped_output_bytes_equal_the_in_memory_writer(tmp_path: Path, minilm: Path, fmt: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The real MiniLM through the copy writer (tokenizer metadata, BERT names, dropped pooler)."""
    from weightmark import quantized_stamp
    from weightmark.formats import gguf as gguf_module

    streamed = quantized_stamp.write_reference_copy(minilm, tmp_path / "stream.gguf", fmt)
    monkeypatch.setattr(gguf_module, "write_gguf", reference_write_gguf)
    reference = quantized_stamp.write_reference_copy(minilm, tmp_path / "reference.gguf", fmt)
    _same_file(streamed, reference)


def test_one_tensor_in_memory_at_a_time(tmp_path: Path) -> None:
    """Peak Python/numpy allocations while writing 24 lazily loaded 1 MiB tensors stay near one
    tensor's working set; the in-memory writer holds all of them."""
    rng = np.random.default_rng(5)
    rows, cols = 512, 512  # 1 MiB of float32 each
    arrays = [(f"model.layers.{i // 4}.mlp.{('gate_proj', 'up_proj', 'down_proj', 'self_attn.o_proj')[i % 4]}"
               .replace("mlp.self_attn", "self_attn") + ".weight", rng.standard_normal((rows, cols), np.float32))
              for i in range(24)]
    one = rows * cols * 4
    total = one * len(arrays)

    def peak(write, name: str) -> int:
        sources = [(n, LazyTensor(a.shape, a.copy)) for n, a in arrays]
        tracemalloc.start()
        try:
            write(tmp_path / name, "llama", sources, "Q8_0", {"attention.head_count": 8})
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    streamed = peak(write_gguf, "stream.gguf")
    held = peak(reference_write_gguf, "reference.gguf")
    _same_file(tmp_path / "stream.gguf", tmp_path / "reference.gguf")
    assert held > total  # the reference really holds the whole model
    assert streamed < 4 * one, f"streaming writer peaked at {streamed / one:.1f} tensors' worth"


def test_a_failure_leaves_nothing_under_the_name(tmp_path: Path, tensors) -> None:
    target = tmp_path / "out.gguf"

    def broken(name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
        if "layers.1" in name:
            raise RuntimeError("encoder failed")
        return "F32", w

    with pytest.raises(RuntimeError, match="encoder failed"):
        write_gguf(target, "llama", tensors, "F32", LLAMA_META, encode=broken)
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary sibling
    target.write_bytes(b"earlier")
    with pytest.raises(RuntimeError, match="encoder failed"):
        write_gguf(target, "llama", tensors, "F32", LLAMA_META, encode=broken)
    assert target.read_bytes() == b"earlier" and os.listdir(tmp_path) == ["out.gguf"]


def test_typed_metadata_arrays_pack_as_gguf_packs_them() -> None:
    """Typed arrays (a donor GGUF's vocabulary) are packed in one go: the bytes of gguf's own
    item-by-item packing, for strings (non-ASCII, empty, bytes), every numeric type and the
    cases left to gguf (bool items, untyped lists, an empty array it refuses)."""
    import gguf

    from weightmark.formats.gguf import _Writer

    T = gguf.GGUFValueType
    ours, theirs = _Writer(None, "llama"), gguf.GGUFWriter(None, "llama")
    cases = [
        (["<s>", "", "Ġthe", "\u00e9t\u00e9", "\u2581x", b"raw"], T.STRING),
        ([1, 2, 3, -4], T.INT32), ([0, 255], T.UINT8), ([2**40, 7], T.UINT64), ([-(2**40)], T.INT64),
        ([0.5, -1e-30, 3.4e38], T.FLOAT32), ([1e300], T.FLOAT64), ([1, -2], T.INT16), ([7], T.UINT16),
        ([-1], T.INT8), ([True, False], T.BOOL), (["a", "b"], None),
    ]  # fmt: skip
    for values, sub_type in cases:
        for add_vtype in (True, False):
            want = theirs._pack_val(values, T.ARRAY, add_vtype, sub_type)
            assert ours._pack_val(values, T.ARRAY, add_vtype, sub_type) == want, (values, sub_type)
    assert ours._pack_val("key", T.STRING, False) == theirs._pack_val("key", T.STRING, False)
    with pytest.raises(ValueError, match="Empty array"):
        ours._pack_val([], T.ARRAY, True, T.STRING)
