"""Tests of the GGML block dequantizers against the gguf package's numpy reference, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightmark.kernels.quant import BLOCK_LAYOUTS, QUANTIZED, dequantize

# Byte offsets of the f16 scales inside one block of each type (the rest is packed quants).
F16_FIELDS = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
}
GGUF_CAN_QUANTIZE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
TYPES = sorted(QUANTIZED)


def random_blocks(qtype: str, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes: uniform quants and sub-scales, scales finite f16 of mixed magnitude."""
    _, type_size = BLOCK_LAYOUTS[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        # Every finite f16 bit pattern is possible (normal, subnormal, zero, both signs).
        bits = rng.integers(0, 0x7C00, size=(rows, blocks), dtype=np.uint16)
        bits |= rng.integers(0, 2, size=(rows, blocks), dtype=np.uint16) << np.uint16(15)
        raw[:, :, offset : offset + 2] = bits.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * type_size)


def reference(qtype: str, raw: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])


def assert_bit_equal(qtype: str, got: np.ndarray, want: np.ndarray, nan_ok: bool = False) -> None:
    """Equal float32 bit patterns (any NaN equals any NaN with nan_ok); else name the blocks."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    same = got.view(np.uint32) == want.view(np.uint32)
    if nan_ok:
        same |= np.isnan(got) & np.isnan(want)
    if same.all():
        return
    block = BLOCK_LAYOUTS[qtype][0]
    rows, cols = got.shape
    bad = ~same.reshape(rows, cols // block, block).all(axis=2)
    where = [(int(r), int(b)) for r, b in zip(*np.nonzero(bad), strict=True)]
    r, c = (int(i) for i in np.argwhere(~same)[0])
    pytest.fail(
        f"{qtype}: {len(where)} of {bad.size} blocks differ, (row, block) {where[:10]}; "
        f"first element [{r}, {c}]: got {got[r, c]!r}, gguf {want[r, c]!r}"
    )


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("qtype", TYPES)
def test_random_blocks_match_gguf(qtype: str, blocks: int) -> None:
    rng = np.random.default_rng([blocks, TYPES.index(qtype)])
    rows = 7
    raw = random_blocks(qtype, rows, blocks, rng)
    got = dequantize(qtype, raw, rows, blocks * BLOCK_LAYOUTS[qtype][0])
    assert got.flags.c_contiguous
    assert_bit_equal(qtype, got, reference(qtype, raw))


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("qtype", GGUF_CAN_QUANTIZE)
def test_quantized_weights_match_gguf(qtype: str, blocks: int) -> None:
    """Blocks gguf quantized itself from weight-like data, zero and constant rows included."""
    rng = np.random.default_rng([blocks, 99])
    cols = blocks * BLOCK_LAYOUTS[qtype][0]
    w = (rng.standard_normal((6, cols)) * 0.02).astype(np.float32)
    w[1] = 0.0
    w[2] = 0.5
    w[3, ::3] *= 1000.0
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    got = dequantize(qtype, raw, 6, cols)
    assert_bit_equal(qtype, got, reference(qtype, raw))
    assert np.abs(got - w).max() <= np.abs(w).max() / 2  # it is a quantization of w


@settings(deadline=None, max_examples=150)
@given(
    qtype=st.sampled_from(TYPES),
    rows=st.integers(0, 5),
    blocks=st.integers(1, 3),
    data=st.data(),
)
def test_arbitrary_bytes_match_gguf(
    qtype: str, rows: int, blocks: int, data: st.DataObject
) -> None:
    """Any bytes at all, inf/NaN/subnormal scales included; NaNs compare equal to NaNs."""
    block, type_size = BLOCK_LAYOUTS[qtype]
    raw_bytes = data.draw(
        st.binary(min_size=rows * blocks * type_size, max_size=rows * blocks * type_size)
    )
    raw = np.frombuffer(raw_bytes, dtype=np.uint8).reshape(rows, blocks * type_size)
    with np.errstate(invalid="ignore", over="ignore"):
        want = reference(qtype, raw) if rows else np.empty((0, blocks * block), np.float32)
    assert_bit_equal(qtype, dequantize(qtype, raw, rows, blocks * block), want, nan_ok=True)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_dense_types_match_gguf(qtype: str) -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 9)).astype(np.float32)
    w[0, :3] = [np.inf, -0.0, 1e-40]
    if qtype == "F32":
        raw = w.view(np.uint8)
    elif qtype == "F16":
        raw = w.astype(np.float16).view(np.uint8)
    else:
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(4, 9)
    got = dequantize(qtype, raw.reshape(-1), 4, 9)
    assert got.dtype == np.float32 and got.shape == (4, 9)
    assert np.array_equal(got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32))


def test_layouts_agree_with_gguf() -> None:
    for name, layout in BLOCK_LAYOUTS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == layout


def test_accepts_any_shape_and_non_contiguous_bytes() -> None:
    rng = np.random.default_rng(3)
    raw = random_blocks("Q4_K", 3, 2, rng)
    want = reference("Q4_K", raw)
    assert_bit_equal("Q4_K", dequantize("Q4_K", raw.reshape(-1), 3, 512), want)
    strided = np.asfortranarray(raw)
    assert_bit_equal("Q4_K", dequantize("Q4_K", strided, 3, 512), want)


def test_zero_rows() -> None:
    out = dequantize("Q6_K", np.empty(0, np.uint8), 0, 256)
    assert out.shape == (0, 256) and out.dtype == np.float32


@pytest.mark.parametrize(
    ("qtype", "raw", "rows", "cols", "pattern"),
    [
        ("Q4_0", np.zeros(18 * 3, np.uint8), 3, 33, r"Q4_0 \[3, 33\]: cols 33 is not a multiple of the block size 32"),
        ("Q4_0", np.zeros(18 * 3 - 1, np.uint8), 3, 32, r"Q4_0 \[3, 32\]: raw holds 53 bytes but rows \* \(cols / 32\) \* 18 = 54"),
        ("Q6_K", np.zeros(210 * 2, np.uint8), 1, 256, r"Q6_K \[1, 256\]: raw holds 420 bytes .* = 210"),
        ("Q8_0", np.zeros(34, np.int8), 1, 32, r"Q8_0 \[1, 32\]: raw must be a uint8 array, got int8"),
        ("Q8_0", np.zeros(34, np.uint8), -1, 32, r"Q8_0 \[-1, 32\]: rows and cols must be non-negative"),
        ("IQ2_XXS", np.zeros(66, np.uint8), 1, 256, r"'IQ2_XXS': unknown type"),
    ],
)  # fmt: skip
def test_rejects_bad_input(qtype: str, raw: np.ndarray, rows: int, cols: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        dequantize(qtype, raw, rows, cols)
