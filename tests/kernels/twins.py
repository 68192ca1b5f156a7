"""Slow, obvious numpy twins of the numba kernels, written from the specification alone."""

from __future__ import annotations

import numpy as np

FLOAT = 0
BF16 = 1
F16 = 2

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)

BF16_MAX_BITS = 0x7F7F
F16_MAX_BITS = 0x7BFF
# (significant bits, smallest normal, largest finite) of each 16-bit grid.
_GRIDS = {
    BF16: (8, 2.0**-126, float(np.float32(2.0**127 * (2.0 - 2.0**-7)))),
    F16: (11, 2.0**-14, 65504.0),
}


# ------------------------------------------------------------------------------ hashing


def hash_twin(seed: int, j: np.ndarray) -> np.ndarray:
    """SplitMix64 of seed + (j + 1) * golden, for every index in j, with wrapping uint64 maths."""
    j = np.asarray(j, dtype=_U64)
    with np.errstate(over="ignore"):
        z = _U64(seed) + (j + _U64(1)) * _GOLDEN
        z = (z ^ (z >> _U64(30))) * _MIX1
        z = (z ^ (z >> _U64(27))) * _MIX2
        z = z ^ (z >> _U64(31))
    return z


def chips_positions_uniforms(
    seed: int, n: int, code_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chip (+-1.0), code position and stochastic-rounding uniform of elements 0..n-1."""
    h = hash_twin(seed, np.arange(n, dtype=_U64))
    chips = np.where((h >> _U64(63)) == 0, 1.0, -1.0)
    positions = (((h & _U64(0xFFFFFFFF)) * _U64(code_length)) >> _U64(32)).astype(np.int64)
    uniforms = ((h >> _U64(32)) & _U64(0x7FFFFFFF)).astype(np.float64) / 2.0**31
    return chips, positions, uniforms


# ------------------------------------------------------------------------------ 16-bit grids


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    """Exact float64 values of bfloat16 bit patterns (the top half of a float32)."""
    wide = np.asarray(bits).astype(np.uint32) << np.uint32(16)
    with np.errstate(invalid="ignore"):  # signalling NaNs become quiet NaNs
        return wide.view(np.float32).astype(np.float64)


def f16_decode(bits: np.ndarray) -> np.ndarray:
    """Exact float64 values of IEEE float16 bit patterns."""
    with np.errstate(invalid="ignore"):
        return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float64)


def decode(array: np.ndarray, kind: int) -> np.ndarray:
    """Float64 values of a carrier: floats as they are, uint16 patterns by kind."""
    if kind == BF16:
        return bf16_decode(array)
    if kind == F16:
        return f16_decode(array)
    return np.asarray(array).astype(np.float64)


def _encode_exact(values: np.ndarray, kind: int) -> np.ndarray:
    """Bit patterns (uint32) of non-negative values that lie exactly on the grid of kind."""
    if kind == BF16:
        wide = values.astype(np.float32).view(np.uint32)
        assert not np.any(wide & np.uint32(0xFFFF)), "value not on the bfloat16 grid"
        return wide >> np.uint32(16)
    half = values.astype(np.float16)
    assert np.array_equal(half.astype(np.float64), values), "value not on the float16 grid"
    return half.view(np.uint16).astype(np.uint32)


def floor_by_ulp(a: np.ndarray, kind: int) -> np.ndarray:
    """Bits of the largest grid value <= a (a >= 0, clamped at the largest finite), via ulps.

    In float64 the local ulp of the grid is a power of two, so floor(a / ulp) * ulp is exact.
    """
    digits, min_normal, largest = _GRIDS[kind]
    a = np.minimum(np.asarray(a, dtype=np.float64), largest)
    _, exponent = np.frexp(a)  # a = m * 2**exponent with m in [0.5, 1)
    normal_ulp = np.ldexp(1.0, exponent - digits)
    subnormal_ulp = np.ldexp(1.0, np.frexp(min_normal)[1] - digits)
    ulp = np.where(a >= min_normal, normal_ulp, subnormal_ulp)
    return _encode_exact(np.floor(a / ulp) * ulp, kind)


def f16_floor_twin(a: np.ndarray) -> np.ndarray:
    """Bits of the largest float16 <= a: round to nearest with numpy, step down if it went up."""
    a = np.minimum(np.asarray(a, dtype=np.float64), 65504.0)
    bits = a.astype(np.float16).view(np.uint16).astype(np.uint32)
    went_up = f16_decode(bits.astype(np.uint16)) > a
    return np.minimum(bits - went_up.astype(np.uint32), np.uint32(F16_MAX_BITS))


def bf16_floor_twin(a: np.ndarray) -> np.ndarray:
    """Bits of the largest bfloat16 <= a (a >= 0, clamped at the largest finite)."""
    return floor_by_ulp(a, BF16)


def floor_twin(a: np.ndarray, kind: int) -> np.ndarray:
    """Grid floor (uint32 bits) for kind BF16 or F16."""
    return bf16_floor_twin(a) if kind == BF16 else f16_floor_twin(a)


def _decode32(bits: np.ndarray, kind: int) -> np.ndarray:
    return decode(bits.astype(np.uint16), kind)


def stochastic_round_twin(
    bits: np.ndarray, delta: np.ndarray, u: np.ndarray, kind: int
) -> np.ndarray:
    """w + delta rounded down or up on the grid, up iff u * (hi - lo) < |x| - lo (never to inf)."""
    bits = np.asarray(bits, dtype=np.uint16)
    w = decode(bits, kind)
    with np.errstate(invalid="ignore", over="ignore"):
        x = w + delta
        finite_w = np.isfinite(w)
        a = np.where(finite_w, np.abs(x), 0.0)
        mag = floor_twin(a, kind)
        lo = _decode32(mag, kind)
        hi = _decode32(mag + np.uint32(1), kind)
        up = (u * (hi - lo) < a - lo) & np.isfinite(hi)
    rounded = (mag + up.astype(np.uint32)) | (np.uint32(0x8000) * (x < 0.0))
    return np.where(finite_w, rounded.astype(np.uint16), bits)


def round_nearest_twin(x: np.ndarray, kind: int) -> np.ndarray:
    """Round-to-nearest-even of float64 values onto the grid (finite results; no overflow)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    mag = floor_twin(a, kind)
    lo = _decode32(mag, kind)
    hi = _decode32(mag + np.uint32(1), kind)
    up = (a - lo > hi - a) | ((a - lo == hi - a) & (mag % 2 == 1))
    return ((mag + up) | (np.uint32(0x8000) * (x < 0.0))).astype(np.uint16)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Bfloat16 patterns nearest to finite values (to make realistic bf16 test weights)."""
    return round_nearest_twin(np.asarray(values, dtype=np.float64), BF16)


# ------------------------------------------------------------------------------ kernels


def deltas_twin(
    shape: tuple[int, int], row_scale: np.ndarray, codeword: np.ndarray, seed: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Perturbation alpha * s_row * chip * c[position] and uniform of every element of a carrier."""
    rows, cols = shape
    chips, positions, uniforms = chips_positions_uniforms(seed, rows * cols, len(codeword))
    amplitude = np.repeat(alpha * row_scale.astype(np.float64), cols)
    delta = amplitude * chips * codeword.astype(np.float64)[positions]
    return delta.reshape(shape), uniforms.reshape(shape)


def embed_twin(
    weights: np.ndarray,
    kind: int,
    row_scale: np.ndarray,
    codeword: np.ndarray,
    seed: int,
    alpha: float,
) -> np.ndarray:
    """The stamped carrier, element by element as the specification says.

    Rows whose amplitude alpha * s_row is zero, or whose scale is not a positive finite
    number, are copied unchanged (bit for bit, -0.0 included).
    """
    delta, uniforms = deltas_twin(weights.shape, row_scale, codeword, seed, alpha)
    if kind == FLOAT:
        with np.errstate(over="ignore", invalid="ignore"):
            out = (weights.astype(np.float64) + delta).astype(weights.dtype)
    else:
        out = stochastic_round_twin(weights, delta, uniforms, kind)
    scale = row_scale.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        untouched = ~((scale > 0.0) & np.isfinite(scale)) | (alpha * scale == 0.0)
    out[untouched] = weights[untouched]
    return out


def extract_twin(
    suspect: np.ndarray,
    suspect_kind: int,
    reference: np.ndarray | None,
    reference_kind: int,
    row_scale: np.ndarray,
    seed: int,
    code_length: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh (num, den, sum of |e|) per code position; the last bounds the rounding error of num."""
    rows, cols = suspect.shape
    chips, positions, _ = chips_positions_uniforms(seed, rows * cols, code_length)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = decode(suspect, suspect_kind)
        if reference is not None:
            d = d - decode(reference, reference_kind)
        scale = row_scale.astype(np.float64)
        good_row = (scale > 0.0) & np.isfinite(scale)
        inverse = np.where(good_row, 1.0 / np.where(good_row, scale, 1.0), 0.0)
        e = (d * inverse[:, None]).ravel()
    keep = (np.repeat(good_row, cols) & np.isfinite(d).ravel()).ravel()
    num = np.zeros(code_length)
    den = np.zeros(code_length)
    mag = np.zeros(code_length)
    np.add.at(num, positions[keep], chips[keep] * e[keep])
    np.add.at(den, positions[keep], e[keep] * e[keep])
    np.add.at(mag, positions[keep], np.abs(e[keep]))
    return num, den, mag


def score_twin(packed: np.ndarray, z: np.ndarray) -> np.ndarray:
    """sum_i c_k[i] z_i with c = +1 for a set bit, -1 for a clear bit (np.unpackbits order)."""
    codes = np.unpackbits(packed, axis=1).astype(np.float64) * 2.0 - 1.0
    return np.array([float(np.sum(row * z)) for row in codes])


# ------------------------------------------------------------------------------ MLX affine


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bfloat16 value, as float32 (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, r).astype(np.float32)


def dequantize_affine_twin(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                           group_size: int, cols: int, grid: int = FLOAT) -> np.ndarray:
    """MLX affine dequantization: the row's bit stream cut into `bits`-bit codes (LSB first),
    w = scale * q + bias per group, each operation rounded to the scales' dtype."""
    rows = words.shape[0]
    stream = np.unpackbits(np.ascontiguousarray(words, dtype="<u4").view(np.uint8), axis=1, bitorder="little")
    codes = stream[:, : cols * bits].reshape(rows, cols, bits).astype(np.uint32)
    q = (codes << np.arange(bits, dtype=np.uint32)).sum(axis=-1).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), group_size, axis=1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=1)
    if grid == F16:
        with np.errstate(over="ignore"):
            product = (s * q).astype(np.float16).astype(np.float32)
            return (product + b).astype(np.float16).astype(np.float32)
    if grid == BF16:
        return _round_bf16(_round_bf16(s * q) + b)
    return (s * q + b).astype(np.float32)


