"""Quantize float32 rows to GGML block types, freely or against frozen scales, and nudge codes."""

import numba
import numpy as np

from weightmark.kernels.bits import f16_to_f64, f32_as_u32, u32_as_f32
from weightmark.kernels.config import INLINE, PARALLEL
from weightmark.kernels.quant import BLOCK_LAYOUTS

__all__ = ["QUANTIZABLE", "nudge_codes", "quantize", "quantize_frozen", "quantize_stamped"]

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
_F0 = np.float32(0.0)
_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: (v + _MAGIC) - _MAGIC rounds |v| < 2^22 half to even
_EXACT = np.float32(4194304.0)  # 2^22


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
    """True when every value of row r is finite: no magnitude's bits reach inf's (an unsigned
    max, which vectorises)."""
    top = np.uint32(0)
    for c in range(x.shape[1]):
        top = max(top, f32_as_u32(x[r, c]) & np.uint32(0x7FFFFFFF))
    return top < np.uint32(0x7F800000)


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
def _nearest_run(x, r, base, n, s, b, zero, lo, hi, L, o):
    """L[o + j] = the stored code whose value s * (code - zero) + b is nearest x[r, base + j],
    clamped to [lo, hi], for j < n (s non-zero and finite): rint((x - b) / s) in float32, ties to
    even, by the 1.5 * 2^23 trick below 2^22 (larger quotients clamp anyway); a NaN quotient
    gives lo. All in float32, so the loop vectorises."""
    qlo = np.float32(lo - zero)
    qhi = np.float32(hi - zero)
    for j in range(n):
        v = (x[r, base + j] - b) / s
        q = (v + _MAGIC) - _MAGIC if abs(v) < _EXACT else v
        q = min(q, qhi) if q >= qlo else qlo
        L[o + j] = np.int64(q) + zero


@numba.njit(**INLINE)
def _nearest_block(kind, x, r, base, n, step, bias, L):
    """Round-to-nearest codes of x[r, base:base + n] against step/bias (step 0: L unchanged).

    step and bias are constant over each sub-block (16 elements for Q6_K, 32 for the others),
    so the codes are made one sub-block at a time."""
    zero = _ZERO[kind]
    lo = _CODE_LO[kind]
    hi = _CODE_HI[kind]
    run = 16 if kind == _Q6_K else 32
    for first in range(0, n, run):
        s = step[first]
        b = bias[first]
        if s != np.float32(0.0) and np.isfinite(s) and np.isfinite(b):
            _nearest_run(x, r, base + first, run, s, b, zero, lo, hi, L, first)


# -- the simple types: llama.cpp's reference rounding, bit for bit --------------------------
# One kernel per family serves quantize (frozen False: pick d and m from the block, store them)
# and quantize_frozen (frozen True: copy the reference's d and m, and round with the block's own
# float32 d and m clamped into the f16 rounding cells of the stored ones).


@numba.njit(**INLINE)
def _absmax(x, r, base):
    """Largest |x| of the 32 elements at base (finite values: magnitudes order as their bits,
    so an unsigned max, which vectorises)."""
    top = np.uint32(0)
    for j in range(32):
        top = max(top, f32_as_u32(x[r, base + j]) & np.uint32(0x7FFFFFFF))
    return u32_as_f32(top)


@numba.njit(**INLINE)
def _peak(x, r, base):
    """Signed value of the first element of largest magnitude (gguf's argmax of |x|): the
    first index whose magnitude bits are the maximum's, found as a minimum (vectorises)."""
    top = np.uint32(0)
    for j in range(32):
        top = max(top, f32_as_u32(x[r, base + j]) & np.uint32(0x7FFFFFFF))
    first = 32
    for j in range(32):
        first = min(first, j if f32_as_u32(x[r, base + j]) & np.uint32(0x7FFFFFFF) == top else 32)
    return x[r, base + first]


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


@numba.njit(**INLINE)
def _q8_0_block(x, r, b, ref, out, frozen, codes):
    """Block b of row r in Q8_0: its d and (with `codes`) its codes."""
    o = b * 34
    base = b * 32
    d = _absmax(x, r, base) / np.float32(127.0)
    inv = _inverse(_scale_field(x, r, o, d, ref, frozen, out))
    if codes:
        for j in range(32):
            q = _clamp(_round_away(x[r, base + j] * inv), -128, 127)
            out[r, o + 2 + j] = np.uint8(q & 0xFF)


