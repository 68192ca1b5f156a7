"""Tests of embed and extract over dense carriers against the numpy twins, plus input checks."""

from __future__ import annotations

import itertools
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from weightmark.kernels import BF16, F16, FLOAT, embed, extract

from . import twins

KINDS = {"f32": FLOAT, "bf16": BF16, "f16": F16}
DTYPES = {"f32": np.float32, "bf16": np.uint16, "f16": np.uint16}

# ------------------------------------------------------------------------------ strategies

SHAPES = st.tuples(st.integers(1, 9), st.integers(1, 33))
SEEDS = st.integers(0, 2**64 - 1)
ALPHAS = st.one_of(st.sampled_from([0.0, 0.002, 0.1, 1.0]), st.floats(0.0, 1.0))
SCALES = st.one_of(
    st.floats(0.0, 2.0, width=32),
    st.sampled_from([0.0, -0.05, 1e-3, 0.05, 1.0, 30.0, 1e4, 1e37]),
)
# Extraction skips rows whose scale is not a positive finite number.
EXTRACT_SCALES = st.one_of(
    st.floats(2.0**-20, 2.0, width=32),
    st.sampled_from([0.0, -0.0, -1.0, 1e-3, 0.05, 1e4, np.nan, np.inf, -np.inf]),
)


def _realistic_f32() -> st.SearchStrategy[float]:
    return st.floats(-0.25, 0.25, width=32)


F32_VALUES = st.one_of(
    st.floats(width=32),  # anything: NaN, +-inf, subnormals, +-0, huge
    _realistic_f32(),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38]),
)


def _bits_of(kind: int, value: float) -> int:
    """Nearest grid pattern of a finite value, as a Python int."""
    return int(twins.round_nearest_twin(np.array([value]), kind)[0])


def _pattern_values(kind: int) -> st.SearchStrategy[int]:
    if kind == BF16:
        specials = [
            0x0000,
            0x8000,
            0x0001,
            0x8001,
            0x007F,
            0x0080,
            0x7F7F,
            0xFF7F,
            0x7F80,
            0xFF80,
            0x7FC0,
            0xFFC1,
            0x7F81,
            0x3F80,
        ]
    else:
        specials = [
            0x0000,
            0x8000,
            0x0001,
            0x8001,
            0x03FF,
            0x0400,
            0x7BFF,
            0xFBFF,
            0x7C00,
            0xFC00,
            0x7E00,
            0xFE01,
            0x7C01,
            0x3C00,
        ]
    return st.one_of(
        st.integers(0, 0xFFFF),  # any pattern, NaNs and infinities included
        _realistic_f32().map(lambda v: _bits_of(kind, v)),
        st.floats(-1e-5, 1e-5).map(lambda v: _bits_of(kind, v)),  # f16 subnormals
        st.sampled_from(specials),
    )


def carriers(kind_name: str, shape: tuple[int, int]) -> st.SearchStrategy[np.ndarray]:
    """Arrays of the storage dtype of `kind_name` with a mix of edge and realistic values."""
    if kind_name == "f32":
        return hnp.arrays(np.float32, shape, elements=F32_VALUES)
    return hnp.arrays(np.uint16, shape, elements=_pattern_values(KINDS[kind_name]))


@st.composite
def embed_cases(draw: st.DrawFn, kind_name: str) -> tuple:
    shape = draw(SHAPES)
    weights = draw(carriers(kind_name, shape))
    scale_dtype = draw(st.sampled_from([np.float32, np.float64]))
    row_scale = draw(hnp.arrays(scale_dtype, shape[0], elements=SCALES))
    code_length = draw(st.integers(1, 40))
    codeword = draw(hnp.arrays(np.int8, code_length, elements=st.sampled_from([-1, 1])))
    return weights, row_scale, codeword, draw(SEEDS), draw(ALPHAS)


def _assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype.kind == "f":
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got), nan)
        uint = np.uint32 if got.dtype == np.float32 else np.uint64
        got, want = got.view(uint)[~nan], want.view(uint)[~nan]
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (
        f"{bad.size} mismatches, first at {bad[:5]}: {got[bad[:5]]} vs {want[bad[:5]]}"
    )


