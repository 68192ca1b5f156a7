"""The fused dequantize-and-extract kernels give exactly what `extract` gives on the dequantized
tensor, and agree with the numpy twins (independent dequantizers + extract_twin)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels import twins
from tests.kernels.test_quant import F16_FIELDS
from weightmark.kernels import BF16, FLOAT, extract
from weightmark.kernels.fused import FUSED_GGML, extract_bnb4, extract_ggml, extract_gptq
from weightmark.kernels.quant import BLOCK_LAYOUTS, dequantize

GGML_TYPES = sorted(FUSED_GGML)
NF4 = np.array(
    [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
     0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0],
    dtype=np.float32,
)  # fmt: skip


def ggml_blocks(qtype: str, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks; f16 scales of every kind, now and then inf or NaN (dropped by extract)."""
    _, type_size = BLOCK_LAYOUTS[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        bits = rng.integers(0, 0x7C00, size=(rows, blocks), dtype=np.uint16)
        bits[rng.random((rows, blocks)) < 0.05] = 0x7C00 | rng.integers(0, 2, dtype=np.uint16)
        bits |= rng.integers(0, 2, size=(rows, blocks), dtype=np.uint16) << np.uint16(15)
        raw[:, :, offset : offset + 2] = bits.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * type_size)


def row_scales(rows: int, rng: np.random.Generator) -> np.ndarray:
    """Positive row scales with an occasional zero, negative or NaN row (skipped)."""
    scale = (rng.random(rows) + 0.05).astype(np.float32)
    odd = rng.random(rows)
    scale[odd < 0.1] = 0.0
    scale[(odd >= 0.1) & (odd < 0.15)] = np.nan
    scale[(odd >= 0.15) & (odd < 0.2)] = -1.0
    return scale


def reference_for(values: np.ndarray, mode: str, rng: np.random.Generator) -> tuple[np.ndarray | None, int]:
    """No reference, a float32 one, or bf16 bits, near the suspect's values."""
    if mode == "none":
        return None, FLOAT
    with np.errstate(invalid="ignore", over="ignore"):
        near = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=-1.0)
        near = (near + rng.standard_normal(values.shape) * 0.01).astype(np.float32)
    if mode == "f32":
        return near, FLOAT
    return twins.to_bf16_bits(near.astype(np.float64)), BF16


def sums_of(call, code_length: int) -> tuple[np.ndarray, np.ndarray]:
    num, den = np.zeros(code_length), np.zeros(code_length)
    call(num, den)
    return num, den


def assert_same_sums(got: tuple[np.ndarray, np.ndarray], values: np.ndarray, reference: np.ndarray | None,
                     reference_kind: int, scale: np.ndarray, seed: int) -> None:  # fmt: skip
    """Bit-equal to `extract` on the dequantized values; within 1e-9 of the numpy twin."""
    code_length = got[0].shape[0]
    want = sums_of(lambda n, d: extract(values, FLOAT, reference, reference_kind, scale, seed, n, d), code_length)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    num, den, magnitude = twins.extract_twin(values, FLOAT, reference, reference_kind, scale, seed, code_length)
    assert np.all(np.abs(got[0] - num) <= 1e-9 * magnitude + 1e-300)
    np.testing.assert_allclose(got[1], den, rtol=1e-9, atol=1e-300)


case_seeds = st.integers(0, 2**32 - 1)
modes = st.sampled_from(["none", "f32", "bf16"])


@pytest.mark.parametrize("qtype", GGML_TYPES)
@settings(deadline=None, max_examples=12)
@given(seed=case_seeds, rows=st.integers(1, 7), blocks=st.integers(1, 3), mode=modes,
       code_length=st.integers(1, 40), permuted=st.booleans())  # fmt: skip
def test_ggml_matches_extract_of_dequantized(qtype: str, seed: int, rows: int, blocks: int, mode: str,
                                             code_length: int, permuted: bool) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    cols = blocks * BLOCK_LAYOUTS[qtype][0]
    raw = ggml_blocks(qtype, rows, blocks, rng)
    row_map = rng.permutation(rows).astype(np.int64) if permuted else None
    stored = twins.ggml_dequantize_twin(qtype, raw)
    # the kernels' dequantizer is bit-equal to the twin (tests/kernels/test_quant.py), NaN for NaN:
    # the sign of the NaN an inf * 0 scale gives depends on the instruction the compiler picked
    ours = dequantize(qtype, raw, rows, cols)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(stored))
    number = ~np.isnan(stored)
    np.testing.assert_array_equal(ours.view(np.uint32)[number], stored.view(np.uint32)[number])
    values = np.ascontiguousarray(stored if row_map is None else stored[row_map])
    reference, kind = reference_for(values, mode, rng)
    scale = row_scales(rows, rng)
    got = sums_of(lambda n, d: extract_ggml(qtype, raw, rows, cols, row_map, reference, kind, scale, seed, n, d),
                  code_length)  # fmt: skip
    assert_same_sums(got, values, reference, kind, scale, seed)


@settings(deadline=None, max_examples=40)
@given(seed=case_seeds, bits=st.sampled_from([2, 4, 8]), words=st.integers(1, 6), rows=st.integers(1, 9),
       groups=st.sampled_from([1, 2, 4]), shuffled=st.booleans(), mode=modes,
       code_length=st.integers(1, 40))  # fmt: skip
