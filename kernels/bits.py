"""Float16 and bfloat16 as uint16 bit patterns: exact decoding, and truncation onto their grids.

Numba has no half-precision types on the CPU, so we reinterpret bits with an LLVM bitcast.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from weightmark.kernels.config import INLINE

FLOAT = 0  # the array holds float32 or float64 values
BF16 = 1  # the array holds bfloat16 bit patterns (uint16)
F16 = 2  # the array holds IEEE float16 bit patterns (uint16)


@intrinsic
def u32_as_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an unsigned integer as float32 (no conversion)."""
    if not isinstance(bits, types.Integer) or bits.signed:
        raise TypingError("u32_as_f32 takes an unsigned integer")

    def codegen(context, builder, signature, args):
        low = args[0]
        if bits.bitwidth > 32:
            low = builder.trunc(low, context.get_value_type(types.uint32))
        elif bits.bitwidth < 32:
            low = builder.zext(low, context.get_value_type(types.uint32))
        return builder.bitcast(low, context.get_value_type(types.float32))

    return types.float32(bits), codegen


def _bitcast(source, target, name):
    """An intrinsic `name`(value) reinterpreting a `source` value as `target` (same width, no
    conversion)."""

    def cast(typingctx, value):
        if value != source:
            raise TypingError(f"{name} takes a {source}")

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    cast.__name__ = cast.__qualname__ = name
    return intrinsic(cast)


f32_as_u32 = _bitcast(types.float32, types.uint32, "f32_as_u32")
f64_as_u64 = _bitcast(types.float64, types.uint64, "f64_as_u64")
u64_as_f64 = _bitcast(types.uint64, types.float64, "u64_as_f64")


_SIGN16 = np.uint16(0x8000)
_TWO_P24 = 2.0**24
_F16_MIN_NORMAL = 2.0**-14
_F16_MAX = 65504.0
_F16_MAX_BITS = 0x7BFF
_BF16_MAX_BITS = 0x7F7F


@numba.njit(**INLINE)
def bf16_to_f64(b):
    """Exact value of a bfloat16 bit pattern."""
    return np.float64(u32_as_f32(np.uint32(b) << np.uint32(16)))


@intrinsic
def _f16_bits_as_f64(typingctx, bits):
    """IEEE half-precision bits widened to float64 by the CPU's own conversion (LLVM fpext half ->
    double: one vcvtph2ps on x86 with F16C, a native instruction on AArch64). Exact for every
    finite value and infinity; NaN stays NaN with its payload on top, quieted, as a float32 -> float64
    widening does."""
    if not isinstance(bits, types.Integer) or bits.signed:
        raise TypingError("_f16_bits_as_f64 takes an unsigned integer")

    def codegen(context, builder, signature, args):
        value = args[0]
        i16 = ir.IntType(16)
        if bits.bitwidth > 16:
            value = builder.trunc(value, i16)
        elif bits.bitwidth < 16:
            value = builder.zext(value, i16)
        return builder.fpext(builder.bitcast(value, ir.HalfType()), ir.DoubleType())

    return types.float64(bits), codegen


@numba.njit(**INLINE)
def f16_to_f64(b):
    """Exact value of an IEEE float16 bit pattern (subnormals, inf and NaN included)."""
    return _f16_bits_as_f64(np.uint16(b))


@numba.njit(**INLINE)
def _floor_f32_bits(a):
    """Bits of the largest float32 <= a, for finite a >= 0."""
    t = np.float32(a)
    return f32_as_u32(t) - np.uint32(np.float64(t) > a)


@numba.njit(**INLINE)
def bf16_floor(a):
    """Bits of the largest bfloat16 <= a, for a >= 0 (clamped to the largest finite)."""
    return min(_floor_f32_bits(a) >> np.uint32(16), np.uint32(_BF16_MAX_BITS))


@numba.njit(**INLINE)
def f16_floor(a):
    """Bits of the largest float16 <= a, for a >= 0 (clamped to the largest finite)."""
    if a >= _F16_MAX:
        return np.uint32(_F16_MAX_BITS)
    if a < _F16_MIN_NORMAL:
        return np.uint32(np.int64(a * _TWO_P24))
    bits = _floor_f32_bits(a)
    exp16 = ((bits >> np.uint32(23)) & np.uint32(0xFF)) - np.uint32(112)
    return (exp16 << np.uint32(10)) | ((bits >> np.uint32(13)) & np.uint32(0x3FF))


@numba.njit(**INLINE)
def _round_magnitude(x, lo, hi, mag, u, original, w):
    """Finish a stochastic rounding: pick lo or hi for |x|, restore the sign, keep non-finite w."""
    a = abs(x)
    # Up with probability (a - lo) / (hi - lo); never onto inf. No data-dependent branch:
    # the decision is a coin flip the CPU could not predict.
    step_up = (u * (hi - lo) < a - lo) & (hi < np.inf)
    bits = np.uint16((mag + np.uint32(step_up)) | (np.uint32(x < 0.0) << np.uint32(15)))
    return bits if np.isfinite(w) else original