# ------------------------------------------------------------------------------ embed


@settings(deadline=None, max_examples=60)
@given(case=embed_cases("f32"), as_f64=st.booleans())
def test_embed_float_matches_twin(case: tuple, as_f64: bool) -> None:
    weights, row_scale, codeword, seed, alpha = case
    if as_f64:
        weights = weights.astype(np.float64)
    got = embed(weights, FLOAT, row_scale, codeword, seed, alpha)
    _assert_bits_equal(got, twins.embed_twin(weights, FLOAT, row_scale, codeword, seed, alpha))


@pytest.mark.parametrize("kind_name", ["bf16", "f16"])
@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_embed_grid_matches_twin(kind_name: str, data: st.DataObject) -> None:
    weights, row_scale, codeword, seed, alpha = data.draw(embed_cases(kind_name))
    kind = KINDS[kind_name]
    before = weights.copy()
    got = embed(weights, kind, row_scale, codeword, seed, alpha)
    np.testing.assert_array_equal(weights, before)  # the input is not touched
    _assert_bits_equal(got, twins.embed_twin(weights, kind, row_scale, codeword, seed, alpha))
    non_finite = ~np.isfinite(twins.decode(weights, kind))
    np.testing.assert_array_equal(got[non_finite], weights[non_finite])


def test_embed_writes_into_out_and_handles_empty() -> None:
    weights = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    out = np.full_like(weights, np.nan)
    code = np.array([1, -1, 1], dtype=np.int8)
    result = embed(weights, FLOAT, np.ones(3), code, 5, 0.01, out=out)
    assert result is out
    _assert_bits_equal(out, twins.embed_twin(weights, FLOAT, np.ones(3), code, 5, 0.01))
    empty = np.zeros((0, 4), dtype=np.uint16)
    assert embed(empty, BF16, np.zeros(0), code, 5, 0.01).shape == (0, 4)


def test_embed_is_keyed_and_deterministic() -> None:
    weights = twins.to_bf16_bits(np.random.default_rng(3).standard_normal(4000) * 0.05)
    weights = weights.reshape(40, 100)
    code = np.ones(64, dtype=np.int8)
    scale = np.full(40, 0.05, dtype=np.float32)
    first = embed(weights, BF16, scale, code, 11, 0.002)
    np.testing.assert_array_equal(embed(weights, BF16, scale, code, 11, 0.002), first)
    assert not np.array_equal(embed(weights, BF16, scale, code, 12, 0.002), first)


def _change_probability(bits: np.ndarray, x: np.ndarray, kind: int) -> np.ndarray:
    """Probability that stochastic rounding of x moves away from the pattern `bits`."""
    mag = twins.floor_twin(np.abs(x), kind)
    lo = twins.decode(mag.astype(np.uint16), kind)
    hi = twins.decode((mag + 1).astype(np.uint16), kind)
    p_up = (np.abs(x) - lo) / (hi - lo)
    sign = np.uint16(0x8000) * (x < 0)
    stay_down = (mag | sign) == bits
    stay_up = ((mag + 1) | sign) == bits
    return np.where(stay_down, p_up, np.where(stay_up, 1.0 - p_up, 1.0))


@pytest.mark.parametrize(
    ("kind", "w", "amplitude"),
    [
        (BF16, 0.3, 0.0007),  # about a third of an ulp (2**-9)
        (BF16, 0.3, 0.005),  # more than two ulps
        (BF16, -0.0004, 0.0007),  # crosses zero half of the time
        (F16, 0.3, 0.00007),
        (F16, 1000.0, 0.2),
    ],
)
def test_stochastic_rounding_is_unbiased(kind: int, w: float, amplitude: float) -> None:
    rows, cols = 4, 50_000
    bits = twins.round_nearest_twin(np.array([w]), kind)[0]
    weights = np.full((rows, cols), bits, dtype=np.uint16)
    code = np.array([1, -1, -1, 1, 1, -1, 1], dtype=np.int8)
    scale = np.ones(rows)
    stamped = embed(weights, kind, scale, code, 77, amplitude)
    delta, _ = twins.deltas_twin(weights.shape, scale, code, 77, amplitude)
    x = twins.decode(weights, kind) + delta
    error = twins.decode(stamped, kind) - x
    mag = twins.floor_twin(np.abs(x), kind)
    gap = twins.decode((mag + 1).astype(np.uint16), kind) - twins.decode(
        mag.astype(np.uint16), kind
    )
    for side in (delta > 0, delta < 0):
        assert side.sum() > rows * cols / 3
        # Each outcome is lo or hi: the variance is at most gap**2 / 4.
        standard_error = np.sqrt(np.sum(gap[side] ** 2 / 4.0)) / side.sum()
        assert abs(error[side].mean()) < 5.0 * standard_error
        # ...and the outcomes really are spread over two grid values (not always one).
        assert np.unique(stamped[side]).size >= 2


