"""The MLX affine dequantization kernel against its numpy twin, bit for bit (every bit width,
group size and scale dtype, random words and scales including subnormals, huge values, inf, NaN)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.twins import BF16, F16, FLOAT, dequantize_affine_twin
from weightmark.kernels.affine import AFFINE_BITS, AFFINE_GROUPS, dequantize_affine, packed_words


def _scales(rng: np.random.Generator, shape: tuple[int, int], grid: int) -> np.ndarray:
    """Finite or not, normal or subnormal values exactly representable in the grid's dtype."""
    if grid == F16:
        return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(np.float16).astype(np.float32)
    if grid == BF16:
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    magnitude = np.float32(10.0) ** rng.integers(-40, 38, size=shape).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        return (rng.standard_normal(shape).astype(np.float32) * magnitude).astype(np.float32)


def _same(ours: np.ndarray, twin: np.ndarray) -> None:
    assert ours.shape == twin.shape and ours.dtype == np.float32
    differ = np.flatnonzero(ours.view(np.uint32) != twin.view(np.uint32))
    both_nan = np.isnan(ours.ravel()[differ]) & np.isnan(twin.ravel()[differ])
    bad = differ[~both_nan]
    assert bad.size == 0, f"{bad.size} elements differ, first at {bad[:5]}: {ours.ravel()[bad[:5]]} vs {twin.ravel()[bad[:5]]}"


@pytest.mark.parametrize("grid", [FLOAT, BF16, F16])
@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("group", AFFINE_GROUPS)
def test_kernel_equals_twin(bits: int, group: int, grid: int) -> None:
    rng = np.random.default_rng(bits * 1000 + group * 10 + grid)
    rows, cols = 5, group * 3
    words = rng.integers(0, 1 << 32, size=(rows, packed_words(cols, bits)), dtype=np.uint64).astype(np.uint32)
    scales, biases = _scales(rng, (rows, 3), grid), _scales(rng, (rows, 3), grid)
    with np.errstate(all="ignore"):
        twin = dequantize_affine_twin(words, scales, biases, bits, group, cols, grid)
    _same(dequantize_affine(words, scales, biases, bits, group, cols, grid), twin)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(AFFINE_BITS), group=st.sampled_from(AFFINE_GROUPS), rows=st.integers(1, 4),
       groups=st.integers(1, 3), grid=st.sampled_from([FLOAT, BF16, F16]), seed=st.integers(0, 2**32 - 1))
def test_kernel_equals_twin_hypothesis(bits: int, group: int, rows: int, groups: int, grid: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cols = group * groups
    words = rng.integers(0, 1 << 32, size=(rows, packed_words(cols, bits)), dtype=np.uint64).astype(np.uint32)
    scales, biases = _scales(rng, (rows, groups), grid), _scales(rng, (rows, groups), grid)
    with np.errstate(all="ignore"):
        twin = dequantize_affine_twin(words, scales, biases, bits, group, cols, grid)
    _same(dequantize_affine(words, scales, biases, bits, group, cols, grid), twin)


def test_codes_straddling_words_are_read_across_them() -> None:
    """3-bit codes 0..7 repeated: code 10 occupies stream bits 30..32, across words 0 and 1."""
    cols, bits = 32, 3
    codes = np.arange(cols) % 8
    stream = sum(int(c) << (3 * j) for j, c in enumerate(codes))
    words = np.array([[(stream >> (32 * w)) & 0xFFFFFFFF for w in range(3)]], dtype=np.uint32)
    ones, zeros = np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32)
    assert dequantize_affine(words, ones, zeros, bits, 32, cols).tolist() == [codes.astype(float).tolist()]


def test_read_only_inputs_are_accepted() -> None:
    words = np.zeros((2, 4), np.uint32)
    scales = np.ones((2, 1), np.float32)
    for a in (words, scales):
        a.setflags(write=False)
    assert dequantize_affine(words, scales, scales, 4, 32, 32).shape == (2, 32)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (dict(bits=7), ValueError, "bits 7"),
        (dict(cols=48), ValueError, "no whole number of groups"),
        (dict(words=np.zeros((2, 3), np.uint32)), ValueError, "3 words per row"),
        (dict(words=np.zeros((2, 4), np.int32)), TypeError, "uint32"),
        (dict(scales=np.ones((2, 2), np.float32)), ValueError, "scales must be float32 \\[2, 1\\]"),
        (dict(biases=np.ones((2, 1), np.float16)), ValueError, "biases must be float32"),
    ],
)
def test_wrapper_explains_bad_input(args: dict, error: type, message: str) -> None:
    call = dict(words=np.zeros((2, 4), np.uint32), scales=np.ones((2, 1), np.float32),
                biases=np.ones((2, 1), np.float32), bits=4, group_size=32, cols=32)
    call.update(args)
    with pytest.raises(error, match=message):
        dequantize_affine(**call)
