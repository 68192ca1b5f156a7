"""Q2_K, Q3_K, IQ4_NL and IQ4_XS dequantizers against the gguf package, bit for bit, and the
GGUF reader on files holding them (values, and packed lengths that do not match the shape)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.test_quant import assert_bit_equal, reference
from weightmark.errors import FormatError
from weightmark.formats.gguf import GGUFModel
from weightmark.kernels.quant import BLOCK_LAYOUTS, IQ4_NL_VALUES, QUANTIZED, dequantize

# Byte offsets of the f16 fields inside one block of each type (the rest is packed bits).
F16_FIELDS = {
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
}
TYPES = sorted(F16_FIELDS)


def random_blocks(qtype: str, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform random bytes, with every f16 field a finite f16 of either sign."""
    _, type_size = BLOCK_LAYOUTS[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        bits = rng.integers(0, 0x7C00, size=(rows, blocks), dtype=np.uint16)
        bits |= rng.integers(0, 2, size=(rows, blocks), dtype=np.uint16) << np.uint16(15)
        raw[:, :, offset : offset + 2] = bits.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * type_size)


def test_types_have_kernels_and_gguf_layouts() -> None:
    assert set(TYPES) <= QUANTIZED
    for qtype in TYPES:
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]] == BLOCK_LAYOUTS[qtype]
    assert IQ4_NL_VALUES.tolist() == list(gguf.quants.IQ4_NL.kvalues)


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("qtype", TYPES)
def test_random_blocks_match_gguf(qtype: str, blocks: int) -> None:
    rng = np.random.default_rng([blocks, 1000 + TYPES.index(qtype)])
    rows = 9
    raw = random_blocks(qtype, rows, blocks, rng)
    got = dequantize(qtype, raw, rows, blocks * BLOCK_LAYOUTS[qtype][0])
    assert got.flags.c_contiguous
    assert_bit_equal(qtype, got, reference(qtype, raw))


@pytest.mark.parametrize("qtype", TYPES)
def test_every_code_and_scale_is_exercised(qtype: str) -> None:
    """Structured blocks: each sub-block scale byte and code byte value appears somewhere."""
    block, type_size = BLOCK_LAYOUTS[qtype]
    rows = 256
    raw = np.zeros((rows, type_size), dtype=np.uint8)
    raw[:] = (np.arange(rows)[:, None] + np.arange(type_size)[None, :] * 7) % 256
    for offset in F16_FIELDS[qtype]:
        raw[:, offset : offset + 2] = np.full(rows, 0.25, "<f2").view(np.uint8).reshape(rows, 2)
    got = dequantize(qtype, raw, rows, block)
    assert_bit_equal(qtype, got, reference(qtype, raw))
    assert np.unique(got).size >= 16  # every level appears: not a degenerate decode


@settings(deadline=None, max_examples=80)
@given(
    qtype=st.sampled_from(TYPES), rows=st.integers(0, 4), blocks=st.integers(1, 2), data=st.data()
)
def test_arbitrary_bytes_match_gguf(
    qtype: str, rows: int, blocks: int, data: st.DataObject
) -> None:
    """Any bytes at all, inf/NaN/subnormal scales included; NaNs compare equal to NaNs."""
    block, type_size = BLOCK_LAYOUTS[qtype]
    n = rows * blocks * type_size
    raw = np.frombuffer(data.draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8)
    raw = raw.reshape(rows, blocks * type_size)
    with np.errstate(invalid="ignore", over="ignore"):
        want = reference(qtype, raw) if rows else np.empty((0, blocks * block), np.float32)
    assert_bit_equal(qtype, dequantize(qtype, raw, rows, blocks * block), want, nan_ok=True)


@pytest.mark.parametrize("qtype", TYPES)
def test_rejects_packed_length_that_does_not_match_the_shape(qtype: str) -> None:
    block, type_size = BLOCK_LAYOUTS[qtype]
    with pytest.raises(ValueError, match=rf"{qtype} \[2, {block + 1}\]: cols {block + 1} is not"):
        dequantize(qtype, np.zeros(2 * type_size, np.uint8), 2, block + 1)
    with pytest.raises(ValueError, match=rf"raw holds {2 * type_size - 1} bytes but"):
        dequantize(qtype, np.zeros(2 * type_size - 1, np.uint8), 2, block)
    with pytest.raises(ValueError, match=rf"raw holds {3 * type_size} bytes but"):
        dequantize(qtype, np.zeros(3 * type_size, np.uint8), 2, block)
    with pytest.raises(ValueError, match="raw must be a uint8 array, got int8"):
        dequantize(qtype, np.zeros(type_size, np.int8), 1, block)


# ------------------------------------------------------------------------- GGUF files


def write_file(path: Path, qtype: str, raw: np.ndarray) -> None:
    """A one-tensor GGUF file 'w.weight' holding raw [rows, bytes per row] as `qtype`."""
    writer = gguf.GGUFWriter(path, "test")
    writer.add_tensor("w.weight", raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


@pytest.mark.parametrize("qtype", TYPES)
def test_reader_loads_the_new_types(tmp_path: Path, qtype: str) -> None:
    block, _ = BLOCK_LAYOUTS[qtype]
    raw = random_blocks(qtype, 3, 2, np.random.default_rng(7))
    path = tmp_path / f"{qtype}.gguf"
    write_file(path, qtype, raw)
    with GGUFModel(path) as model:
        assert model.info("w.weight").ggml_type == qtype
        got = model.load("w.weight")
    assert got.shape == (3, 2 * block)
    assert_bit_equal(qtype, got, reference(qtype, raw))


@pytest.mark.parametrize("qtype", TYPES)
def test_reader_refuses_truncated_data(tmp_path: Path, qtype: str) -> None:
    raw = random_blocks(qtype, 4, 1, np.random.default_rng(8))
    path = tmp_path / f"{qtype}.gguf"
    write_file(path, qtype, raw)
    with GGUFModel(path) as model:
        info = model.info("w.weight")
        end = info.begin + info.nbytes
    assert info.nbytes == 4 * BLOCK_LAYOUTS[qtype][1]
    path.write_bytes(path.read_bytes()[: end - 1])  # the last byte of the last block is gone
    with pytest.raises(FormatError, match=rf"w\.weight.*{qtype}.*runs past the end"):
        GGUFModel(path)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "IQ4_XS"])
def test_reader_refuses_rows_that_are_not_whole_blocks(tmp_path: Path, qtype: str) -> None:
    """A header that claims 288-element rows of a 256-block type (bytes for 2 blocks present)."""
    raw = random_blocks(qtype, 1, 2, np.random.default_rng(9))
    path = tmp_path / f"{qtype}.gguf"
    write_file(path, qtype, raw)
    data = bytearray(path.read_bytes())
    at = data.find((512).to_bytes(8, "little"))  # ne[0] of w.weight in its tensor info
    assert at > 0
    data[at : at + 8] = (288).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(
        FormatError, match=rf"rows of 288 elements are not a multiple of the {qtype}"
    ):
        GGUFModel(path)
