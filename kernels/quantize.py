"""Quantize float32 rows to GGML block types, freely or against frozen scales, and nudge codes."""

import numba
import numpy as np

from weightmark.kernels.bits import f16_to_f64, f32_as_u32, u32_as_f32
from weightmark.kernels.config import INLINE, PARALLEL
from weightmark.kernels.quant import BLOCK_LAYOUTS

__all__ = ["QUANTIZABLE", "nudge_codes", "quantize", "quantize_frozen"]

# Kind numbers the kernels branch on (the public API takes type names).
_Q8_0, _Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q4_K, _Q5_K, _Q6_K = range(8)
_KINDS = {
    "Q8_0": _Q8_0,
    "Q4_0": _Q4_0,
    "Q4_1": _Q4_1,
    "Q5_0": _Q5_0,
    "Q5_1": _Q5_1,
    "Q4_K": _Q4_K,
    "Q5_K": _Q5_K,
    "Q6_K": _Q6_K,
}
QUANTIZABLE = tuple(_KINDS)
_SIMPLE = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"})

# Per kind: bytes per block and elements per block.
_TYPE_SIZE = np.array([BLOCK_LAYOUTS[name][1] for name in QUANTIZABLE], dtype=np.int64)
_BLOCK = np.array([BLOCK_LAYOUTS[name][0] for name in QUANTIZABLE], dtype=np.int64)
# Code range per kind as stored integers (Q8_0 codes are the signed int8 values).
_CODE_LO = np.array([-128, 0, 0, 0, 0, 0, 0, 0], dtype=np.int64)
_CODE_HI = np.array([127, 15, 15, 31, 31, 15, 31, 63], dtype=np.int64)
# Stored code of the value zero for symmetric types (dequantized value = step * (code - zero)).
_ZERO = np.array([0, 8, 0, 16, 0, 0, 0, 32], dtype=np.int64)

_GROUP_EPS = 1e-15  # sub-blocks whose largest magnitude is below this quantize to zero


# -- float16 ----------------------------------------------------------------------------------


@numba.njit(**INLINE)
def _f16_bits(x):
    """IEEE float16 bits of float32 x, rounded to nearest even (as numpy's astype(float16))."""
    b = f32_as_u32(np.float32(x))
    sign = (b >> np.uint32(16)) & np.uint32(0x8000)
    a = b & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf, NaN (kept quiet)
        nan = np.uint32(0x200) if a > np.uint32(0x7F800000) else np.uint32(0)
        return sign | np.uint32(0x7C00) | nan
    if a >= np.uint32(0x477FF000):  # >= 65520 rounds to inf
        return sign | np.uint32(0x7C00)
    if a < np.uint32(0x38800000):  # below 2**-14: a subnormal f16 (or the smallest normal)
        units = np.rint(np.float64(u32_as_f32(a)) * 16777216.0)  # exact product, ties to even
        return sign | np.uint32(units)
    h = (a >> np.uint32(13)) - np.uint32(112 << 10)
    rest = a & np.uint32(0x1FFF)
    if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and (h & np.uint32(1))):
        h += np.uint32(1)
    return sign | h


@numba.njit(**INLINE)
def _f16_at(buf, r, o):
    """float32 value of the little-endian f16 at buf[r, o:o + 2]."""
    bits = np.uint32(buf[r, o]) | (np.uint32(buf[r, o + 1]) << np.uint32(8))
    return np.float32(f16_to_f64(bits))


@numba.njit(**INLINE)
def _f16_bits_at(buf, r, o):
    return np.uint32(buf[r, o]) | (np.uint32(buf[r, o + 1]) << np.uint32(8))


@numba.njit(**INLINE)
def _put_f16(out, r, o, bits):
    out[r, o] = np.uint8(bits & np.uint32(0xFF))
    out[r, o + 1] = np.uint8((bits >> np.uint32(8)) & np.uint32(0xFF))


@numba.njit(**INLINE)
def _f32_next(x, up):
    """The float32 next to x >= 0 (finite) towards +inf (up) or towards zero."""
    bits = f32_as_u32(np.float32(x))
    return u32_as_f32(bits + np.uint32(1)) if up else u32_as_f32(bits - np.uint32(1))


@numba.njit(**INLINE)
def _f16_cell(v, bits):
    """The float32 nearest v among those that round to the f16 `bits` (v itself if it does).

    Lets quantize_frozen use the very rounding of the reference quantizer (which rounds with
    the float32 scale, not the stored f16 one) while staying on the frozen f16 scale.
    """
    v = np.float32(v)
    if _f16_bits(v) == bits:
        return v
    mag = bits & np.uint32(0x7FFF)
    if mag >= np.uint32(0x7C00):  # inf or NaN stored: nothing to clamp to
        return np.float32(f16_to_f64(bits))
    value = f16_to_f64(mag)
    up = f16_to_f64(mag + np.uint32(1)) if mag < np.uint32(0x7BFF) else 65536.0
    hi = np.float32(0.5 * (value + up))  # midpoints are exact in float32
    odd = (mag & np.uint32(1)) != np.uint32(0)  # ties go to the even neighbour
    if odd:
        hi = _f32_next(hi, False)
    if mag == np.uint32(0):
        lo = np.float32(0.0)
    else:
        lo = np.float32(0.5 * (f16_to_f64(mag - np.uint32(1)) + value))
        if odd:
            lo = _f32_next(lo, True)
    negative = (bits & np.uint32(0x8000)) != np.uint32(0)
    a = abs(v)
    if (v < 0) != negative:  # wrong side of zero: the cell's edge nearest zero
        a = lo
    a = min(max(a, lo), hi)
    return -a if negative else a


