"""The vectorised embed kernels give the bits of the element-wise reference, on every input.

The reference is the element-wise formula composed from the unchanged helpers (element_hash,
chip_of, position_of, uniform_of, bf16/f16_stochastic_round): what every copy issued so far was
stamped with. It also covers inputs the numpy twins leave out (a NaN or infinite alpha, codeword
entries other than +-1), where the twins' rounding differs from the kernels' in NaN payloads.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from weightmark.kernels import BF16, F16, FLOAT, embed
from weightmark.kernels.bits import (
    BF16_ROUND_DOMAIN,
    F16_ROUND_DOMAIN,
    bf16_round_bits,
    bf16_stochastic_round,
    bf16_to_f64,
    f16_round_bits,
    f16_stochastic_round,
    f16_to_f64,
    outside_bf16,
    outside_f16,
)
from weightmark.kernels.prng import (
    chip_of,
    chip_times,
    counter_of,
    draw_of,
    element_hash,
    mix64,
    position_of,
    short_position_of,
    uniform_of,
)

from . import twins
from .test_dense import KINDS, carriers

# ------------------------------------------------------------------------------ the reference


@numba.njit
def _reference_amplitude(alpha: float, scale: float) -> float:
    s = np.float64(scale)
    if s > 0.0 and np.isfinite(s):
        return alpha * s
    return 0.0


@numba.njit
def _reference_float(w, out, row_scale, codeword, seed, alpha):  # type: ignore[no-untyped-def]
    rows, cols = w.shape
    for r in range(rows):
        amplitude = _reference_amplitude(alpha, row_scale[r])
        for c in range(cols):
            if amplitude == 0.0:
                out[r, c] = w[r, c]
                continue
            h = element_hash(seed, r * cols + c)
            p = position_of(h, codeword.shape[0])
            delta = amplitude * chip_of(h) * np.float64(codeword[p])
            out[r, c] = np.float64(w[r, c]) + delta


@numba.njit
def _reference_grid(w, out, row_scale, codeword, seed, alpha, bf16):  # type: ignore[no-untyped-def]
    rows, cols = w.shape
    for r in range(rows):
        amplitude = _reference_amplitude(alpha, row_scale[r])
        for c in range(cols):
            if amplitude == 0.0:
                out[r, c] = w[r, c]
                continue
            h = element_hash(seed, r * cols + c)
            p = position_of(h, codeword.shape[0])
            delta = amplitude * chip_of(h) * np.float64(codeword[p])
            if bf16:
                out[r, c] = bf16_stochastic_round(w[r, c], delta, uniform_of(h))
            else:
                out[r, c] = f16_stochastic_round(w[r, c], delta, uniform_of(h))


def reference_embed(weights: np.ndarray, kind: int, row_scale: np.ndarray, codeword: np.ndarray,
                    seed: int, alpha: float) -> np.ndarray:
    """The stamped carrier, element by element with the reference helpers."""
    out = np.empty_like(weights)
    if kind == FLOAT:
        _reference_float(weights, out, row_scale, codeword, np.uint64(seed), float(alpha))
    else:
        _reference_grid(weights, out, row_scale, codeword, np.uint64(seed), float(alpha), kind == BF16)
    return out


def assert_same_bytes(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.view(np.uint8).reshape(got.shape[0], -1), want.view(np.uint8).reshape(want.shape[0], -1)
    bad = np.argwhere(g != w)
    assert bad.size == 0, f"{len(bad)} bytes differ, first at (row, byte) {bad[:5].tolist()}"


# ------------------------------------------------------------------------------ strategies

# Shapes with a single row or column and odd lengths around the vector widths.
SHAPES = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 70)),
    st.tuples(st.just(1), st.integers(1, 200)),
    st.tuples(st.integers(1, 40), st.just(1)),
)
ALPHAS = st.one_of(
    st.sampled_from([0.002, 0.02, 1.0]),
    st.floats(-2.0, 2.0),
    st.sampled_from([np.inf, -np.inf, np.nan, 1e300, -1e300, 5e-324, 1e-300, 0.0, -0.0]),
)
SCALES = st.one_of(
    st.floats(0.0, 2.0, width=32),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e-45, 1e-38, 3.4e38, 1e-320, 1e300, np.nan, np.inf]),
)
CODE_VALUES = st.one_of(st.sampled_from([-1, 1]), st.integers(-128, 127))


@st.composite
def embed_cases(draw: st.DrawFn, kind_name: str) -> tuple:
    shape = draw(SHAPES)
    weights = draw(carriers(kind_name, shape))
    if kind_name == "f32" and draw(st.booleans()):
        weights = weights.astype(np.float64)
    scale_dtype = draw(st.sampled_from([np.float32, np.float64]))
    with np.errstate(over="ignore"):
        row_scale = draw(hnp.arrays(np.float64, shape[0], elements=SCALES)).astype(scale_dtype)
    length = draw(st.integers(1, 50))
    if draw(st.booleans()):
        codeword = draw(hnp.arrays(np.int8, length, elements=st.sampled_from([-1, 1])))
    else:
        codeword = draw(hnp.arrays(np.int8, length, elements=CODE_VALUES))
    return weights, row_scale, codeword, draw(st.integers(0, 2**64 - 1)), draw(ALPHAS)


# ------------------------------------------------------------------------------ whole kernels


@pytest.mark.parametrize("kind_name", ["f32", "bf16", "f16"])
@settings(deadline=None, max_examples=80)
@given(data=st.data())
def test_embed_matches_the_elementwise_reference(kind_name: str, data: st.DataObject) -> None:
    weights, row_scale, codeword, seed, alpha = data.draw(embed_cases(kind_name))
    kind = KINDS[kind_name]
    got = embed(weights, kind, row_scale, codeword, seed, alpha)
    assert_same_bytes(got, reference_embed(weights, kind, row_scale, codeword, seed, alpha))


@pytest.mark.parametrize("kind", [BF16, F16])
@pytest.mark.parametrize("alpha", [0.002, 1.0, 1e30, np.inf, np.nan, -0.5])
def test_every_pattern_at_many_amplitudes(kind: int, alpha: float) -> None:
    """All 65,536 patterns, each row at another amplitude from 1e-45 to 3e38 (and non-finite)."""
    patterns = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    scale = np.logspace(-45, 38, 256).astype(np.float32)
    scale[::17] = [0.0, -1.0, np.nan, np.inf, 1e-45, 3.4e38, 1.0, 0.5, -0.0, 2.0, 1e-40, 1e-20,
                   1e20, 7.0, 0.125, 1e-30]
    rng = np.random.default_rng(kind)
    for codeword in (np.where(rng.random(61) < 0.5, 1, -1).astype(np.int8),
                     np.array([1, -1, 0, 127, -128, 3], dtype=np.int8)):
        got = embed(patterns, kind, scale, codeword, 0xC0FFEE, alpha)
        assert_same_bytes(got, reference_embed(patterns, kind, scale, codeword, 0xC0FFEE, alpha))


@pytest.mark.parametrize("kind", [BF16, F16])
def test_rows_redone_by_the_reference_rounding(kind: int) -> None:
    """Rows where w + delta is zero, tiny or infinite, or w is not finite, beside plain rows."""
    rng = np.random.default_rng(11)
    values = rng.standard_normal((8, 37)) * 0.05
    bits = twins.round_nearest_twin(values, kind).reshape(8, 37)
    w = twins.decode(bits, kind)
    code = np.ones(3, dtype=np.int8)
    seed = 5
    delta, _ = twins.deltas_twin(bits.shape, np.ones(8), code, seed, 1.0)  # the chips
    scale = np.abs(w[:, 3]).astype(np.float64)  # amplitude |w[r, 3]|: delta[r, 3] = +-w[r, 3]
    cancel = np.sign(delta[:, 3]) != np.sign(w[:, 3])
    r = int(np.flatnonzero(cancel)[0])  # row r has w + delta == 0 exactly at column 3
    scale[r + 1 if r + 1 < 8 else 0] = 1e-44 if kind == BF16 else 1e-9  # tiny sums
    nan, inf = (0x7FC0, 0x7F80) if kind == BF16 else (0x7E00, 0x7C00)
    bits[6, 5], bits[7, 9] = nan, inf | 0x8000
    got = embed(bits, kind, scale, code, seed, 1.0)
    assert_same_bytes(got, reference_embed(bits, kind, scale, code, seed, 1.0))
    assert got[r, 3] == 0 and got[6, 5] == nan and got[7, 9] == inf | 0x8000


def test_f16_sums_just_past_a_step_boundary_below_2_to_minus_14() -> None:
    """|x| = (k + u) * 2**-24 plus a quarter of 2**-66: |x| + 2**-14 rounds that quarter away, so
    the rounding on its bits would stay down where the reference steps up; such rows are redone."""
    rows, cols, seed = 12, 9, 77
    code = np.ones(1, dtype=np.int8)
    h = twins.hash_twin(seed, np.arange(rows * cols, dtype=np.uint64)).reshape(rows, cols)
    draws = ((h >> np.uint64(32)) & np.uint64(0x7FFFFFFF)).astype(np.float64)
    bits = np.zeros((rows, cols), dtype=np.uint16)  # w = 0: x = +-amplitude
    column = np.arange(rows) % cols
    k = 3.0 + np.arange(rows)
    tie = (k + draws[np.arange(rows), column] * 2.0**-31) * 2.0**-24
    scale = tie + 2.0**-68  # exactly representable: |x| is about 2**-22
    assert np.all(scale - tie == 2.0**-68)
    got = embed(bits, F16, scale, code, seed, 1.0)
    want = reference_embed(bits, F16, scale, code, seed, 1.0)
    assert_same_bytes(got, want)
    # At the crafted element the reference steps up from k to k + 1 (sign aside).
    np.testing.assert_array_equal(want[np.arange(rows), column] & 0x7FFF, k.astype(np.uint16) + 1)


def test_realistic_carriers_match_the_reference() -> None:
    rng = np.random.default_rng(2024)
    values = rng.standard_normal((48, 515)) * 0.02
    scale = np.sqrt(np.mean(values * values, axis=1)).astype(np.float32)
    code = np.where(rng.random(4096) < 0.5, 1, -1).astype(np.int8)
    for kind in (BF16, F16):
        bits = twins.round_nearest_twin(values, kind).reshape(values.shape)
        got = embed(bits, kind, scale, code, 99, 0.002)
        assert_same_bytes(got, reference_embed(bits, kind, scale, code, 99, 0.002))
    for dtype in (np.float32, np.float64):
        got = embed(values.astype(dtype), FLOAT, scale, code, 99, 0.002)
        assert_same_bytes(got, reference_embed(values.astype(dtype), FLOAT, scale, code, 99, 0.002))


def test_codewords_longer_than_32_bits_of_positions_are_refused() -> None:
    huge = np.broadcast_to(np.int8(1), (2**32,))  # no memory behind it
    with pytest.raises(ValueError, match="at most"):
        embed(np.zeros((2, 2), np.float32), FLOAT, np.ones(2), huge, 1, 0.01)


# ------------------------------------------------------------------------------ the helpers


@numba.njit
def _round_bits_loop(bits, delta, draws, bf16, out, outside):  # type: ignore[no-untyped-def]
    for i in range(bits.shape[0]):
        if bf16:
            x = bf16_to_f64(bits[i]) + delta[i]
            out[i] = bf16_round_bits(x, draws[i])
            outside[i] = outside_bf16(x)
        else:
            x = f16_to_f64(bits[i]) + delta[i]
            out[i] = f16_round_bits(x, draws[i])
            outside[i] = outside_f16(x)


@numba.njit
def _reference_round_loop(bits, delta, draws, bf16, out):  # type: ignore[no-untyped-def]
    for i in range(bits.shape[0]):
        u = np.float64(draws[i]) * (1.0 / 2147483648.0)
        if bf16:
            out[i] = bf16_stochastic_round(bits[i], delta[i], u)
        else:
            out[i] = f16_stochastic_round(bits[i], delta[i], u)


def _tie_deltas(bits: np.ndarray, draws: np.ndarray, kind: int) -> np.ndarray:
    """Deltas putting |w + delta| - lo exactly at u * (hi - lo), and one float64 step either side."""
    shift = 45 if kind == BF16 else 42
    w = twins.decode(bits, kind)
    a = np.abs(w)
    lo_bits = a.view(np.uint64) & ~np.uint64((1 << shift) - 1)
    x = (lo_bits | (draws.astype(np.uint64) << np.uint64(shift - 31))).view(np.float64)
    x = np.where(w < 0, -x, x)
    return np.concatenate([x - w, np.nextafter(x, np.inf) - w, np.nextafter(x, -np.inf) - w])


@pytest.mark.parametrize("kind", [BF16, F16])
def test_round_bits_equal_the_reference_rounding_in_their_domain(kind: int) -> None:
    rng = np.random.default_rng(3 + kind)
    finite = np.arange(1 << 16, dtype=np.uint16)
    finite = finite[np.isfinite(twins.decode(finite, kind))]
    bits = np.concatenate([finite] * 4)
    n = bits.size
    draws = rng.integers(0, 2**31, n, dtype=np.int64)
    draws[: n // 8] = 0
    draws[n // 8 : n // 4] = 2**31 - 1
    w = twins.decode(bits, kind)
    delta = np.concatenate([
        rng.standard_normal(n // 4) * np.abs(w[: n // 4]) * 0.01,  # within a few grid steps
        rng.standard_normal(n // 4) * 10.0 ** rng.uniform(-40, 38, n // 4),
        -w[n // 2 : 3 * n // 4] * (1.0 + rng.standard_normal(n // 4) * 1e-6),  # near cancellation
        rng.choice([1e308, -1e308, 5e-324, -5e-324, 2.0**-126, 2.0**-14], n - 3 * n // 4),
    ])
    tie_bits = np.concatenate([bits[: n // 4]] * 3)
    tie_draws = np.concatenate([draws[: n // 4]] * 3)
    with np.errstate(over="ignore", invalid="ignore"):
        tie_delta = _tie_deltas(bits[: n // 4], draws[: n // 4], kind)
    bits = np.concatenate([bits, tie_bits])
    draws = np.concatenate([draws, tie_draws]).astype(np.uint64)
    delta = np.concatenate([delta, tie_delta])
    ok = np.isfinite(delta)
    bits, draws, delta = bits[ok], draws[ok], delta[ok]

    got = np.empty(bits.size, np.uint16)
    outside = np.empty(bits.size, np.uint64)
    want = np.empty(bits.size, np.uint16)
    bf16 = kind == BF16
    _round_bits_loop(bits, delta, draws, bf16, got, outside)
    _reference_round_loop(bits, delta, draws, bf16, want)
    inside = outside < (BF16_ROUND_DOMAIN if bf16 else F16_ROUND_DOMAIN)
    # The domain is what it says: nonzero (bf16: at least 2**-126) and finite sums; for f16,
    # less the sums below 2**-14 whose |x| + 2**-14 ends in eleven zero bits.
    x = twins.decode(bits, kind) + delta
    low = 2.0**-126 if bf16 else 0.0
    domain = (np.abs(x) >= low) & (np.abs(x) > 0) & np.isfinite(x)
    if not bf16:
        tiny = np.abs(x) < 2.0**-14
        with np.errstate(invalid="ignore"):
            ends = ((np.abs(x) + 2.0**-14).view(np.uint64) & np.uint64(0x7FF)) == 0
        domain &= ~(tiny & ends)
        assert (tiny & domain).sum() > 1000  # the below-normal path is exercised
    np.testing.assert_array_equal(inside, domain)
    assert inside.mean() > 0.8
    bad = np.flatnonzero(inside & (got != want))
    assert bad.size == 0, f"bits {bits[bad[:5]]}, delta {delta[bad[:5]]}: {got[bad[:5]]} vs {want[bad[:5]]}"


@numba.njit
def _helper_values(seed, start, count, code_length, value):  # type: ignore[no-untyped-def]
    same = 0
    z = counter_of(seed, start)
    for j in range(start, start + count):
        h = element_hash(seed, j)
        same += mix64(z) == h
        same += short_position_of(h, code_length) == position_of(h, code_length)
        same += np.float64(draw_of(h)) * (1.0 / 2147483648.0) == uniform_of(h)
        flipped = chip_times(h, value)
        same += np.float64(flipped) == chip_of(h) * value and np.signbit(flipped) == np.signbit(chip_of(h) * value)
        z += np.uint64(0x9E3779B97F4A7C15)
    return same


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 2**64 - 1),
    start=st.integers(0, 2**62),
    code_length=st.one_of(st.integers(1, 5000), st.integers(1, 2**32 - 1)),
    value=st.floats(allow_nan=False),
)
def test_row_helpers_agree_with_the_element_helpers(seed: int, start: int, code_length: int,
                                                    value: float) -> None:
    count = 64
    assert _helper_values(np.uint64(seed), start, count, code_length, value) == 4 * count