@numba.njit(**INLINE)
def bf16_stochastic_round(bits, delta, u):
    """bfloat16 w (bits) plus delta, stochastically rounded so the expectation is w + delta."""
    w = bf16_to_f64(bits)
    x = w + delta
    mag = bf16_floor(abs(x))
    lo = bf16_to_f64(mag)
    hi = bf16_to_f64(mag + np.uint32(1))
    return _round_magnitude(x, lo, hi, mag, u, bits, w)


@numba.njit(**INLINE)
def f16_stochastic_round(bits, delta, u):
    """float16 w (bits) plus delta, stochastically rounded so the expectation is w + delta."""
    w = f16_to_f64(bits)
    x = w + delta
    mag = f16_floor(abs(x))
    lo = f16_to_f64(mag)
    hi = f16_to_f64(mag + np.uint32(1))
    return _round_magnitude(x, lo, hi, mag, u, bits, w)


# The same rounding read off the float64 bits of x = w + delta, in integer lanes that vectorise.
# Where |x| lies in a grid's normal range, its floor `lo` keeps the top bits of |x| (rebiased to
# the grid's exponent), |x| - lo is the `shift` low bits times 2**(e - 52), hi - lo = 2**(e - 52 +
# shift) and u = U * 2**-31, so u * (hi - lo) < |x| - lo is U * 2**(shift - 31) < low bits: the
# same comparison of exact values, in integers. The floor clamps at the largest finite value,
# whose hi is inf (never taken). The outside_* functions say where this does not hold; the
# kernels redo such rows with the reference rounding.
_ABS64 = np.uint64(0x7FFFFFFFFFFFFFFF)
_F64_INF_BITS = np.uint64(0x7FF0000000000000)
_BF16_MIN_NORMAL_BITS = np.uint64(0x3810000000000000)  # 2**-126 as float64 bits
_F16_MIN_NORMAL_BITS = np.uint64(0x3F10000000000000)  # 2**-14 as float64 bits
_F16_MIN_NORMAL = 2.0**-14
_ALL_ONES64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# outside_* below: |x| bits minus the domain's low end (wrapping below it), against its width.
BF16_ROUND_DOMAIN = _F64_INF_BITS - _BF16_MIN_NORMAL_BITS
F16_ROUND_DOMAIN = _F64_INF_BITS - np.uint64(1)


@numba.njit(**INLINE)
def bf16_round_bits(x, draw):
    """bf16_stochastic_round's bits for x = w + delta and u = draw * 2**-31, when
    2**-126 <= |x| < inf (outside_bf16(x) < BF16_ROUND_DOMAIN; w is then finite)."""
    b = f64_as_u64(x)
    a = b & _ABS64
    mag = (a >> np.uint64(45)) - np.uint64((1023 - 127) << 7)
    up = ((draw << np.uint64(14)) - (a & np.uint64((1 << 45) - 1))) >> np.uint64(63)
    mag = min(mag + up, np.uint64(_BF16_MAX_BITS))
    # x is neither -0.0 nor NaN here, so its sign bit says x < 0.
    return np.uint16(mag | ((b >> np.uint64(48)) & np.uint64(0x8000)))


@numba.njit(**INLINE)
def outside_bf16(x):
    """At least BF16_ROUND_DOMAIN iff bf16_round_bits does not apply to x."""
    return (f64_as_u64(x) & _ABS64) - _BF16_MIN_NORMAL_BITS


@numba.njit(**INLINE)
def _f16_rounding_bits(a):
    """The float64 bits f16_round_bits reads: |x| itself in the normal range; below it,
    |x| + 2**-14 (whose binade has float16's subnormal step, 2**-24: its low 42 bits are the
    steps of 2**-24 in |x|, rounded to the nearest) with its exponent one lower, so that the
    normal range's rebiasing yields the subnormal pattern."""
    if a < _F16_MIN_NORMAL_BITS:
        return f64_as_u64(u64_as_f64(a) + _F16_MIN_NORMAL) - (np.uint64(1) << np.uint64(52))
    return a


@numba.njit(**INLINE)
def f16_round_bits(x, draw):
    """f16_stochastic_round's bits for x = w + delta and u = draw * 2**-31, when
    outside_f16(x) < F16_ROUND_DOMAIN (0 < |x| < inf, w then finite, and no rounding doubt)."""
    b = f64_as_u64(x)
    a = b & _ABS64
    c = _f16_rounding_bits(a)
    mag = (c >> np.uint64(42)) - np.uint64((1023 - 15) << 10)
    up = ((draw << np.uint64(11)) - (c & np.uint64((1 << 42) - 1))) >> np.uint64(63)
    mag = min(mag + up, np.uint64(_F16_MAX_BITS))
    return np.uint16(mag | ((b >> np.uint64(48)) & np.uint64(0x8000)))