# -- helpers --------------------------------------------------------------------------------


@numba.njit(**INLINE)
def _row_finite(x, r):
    """True when every value of row r is finite (x * 0 is NaN for inf and NaN)."""
    acc = np.float32(0.0)
    for c in range(x.shape[1]):
        acc += x[r, c] * np.float32(0.0)
    return acc == np.float32(0.0)


@numba.njit(**INLINE)
def _clamp(v, lo, hi):
    return min(max(v, lo), hi)


@numba.njit(**INLINE)
def _round_away(v):
    """roundf: float32 v to the nearest integer, halves away from zero (exact, clamped to int8).

    inf and NaN (from a subnormal scale whose inverse overflows) give 0, as the reference does
    on x86, where converting them to an integer yields 0x80000000.
    """
    if not np.isfinite(v):
        return 0
    a = min(abs(v), np.float32(128.0))
    f = np.floor(a)
    q = np.int64(f + np.floor(np.float32(2.0) * (a - f)))  # every step is exact in float32
    return -q if v < 0 else q


@numba.njit(**INLINE)
def _nearest_code(x, step, bias, zero, lo, hi):
    """Stored code whose value step * (code - zero) + bias is nearest x, clamped to [lo, hi]."""
    q = np.rint((np.float32(x) - bias) / step)
    if not q >= -1e9:  # guards the int cast (q is finite for finite x and step != 0)
        q = -1e9
    return _clamp(np.int64(min(q, 1e9)) + zero, lo, hi)


# -- packing of codes -----------------------------------------------------------------------


