"""Tests of packed-codeword scoring against the numpy twin."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightmark.kernels import score_codewords

from . import twins


@settings(deadline=None, max_examples=60)
@given(
    count=st.integers(0, 40),
    nbytes=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    spread=st.sampled_from([1e-3, 1.0, 1e6]),
)
def test_score_matches_twin(count: int, nbytes: int, seed: int, spread: float) -> None:
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, size=(count, nbytes), dtype=np.uint8)
    z = rng.standard_normal(nbytes * 8) * spread
    got = score_codewords(packed, z)
    assert got.shape == (count,) and got.dtype == np.float64
    np.testing.assert_allclose(
        got, twins.score_twin(packed, z), rtol=0, atol=1e-9 * np.abs(z).sum()
    )


def test_score_landmarks() -> None:
    z = np.arange(1.0, 17.0)
    packed = np.array([[0xFF, 0xFF], [0x00, 0x00], [0x80, 0x00], [0x00, 0x01]], dtype=np.uint8)
    # bit 1 -> +1, bit 0 -> -1; the first position is the most significant bit of byte 0.
    want = [z.sum(), -z.sum(), -z.sum() + 2 * z[0], -z.sum() + 2 * z[15]]
    np.testing.assert_allclose(score_codewords(packed, z), want, rtol=1e-15)
    codes = np.where(np.random.default_rng(1).random((3, 16)) < 0.5, 1, -1)
    packed = np.packbits(codes > 0, axis=1)
    np.testing.assert_allclose(score_codewords(packed, z), codes @ z, rtol=1e-12)


def test_score_accepts_non_contiguous_input() -> None:
    rng = np.random.default_rng(2)
    packed = rng.integers(0, 256, size=(6, 8), dtype=np.uint8)
    z = rng.standard_normal(64)
    strided = np.asfortranarray(packed)
    np.testing.assert_allclose(score_codewords(strided, z), twins.score_twin(packed, z), atol=1e-9)
    wide = np.repeat(z, 2)[::2]
    np.testing.assert_allclose(
        score_codewords(packed, wide), twins.score_twin(packed, z), atol=1e-9
    )


@pytest.mark.parametrize(
    ("packed", "z"),
    [
        (np.zeros((2, 3), np.int8), np.zeros(24)),  # not uint8
        (np.zeros(3, np.uint8), np.zeros(24)),  # 1-D
        (np.zeros((2, 3), np.uint8), np.zeros(23)),  # length is not 8 * bytes
        (np.zeros((2, 3), np.uint8), np.zeros(24, np.float32)),
        (np.zeros((2, 3), np.uint8), np.zeros((24, 1))),
    ],
)
def test_score_rejects_bad_input(packed: np.ndarray, z: np.ndarray) -> None:
    with pytest.raises(ValueError):
        score_codewords(packed, z)
