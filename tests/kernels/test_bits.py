"""Tests of the half-precision bit helpers: exact decoding, grid floors and stochastic rounding."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightmark.kernels.bits import (
    BF16,
    F16,
    bf16_floor,
    bf16_stochastic_round,
    bf16_to_f64,
    f16_floor,
    f16_stochastic_round,
    f16_to_f64,
)

from . import twins

ALL_PATTERNS = np.arange(1 << 16, dtype=np.uint16)


# Python cannot call the inlined helpers directly: these small jitted loops do.
@numba.njit
def _decode_bf16(bits: np.ndarray, out: np.ndarray) -> None:
    for i in range(bits.shape[0]):
        out[i] = bf16_to_f64(bits[i])


@numba.njit
def _decode_f16(bits: np.ndarray, out: np.ndarray) -> None:
    for i in range(bits.shape[0]):
        out[i] = f16_to_f64(bits[i])


@numba.njit
def _floor_bf16(a: np.ndarray, out: np.ndarray) -> None:
    for i in range(a.shape[0]):
        out[i] = bf16_floor(a[i])


@numba.njit
def _floor_f16(a: np.ndarray, out: np.ndarray) -> None:
    for i in range(a.shape[0]):
        out[i] = f16_floor(a[i])


@numba.njit
def _round_bf16(bits: np.ndarray, delta: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    for i in range(bits.shape[0]):
        out[i] = bf16_stochastic_round(bits[i], delta[i], u[i])


@numba.njit
def _round_f16(bits: np.ndarray, delta: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    for i in range(bits.shape[0]):
        out[i] = f16_stochastic_round(bits[i], delta[i], u[i])


def kernel_decode(bits: np.ndarray, kind: int) -> np.ndarray:
    """Decode with the kernel helper of `kind`."""
    out = np.empty(bits.shape[0], dtype=np.float64)
    (_decode_bf16 if kind == BF16 else _decode_f16)(np.ascontiguousarray(bits, np.uint16), out)
    return out


def kernel_floor(a: np.ndarray, kind: int) -> np.ndarray:
    """Grid floor with the kernel helper of `kind`."""
    out = np.empty(a.shape[0], dtype=np.uint32)
    (_floor_bf16 if kind == BF16 else _floor_f16)(np.ascontiguousarray(a, np.float64), out)
    return out


def kernel_round(bits: np.ndarray, delta: np.ndarray, u: np.ndarray, kind: int) -> np.ndarray:
    """Stochastic rounding with the kernel helper of `kind`."""
    out = np.empty(bits.shape[0], dtype=np.uint16)
    fn = _round_bf16 if kind == BF16 else _round_f16
    fn(
        np.ascontiguousarray(bits, np.uint16),
        np.ascontiguousarray(delta, np.float64),
        np.ascontiguousarray(u, np.float64),
        out,
    )
    return out


def _assert_same_values(got: np.ndarray, want: np.ndarray) -> None:
    """Equal as float64 bit patterns, except that any NaN matches any NaN."""
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    bad = np.flatnonzero(got[finite].view(np.uint64) != want[finite].view(np.uint64))
    assert bad.size == 0, (
        f"first mismatch at {bad[:5]}: {got[finite][bad[:5]]} vs {want[finite][bad[:5]]}"
    )


# ------------------------------------------------------------------------------ decoding


def test_bf16_decoding_of_all_patterns() -> None:
    _assert_same_values(kernel_decode(ALL_PATTERNS, BF16), twins.bf16_decode(ALL_PATTERNS))


def test_f16_decoding_of_all_patterns() -> None:
    _assert_same_values(kernel_decode(ALL_PATTERNS, F16), twins.f16_decode(ALL_PATTERNS))


def test_decoding_landmarks() -> None:
    bits = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0xFC00])
    want = [0.0, -0.0, 2.0**-24, 1023 * 2.0**-24, 2.0**-14, 1.0, 65504.0, np.inf, -np.inf]
    _assert_same_values(kernel_decode(bits, F16), np.array(want))
    bits = np.array([0x0000, 0x8000, 0x0001, 0x3F80, 0xBF80, 0x7F7F, 0x7F80, 0x0080])
    want = [0.0, -0.0, 2.0**-133, 1.0, -1.0, 3.3895313892515355e38, np.inf, 2.0**-126]
    _assert_same_values(kernel_decode(bits, BF16), np.array(want))
    assert np.isnan(kernel_decode(np.array([0x7FC0, 0xFFFF, 0x7F81]), BF16)).all()
    assert np.isnan(kernel_decode(np.array([0x7E00, 0xFFFF, 0x7C01]), F16)).all()


# ------------------------------------------------------------------------------ floors


def _edge_values(kind: int) -> np.ndarray:
    """Every grid value, its float64 neighbours and midpoints, plus zero, inf and the max region."""
    positive = ALL_PATTERNS[: 0x7F80 if kind == BF16 else 0x7C00]
    grid = twins.decode(positive, kind)
    nxt = twins.decode(positive + 1, kind)
    midpoints = grid + (np.minimum(nxt, 1e300) - grid) / 2.0
    largest = grid[-1]
    values = [
        grid,
        np.nextafter(grid, np.inf),
        np.nextafter(grid, 0.0),
        midpoints,
        np.nextafter(midpoints, 0.0),
        np.array([0.0, 5e-324, 1e-300, np.inf, 1e300, largest * 1.5, largest * 2.0]),
        np.nextafter(largest, np.inf) * np.array([1.0, 1.0 + 2.0**-10, 1.0 + 2.0**-7]),
    ]
    with np.errstate(over="ignore"):
        values.append(np.array([float(np.float32(3.4028234663852886e38)), 65519.99, 65520.0]))
    return np.concatenate(values)


@pytest.mark.parametrize("kind", [BF16, F16])
def test_floor_twins_agree_with_each_other(kind: int) -> None:
    values = _edge_values(kind)
    by_ulp = twins.floor_by_ulp(values, kind)
    if kind == F16:
        np.testing.assert_array_equal(twins.f16_floor_twin(values), by_ulp)
    lo = twins.decode(by_ulp.astype(np.uint16), kind)
    hi = twins.decode((by_ulp + 1).astype(np.uint16), kind)
    assert np.all(lo <= values)
    clamped = by_ulp == (twins.BF16_MAX_BITS if kind == BF16 else twins.F16_MAX_BITS)
    assert np.all((hi > values) | clamped)


@pytest.mark.parametrize("kind", [BF16, F16])
def test_floor_on_edge_values(kind: int) -> None:
    values = _edge_values(kind)
    got = kernel_floor(values, kind)
    want = twins.floor_twin(values, kind)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"a={values[bad[:5]]!r}: got {got[bad[:5]]}, want {want[bad[:5]]}"


_NON_NEGATIVE = st.one_of(
    st.floats(min_value=0.0, allow_infinity=True, allow_nan=False, allow_subnormal=True),
    st.floats(min_value=0.0, max_value=70000.0),
    st.floats(min_value=0.0, max_value=2.0**-13),
    st.floats(min_value=0.0, max_value=1e-38),
    st.floats(min_value=3.3e38, max_value=3.5e38),
)


@settings(deadline=None, max_examples=60)
@given(values=st.lists(_NON_NEGATIVE, min_size=1, max_size=64), kind=st.sampled_from([BF16, F16]))
def test_floor_matches_twin_on_generated_values(values: list[float], kind: int) -> None:
    a = np.array(values, dtype=np.float64)
    np.testing.assert_array_equal(kernel_floor(a, kind), twins.floor_twin(a, kind))


@pytest.mark.parametrize("kind", [BF16, F16])
def test_floor_matches_twin_on_random_values(kind: int) -> None:
    rng = np.random.default_rng(7 + kind)
    a = np.concatenate(
        [
            np.abs(rng.standard_normal(20_000)) * 0.05,
            np.exp(rng.uniform(-110.0, 90.0, 20_000)),
            np.abs(rng.standard_normal(5_000)) * 2.0**-20,
            rng.uniform(0.0, 70000.0, 5_000),
        ]
    )
    np.testing.assert_array_equal(kernel_floor(a, kind), twins.floor_twin(a, kind))


# ------------------------------------------------------------------------------ rounding


@settings(deadline=None, max_examples=60)
@given(
    bits=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=32),
    delta_scale=st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 10.0, 1e4, 1e37]),
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from([BF16, F16]),
)
def test_stochastic_round_matches_twin(
    bits: list[int], delta_scale: float, seed: int, kind: int
) -> None:
    rng = np.random.default_rng(seed)
    pattern = np.array(bits, dtype=np.uint16)
    delta = rng.standard_normal(pattern.size) * delta_scale
    u = rng.random(pattern.size)
    u[: pattern.size // 4] = 0.0
    np.testing.assert_array_equal(
        kernel_round(pattern, delta, u, kind), twins.stochastic_round_twin(pattern, delta, u, kind)
    )


@pytest.mark.parametrize("kind", [BF16, F16])
def test_stochastic_round_edge_cases(kind: int) -> None:
    one = 0x3F80 if kind == BF16 else 0x3C00
    largest = twins.BF16_MAX_BITS if kind == BF16 else twins.F16_MAX_BITS
    ulp_at_one = 2.0**-7 if kind == BF16 else 2.0**-10
    nan, inf = (0x7FC1, 0x7F80) if kind == BF16 else (0x7E01, 0x7C00)
    cases = [
        # (bits, delta, u, expected bits)
        (one, 0.0, 0.0, one),
        (one, ulp_at_one / 4, 0.0, one + 1),  # u = 0 rounds up whenever |x| > lo
        (one, ulp_at_one / 4, 0.25, one),  # u * ulp == |x| - lo: stays down
        (one, ulp_at_one / 4, 0.2499, one + 1),
        (one, -2.0, 0.9, one | 0x8000),  # 1 - 2 = -1 exactly
        (largest, 1e37 if kind == BF16 else 100.0, 0.0, largest),  # never rounds up to inf
        (largest | 0x8000, -1e37 if kind == BF16 else -100.0, 0.0, largest | 0x8000),
        (nan, 1.0, 0.0, nan),  # non-finite weights pass through unchanged
        (inf, -1.0, 0.0, inf),
        (inf | 0x8000, 1.0, 0.0, inf | 0x8000),
        (0x8000, 0.0, 0.0, 0x0000),  # -0 + 0 is +0: the sign follows x < 0
        (0x0001, -(2.0**-134 if kind == BF16 else 2.0**-25), 0.9, 0x0000),
    ]
    bits, delta, u, want = (np.array(column) for column in zip(*cases, strict=True))
    got = kernel_round(bits.astype(np.uint16), delta.astype(np.float64), u.astype(np.float64), kind)
    np.testing.assert_array_equal(got, want.astype(np.uint16))
    twin = twins.stochastic_round_twin(bits.astype(np.uint16), delta, u, kind)
    np.testing.assert_array_equal(twin, want.astype(np.uint16))