@numba.njit(**INLINE)
def _pack(kind, out, r, o, L):
    """Write the code bytes of one block from the stored codes L (every code byte is set)."""
    if kind == _Q8_0:
        for j in range(32):
            out[r, o + 2 + j] = np.uint8(L[j] & 0xFF)
    elif kind == _Q4_0 or kind == _Q4_1:
        s = o + (2 if kind == _Q4_0 else 4)
        for j in range(16):
            out[r, s + j] = np.uint8(L[j] | (L[j + 16] << 4))
    elif kind == _Q5_0 or kind == _Q5_1:
        h = o + (2 if kind == _Q5_0 else 4)
        qh = np.uint32(0)
        for j in range(32):
            qh |= np.uint32((L[j] >> 4) & 1) << np.uint32(j)
        for k in range(4):
            out[r, h + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))
        for j in range(16):
            out[r, h + 4 + j] = np.uint8((L[j] & 15) | ((L[j + 16] & 15) << 4))
    elif kind == _Q4_K:
        for c in range(4):
            for j in range(32):
                out[r, o + 16 + 32 * c + j] = np.uint8(L[64 * c + j] | (L[64 * c + 32 + j] << 4))
    elif kind == _Q5_K:
        for j in range(32):
            h = 0
            for c in range(4):
                h |= ((L[64 * c + j] >> 4) & 1) << (2 * c)
                h |= ((L[64 * c + 32 + j] >> 4) & 1) << (2 * c + 1)
            out[r, o + 16 + j] = np.uint8(h)
        for c in range(4):
            for j in range(32):
                lo = L[64 * c + j] & 15
                hi = L[64 * c + 32 + j] & 15
                out[r, o + 48 + 32 * c + j] = np.uint8(lo | (hi << 4))
    else:  # Q6_K: ql[128] | qh[64] per 256, in two halves of 128 elements
        for half in range(2):
            ql = o + 64 * half
            qh = o + 128 + 32 * half
            e = 128 * half
            for j in range(32):
                a = L[e + j]
                b = L[e + 32 + j]
                c = L[e + 64 + j]
                d = L[e + 96 + j]
                out[r, ql + j] = np.uint8((a & 15) | ((c & 15) << 4))
                out[r, ql + 32 + j] = np.uint8((b & 15) | ((d & 15) << 4))
                out[r, qh + j] = np.uint8(
                    (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((d >> 4) << 6)
                )


@numba.njit(**INLINE)
def _unpack(kind, raw, r, o, L):
    """Read the stored codes of one block into L (Q8_0: signed values)."""
    if kind == _Q8_0:
        for j in range(32):
            v = np.int64(raw[r, o + 2 + j])
            L[j] = v - ((v & 128) << 1)
    elif kind == _Q4_0 or kind == _Q4_1:
        s = o + (2 if kind == _Q4_0 else 4)
        for j in range(16):
            v = np.int64(raw[r, s + j])
            L[j] = v & 15
            L[j + 16] = v >> 4
    elif kind == _Q5_0 or kind == _Q5_1:
        h = o + (2 if kind == _Q5_0 else 4)
        qh = np.int64(0)
        for k in range(4):
            qh |= np.int64(raw[r, h + k]) << (8 * k)
        for j in range(16):
            v = np.int64(raw[r, h + 4 + j])
            L[j] = (v & 15) | (((qh >> j) & 1) << 4)
            L[j + 16] = (v >> 4) | (((qh >> (j + 16)) & 1) << 4)
    elif kind == _Q4_K:
        for c in range(4):
            for j in range(32):
                v = np.int64(raw[r, o + 16 + 32 * c + j])
                L[64 * c + j] = v & 15
                L[64 * c + 32 + j] = v >> 4
    elif kind == _Q5_K:
        for c in range(4):
            for j in range(32):
                v = np.int64(raw[r, o + 48 + 32 * c + j])
                h = np.int64(raw[r, o + 16 + j])
                L[64 * c + j] = (v & 15) | (((h >> (2 * c)) & 1) << 4)
                L[64 * c + 32 + j] = (v >> 4) | (((h >> (2 * c + 1)) & 1) << 4)
    else:
        for half in range(2):
            ql = o + 64 * half
            qh = o + 128 + 32 * half
            e = 128 * half
            for j in range(32):
                lo1 = np.int64(raw[r, ql + j])
                lo2 = np.int64(raw[r, ql + 32 + j])
                h = np.int64(raw[r, qh + j])
                L[e + j] = (lo1 & 15) | ((h & 3) << 4)
                L[e + 32 + j] = (lo2 & 15) | (((h >> 2) & 3) << 4)
                L[e + 64 + j] = (lo1 >> 4) | (((h >> 4) & 3) << 4)
                L[e + 96 + j] = (lo2 >> 4) | (((h >> 6) & 3) << 4)


@numba.njit(**INLINE)
def _header(kind):
    """(first byte, length) of the non-code fields of a block: scales, mins and f16 factors."""
    if kind == _Q8_0 or kind == _Q4_0 or kind == _Q5_0:
        return 0, 2
    if kind == _Q4_1 or kind == _Q5_1:
        return 0, 4
    if kind == _Q4_K or kind == _Q5_K:
        return 0, 16
    return 192, 18  # Q6_K: scales int8[16] | d f16


@numba.njit(**INLINE)
def _k_scale_min(buf, r, o, j):
    """Six-bit scale and min of Q4_K/Q5_K sub-block j (0..7) from the packed bytes at o + 4."""
    s = o + 4
    if j < 4:
        return np.int64(buf[r, s + j]) & 63, np.int64(buf[r, s + j + 4]) & 63
    hi = np.int64(buf[r, s + j + 4])
    sc = (hi & 15) | ((np.int64(buf[r, s + j - 4]) >> 6) << 4)
    mn = (hi >> 4) | ((np.int64(buf[r, s + j]) >> 6) << 4)
    return sc, mn


@numba.njit(**INLINE)
def _params(kind, buf, r, o, step, bias):
    """Per element of one block: the dequantization step and bias the stored scales give.

    value = step * (code - zero) + bias, each product rounded to float32 as the dequantizers do.
    """
    if kind == _Q8_0 or kind == _Q4_0 or kind == _Q5_0:
        d = _f16_at(buf, r, o)
        for j in range(32):
            step[j] = d
            bias[j] = np.float32(0.0)
    elif kind == _Q4_1 or kind == _Q5_1:
        d = _f16_at(buf, r, o)
        m = _f16_at(buf, r, o + 2)
        for j in range(32):
            step[j] = d
            bias[j] = m
    elif kind == _Q4_K or kind == _Q5_K:
        d = _f16_at(buf, r, o)
        dmin = _f16_at(buf, r, o + 2)
        for sb in range(8):
            sc, mn = _k_scale_min(buf, r, o, sb)
            s = d * np.float32(sc)
            b = -(dmin * np.float32(mn))
            for j in range(32):
                step[32 * sb + j] = s
                bias[32 * sb + j] = b
    else:
        d = _f16_at(buf, r, o + 208)
        for sb in range(16):
            v = np.int64(buf[r, o + 192 + sb])
            s = d * np.float32(v - ((v & 128) << 1))
            for j in range(16):
                step[16 * sb + j] = s
                bias[16 * sb + j] = np.float32(0.0)


@numba.njit(**INLINE)
def _nearest_block(kind, x, r, base, n, step, bias, L):
    """Round-to-nearest codes of x[r, base:base + n] against step/bias (step 0: L unchanged)."""
    zero = _ZERO[kind]
    lo = _CODE_LO[kind]
    hi = _CODE_HI[kind]
    for j in range(n):
        s = step[j]
        if s != np.float32(0.0) and np.isfinite(s) and np.isfinite(bias[j]):
            L[j] = _nearest_code(x[r, base + j], s, bias[j], zero, lo, hi)


# -- the simple types: llama.cpp's reference rounding, bit for bit --------------------------
# One kernel per family serves quantize (frozen False: pick d and m from the block, store them)
# and quantize_frozen (frozen True: copy the reference's d and m, and round with the block's own
# float32 d and m clamped into the f16 rounding cells of the stored ones).


@numba.njit(**INLINE)
def _absmax(x, r, base):
    amax = np.float32(0.0)
    for j in range(32):  # a plain max: vectorises
        amax = max(amax, abs(x[r, base + j]))
    return amax


@numba.njit(**INLINE)
def _peak(x, r, base):
    """Signed value of the first element of largest magnitude (gguf's argmax of |x|)."""
    amax = _absmax(x, r, base)
    for j in range(32):
        if abs(x[r, base + j]) == amax:
            return x[r, base + j]
    return x[r, base]


@numba.njit(**INLINE)
def _inverse(d):
    return np.float32(0.0) if d == np.float32(0.0) else np.float32(1.0) / d


@numba.njit(**INLINE)
def _sym_code(v, inv, offset, top):
    """trunc(v * inv + offset) clamped to [0, top] (Q4_0, Q5_0: offset 8.5 or 16.5).

    inf and NaN give 0, as for _round_away.
    """
    t = v * inv + offset
    if not np.isfinite(t):
        return 0
    return _clamp(np.int64(min(max(t, np.float32(-1.0)), np.float32(64.0))), 0, top)


@numba.njit(**INLINE)
def _affine_code(v, m, inv, top):
    """trunc((v - m) * inv + 0.5) clamped to [0, top] (Q4_1, Q5_1); inf and NaN give 0."""
    t = (v - m) * inv + np.float32(0.5)
    if not np.isfinite(t):
        return 0
    return _clamp(np.int64(min(max(t, np.float32(-1.0)), np.float32(64.0))), 0, top)


@numba.njit(**INLINE)
def _scale_field(x, r, o, d, ref, frozen, out):
    """Store f16(d) at o, or (frozen) copy the reference's and return d clamped into its cell."""
    if frozen:
        out[r, o] = ref[r, o]
        out[r, o + 1] = ref[r, o + 1]
        return _f16_cell(d, _f16_bits_at(ref, r, o))
    _put_f16(out, r, o, _f16_bits(d))
    return d


@numba.njit(**PARALLEL)
def _q8_0(x, ref, out, bad, frozen):
    rows, cols = x.shape
    for r in numba.prange(rows):
        if not _row_finite(x, r):
            bad[r] = True
            continue
        for b in range(cols // 32):
            o = b * 34
            base = b * 32
            d = _absmax(x, r, base) / np.float32(127.0)
            inv = _inverse(_scale_field(x, r, o, d, ref, frozen, out))
            for j in range(32):
                q = _clamp(_round_away(x[r, base + j] * inv), -128, 127)
                out[r, o + 2 + j] = np.uint8(q & 0xFF)


@numba.njit(**PARALLEL)
def _q4_0_q5_0(x, ref, out, bad, frozen, five):
    rows, cols = x.shape
    size = 22 if five else 18
    top = 31 if five else 15
    offset = np.float32(16.5) if five else np.float32(8.5)
    levels = np.float32(-16.0) if five else np.float32(-8.0)
    for r in numba.prange(rows):
        if not _row_finite(x, r):
            bad[r] = True
            continue
        for b in range(cols // 32):
            o = b * size
            base = b * 32
            d = _peak(x, r, base) / levels
            inv = _inverse(_scale_field(x, r, o, d, ref, frozen, out))
            qs = o + 6 if five else o + 2
            qh = np.uint32(0)
            for j in range(16):
                lo = _sym_code(x[r, base + j], inv, offset, top)
                hi = _sym_code(x[r, base + j + 16], inv, offset, top)
                out[r, qs + j] = np.uint8((lo & 15) | ((hi & 15) << 4))
                qh |= (np.uint32(lo >> 4) << np.uint32(j)) | (
                    np.uint32(hi >> 4) << np.uint32(j + 16)
                )
            if five:
                for k in range(4):
                    out[r, o + 2 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@numba.njit(**PARALLEL)
def _q4_1_q5_1(x, ref, out, bad, frozen, five):
    rows, cols = x.shape
    size = 24 if five else 20
    top = 31 if five else 15
    levels = np.float32(31.0) if five else np.float32(15.0)
    for r in numba.prange(rows):
        if not _row_finite(x, r):
            bad[r] = True
            continue
        for b in range(cols // 32):
            o = b * size
            base = b * 32
            lo = x[r, base]
            hi = x[r, base]
            for j in range(1, 32):  # first-found extremes, as the reference (signed zeros)
                v = x[r, base + j]
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            inv = _inverse(_scale_field(x, r, o, (hi - lo) / levels, ref, frozen, out))
            m = _scale_field(x, r, o + 2, lo, ref, frozen, out)
            qs = o + 8 if five else o + 4
            qh = np.uint32(0)
            for j in range(16):
                a = _affine_code(x[r, base + j], m, inv, top)
                c = _affine_code(x[r, base + j + 16], m, inv, top)
                out[r, qs + j] = np.uint8((a & 15) | ((c & 15) << 4))
                qh |= (np.uint32(a >> 4) << np.uint32(j)) | (np.uint32(c >> 4) << np.uint32(j + 16))
            if five:
                for k in range(4):
                    out[r, o + 4 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


def _simple(
    qtype: str, w: np.ndarray, ref: np.ndarray, out: np.ndarray, bad: np.ndarray, frozen: bool
) -> None:
    """Run the kernel of a simple type (quantize, or frozen against ref's scales)."""
    if qtype == "Q8_0":
        _q8_0(w, ref, out, bad, frozen)
    elif qtype in ("Q4_0", "Q5_0"):
        _q4_0_q5_0(w, ref, out, bad, frozen, qtype == "Q5_0")
    else:
        _q4_1_q5_1(w, ref, out, bad, frozen, qtype == "Q5_1")


# -- K-quants: scale search -----------------------------------------------------------------
# Unit weights throughout: the fits minimise the plain squared error of the sub-block. (llama.cpp
# weighs elements by rms + |x|, or x^2 for Q6_K, trading some RMS error for the large values.)
# Float sums run in four interleaved partials (a fixed order: results do not depend on the CPU)
# so the dependency chains overlap; sums of codes are integers.


@numba.njit(**INLINE)
def _round_codes(xs, n, inv, origin, lo, hi, q):
    """q[j] = rint(inv * (xs[j] - origin)) clamped to [lo, hi]; returns (sum q, sum q^2).

    The code sums are integers, exact in any order, so they vectorise.
    """
    sl = 0
    sl2 = 0
    for j in range(n):
        k = np.int64(min(max(np.rint(inv * (xs[j] - origin)), lo), hi))
        q[j] = k
        sl += k
        sl2 += k * k
    return np.float64(sl), np.float64(sl2)


@numba.njit(**INLINE)
def _dot(a, b, n):
    """sum a[j] * b[j] over n (a multiple of 4) elements, in four interleaved partial sums."""
    p0 = p1 = p2 = p3 = 0.0
    for j in range(0, n, 4):
        p0 += a[j] * b[j]
        p1 += a[j + 1] * b[j + 1]
        p2 += a[j + 2] * b[j + 2]
        p3 += a[j + 3] * b[j + 3]
    return (p0 + p1) + (p2 + p3)


@numba.njit(**INLINE)
def _load(x, r, base, n, xs):
    """Copy x[r, base:base + n] to xs (float64); return (min, max, sum, sum of squares)."""
    lo = np.inf
    hi = -np.inf
    sx = 0.0
    for j in range(n):
        v = np.float64(x[r, base + j])
        xs[j] = v
        lo = min(lo, v)
        hi = max(hi, v)
        sx += v
    return lo, hi, sx, _dot(xs, xs, n)


@numba.njit(**INLINE)
def _fit_affine(x, r, base, nmax, steps, xs, q):
    """Scale a and min m >= 0 so a * code - m (codes 0..nmax) fits 32 elements of x best.

    Tries steps + 1 grids spanning min(x, 0)..max(x) with nmax - 1 to nmax + 1 levels; for the
    codes each grid rounds to, solves least squares for (a, -m) (m clamped to >= 0) and keeps
    the fit of least squared error; a last pass re-rounds with the best fit and solves again.
    steps 0 gives the naive fit (max - min) / nmax.
    """
    n = 32
    lo, hi, sx, sx2 = _load(x, r, base, n, xs)
    lo = min(lo, 0.0)
    span = hi - lo
    if span <= 0.0:
        return 0.0, -lo
    best_a = span / nmax
    best_b = lo
    if steps == 0:
        return best_a, -best_b
    best_err = np.inf
    for s in range(-1, steps + 2):
        if s == -1:  # the naive grid
            inv = nmax / span
            origin = lo
        elif s <= steps:
            inv = (nmax - 1.0 + 0.1 * s) / span
            origin = lo
        else:  # the best fit's own rounding
            inv = 1.0 / best_a
            origin = best_b
        sl, sl2 = _round_codes(xs, n, inv, origin, 0.0, nmax, q)
        sxl = _dot(xs, q, n)
        if s == -1:
            a = best_a
            b = best_b
        else:
            det = n * sl2 - sl * sl
            if det <= 0.0:
                continue
            a = (n * sxl - sx * sl) / det
            b = (sl2 * sx - sl * sxl) / det
            if b > 0.0:
                b = 0.0
                a = sxl / sl2
            if not a > 0.0:
                continue
        # sum (a q + b - x)^2, expanded in the sums
        err = a * a * sl2 + 2.0 * a * b * sl + b * b * n - 2.0 * a * sxl - 2.0 * b * sx + sx2
        if err < best_err:
            best_err = err
            best_a = a
            best_b = b
    return best_a, -best_b


@numba.njit(**INLINE)
def _fit_symmetric(x, r, base, steps, xs, q):
    """Signed scale a so a * code (codes -32..31) fits 16 elements of x best.

    The largest-magnitude element maps near code -32 (the side with one more level): grids of
    32 + 0.1 * s levels for s in -steps..steps, each rounding with its least-squares scale,
    keeping the least squared error; a last pass re-rounds with the best scale. steps 0 gives
    the naive scale peak / -32.
    """
    n = 16
    lo, hi, _, _ = _load(x, r, base, n, xs)
    peak = lo if -lo > hi else hi
    if abs(peak) < _GROUP_EPS:
        return 0.0
    best_a = peak / -32.0
    if steps == 0:
        return best_a
    best_gain = -1.0
    for s in range(-steps, steps + 2):
        inv = -(32.0 + 0.1 * s) / peak if s <= steps else 1.0 / best_a
        _, sl2 = _round_codes(xs, n, inv, 0.0, -32.0, 31.0, q)
        sxl = _dot(xs, q, n)
        # For these codes the best scale is sxl / sl2, leaving error sum(x^2) - sxl^2 / sl2.
        if sl2 > 0.0 and sxl * sxl > best_gain * sl2:
            best_gain = sxl * sxl / sl2
            best_a = sxl / sl2
    return best_a


@numba.njit(**INLINE)
def _grid_error(xs, n, step, bias, lo, hi, zero, q):
    """Squared error of xs rounded to nearest on the grid step * (code - zero) + bias."""
    s = np.float64(step)
    b = np.float64(bias)
    if s == 0.0:
        for j in range(n):
            q[j] = b - xs[j]
    else:
        inv = 1.0 / s
        for j in range(n):
            k = min(max(np.rint((xs[j] - b) * inv) + zero, lo), hi)
            q[j] = s * (k - zero) + b - xs[j]
    return _dot(q, q, n)


@numba.njit(**INLINE)
def _encode_k4(kind, x, r, base, out, o, search, scales, mins, xs, q):
    """Choose and write d, dmin and the 8 six-bit scales and mins of one Q4_K/Q5_K block."""
    nmax = 15.0 if kind == _Q4_K else 31.0
    steps = 20 if search else 0
    max_scale = 0.0
    max_min = 0.0
    for sb in range(8):
        a, m = _fit_affine(x, r, base + 32 * sb, nmax, steps, xs, q)
        scales[sb] = a
        mins[sb] = m
        max_scale = max(max_scale, a)
        max_min = max(max_min, m)
    d_bits = _f16_bits(np.float32(max_scale / 63.0))
    m_bits = _f16_bits(np.float32(max_min / 63.0))
    d = np.float32(f16_to_f64(d_bits))
    dmin = np.float32(f16_to_f64(m_bits))
    ls = np.zeros(8, dtype=np.int64)
    lm = np.zeros(8, dtype=np.int64)
    for sb in range(8):
        s0 = _clamp(np.int64(np.rint(scales[sb] / d)), 0, 63) if d > 0 else 0
        m0 = _clamp(np.int64(np.rint(mins[sb] / dmin)), 0, 63) if dmin > 0 else 0
        ls[sb] = s0
        lm[sb] = m0
        if not search:
            continue
        # The six-bit rounding moved the fit: keep the best of the neighbouring grid points.
        _load(x, r, base + 32 * sb, 32, xs)
        best = np.inf
        for s1 in range(max(s0 - 1, 0), min(s0 + 1, 63) + 1):
            if s1 != s0 and d == 0:
                continue
            for m1 in range(max(m0 - 1, 0), min(m0 + 1, 63) + 1):
                if m1 != m0 and dmin == 0:
                    continue
                step = d * np.float32(s1)
                bias = -(dmin * np.float32(m1))
                err = _grid_error(xs, 32, step, bias, 0.0, nmax, 0.0, q)
                if err < best:
                    best = err
                    ls[sb] = s1
                    lm[sb] = m1
    _put_f16(out, r, o, d_bits)
    _put_f16(out, r, o + 2, m_bits)
    for i in range(4):
        out[r, o + 4 + i] = np.uint8(ls[i] | ((ls[i + 4] >> 4) << 6))
        out[r, o + 8 + i] = np.uint8(lm[i] | ((lm[i + 4] >> 4) << 6))
        out[r, o + 12 + i] = np.uint8((ls[i + 4] & 15) | ((lm[i + 4] & 15) << 4))


@numba.njit(**INLINE)
def _encode_q6_k(x, r, base, out, o, search, scales, xs, q):
    """Choose and write the 16 int8 scales and the f16 d of one Q6_K block."""
    steps = 9 if search else 0
    peak = 0.0
    for sb in range(16):
        a = _fit_symmetric(x, r, base + 16 * sb, steps, xs, q)
        scales[sb] = a
        if abs(a) > abs(peak):
            peak = a
    if abs(peak) < _GROUP_EPS:
        for k in range(18):
            out[r, o + 192 + k] = 0
        return
    # The largest scale gets -128, the int8 end with one more level.
    d_bits = _f16_bits(np.float32(peak / -128.0))
    d = np.float32(f16_to_f64(d_bits))
    for sb in range(16):
        s0 = _clamp(np.int64(np.rint(scales[sb] / d)), -128, 127) if d != 0 else 0
        best_s = s0
        if search and d != 0:
            _load(x, r, base + 16 * sb, 16, xs)
            best = np.inf
            for s1 in range(max(s0 - 1, -128), min(s0 + 1, 127) + 1):
                err = _grid_error(xs, 16, d * np.float32(s1), 0.0, 0.0, 63.0, 32.0, q)
                if err < best:
                    best = err
                    best_s = s1
        out[r, o + 192 + sb] = np.uint8(best_s & 0xFF)
    _put_f16(out, r, o + 208, d_bits)


@numba.njit(**PARALLEL)
def _quantize_k(kind, x, out, bad, search):
    rows, cols = x.shape
    size = _TYPE_SIZE[kind]
    for r in numba.prange(rows):
        if not _row_finite(x, r):
            bad[r] = True
            continue
        L = np.empty(256, dtype=np.int64)
        step = np.empty(256, dtype=np.float32)
        bias = np.empty(256, dtype=np.float32)
        scales = np.empty(16)
        mins = np.empty(16)
        xs = np.empty(32)
        q = np.empty(32)
        for b in range(cols // 256):
            o = b * size
            base = b * 256
            if kind == _Q6_K:
                _encode_q6_k(x, r, base, out, o, search, scales, xs, q)
            else:
                _encode_k4(kind, x, r, base, out, o, search, scales, mins, xs, q)
            # Codes: round to nearest against the stored scales, exactly as quantize_frozen.
            for j in range(256):
                L[j] = _ZERO[kind]
            _params(kind, out, r, o, step, bias)
            _nearest_block(kind, x, r, base, 256, step, bias, L)
            _pack(kind, out, r, o, L)


@numba.njit(**PARALLEL)
def _frozen_nearest(kind, x, ref, out, bad):
    rows, cols = x.shape
    size = _TYPE_SIZE[kind]
    n = _BLOCK[kind]
    first, length = _header(kind)
    for r in numba.prange(rows):
        if not _row_finite(x, r):
            bad[r] = True
            continue
        L = np.empty(256, dtype=np.int64)
        step = np.empty(256, dtype=np.float32)
        bias = np.empty(256, dtype=np.float32)
        for b in range(cols // n):
            o = b * size
            for k in range(first, first + length):
                out[r, o + k] = ref[r, o + k]
            _unpack(kind, ref, r, o, L)
            _params(kind, ref, r, o, step, bias)
            _nearest_block(kind, x, r, b * n, n, step, bias, L)
            _pack(kind, out, r, o, L)


# -- nudging codes --------------------------------------------------------------------------


@numba.njit(**PARALLEL)
def _nudge(kind, raw, delta, uniforms, out, bad):
    rows, cols = delta.shape
    size = _TYPE_SIZE[kind]
    n = _BLOCK[kind]
    lo = _CODE_LO[kind]
    hi = _CODE_HI[kind]
    for r in numba.prange(rows):
        if not _row_finite(delta, r):
            bad[r] = True
            continue
        L = np.empty(256, dtype=np.int64)
        step = np.empty(256, dtype=np.float32)
        bias = np.empty(256, dtype=np.float32)
        for k in range(raw.shape[1]):
            out[r, k] = raw[r, k]
        for b in range(cols // n):
            o = b * size
            _params(kind, raw, r, o, step, bias)
            _unpack(kind, raw, r, o, L)
            for j in range(n):
                s = np.float64(step[j])
                dl = np.float64(delta[r, b * n + j])
                if s == 0.0 or not np.isfinite(s) or dl == 0.0:
                    continue
                ratio = abs(dl / s)
                whole = np.floor(ratio)
                moves = np.int64(min(whole, 1e6)) + np.int64(uniforms[r, b * n + j] < ratio - whole)
                if (dl > 0.0) != (s > 0.0):
                    moves = -moves
                L[j] = _clamp(L[j] + moves, lo, hi)
            _pack(kind, out, r, o, L)


# -- public wrappers ------------------------------------------------------------------------


def _kind_of(qtype: str) -> int:
    kind = _KINDS.get(qtype)
    if kind is None:
        raise ValueError(f"{qtype!r}: unknown type; quantizable types are {', '.join(QUANTIZABLE)}")
    return kind


def _check_float(qtype: str, name: str, array: np.ndarray, dtype: type) -> tuple[int, int]:
    """Validate a [rows, cols] C-contiguous array of `dtype` whose rows are whole blocks."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{qtype}: {name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 2:
        raise ValueError(f"{qtype} {list(array.shape)}: {name} must be 2-D [rows, cols]")
    rows, cols = array.shape
    if array.dtype != dtype:
        raise ValueError(
            f"{qtype} [{rows}, {cols}]: {name} must be {np.dtype(dtype).name}, got {array.dtype}"
        )
    if not array.flags.c_contiguous:
        raise ValueError(f"{qtype} [{rows}, {cols}]: {name} must be C-contiguous")
    block = BLOCK_LAYOUTS[qtype][0]
    if cols % block:
        raise ValueError(
            f"{qtype} [{rows}, {cols}]: cols {cols} is not a multiple of the block size {block}"
        )
    return rows, cols


def _check_raw(qtype: str, name: str, raw: np.ndarray, rows: int, cols: int) -> None:
    """Validate quantized bytes: a C-contiguous uint8 [rows, bytes_per_row] array."""
    block, type_size = BLOCK_LAYOUTS[qtype]
    want = (rows, cols // block * type_size)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        kind = raw.dtype if isinstance(raw, np.ndarray) else type(raw).__name__
        raise ValueError(f"{qtype} [{rows}, {cols}]: {name} must be a uint8 array, got {kind}")
    if raw.shape != want:
        raise ValueError(
            f"{qtype} [{rows}, {cols}]: {name} has shape {list(raw.shape)}, expected "
            f"[rows, cols / {block} * {type_size}] = {list(want)}"
        )
    if not raw.flags.c_contiguous:
        raise ValueError(f"{qtype} [{rows}, {cols}]: {name} must be C-contiguous")


def _raise_if_bad(qtype: str, name: str, shape: tuple[int, int], bad: np.ndarray) -> None:
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{qtype} [{shape[0]}, {shape[1]}]: {name} must be finite; rows {rows[:10].tolist()} "
            f"({rows.size} in all) hold inf or NaN"
        )


def quantize(qtype: str, w: np.ndarray, *, search: bool = True) -> np.ndarray:
    """Quantize float32 [rows, cols] weights to `qtype` bytes, uint8 [rows, bytes_per_row].

    Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are bit-exact with llama.cpp's quantize_row_*_ref (and
    gguf.quants.quantize). Q4_K, Q5_K and Q6_K search each sub-block's scale (and min) for the
    least squared error, round those to the block's 6- or 8-bit scale grid (trying
    the neighbouring grid points), then round every element to nearest against the stored
    scales. search=False gives the naive max-abs / min-max scales instead (a baseline; the
    simple types ignore it).
    """
    kind = _kind_of(qtype)
    rows, cols = _check_float(qtype, "w", w, np.float32)
    block, type_size = BLOCK_LAYOUTS[qtype]
    out = np.empty((rows, cols // block * type_size), dtype=np.uint8)
    if out.size == 0:
        return out
    bad = np.zeros(rows, dtype=np.bool_)
    if qtype in _SIMPLE:
        _simple(qtype, w, out, out, bad, False)
    else:
        _quantize_k(kind, w, out, bad, bool(search))
    _raise_if_bad(qtype, "w", (rows, cols), bad)
    return out


def quantize_frozen(
    qtype: str, w: np.ndarray, reference: np.ndarray, *, nearest: bool = False
) -> np.ndarray:
    """Quantize w with the scales of `reference` (the quantized unstamped weights) kept as is.

    Every non-code byte (d, dmin, m, sub-block scales and mins) is copied from `reference`;
    only the codes are computed from w, rounded to nearest against those scales and clamped to
    the code range. Elements whose step is zero keep the reference's code.

    For the simple types the reference quantizer rounds with its float32 scale, not the f16 one
    it stores; by default the codes are rounded the same way, with w's own float32 scale
    clamped into the f16 rounding cell of the stored scale, so that
    quantize_frozen(qtype, w, quantize(qtype, w)) == quantize(qtype, w) bit for bit.
    The price: where a stamp moves a block's peak (or min), that block's float32 scale moves
    within the cell and may flip a few unstamped codes (~0.3% of codes for Q8_0 with a 0.3-step
    mark on a quarter of the elements, less for 4/5 bits). nearest=True rounds against the
    stored f16 values instead: the code whose dequantized value is nearest w, never moving an
    unstamped code, but differing from gguf's code by one where gguf's is not the nearest.
    K-quants always round against the stored scales (so does quantize), so `nearest` is moot.
    """
    kind = _kind_of(qtype)
    rows, cols = _check_float(qtype, "w", w, np.float32)
    _check_raw(qtype, "reference", reference, rows, cols)
    out = np.empty_like(reference)
    if out.size == 0:
        return out
    bad = np.zeros(rows, dtype=np.bool_)
    if qtype in _SIMPLE and not nearest:
        _simple(qtype, w, reference, out, bad, True)
    else:
        _frozen_nearest(kind, w, reference, out, bad)
    _raise_if_bad(qtype, "w", (rows, cols), bad)
    return out


def nudge_codes(qtype: str, raw: np.ndarray, delta: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Stamp delta straight into quantized bytes by stochastic code steps, scales untouched.

    Each element's code moves one step (step = its dequantization step: d for the simple types,
    d * sc for K-quants) in the direction of delta with probability |delta| / |step|, decided by
    uniforms < that probability; |delta| beyond one step moves floor(|delta| / |step|) steps
    plus one more with the remaining probability. Codes are clamped to the code range, so the
    expected dequantized value moves by exactly delta unless clamped. Elements with a zero step
    or a zero delta keep their code. raw: uint8 [rows, bytes_per_row]; delta: float32 and
    uniforms: float64 in [0, 1), both [rows, cols].
    """
    kind = _kind_of(qtype)
    rows, cols = _check_float(qtype, "delta", delta, np.float32)
    _check_raw(qtype, "raw", raw, rows, cols)
    if not isinstance(uniforms, np.ndarray) or uniforms.shape != (rows, cols):
        shape = (
            list(uniforms.shape) if isinstance(uniforms, np.ndarray) else type(uniforms).__name__
        )
        raise ValueError(
            f"{qtype} [{rows}, {cols}]: uniforms has shape {shape}, expected the delta's"
        )
    _check_float(qtype, "uniforms", uniforms, np.float64)
    out = np.empty_like(raw)
    if out.size == 0:
        return out
    bad = np.zeros(rows, dtype=np.bool_)
    _nudge(kind, raw, delta, uniforms, out, bad)
    _raise_if_bad(qtype, "delta", (rows, cols), bad)
    return out