def test_gptq_matches_extract_of_dequantized(seed: int, bits: int, words: int, rows: int, groups: int,
                                             shuffled: bool, mode: str, code_length: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    cols = words * (32 // bits)
    groups = min(groups, cols)
    qweight = rng.integers(0, 2**32, size=(words, rows), dtype=np.uint32)
    zeros = rng.integers(0, 1 << bits, size=(rows, groups)).astype(np.float32)
    scales = (rng.standard_normal((rows, groups)) * 0.01).astype(np.float32)
    scales[rng.random((rows, groups)) < 0.05] = np.inf
    g_idx = np.arange(cols, dtype=np.int64) * groups // cols
    if shuffled:  # act-order: any group for any input
        g_idx = rng.integers(0, groups, size=cols).astype(np.int64)
    values = twins.gptq_dequantize_twin(qweight, bits, zeros, scales, g_idx)
    reference, kind = reference_for(values, mode, rng)
    scale = row_scales(rows, rng)
    got = sums_of(lambda n, d: extract_gptq(qweight, bits, zeros, scales, g_idx, reference, kind, scale, seed,
                                            n, d), code_length)  # fmt: skip
    assert_same_sums(got, values, reference, kind, scale, seed)


@settings(deadline=None, max_examples=40)
@given(seed=case_seeds, rows=st.integers(1, 9), cols=st.integers(1, 150), blocksize=st.sampled_from([7, 64, 256]),
       table=st.sampled_from(["nf4", "random"]), mode=modes, code_length=st.integers(1, 40))  # fmt: skip
def test_bnb4_matches_extract_of_dequantized(seed: int, rows: int, cols: int, blocksize: int, table: str,
                                             mode: str, code_length: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    numel = rows * cols
    data = rng.integers(0, 256, size=(numel + 1) // 2, dtype=np.uint8)
    code = NF4 if table == "nf4" else rng.standard_normal(16).astype(np.float32)
    absmax = (rng.random(-(-numel // blocksize)) * 0.1).astype(np.float32)
    absmax[rng.random(absmax.size) < 0.05] = np.nan
    values = twins.bnb4_dequantize_twin(data, code, absmax, blocksize, rows, cols)
    reference, kind = reference_for(values, mode, rng)
    scale = row_scales(rows, rng)
    got = sums_of(lambda n, d: extract_bnb4(data, code, absmax, blocksize, rows, cols, reference, kind, scale,
                                            seed, n, d), code_length)  # fmt: skip
    assert_same_sums(got, values, reference, kind, scale, seed)


def test_sums_add_to_what_is_there_and_read_only_inputs_work() -> None:
    rng = np.random.default_rng(3)
    raw = ggml_blocks("Q4_0", 4, 2, rng)
    raw.flags.writeable = False
    scale = np.ones(4, dtype=np.float32)
    scale.flags.writeable = False
    num, den = np.full(5, 2.0), np.full(5, 3.0)
    extract_ggml("Q4_0", raw, 4, 64, None, None, FLOAT, scale, 9, num, den)
    want = sums_of(lambda n, d: extract(dequantize("Q4_0", raw, 4, 64), FLOAT, None, FLOAT, scale, 9, n, d), 5)
    np.testing.assert_array_equal(num, want[0] + 2.0)
    np.testing.assert_array_equal(den, want[1] + 3.0)


def test_wrappers_refuse_inconsistent_inputs() -> None:
    raw = np.zeros((2, 18), dtype=np.uint8)
    ones = np.ones(2, dtype=np.float32)
    z = np.zeros(4)
    with pytest.raises(ValueError, match="no fused kernel"):
        extract_ggml("IQ4_XS", raw, 2, 32, None, None, FLOAT, ones, 1, z, z.copy())
    with pytest.raises(ValueError, match="raw holds 36 bytes"):
        extract_ggml("Q4_0", raw, 3, 32, None, None, FLOAT, np.ones(3), 1, z, z.copy())
    with pytest.raises(ValueError, match="row_map points outside"):
        extract_ggml("Q4_0", raw, 2, 32, np.array([0, 2]), None, FLOAT, ones, 1, z, z.copy())
    with pytest.raises(ValueError, match="reference shape"):
        extract_ggml("Q4_0", raw, 2, 32, None, np.zeros((2, 31), np.float32), FLOAT, ones, 1, z, z.copy())
    with pytest.raises(ValueError, match="row_scale"):
        extract_ggml("Q4_0", raw, 2, 32, None, None, FLOAT, np.ones(3), 1, z, z.copy())
    qweight = np.zeros((1, 2), dtype=np.uint32)
    fz = np.zeros((2, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="g_idx points outside"):
        extract_gptq(qweight, 4, fz, fz, np.full(8, 1, dtype=np.int64), None, FLOAT, ones, 1, z, z.copy())
    with pytest.raises(ValueError, match="bits 3"):
        extract_gptq(qweight, 3, fz, fz, np.zeros(8, dtype=np.int64), None, FLOAT, ones, 1, z, z.copy())
    with pytest.raises(ValueError, match="at least 4 bytes"):
        extract_bnb4(np.zeros(3, np.uint8), NF4, np.ones(1, np.float32), 64, 2, 4, None, FLOAT, ones, 1, z,
                     z.copy())  # fmt: skip
    with pytest.raises(ValueError, match="one scale per block"):
        extract_bnb4(np.zeros(4, np.uint8), NF4, np.ones(1, np.float32), 4, 2, 4, None, FLOAT, ones, 1, z,
                     z.copy())  # fmt: skip
