"""Extraction adds every element's terms in one fixed order, so its sums are exact functions of
the input: rows in 64 fixed blocks, each block's rows and columns in order into float64 sums, the
blocks then summed in order. These tests rebuild that order in numpy (np.add.at applies its
additions one index after the other) and ask for the same bits, on rows long enough to span the
kernels' tiles and vector steps, with non-finite values, dead rows and ragged tails."""

from __future__ import annotations

import numpy as np
import pytest

from tests.kernels import twins
from tests.kernels.test_fused import NF4, reference_for, row_scales
from weightmark.kernels import BF16, F16, FLOAT, extract
from weightmark.kernels.dense import EXTRACT_PARTS, MAX_CODE_LENGTH, TILE
from weightmark.kernels.fused import extract_bnb4, extract_ggml, extract_gptq
from weightmark.kernels.quant import dequantize
from weightmark.kernels.quantize import quantize


def ordered_sums(suspect: np.ndarray, suspect_kind: int, reference: np.ndarray | None, reference_kind: int,
                 row_scale: np.ndarray, seed: int, code_length: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """num and den added up in extraction's order: per block of rows, element by element."""
    rows, cols = suspect.shape
    chips, positions, _ = twins.chips_positions_uniforms(seed, rows * cols, code_length)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = twins.decode(suspect, suspect_kind)
        if reference is not None:
            d = d - twins.decode(reference, reference_kind)
        scale = row_scale.astype(np.float64)
        good = (scale > 0.0) & np.isfinite(scale)
        e = d * np.where(good, 1.0 / np.where(good, scale, 1.0), 0.0)[:, None]
    keep = (np.repeat(good, cols) & np.isfinite(d).ravel()).reshape(rows, cols)
    e = e.ravel()
    parts = max(1, min(EXTRACT_PARTS, rows))
    chunk = -(-rows // parts)
    part_num = np.zeros((parts, code_length))
    part_den = np.zeros((parts, code_length))
    for t in range(parts):
        for r in range(t * chunk, min(rows, (t + 1) * chunk)):
            j = r * cols + np.flatnonzero(keep[r])
            np.add.at(part_num[t], positions[j], chips[j] * e[j])
            np.add.at(part_den[t], positions[j], e[j] * e[j])
    return part_num.sum(axis=0), part_den.sum(axis=0)


def kernel_sums(call, code_length: int) -> tuple[np.ndarray, np.ndarray]:
    num, den = np.zeros(code_length), np.zeros(code_length)
    call(num, den)
    return num, den


def assert_bits_equal(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].tobytes() == want[0].tobytes()
    assert got[1].tobytes() == want[1].tobytes()


def values_with_specials(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    values = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    flat = values.ravel()
    for special in (np.nan, np.inf, -np.inf, 0.0, -0.0, 3e38):
        flat[rng.integers(0, flat.size, size=3)] = special
    return values


def as_kind(values: np.ndarray, kind: int) -> np.ndarray:
    if kind == BF16:
        return twins.to_bf16_bits(values.astype(np.float64))
    if kind == F16:
        with np.errstate(over="ignore"):
            return values.astype(np.float16).view(np.uint16)
    return values


# Rows shorter than a tile, exactly one, and several with a ragged tail (not a multiple of 8);
# 3 rows (3 blocks of 1) and 130 (64 blocks of up to 3 rows).
SHAPES = [(3, 5), (3, TILE), (130, 2 * TILE + 13), (7, 3 * TILE + 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("suspect_kind", "reference_kind"), [(FLOAT, None), (BF16, BF16), (F16, FLOAT),
                                                              (FLOAT, BF16)])  # fmt: skip
def test_dense_extract_adds_in_the_fixed_order(shape: tuple[int, int], suspect_kind: int,
                                                reference_kind: int | None) -> None:  # fmt: skip
    rng = np.random.default_rng(shape[0] * 1000 + shape[1] + 10 * suspect_kind)
    suspect = as_kind(values_with_specials(*shape, rng), suspect_kind)
    reference = None
    if reference_kind is not None:
        reference = as_kind(values_with_specials(*shape, rng), reference_kind)
    scale = row_scales(shape[0], rng)
    seed = int(rng.integers(0, 2**63))
    for code_length in (1, 37, 4096):
        got = kernel_sums(lambda n, d: extract(suspect, suspect_kind, reference, reference_kind or FLOAT, scale,
                                               seed, n, d), code_length)  # fmt: skip
        assert_bits_equal(got, ordered_sums(suspect, suspect_kind, reference, reference_kind or FLOAT, scale,
                                            seed, code_length))  # fmt: skip


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("mode", ["none", "bf16"])
def test_ggml_rows_longer_than_a_tile(qtype: str, mode: str) -> None:
    rng = np.random.default_rng(7)
    rows, cols = 67, 5 * 256
    raw = quantize(qtype, (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32))
    values = dequantize(qtype, raw, rows, cols)
    reference, kind = reference_for(values, mode, rng)
    scale = row_scales(rows, rng)
    got = kernel_sums(lambda n, d: extract_ggml(qtype, raw, rows, cols, None, reference, kind, scale, 11, n, d),
                      4096)  # fmt: skip
    assert_bits_equal(got, ordered_sums(values, FLOAT, reference, kind, scale, 11, 4096))


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize(("rows", "cols"), [(70, 1032), (70, 1024), (64 * 17 + 5, 40)])
def test_gptq_4bit_rows_longer_than_a_tile(shuffled: bool, rows: int, cols: int) -> None:
    """Long rows; and 1093 rows, 18 to a block, so a block's rows are read in a group of 16 and
    one of 2."""
    rng = np.random.default_rng(cols + shuffled)
    groups = 8
    qweight = rng.integers(0, 2**32, size=(cols // 8, rows), dtype=np.uint32)
    zeros = rng.integers(0, 16, size=(rows, groups)).astype(np.float32)
    scales = (rng.standard_normal((rows, groups)) * 0.01).astype(np.float32)
    g_idx = np.arange(cols, dtype=np.int64) * groups // cols
    if shuffled:
        g_idx = rng.integers(0, groups, size=cols).astype(np.int64)
    values = twins.gptq_dequantize_twin(qweight, 4, zeros, scales, g_idx)
    scale = row_scales(rows, rng)
    got = kernel_sums(lambda n, d: extract_gptq(qweight, 4, zeros, scales, g_idx, None, FLOAT, scale, 5, n, d),
                      4096)  # fmt: skip
    assert_bits_equal(got, ordered_sums(values, FLOAT, None, FLOAT, scale, 5, 4096))


@pytest.mark.parametrize(("cols", "blocksize"), [(1024, 64), (1031, 64), (1100, 7)])
def test_bnb4_rows_longer_than_a_tile(cols: int, blocksize: int) -> None:
    rng = np.random.default_rng(cols)
    rows = 9
    numel = rows * cols
    data = rng.integers(0, 256, size=(numel + 1) // 2, dtype=np.uint8)
    absmax = (rng.random(-(-numel // blocksize)) * 0.1).astype(np.float32)
    values = twins.bnb4_dequantize_twin(data, NF4, absmax, blocksize, rows, cols)
    scale = row_scales(rows, rng)
    got = kernel_sums(lambda n, d: extract_bnb4(data, NF4, absmax, blocksize, rows, cols, None, FLOAT, scale, 3,
                                                n, d), 4096)  # fmt: skip
    assert_bits_equal(got, ordered_sums(values, FLOAT, None, FLOAT, scale, 3, 4096))


def test_code_lengths_beyond_uint32_positions_are_refused() -> None:
    """Positions are uint32s in the kernels: a longer code is refused before anything runs (the
    sums here are zero-stride views, so no memory is spent on them)."""
    huge = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(MAX_CODE_LENGTH + 1,), strides=(0,))
    ones = np.ones(2, dtype=np.float32)
    with pytest.raises(ValueError, match="code length"):
        extract(np.zeros((2, 4), dtype=np.float32), FLOAT, None, FLOAT, ones, 1, huge, huge)
    with pytest.raises(ValueError, match="code length"):
        extract_ggml("Q4_0", np.zeros(2 * 18, dtype=np.uint8), 2, 32, None, None, FLOAT, ones, 1, huge, huge)


@pytest.mark.parametrize("permute", [False, True])
def test_both_bnb4_lookups_give_the_code_book_values(monkeypatch: pytest.MonkeyPatch, permute: bool) -> None:
    """bnb4_lanes picks code[q] with an AVX-512 permute on machines that have one, else with a tree
    of selects; each must give float32(code[q] * scale), high nibble first, bit for bit."""
    import numba

    from weightmark.kernels import quant

    if permute and not quant._PERMUTE_16:
        pytest.skip("this machine (or numba's target) has no AVX-512")
    monkeypatch.setattr(quant, "_PERMUTE_16", permute)

    @numba.njit(cache=False)  # compiled here, under the patched choice
    def decode(data, code, scale, out):
        for k in range(data.shape[0] // 16):
            quant.bnb4_lanes(data, 16 * k, code, out, 32 * k, scale)

    rng = np.random.default_rng(17)
    data = rng.integers(0, 256, size=64, dtype=np.uint8)
    code = rng.standard_normal(16).astype(np.float32)
    code[3] = -0.0
    out = np.empty(128)
    scale = np.float32(0.37)
    decode(data, code, scale, out)
    nibbles = np.stack([data >> 4, data & 15], axis=1).ravel()
    want = (code[nibbles] * scale).astype(np.float64)
    assert out.tobytes() == want.tobytes()