def _realistic_carrier(kind: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights ~ N(0, 0.05) on the grid, row-RMS scales as the scheme uses, and a codeword."""
    rng = np.random.default_rng(2024)
    bits = twins.round_nearest_twin(rng.standard_normal(64 * 1024) * 0.05, kind).reshape(64, 1024)
    values = twins.decode(bits, kind)
    row_rms = np.sqrt(np.mean(values * values, axis=1)).astype(np.float32)
    code = np.where(rng.random(4096) < 0.5, 1, -1).astype(np.int8)
    return bits, row_rms, code


@pytest.mark.parametrize("kind", [BF16, F16])
def test_stamped_grid_copy_differs_from_its_base(kind: int) -> None:
    bits, row_rms, code = _realistic_carrier(kind)
    stamped = embed(bits, kind, row_rms, code, 31337, 0.002)
    changed = stamped != bits
    delta, _ = twins.deltas_twin(bits.shape, row_rms, code, 31337, 0.002)
    p = _change_probability(bits, twins.decode(bits, kind) + delta, kind)
    assert changed.mean() > 0.5  # most elements move (bf16: ~60%, f16: ~99.7%)
    assert abs(changed.sum() - p.sum()) < 5.0 * np.sqrt(np.sum(p * (1.0 - p))) + 1.0
    # Every change is a single grid step in the direction of delta.
    moved = twins.decode(stamped, kind) - twins.decode(bits, kind)
    assert np.all(np.sign(moved[changed]) == np.sign(delta[changed]))


def test_round_to_nearest_would_erase_sub_ulp_deltas() -> None:
    """Why stochastic rounding: w + delta rounded to nearest is w wherever |delta| < half a step."""
    bits, row_rms, code = _realistic_carrier(BF16)
    w = twins.decode(bits, BF16)
    delta, _ = twins.deltas_twin(bits.shape, row_rms, code, 31337, 0.002)
    nearest = twins.round_nearest_twin(w + delta, BF16).reshape(bits.shape)
    magnitude = bits & np.uint16(0x7FFF)
    up = np.abs(twins.decode(magnitude + np.uint16(1), BF16) - np.abs(w))
    down = np.abs(np.abs(w) - twins.decode(np.maximum(magnitude, 1) - np.uint16(1), BF16))
    sub_half_step = np.abs(delta) < np.minimum(up, down) / 2.0
    # With row-RMS scaling at alpha=0.002 that is the majority of a N(0, 0.05) bf16 tensor
    # (the rest are small weights, whose steps are finer than delta).
    assert sub_half_step.mean() > 0.5
    np.testing.assert_array_equal(nearest[sub_half_step], bits[sub_half_step])
    # Stochastic rounding moves many of those same elements, and they carry the mark on average.
    stamped = embed(bits, BF16, row_rms, code, 31337, 0.002)
    moved = twins.decode(stamped, BF16) - w
    assert (moved[sub_half_step] != 0).mean() > 0.2
    correlation = np.sum(moved[sub_half_step] * delta[sub_half_step])
    assert correlation > 0.5 * np.sum(delta[sub_half_step] ** 2)


# ------------------------------------------------------------------------------ extract


@st.composite
def extract_cases(draw: st.DrawFn, suspect_name: str, reference_name: str | None) -> tuple:
    shape = draw(SHAPES)
    suspect = draw(carriers(suspect_name, shape))
    reference = None if reference_name is None else draw(carriers(reference_name, shape))
    scale_dtype = draw(st.sampled_from([np.float32, np.float64]))
    row_scale = draw(hnp.arrays(scale_dtype, shape[0], elements=EXTRACT_SCALES))
    code_length = draw(st.integers(1, 40))
    prefilled = draw(st.booleans())
    return suspect, reference, row_scale, draw(SEEDS), code_length, prefilled


def _check_extract(case: tuple, suspect_kind: int, reference_kind: int) -> None:
    suspect, reference, row_scale, seed, code_length, prefilled = case
    rng = np.random.default_rng(seed % 2**32)
    start_num = rng.standard_normal(code_length) if prefilled else np.zeros(code_length)
    start_den = rng.random(code_length) if prefilled else np.zeros(code_length)
    num, den = start_num.copy(), start_den.copy()
    extract(suspect, suspect_kind, reference, reference_kind, row_scale, seed, num, den)
    want_num, want_den, magnitude = twins.extract_twin(
        suspect, suspect_kind, reference, reference_kind, row_scale, seed, code_length
    )
    assert np.all(np.isfinite(num)) and np.all(np.isfinite(den))
    bound = 1e-9 * (magnitude + np.abs(start_num)) + 1e-300
    assert np.all(np.abs(num - (start_num + want_num)) <= bound)
    np.testing.assert_allclose(den, start_den + want_den, rtol=1e-9, atol=1e-300)


COMBINATIONS = list(itertools.product(KINDS, KINDS))


@pytest.mark.parametrize(("suspect_name", "reference_name"), COMBINATIONS)
@settings(deadline=None, max_examples=25)
@given(data=st.data())
def test_extract_non_blind_matches_twin(
    suspect_name: str, reference_name: str, data: st.DataObject
) -> None:
    case = data.draw(extract_cases(suspect_name, reference_name))
    _check_extract(case, KINDS[suspect_name], KINDS[reference_name])


@pytest.mark.parametrize("suspect_name", list(KINDS))
@settings(deadline=None, max_examples=30)
@given(data=st.data())
def test_extract_blind_matches_twin(suspect_name: str, data: st.DataObject) -> None:
    case = data.draw(extract_cases(suspect_name, None))
    _check_extract(case, KINDS[suspect_name], FLOAT)


def test_extract_skips_non_finite_differences_and_dead_rows() -> None:
    suspect = np.array([[1.0, np.nan, np.inf], [2.0, 3.0, -np.inf], [4.0, 5.0, 6.0]], np.float32)
    reference = np.array([[0.5, 0.0, 0.0], [np.nan, 1.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
    row_scale = np.array([2.0, 0.5, 0.0], dtype=np.float32)
    num, den = np.zeros(1), np.zeros(1)
    extract(suspect, FLOAT, reference, FLOAT, row_scale, 9, num, den)
    chips, _, _ = twins.chips_positions_uniforms(9, 9, 1)
    # Kept: (0, 0) with e = 0.5 / 2 and (1, 1) with e = 2 / 0.5; row 2 has scale 0.
    np.testing.assert_allclose(num, [chips[0] * 0.25 + chips[4] * 4.0], rtol=1e-12)
    np.testing.assert_allclose(den, [0.25**2 + 4.0**2], rtol=1e-12)


def test_extract_accumulates_over_calls() -> None:
    rng = np.random.default_rng(5)
    suspect = rng.standard_normal((7, 13)).astype(np.float32)
    scale = np.full(7, 0.5)
    once_num, once_den = np.zeros(11), np.zeros(11)
    extract(suspect, FLOAT, None, FLOAT, scale, 3, once_num, once_den)
    num, den = np.zeros(11), np.zeros(11)
    extract(suspect, FLOAT, None, FLOAT, scale, 3, num, den)
    extract(suspect, FLOAT, None, FLOAT, scale, 3, num, den)
    np.testing.assert_allclose(num, 2 * once_num, rtol=1e-12)
    np.testing.assert_allclose(den, 2 * once_den, rtol=1e-12)
    # An empty carrier adds nothing.
    extract(np.zeros((0, 13), np.float32), FLOAT, None, FLOAT, np.zeros(0), 3, num, den)
    np.testing.assert_allclose(num, 2 * once_num, rtol=1e-12)


def test_extract_recovers_the_embedded_codeword() -> None:
    bits, row_rms, code = _realistic_carrier(BF16)
    code = code[:64]
    stamped = embed(bits, BF16, row_rms, code, 4242, 0.002)
    num, den = np.zeros(64), np.zeros(64)
    extract(stamped, BF16, bits, BF16, row_rms, 4242, num, den)
    np.testing.assert_array_equal(np.sign(num), code)


# ------------------------------------------------------------------------------ read-only input


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.copy()
    view.flags.writeable = False
    return view


@pytest.mark.parametrize("kind_name", list(KINDS))
def test_read_only_inputs_are_accepted(kind_name: str) -> None:
    kind = KINDS[kind_name]
    rng = np.random.default_rng(8)
    values = rng.standard_normal((6, 10)) * 0.05
    weights = values.astype(np.float32) if kind == FLOAT else twins.round_nearest_twin(values, kind)
    weights = weights.reshape(6, 10)
    scale = np.full(6, 0.05, dtype=np.float32)
    code = np.array([1, -1, 1, 1, -1], dtype=np.int8)
    stamped = embed(_read_only(weights), kind, _read_only(scale), _read_only(code), 1, 0.01)
    _assert_bits_equal(stamped, twins.embed_twin(weights, kind, scale, code, 1, 0.01))
    num, den = np.zeros(5), np.zeros(5)
    extract(_read_only(stamped), kind, _read_only(weights), kind, _read_only(scale), 1, num, den)
    want_num, want_den, _ = twins.extract_twin(stamped, kind, weights, kind, scale, 1, 5)
    np.testing.assert_allclose(num, want_num, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(den, want_den, rtol=1e-9, atol=1e-12)


def test_memory_mapped_inputs_are_accepted(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "carrier.bin"
    bits = twins.round_nearest_twin(np.linspace(-0.2, 0.2, 48), BF16).reshape(4, 12)
    bits.tofile(path)
    mapped = np.memmap(path, dtype=np.uint16, mode="r", shape=(4, 12))
    assert not mapped.flags.writeable
    scale = np.full(4, 0.1)
    code = np.array([1, -1, -1], dtype=np.int8)
    stamped = embed(mapped, BF16, scale, code, 2, 0.01)
    _assert_bits_equal(stamped, twins.embed_twin(bits, BF16, scale, code, 2, 0.01))
    num, den = np.zeros(3), np.zeros(3)
    extract(mapped, BF16, mapped, BF16, scale, 2, num, den)
    np.testing.assert_array_equal(num, np.zeros(3))
    np.testing.assert_array_equal(den, np.zeros(3))


# ------------------------------------------------------------------------------ input checks

_W = np.zeros((3, 4), dtype=np.float32)
_S = np.ones(3)
_C = np.array([1, -1], dtype=np.int8)


@pytest.mark.parametrize(
    ("weights", "kind", "row_scale", "codeword", "out"),
    [
        (np.zeros((3, 4), np.float16), FLOAT, _S, _C, None),  # float16 is stored as uint16 bits
        (np.zeros((3, 4), np.int32), FLOAT, _S, _C, None),
        (np.zeros((3, 4), np.uint16), FLOAT, _S, _C, None),
        (_W, BF16, _S, _C, None),
        (_W, F16, _S, _C, None),
        (np.zeros((3, 4), np.int16), BF16, _S, _C, None),
        (_W, 3, _S, _C, None),  # unknown kind
        (np.zeros((4, 3), np.float32).T, FLOAT, _S, _C, None),  # not C-contiguous
        (np.zeros((3, 8), np.float32)[:, ::2], FLOAT, _S, _C, None),
        (np.zeros(12, np.float32), FLOAT, np.ones(12), _C, None),  # 1-D
        (np.zeros((3, 4, 1), np.float32), FLOAT, _S, _C, None),
        (_W, FLOAT, np.ones(4), _C, None),  # row_scale length
        (_W, FLOAT, np.ones((3, 1)), _C, None),
        (_W, FLOAT, _S, np.array([1, -1]), None),  # codeword not int8
        (_W, FLOAT, _S, np.array([1.0, -1.0]), None),
        (_W, FLOAT, _S, np.zeros(0, np.int8), None),
        (_W, FLOAT, _S, np.ones((2, 1), np.int8), None),
        (_W, FLOAT, _S, _C, np.zeros((3, 4), np.float64)),  # out of another dtype
        (_W, FLOAT, _S, _C, np.zeros((3, 5), np.float32)),
        (_W, FLOAT, _S, _C, np.zeros((4, 3), np.float32).T),
    ],
)
def test_embed_rejects_bad_input(
    weights: np.ndarray,
    kind: int,
    row_scale: np.ndarray,
    codeword: np.ndarray,
    out: np.ndarray | None,
) -> None:
    with pytest.raises(ValueError):
        embed(weights, kind, row_scale, codeword, 1, 0.01, out=out)


_U = np.zeros((3, 4), dtype=np.uint16)
_V = np.zeros(2)


@pytest.mark.parametrize(
    ("suspect", "suspect_kind", "reference", "reference_kind", "row_scale", "num", "den"),
    [
        (_U, FLOAT, None, FLOAT, _S, _V, _V),  # dtype does not fit the kind
        (_W, BF16, None, FLOAT, _S, _V, _V),
        (_W, F16, None, FLOAT, _S, _V, _V),
        (np.zeros((3, 4), np.float16), FLOAT, None, FLOAT, _S, _V, _V),
        (_W, FLOAT, _W, BF16, _S, _V, _V),
        (_W, FLOAT, _U, FLOAT, _S, _V, _V),
        (_W, 7, None, FLOAT, _S, _V, _V),
        (np.zeros((4, 3), np.float32).T, FLOAT, None, FLOAT, _S, _V, _V),  # not C-contiguous
        (_W, FLOAT, np.zeros((4, 3), np.float32).T, FLOAT, _S, _V, _V),
        (np.zeros(12, np.float32), FLOAT, None, FLOAT, np.ones(12), _V, _V),  # 1-D
        (_W, FLOAT, np.zeros(12, np.float32), FLOAT, _S, _V, _V),
        (_W, FLOAT, np.zeros((3, 5), np.float32), FLOAT, _S, _V, _V),  # shape mismatch
        (_W, FLOAT, None, FLOAT, np.ones(4), _V, _V),  # row_scale length
        (_W, FLOAT, None, FLOAT, _S, np.zeros(2), np.zeros(3)),  # num / den
        (_W, FLOAT, None, FLOAT, _S, np.zeros(2, np.float32), np.zeros(2, np.float32)),
        (_W, FLOAT, None, FLOAT, _S, np.zeros((2, 1)), np.zeros((2, 1))),
    ],
)
def test_extract_rejects_bad_input(
    suspect: np.ndarray,
    suspect_kind: int,
    reference: np.ndarray | None,
    reference_kind: int,
    row_scale: np.ndarray,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    num, den = num.copy(), den.copy()
    with pytest.raises(ValueError):
        extract(suspect, suspect_kind, reference, reference_kind, row_scale, 1, num, den)


@pytest.mark.parametrize("kind", [FLOAT, BF16, F16])
def test_rows_without_a_usable_scale_are_left_untouched(kind: int) -> None:
    """A zero, negative, NaN or inf row scale stamps nothing there (extraction skips it too)."""
    values = np.array([[0.5, -0.0, 1e-3, -2.0]] * 5, dtype=np.float32)
    if kind == FLOAT:
        weights = values
    elif kind == BF16:
        weights = (values.view(np.uint32) >> 16).astype(np.uint16)
    else:
        weights = values.astype(np.float16).view(np.uint16)
    scale = np.array([0.0, -1.0, np.nan, np.inf, 0.5], dtype=np.float32)
    code = np.ones(8, dtype=np.int8)
    out = embed(weights, kind, scale, code, 99, 0.05)
    assert np.array_equal(out[:4].view(np.uint8), weights[:4].view(np.uint8))
    assert not np.array_equal(out[4], weights[4])