# ------------------------------------------------------------------------------ packed formats


def ggml_dequantize_twin(qtype: str, raw: np.ndarray) -> np.ndarray:
    """float32 values of GGML blocks [rows, bytes per row] by the gguf package's numpy code."""
    import gguf

    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    return np.ascontiguousarray(values, dtype=np.float32)


def gptq_dequantize_twin(
    qweight: np.ndarray, bits: int, zeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray
) -> np.ndarray:
    """[out, in] float32: w[o, i] = (q[i, o] - zeros[o, g(i)]) * scales[o, g(i)], each step in float32.

    qweight is uint32 [in * bits / 32, out]; input i is field i % (32 / bits) of word i // (32 / bits),
    low bits first.
    """
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits))[None, :, None]
    fields = (qweight[:, None, :] >> shifts) & np.uint32((1 << bits) - 1)
    q = fields.reshape(qweight.shape[0] * per, qweight.shape[1]).T.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.ascontiguousarray((q - zeros[:, g_idx]) * scales[:, g_idx], dtype=np.float32)


def bnb4_dequantize_twin(
    data: np.ndarray, code: np.ndarray, absmax: np.ndarray, blocksize: int, rows: int, cols: int
) -> np.ndarray:
    """[rows, cols] float32: flat element j = code[nibble j] * absmax[j // blocksize], the nibble
    of element j being the high half of byte j // 2 for even j and the low half for odd j."""
    j = np.arange(rows * cols)
    byte = data[j // 2].astype(np.int64)
    nibble = np.where(j % 2 == 0, byte >> 4, byte & 15)
    with np.errstate(invalid="ignore", over="ignore"):
        return (code[nibble] * absmax[j // blocksize]).astype(np.float32).reshape(rows, cols)


# ------------------------------------------------------------------------------ Chernoff bound


def cumulants_twin(A: np.ndarray, B: np.ndarray, log_p: np.ndarray, log_q: np.ndarray,
                   lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K(lambda) = sum_i log(p_i e^{lambda A_i} + q_i e^{lambda B_i}), K' and K'' at every lambda,
    as [lambdas, positions] arrays reduced along the positions."""
    lam = np.asarray(lambdas, dtype=np.float64)[:, None]
    u = log_p + lam * A
    v = log_q + lam * B
    log_sum = np.logaddexp(u, v)
    w = np.exp(u - log_sum)  # the tilted probability of +1
    K = log_sum.sum(axis=1)
    d1 = (B + w * (A - B)).sum(axis=1)
    d2 = (w * (1.0 - w) * (A - B) ** 2).sum(axis=1)
    return K, d1, d2


def chernoff_solve_twin(A: np.ndarray, B: np.ndarray, log_p: np.ndarray, log_q: np.ndarray,
                        s: np.ndarray, variance: float, iterations: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every target at once: double lambda until K'(lambda) >= s (not past 1e12), then
    safeguarded Newton on K'(lambda) = s; (lambda, smallest K(lambda) - lambda s seen, gap).

    Where Newton converged with residual r, probes at lambda -+ 2 (|r| + e) / K'' (e: the rounding
    allowance of a computed K') that land on either side of s by more than e put lambda* between
    them, and convexity bounds the gap to the optimum by (|r| + e) times that distance."""
    s = np.asarray(s, dtype=np.float64)
    best = np.zeros_like(s)
    lo = np.zeros_like(s)
    hi = np.maximum(1.0, 2.0 * s / max(variance, 1e-300))
    for _ in range(64):
        K, d1, _ = cumulants_twin(A, B, log_p, log_q, hi)
        best = np.minimum(best, K - hi * s)
        short = (d1 < s) & (hi < 1e12)
        if not short.any():
            break
        lo = np.where(short, hi, lo)
        hi = np.where(short, hi * 2.0, hi)
    lam = np.minimum(s / max(variance, 1e-300), 0.5 * (lo + hi))
    lam = np.where(lam > lo, lam, 0.5 * (lo + hi))
    done = np.zeros(s.shape, dtype=bool)
    residual = np.zeros_like(s)
    curvature = np.zeros_like(s)
    for _ in range(iterations):
        K, d1, d2 = cumulants_twin(A, B, log_p, log_q, lam)
        best = np.where(done, best, np.minimum(best, K - lam * s))
        now = ~done & (np.abs(d1 - s) <= 1e-13 * np.maximum(1.0, s))
        residual = np.where(now, d1 - s, residual)
        curvature = np.where(now, d2, curvature)
        done |= now
        if done.all():
            break
        above = d1 > s
        hi = np.where(done, hi, np.where(above, lam, hi))
        lo = np.where(done, lo, np.where(above, lo, lam))
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = lam - (d1 - s) / d2
        inside = np.isfinite(newton) & (newton > lo) & (newton < hi)
        lam = np.where(done, lam, np.where(inside, newton, 0.5 * (lo + hi)))
    e = (256 + A.shape[0] // 256 + 8) * 2.0**-52 * float(np.maximum(np.abs(A), np.abs(B)).sum())
    gap = np.full_like(s, np.inf)
    for t in np.flatnonzero(done & (curvature > 0)):
        r = abs(residual[t]) + e
        delta = 2.0 * r / curvature[t]
        probes = np.array([max(0.0, lam[t] - delta), lam[t] + delta])
        K, d1, _ = cumulants_twin(A, B, log_p, log_q, probes)
        best[t] = min(best[t], float((K - probes * s[t]).min()))
        if d1[0] < s[t] - e and d1[1] > s[t] + e:
            gap[t] = r * delta
    return lam, best, gap