@numba.njit(**INLINE)
def outside_f16(x):
    """At least F16_ROUND_DOMAIN iff f16_round_bits may differ from f16_stochastic_round at x:
    x is zero, infinite or NaN, or |x| < 2**-14 and its rounded steps c end in eleven zero bits.

    Only then can rounding |x| + 2**-14 change the comparison: u * 2**31 * 2**11 is a multiple
    of 2**11, and the true fraction and c's low bits differ by at most half a unit.
    """
    a = f64_as_u64(x) & _ABS64
    if a < _F16_MIN_NORMAL_BITS and (_f16_rounding_bits(a) & np.uint64(0x7FF)) == np.uint64(0):
        return _ALL_ONES64
    return a - np.uint64(1)


@numba.njit(**INLINE)
def stochastic_round(bits, delta, u, kind):
    """Stochastic rounding of w + delta on the grid named by `kind` (BF16 or F16)."""
    if kind == BF16:
        return bf16_stochastic_round(bits, delta, u)
    return f16_stochastic_round(bits, delta, u)


def as_f64(x, kind):
    """Value of an element: a float as it is, a uint16 as a bf16 or f16 pattern (by `kind`)."""


@overload(as_f64)
def _as_f64_overload(x, kind):
    if isinstance(x, types.Float):
        return lambda x, kind: np.float64(x)
    if x == types.uint16:

        def impl(x, kind):
            if kind == BF16:
                return bf16_to_f64(x)
            return f16_to_f64(x)

        return impl
    raise TypingError(f"as_f64: unsupported element type {x}")


def decode_row(array, r, kind, out):
    """out[:] = values of row r of a carrier (floats as they are, uint16 by `kind`)."""


@overload(decode_row)
def _decode_row_overload(array, r, kind, out):
    if isinstance(array.dtype, types.Float):

        def impl_float(array, r, kind, out):
            for c in range(out.shape[0]):
                out[c] = np.float64(array[r, c])

        return impl_float
    if array.dtype == types.uint16:

        def impl_bits(array, r, kind, out):
            # The format test sits outside the loops so each loop is a plain, vectorisable map.
            if kind == BF16:
                for c in range(out.shape[0]):
                    out[c] = bf16_to_f64(array[r, c])
            else:
                for c in range(out.shape[0]):
                    out[c] = f16_to_f64(array[r, c])

        return impl_bits
    raise TypingError(f"decode_row: unsupported element type {array.dtype}")


def decode_span(array, r, start, n, kind, out):
    """out[:n] = values of row r, columns start..start+n-1 (as decode_row, on a part of the row)."""


@overload(decode_span)
def _decode_span_overload(array, r, start, n, kind, out):
    # The loops index a view of the span by their own counter (never negative), so there is no
    # wrap-around test per element and they vectorise.
    if isinstance(array.dtype, types.Float):

        def impl_float(array, r, start, n, kind, out):
            span = array[r, start : start + n]
            for c in range(n):
                out[c] = np.float64(span[c])

        return impl_float
    if array.dtype == types.uint16:

        def impl_bits(array, r, start, n, kind, out):
            span = array[r, start : start + n]
            if kind == BF16:
                for c in range(n):
                    out[c] = bf16_to_f64(span[c])
            else:
                for c in range(n):
                    out[c] = f16_to_f64(span[c])

        return impl_bits
    raise TypingError(f"decode_span: unsupported element type {array.dtype}")


@numba.njit(**INLINE)
def _float_value(x):
    """A float element's value as float64."""
    return np.float64(x)


def _span_decoder(dtype):
    """Per element type, the decoders a span loop picks from by kind: float values as they are;
    uint16 patterns as bfloat16 (BF16) or float16."""
    if isinstance(dtype, types.Float):
        return _float_value, _float_value
    if dtype == types.uint16:
        return bf16_to_f64, f16_to_f64
    raise TypingError(f"decode_difference: unsupported element type {dtype}")


def decode_difference(a, a_kind, b, b_kind, r, start, n, out):
    """out[:n] = row r of a minus row r of b over columns start..start+n-1, each decoded as
    decode_span does and subtracted in float64 (one pass, no second buffer)."""


@overload(decode_difference)
def _decode_difference_overload(a, a_kind, b, b_kind, r, start, n, out):
    a_first, a_second = _span_decoder(a.dtype)
    b_first, b_second = _span_decoder(b.dtype)

    def impl(a, a_kind, b, b_kind, r, start, n, out):
        x = a[r, start : start + n]
        y = b[r, start : start + n]
        # One loop per pair of kinds, each a plain vectorisable map (the kind tests stay outside).
        if a_kind == BF16 and b_kind == BF16:
            for c in range(n):
                out[c] = a_first(x[c]) - b_first(y[c])
        elif a_kind == BF16:
            for c in range(n):
                out[c] = a_first(x[c]) - b_second(y[c])
        elif b_kind == BF16:
            for c in range(n):
                out[c] = a_second(x[c]) - b_first(y[c])
        else:
            for c in range(n):
                out[c] = a_second(x[c]) - b_second(y[c])

    return impl