@numba.njit(**INLINE)
def _q4_0_q5_0_block(x, r, b, ref, out, frozen, five, codes):
    """Block b of row r in Q4_0 or (five) Q5_0: its d and (with `codes`) its codes."""
    size = 22 if five else 18
    top = 31 if five else 15
    offset = np.float32(16.5) if five else np.float32(8.5)
    levels = np.float32(-16.0) if five else np.float32(-8.0)
    o = b * size
    base = b * 32
    d = _peak(x, r, base) / levels
    inv = _inverse(_scale_field(x, r, o, d, ref, frozen, out))
    if not codes:
        return
    qs = o + 6 if five else o + 2
    qh = np.uint32(0)
    for j in range(16):
        lo = _sym_code(x[r, base + j], inv, offset, top)
        hi = _sym_code(x[r, base + j + 16], inv, offset, top)
        out[r, qs + j] = np.uint8((lo & 15) | ((hi & 15) << 4))
        qh |= (np.uint32(lo >> 4) << np.uint32(j)) | (np.uint32(hi >> 4) << np.uint32(j + 16))
    if five:
        for k in range(4):
            out[r, o + 2 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@numba.njit(**INLINE)
def _q4_1_q5_1_block(x, r, b, ref, out, frozen, five, codes):
    """Block b of row r in Q4_1 or (five) Q5_1: its d and m and (with `codes`) its codes."""
    size = 24 if five else 20
    top = 31 if five else 15
    levels = np.float32(31.0) if five else np.float32(15.0)
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
    if not codes:
        return
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


@numba.njit(**INLINE)
def _simple_block(kind, x, r, b, ref, out, frozen, codes):
    """Block b of row r of a simple type, as llama.cpp's quantize_row_*_ref makes it."""
    if kind == _Q8_0:
        _q8_0_block(x, r, b, ref, out, frozen, codes)
    elif kind == _Q4_0 or kind == _Q5_0:
        _q4_0_q5_0_block(x, r, b, ref, out, frozen, kind == _Q5_0, codes)
    else:
        _q4_1_q5_1_block(x, r, b, ref, out, frozen, kind == _Q5_1, codes)


@numba.njit(**PARALLEL)
def _simple_kernel(kind, x, ref, out, bad, frozen):
    rows, cols = x.shape
    for r in numba.prange(rows):
        if not _row_finite(x, r):
            bad[r] = True
            continue
        for b in range(cols // 32):
            _simple_block(kind, x, r, b, ref, out, frozen, True)


@numba.njit(**INLINE)
def _stamped_block(kind, y, r, b, out, o, L):
    """Codes of y's block b rounded to nearest against the scale fields just written at o;
    False (nothing written) where the step is zero or not finite, as _nearest_block skips it."""
    step = _f16_at(out, r, o)  # d, and m for the affine types, as _params reads them
    bias = _f16_at(out, r, o + 2) if kind == _Q4_1 or kind == _Q5_1 else _F0
    if step == _F0 or not np.isfinite(step) or not np.isfinite(bias):
        return False
    _nearest_run(y, r, b * 32, 32, step, bias, _ZERO[kind], _CODE_LO[kind], _CODE_HI[kind], L, 0)
    _pack(kind, out, r, o, L)
    return True


@numba.njit(**PARALLEL)
def _simple_stamped(kind, x, y, out, bad):
    """The simple types' quantize_stamped: scales from x as the reference quantizer picks them,
    codes of y rounded to nearest against them (x's own codes where the step is zero). One loop
    per family, so that each block's work is a direct call."""
    rows, cols = x.shape
    size = _TYPE_SIZE[kind]
    for r in numba.prange(rows):
        if not _row_finite(x, r):
            bad[r] = 1
            continue
        if not _row_finite(y, r):
            bad[r] = 2
            continue
        L = np.empty(32, dtype=np.int64)
        if kind == _Q8_0:
            for b in range(cols // 32):
                _q8_0_block(x, r, b, out, out, False, False)
                if not _stamped_block(kind, y, r, b, out, b * size, L):
                    _q8_0_block(x, r, b, out, out, False, True)
        elif kind == _Q4_0 or kind == _Q5_0:
            five = kind == _Q5_0
            for b in range(cols // 32):
                _q4_0_q5_0_block(x, r, b, out, out, False, five, False)
                if not _stamped_block(kind, y, r, b, out, b * size, L):
                    _q4_0_q5_0_block(x, r, b, out, out, False, five, True)
        else:
            five = kind == _Q5_1
            for b in range(cols // 32):
                _q4_1_q5_1_block(x, r, b, out, out, False, five, False)
                if not _stamped_block(kind, y, r, b, out, b * size, L):
                    _q4_1_q5_1_block(x, r, b, out, out, False, five, True)


def _simple(
    qtype: str, w: np.ndarray, ref: np.ndarray, out: np.ndarray, bad: np.ndarray, frozen: bool
) -> None:
    """Run the kernel of a simple type (quantize, or frozen against ref's scales)."""
    _simple_kernel(_KINDS[qtype], w, ref, out, bad, frozen)


# -- K-quants: naive scales (search=False) --------------------------------------------------
# The baseline the scale search is measured against: each sub-block's min-max (Q4_K, Q5_K) or
# max-abs (Q6_K) scale, rounded to the block's 6- or 8-bit scale grid.


@numba.njit(**INLINE)
def _naive_k4(kind, x, r, base, out, o, scales, mins):
    """d, dmin and the 8 six-bit scales and mins of one Q4_K/Q5_K block from min-max fits."""
    nmax = 15.0 if kind == _Q4_K else 31.0
    max_scale = 0.0
    max_min = 0.0
    for sb in range(8):
        lo = 0.0
        hi = -np.inf
        for j in range(32):
            v = np.float64(x[r, base + 32 * sb + j])
            lo = min(lo, v)
            hi = max(hi, v)
        scales[sb] = (hi - lo) / nmax if hi > lo else 0.0
        mins[sb] = -lo
        max_scale = max(max_scale, scales[sb])
        max_min = max(max_min, mins[sb])
    d_bits = _f16_bits(np.float32(max_scale / 63.0))
    m_bits = _f16_bits(np.float32(max_min / 63.0))
    d = np.float32(f16_to_f64(d_bits))
    dmin = np.float32(f16_to_f64(m_bits))
    ls = np.zeros(8, dtype=np.int64)
    lm = np.zeros(8, dtype=np.int64)
    for sb in range(8):
        ls[sb] = _clamp(np.int64(np.rint(scales[sb] / d)), 0, 63) if d > 0 else 0
        lm[sb] = _clamp(np.int64(np.rint(mins[sb] / dmin)), 0, 63) if dmin > 0 else 0
    _put_f16(out, r, o, d_bits)
    _put_f16(out, r, o + 2, m_bits)
    for i in range(4):
        out[r, o + 4 + i] = np.uint8(ls[i] | ((ls[i + 4] >> 4) << 6))
        out[r, o + 8 + i] = np.uint8(lm[i] | ((lm[i + 4] >> 4) << 6))
        out[r, o + 12 + i] = np.uint8((ls[i + 4] & 15) | ((lm[i + 4] & 15) << 4))


@numba.njit(**INLINE)
def _naive_q6_k(x, r, base, out, o, scales):
    """The 16 int8 scales and the f16 d of one Q6_K block: each sub-block's peak maps to -32."""
    peak = 0.0
    for sb in range(16):
        p = 0.0
        for j in range(16):
            v = np.float64(x[r, base + 16 * sb + j])
            if abs(v) > abs(p):
                p = v
        scales[sb] = p / -32.0 if abs(p) >= _GROUP_EPS else 0.0
        if abs(scales[sb]) > abs(peak):
            peak = scales[sb]
    if abs(peak) < _GROUP_EPS:
        for k in range(18):
            out[r, o + 192 + k] = 0
        return
    d_bits = _f16_bits(np.float32(peak / -128.0))
    d = np.float32(f16_to_f64(d_bits))
    for sb in range(16):
        s0 = _clamp(np.int64(np.rint(scales[sb] / d)), -128, 127) if d != 0 else 0
        out[r, o + 192 + sb] = np.uint8(s0 & 0xFF)
    _put_f16(out, r, o + 208, d_bits)


# -- K-quants: llama.cpp's scale search, float32 step for step ------------------------------
# quantize_row_q4_K_ref / q5_K_ref (make_qkx2_quants with weights rms + |x|) and
# quantize_row_q6_K_ref (make_qx_quants with weights x^2), in float32 and in the reference's
# order of operations, so that quantize gives llama-quantize's bytes.

@numba.njit(**INLINE)
def _nearest_int(v):
    """llama.cpp's nearest_int: float32 to the nearest integer, ties to even."""
    return np.int64(np.rint(v))


# The search tries its candidate scales side by side: lane k of the [_LANES] buffers holds one
# candidate (a step of make_qkx2_quants or make_qx_quants), and the loops over elements update
# every lane at once, which the compiler turns into SIMD. Each lane's sums still add the elements
# in the reference's order, so every lane holds the reference's float32 for float32; the choice
# among them is a short scalar loop in the reference's order.
_LANES = 24  # Q4_K's 21 steps at most, rounded up to whole 8-wide vectors
_I64 = np.float32(9.223372036854775808e18)  # 2^63: where converting to int64 stops being exact
# rows of the lane buffer
_ISCALE, _SUM_L, _SUM_L2, _SUM_XL, _SCALE, _MIN, _ERROR, _DET = range(8)


@numba.njit(**INLINE)
def _code_of(v, top):
    """_clamp(_nearest_int(v), 0, top) as float32, without leaving float32 (so it vectorises).

    Rounds as nearest_int where that is exact (|v| < 2^22); larger finite values clamp to top;
    negative values give 0, and so do NaN, inf and values beyond int64, whose int64 conversion
    (INT64_MIN) clamps to 0.
    """
    if v >= _F0 and v < _EXACT:
        return min((v + _MAGIC) - _MAGIC, top)
    if v >= _EXACT and v < _I64:
        return top
    return _F0


@numba.njit(**INLINE)
def _signed_code_of(v, lo, hi):
    """_clamp(_nearest_int(v), lo, hi) as float32 (lo < 0 < hi); see _code_of."""
    if abs(v) < _EXACT:
        return min(max((v + _MAGIC) - _MAGIC, lo), hi)
    if v >= _EXACT and v < _I64:
        return hi
    return lo


@numba.njit(**INLINE)
def _qkx2_steps(x, r, base, w, mn, mx, nstep, fmax, rmin, rdelta, sum_w, sum_x, lanes, codes):
    """Every step of make_qkx2_quants's search, step k in lane k, for the min mn: codes, the
    least-squares fit (scale, min; lanes where det <= 0 are not fits) and its weighted squared
    error. Lanes beyond nstep hold an all-zero grid, never taken."""
    isc = lanes[_ISCALE]
    sl = lanes[_SUM_L]
    sl2 = lanes[_SUM_L2]
    sxl = lanes[_SUM_XL]
    ts = lanes[_SCALE]
    tm = lanes[_MIN]
    err = lanes[_ERROR]
    det = lanes[_DET]
    for k in range(_LANES):
        isc[k] = (rmin + rdelta * np.float32(k) + fmax) / (mx - mn) if k <= nstep else _F0
        sl[k] = _F0
        sl2[k] = _F0
        sxl[k] = _F0
        err[k] = _F0
    for i in range(32):
        xi = x[r, base + i]
        d = xi - mn
        wi = w[i]
        for k in range(_LANES):
            fl = _code_of(isc[k] * d, fmax)
            codes[i * _LANES + k] = fl
            wl = wi * fl
            sl[k] += wl
            sl2[k] += wl * fl
            sxl[k] += wl * xi
    for k in range(_LANES):
        det[k] = sum_w * sl2[k] - sl[k] * sl[k]
        ts[k] = _F0
        tm[k] = _F0
        if det[k] > _F0:
            this_scale = (sum_w * sxl[k] - sum_x * sl[k]) / det[k]
            this_min = (sl2[k] * sum_x - sl[k] * sxl[k]) / det[k]
            if this_min > _F0:
                this_min = _F0
                this_scale = sxl[k] / sl2[k]
            ts[k] = this_scale
            tm[k] = this_min
    for i in range(32):
        xi = x[r, base + i]
        wi = w[i]
        for k in range(_LANES):
            diff = ts[k] * codes[i * _LANES + k] + tm[k] - xi
            err[k] += wi * (diff * diff)


@numba.njit(**INLINE)
def _qkx2(x, r, base, w, nmax, rmin, rdelta, nstep, L, lanes, codes):
    """make_qkx2_quants(32, nmax, x, w, L, &min, Laux, rmin, rdelta, nstep, false): (scale, min)
    with the codes of the best fit in L[base % 256 ..]. lanes: float32 [8, _LANES] and codes:
    float32 [32 * _LANES], scratch.

    The reference's steps depend on each other only through the min: a better fit replaces it,
    and later steps round x - min. So every step is computed at once for the current min, the
    steps are taken in order, and when one replaces the min by another value the steps after it
    are computed again for the new min: the same arithmetic as the reference's, step by step.
    """
    n = 32
    o = base % 256
    mn = x[r, base]
    mx = x[r, base]
    sum_w = w[0]
    sum_x = sum_w * x[r, base]
    for i in range(1, n):
        v = x[r, base + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        sum_w += w[i]
        sum_x += w[i] * v
    if mn > _F0:
        mn = _F0
    if mx == mn:
        for i in range(n):
            L[o + i] = 0
        return _F0, -mn
    fmax = np.float32(nmax)
    iscale = fmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_error = _F0
    for i in range(n):
        li = _clamp(_nearest_int(iscale * (x[r, base + i] - mn)), 0, nmax)
        L[o + i] = li
        diff = scale * np.float32(li) + mn - x[r, base + i]
        best_error += w[i] * (diff * diff)
    err = lanes[_ERROR]
    det = lanes[_DET]
    _qkx2_steps(x, r, base, w, mn, mx, nstep, fmax, rmin, rdelta, sum_w, sum_x, lanes, codes)
    for k in range(nstep + 1):
        if det[k] > _F0 and err[k] < best_error:
            best_error = err[k]
            scale = lanes[_SCALE, k]
            for i in range(n):
                L[o + i] = np.int64(codes[i * _LANES + k])
            if lanes[_MIN, k] != mn:
                # the steps after k round x - min with the new min: computed again (all lanes;
                # those up to k are not looked at any more)
                mn = lanes[_MIN, k]
                _qkx2_steps(x, r, base, w, mn, mx, nstep, fmax, rmin, rdelta, sum_w, sum_x, lanes, codes)
    return scale, -mn


@numba.njit(**INLINE)
def _llama_k4(kind, x, r, base, out, o, scales, mins, w, L, lanes, codes):
    """quantize_row_q4_K_ref / q5_K_ref's scales of one block: d, dmin and the 6-bit scales and
    mins written at o; L holds the fits' codes (kept where a sub-block's step is zero)."""
    nmax = 15 if kind == _Q4_K else 31
    rmin = np.float32(-1.0) if kind == _Q4_K else np.float32(-0.5)
    nstep = 20 if kind == _Q4_K else 15
    max_scale = _F0
    max_min = _F0
    for j in range(8):
        sb = base + 32 * j
        sum_x2 = _F0
        for i in range(32):
            sum_x2 += x[r, sb + i] * x[r, sb + i]
        av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))
        for i in range(32):
            w[i] = av_x + abs(x[r, sb + i])
        a, m = _qkx2(x, r, sb, w, nmax, rmin, np.float32(0.1), nstep, L, lanes, codes)
        scales[j] = a
        mins[j] = m
        if a > max_scale:
            max_scale = a
        if m > max_min:
            max_min = m
    inv_scale = np.float32(63.0) / max_scale if max_scale > _F0 else _F0
    inv_min = np.float32(63.0) / max_min if max_min > _F0 else _F0
    for i in range(12):
        out[r, o + 4 + i] = 0
    for j in range(8):
        ls = min(_nearest_int(inv_scale * np.float32(scales[j])) & 0xFF, 63)
        lm = min(_nearest_int(inv_min * np.float32(mins[j])) & 0xFF, 63)
        if j < 4:
            out[r, o + 4 + j] = np.uint8(ls)
            out[r, o + 8 + j] = np.uint8(lm)
        else:
            out[r, o + 8 + j] = np.uint8((ls & 15) | ((lm & 15) << 4))
            out[r, o + j] |= np.uint8((ls >> 4) << 6)
            out[r, o + 4 + j] |= np.uint8((lm >> 4) << 6)
    _put_f16(out, r, o, _f16_bits(max_scale / np.float32(63.0)))
    _put_f16(out, r, o + 2, _f16_bits(max_min / np.float32(63.0)))


@numba.njit(**INLINE)
def _qx(x, r, base, L, lanes, codes):
    """make_qx_quants(16, 32, x, L, 1, NULL): the scale of 16 elements (weights x^2), stored
    codes (l + 32) of the best grid in L[base % 256 ..]. Lane 0 is the first grid, lanes 1..18
    the steps -9..-1, 1..9 (see _qkx2 for the lanes)."""
    n = 16
    nmax = 32
    o = base % 256
    amax = _F0
    mx = _F0
    for i in range(n):
        ax = abs(x[r, base + i])
        if ax > amax:
            amax = ax
            mx = x[r, base + i]
    if amax < np.float32(_GROUP_EPS):
        for i in range(n):
            L[o + i] = 0
        return _F0
    isc = lanes[_ISCALE]
    slx = lanes[_SUM_XL]
    sl2 = lanes[_SUM_L2]
    isc[0] = np.float32(-nmax) / mx
    for k in range(1, _LANES):
        step = k - 10 if k <= 9 else k - 9
        isc[k] = -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / mx if k <= 18 else _F0
    for k in range(_LANES):
        slx[k] = _F0
        sl2[k] = _F0
    lo = np.float32(-nmax)
    hi = np.float32(nmax - 1)
    for i in range(n):
        v = x[r, base + i]
        wt = v * v
        wx = wt * v
        for k in range(_LANES):
            fl = _signed_code_of(isc[k] * v, lo, hi)
            codes[i * _LANES + k] = fl
            slx[k] += wx * fl
            sl2[k] += wt * fl * fl
    best = 0
    scale = slx[0] / sl2[0] if sl2[0] != _F0 else _F0
    best_fit = scale * slx[0]
    for k in range(1, 19):
        if sl2[k] > _F0 and slx[k] * slx[k] > best_fit * sl2[k]:
            best = k
            scale = slx[k] / sl2[k]
            best_fit = scale * slx[k]
    for i in range(n):
        L[o + i] = nmax + np.int64(codes[i * _LANES + best])
    return scale


@numba.njit(**INLINE)
def _llama_q6_k(x, r, base, out, o, scales, L, lanes, codes):
    """quantize_row_q6_K_ref's scales of one block: the int8 scales and f16 d written at o; L
    holds the fits' codes (kept where a sub-block's step is zero). False for an all-zero block
    (every byte zero, as the reference's memset)."""
    max_scale = _F0
    max_abs = _F0
    for j in range(16):
        a = _qx(x, r, base + 16 * j, L, lanes, codes)
        scales[j] = a
        if abs(a) > max_abs:
            max_abs = abs(a)
            max_scale = a
    if max_abs < np.float32(_GROUP_EPS):
        for k in range(210):
            out[r, o + k] = 0
        return False
    iscale = np.float32(-128.0) / max_scale
    _put_f16(out, r, o + 208, _f16_bits(np.float32(1.0) / iscale))
    for j in range(16):
        out[r, o + 192 + j] = np.uint8(min(127, _nearest_int(iscale * np.float32(scales[j]))) & 0xFF)
    return True


@numba.njit(**PARALLEL)
def _quantize_k(kind, x, y, out, bad, search, stamped):
    """Scales from x (searched as llama.cpp does, or naive), codes of y rounded to nearest
    against them (the fits' codes of x where a step is zero); y is x unless `stamped`.
    bad[r]: 1 where x's row r is not finite, 2 where y's is not."""
    rows, cols = x.shape
    size = _TYPE_SIZE[kind]
    for r in numba.prange(rows):
        if not _row_finite(x, r):
            bad[r] = 1
            continue
        if stamped and not _row_finite(y, r):
            bad[r] = 2
            continue
        L = np.empty(256, dtype=np.int64)
        lanes = np.empty((8, _LANES), dtype=np.float32)
        codes = np.empty(32 * _LANES, dtype=np.float32)
        step = np.empty(256, dtype=np.float32)
        bias = np.empty(256, dtype=np.float32)
        scales = np.empty(16)
        mins = np.empty(16)
        fscales = np.empty(16, dtype=np.float32)
        fmins = np.empty(16, dtype=np.float32)
        w = np.empty(32, dtype=np.float32)
        for b in range(cols // 256):
            o = b * size
            base = b * 256
            for j in range(256):
                L[j] = _ZERO[kind]
            if search and kind == _Q6_K:
                if not _llama_q6_k(x, r, base, out, o, fscales, L, lanes, codes):
                    continue  # an all-zero block: every byte zero
            elif search:
                _llama_k4(kind, x, r, base, out, o, fscales, fmins, w, L, lanes, codes)
            elif kind == _Q6_K:
                _naive_q6_k(x, r, base, out, o, scales)
            else:
                _naive_k4(kind, x, r, base, out, o, scales, mins)
            # Codes: round to nearest against the stored scales, exactly as quantize_frozen.
            _params(kind, out, r, o, step, bias)
            _nearest_block(kind, y, r, base, 256, step, bias, L)
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
    gguf.quants.quantize); so are Q4_K, Q5_K and Q6_K (quantize_row_q4_K_ref, q5_K_ref and
    q6_K_ref: each sub-block's scale and min searched for the least weighted squared error,
    weights rms + |x| or x^2, rounded to the block's 6- or 8-bit scale grid, then every element
    rounded to nearest against the stored scales), which llama-quantize uses without an
    importance matrix. search=False gives the naive max-abs / min-max scales instead (a
    baseline; the simple types ignore it).
    """
    kind = _kind_of(qtype)
    rows, cols = _check_float(qtype, "w", w, np.float32)
    block, type_size = BLOCK_LAYOUTS[qtype]
    out = np.empty((rows, cols // block * type_size), dtype=np.uint8)
    if out.size == 0:
        return out
    if qtype in _SIMPLE:
        bad = np.zeros(rows, dtype=np.bool_)
        _simple(qtype, w, out, out, bad, False)
        _raise_if_bad(qtype, "w", (rows, cols), bad)
    else:
        which = np.zeros(rows, dtype=np.int8)
        _quantize_k(kind, w, w, out, which, bool(search), False)
        _raise_if_bad(qtype, "w", (rows, cols), which == 1)
    return out


def quantize_stamped(qtype: str, w: np.ndarray, stamped: np.ndarray) -> np.ndarray:
    """Quantize `stamped` with the scales quantize picks for `w`, in one pass over the rows.

    The bytes of quantize_frozen(qtype, stamped, quantize(qtype, w), nearest=True): every
    scale field is quantize(qtype, w)'s; each code is the one whose dequantized value is nearest
    the stamped value (w's own code where the step is zero), so a watermark moves only the
    codes it pushes across a rounding boundary. w and stamped: float32 [rows, cols], C-contiguous.
    """
    kind = _kind_of(qtype)
    rows, cols = _check_float(qtype, "w", w, np.float32)
    _check_float(qtype, "stamped", stamped, np.float32)
    if stamped.shape != w.shape:
        raise ValueError(f"{qtype} [{rows}, {cols}]: stamped has shape {list(stamped.shape)}, expected w's")
    block, type_size = BLOCK_LAYOUTS[qtype]
    out = np.empty((rows, cols // block * type_size), dtype=np.uint8)
    if out.size == 0:
        return out
    which = np.zeros(rows, dtype=np.int8)
    if qtype in _SIMPLE:
        _simple_stamped(kind, w, stamped, out, which)
    else:
        _quantize_k(kind, w, stamped, out, which, True, True)
    _raise_if_bad(qtype, "w", (rows, cols), which == 1)
    _raise_if_bad(qtype, "stamped", (rows, cols), which == 2)
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
