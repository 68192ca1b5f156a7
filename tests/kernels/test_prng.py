"""Tests of the keyed counter hash: bit-exact against the twin, and statistically sane."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightmark.kernels import element_hashes

from . import twins

SEEDS = st.integers(0, 2**64 - 1)


def test_known_values() -> None:
    # SplitMix64 seeded with 0: its first outputs are the published reference sequence.
    got = element_hashes(0, 0, 3)
    want = np.array([0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F], dtype=np.uint64)
    np.testing.assert_array_equal(got, want)


@settings(deadline=None, max_examples=80)
@given(seed=SEEDS, start=st.integers(0, 2**62), count=st.integers(0, 300))
def test_element_hashes_match_twin(seed: int, start: int, count: int) -> None:
    got = element_hashes(seed, start, count)
    assert got.dtype == np.uint64 and got.shape == (count,)
    want = twins.hash_twin(seed, np.arange(count, dtype=np.uint64) + np.uint64(start))
    np.testing.assert_array_equal(got, want)


def test_hashes_are_counter_based() -> None:
    whole = element_hashes(99, 0, 1000)
    np.testing.assert_array_equal(element_hashes(99, 400, 17), whole[400:417])
    assert np.unique(whole).size == whole.size
    assert not np.array_equal(element_hashes(100, 0, 1000), whole)


def test_rejects_negative_arguments() -> None:
    with pytest.raises(ValueError):
        element_hashes(1, -1, 4)
    with pytest.raises(ValueError):
        element_hashes(1, 0, -4)


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, 2**64 - 1])
def test_chips_are_balanced(seed: int) -> None:
    n = 200_000
    chips, _, _ = twins.chips_positions_uniforms(seed, n, 64)
    np.testing.assert_array_equal(
        chips, np.where(element_hashes(seed, 0, n) >> np.uint64(63), -1.0, 1.0)
    )
    # The mean of n fair +-1 chips has standard deviation 1/sqrt(n): allow 5 of them.
    assert abs(chips.mean()) < 5.0 / np.sqrt(n)


@pytest.mark.parametrize("code_length", [1, 2, 97, 4096])
def test_positions_are_uniform(code_length: int) -> None:
    n = 200_000
    _, positions, _ = twins.chips_positions_uniforms(12345, n, code_length)
    assert positions.min() >= 0 and positions.max() < code_length
    counts = np.bincount(positions, minlength=code_length)
    expected = n / code_length
    chi2 = float(np.sum((counts - expected) ** 2) / expected)
    dof = code_length - 1
    # Mean dof, sd sqrt(2 dof); a half-range (or otherwise lopsided) map gives chi2 ~ n.
    assert chi2 < dof + 8.0 * np.sqrt(2.0 * dof) + 10.0, chi2
    if code_length > 1:
        assert np.all(counts > 0)


def test_half_range_positions_would_fail_the_check() -> None:
    # The uniformity bound above is loose, but not blind: hitting half the range is rejected.
    n, code_length = 200_000, 97
    _, positions, _ = twins.chips_positions_uniforms(12345, n, code_length)
    counts = np.bincount(positions // 2, minlength=code_length)
    chi2 = float(np.sum((counts - n / code_length) ** 2) / (n / code_length))
    assert chi2 > 10 * code_length


def test_uniforms_and_chip_position_independence() -> None:
    n, code_length = 200_000, 16
    chips, positions, uniforms = twins.chips_positions_uniforms(2024, n, code_length)
    assert uniforms.min() >= 0.0 and uniforms.max() < 1.0
    assert abs(uniforms.mean() - 0.5) < 5.0 * np.sqrt(1 / 12 / n)
    # Within every position the chips stay balanced, and the uniform is unrelated to the chip.
    per_position = np.bincount(positions, weights=chips, minlength=code_length)
    sizes = np.bincount(positions, minlength=code_length)
    assert np.all(np.abs(per_position) < 5.0 * np.sqrt(sizes))
    assert abs(np.mean(chips * (uniforms - 0.5))) < 5.0 * np.sqrt(1 / 12 / n)
