"""Embed and extract the spread-spectrum watermark over dense carriers (f32/f64, bf16, f16 bits).

A carrier is viewed as a 2-D [out, in] array, element j = row * in + column. Element j gets
hash h = H(seed, j), chip r_j = +-1 and code position p_j; its amplitude is alpha * s_row.
"""

import numba
import numpy as np

from weightmark.kernels.bits import (
    BF16,
    BF16_ROUND_DOMAIN,
    F16,
    F16_ROUND_DOMAIN,
    FLOAT,
    bf16_round_bits,
    bf16_stochastic_round,
    bf16_to_f64,
    decode_row,
    f16_round_bits,
    f16_stochastic_round,
    f16_to_f64,
    outside_bf16,
    outside_f16,
)
from weightmark.kernels.config import INLINE, PARALLEL
from weightmark.kernels.prng import (
    GOLDEN,
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

__all__ = ["FLOAT", "BF16", "F16", "embed", "extract"]


@numba.njit(**INLINE)
def _amplitude(alpha, scale):
    """alpha * s_row; rows whose scale is zero, negative or not finite are left untouched."""
    s = np.float64(scale)
    if s > 0.0 and np.isfinite(s):
        return alpha * s
    return 0.0


# Each embed kernel walks a row with a running hash counter (one add per element, not a
# multiply) and reads the codeword as float64 (a vector gather), in loops without branches so
# they vectorise. delta is amplitude * c[p] with the chip's sign (prng.chip_times), which is
# (amplitude * chip) * c[p] for a finite amplitude. The 16-bit grids round on the float64 bits
# of x = w + delta (bits.bf16_round_bits, bits.f16_round_bits). A row with an x outside the
# rounding's domain (zero or tiny, infinite or NaN: a non-finite weight or amplitude gives such
# an x) is done again element by element with the reference formula, and so is a float row
# whose amplitude is not finite. Every path gives the reference bits.


@numba.njit(**PARALLEL)
def _embed_float(w, out, row_scale, code, seed, alpha):
    rows, cols = w.shape
    code_length = code.shape[0]
    for r in numba.prange(rows):
        amplitude = _amplitude(alpha, row_scale[r])
        if amplitude == 0.0:
            for c in range(cols):
                out[r, c] = w[r, c]
            continue
        z = counter_of(seed, r * cols)
        if np.isfinite(amplitude):  # amplitude * c[p] is not NaN: the chip's sign is a flip
            for c in range(cols):
                h = mix64(z)
                z += GOLDEN
                delta = chip_times(h, amplitude * code[short_position_of(h, code_length)])
                out[r, c] = np.float64(w[r, c]) + delta
        else:
            for c in range(cols):
                h = mix64(z)
                z += GOLDEN
                delta = amplitude * chip_of(h) * code[position_of(h, code_length)]
                out[r, c] = np.float64(w[r, c]) + delta


@numba.njit(**PARALLEL)
def _embed_bf16(w, out, row_scale, code, seed, alpha):
    rows, cols = w.shape
    code_length = code.shape[0]
    for r in numba.prange(rows):
        amplitude = _amplitude(alpha, row_scale[r])
        if amplitude == 0.0:
            for c in range(cols):
                out[r, c] = w[r, c]
            continue
        outside = np.uint64(0)
        z = counter_of(seed, r * cols)
        for c in range(cols):
            h = mix64(z)
            z += GOLDEN
            delta = chip_times(h, amplitude * code[short_position_of(h, code_length)])
            x = bf16_to_f64(w[r, c]) + delta
            out[r, c] = bf16_round_bits(x, draw_of(h))
            outside = max(outside, outside_bf16(x))
        if outside >= BF16_ROUND_DOMAIN:  # also where the amplitude is not finite
            z = counter_of(seed, r * cols)
            for c in range(cols):
                h = mix64(z)
                z += GOLDEN
                delta = amplitude * chip_of(h) * code[position_of(h, code_length)]
                out[r, c] = bf16_stochastic_round(w[r, c], delta, uniform_of(h))


@numba.njit(**PARALLEL)
def _embed_f16(w, out, row_scale, code, seed, alpha):
    rows, cols = w.shape
    code_length = code.shape[0]
    for r in numba.prange(rows):
        amplitude = _amplitude(alpha, row_scale[r])
        if amplitude == 0.0:
            for c in range(cols):
                out[r, c] = w[r, c]
            continue
        outside = np.uint64(0)
        z = counter_of(seed, r * cols)
        for c in range(cols):
            h = mix64(z)
            z += GOLDEN
            delta = chip_times(h, amplitude * code[short_position_of(h, code_length)])
            x = f16_to_f64(w[r, c]) + delta
            out[r, c] = f16_round_bits(x, draw_of(h))
            outside = max(outside, outside_f16(x))
        if outside >= F16_ROUND_DOMAIN:  # also where the amplitude is not finite
            z = counter_of(seed, r * cols)
            for c in range(cols):
                h = mix64(z)
                z += GOLDEN
                delta = amplitude * chip_of(h) * code[position_of(h, code_length)]
                out[r, c] = f16_stochastic_round(w[r, c], delta, uniform_of(h))


@numba.njit(**PARALLEL)
def _extract(suspect, suspect_kind, reference, reference_kind, has_reference, row_scale, seed, num, den):
    rows, cols = suspect.shape
    threads, code_length = num.shape
    chunk = (rows + threads - 1) // threads
    for t in numba.prange(threads):
        # Per row: decode, then hash and weigh every element (vectorisable maps), then
        # scatter into this thread's own sums (the only part with random access).
        d = np.empty(cols)
        ref = np.empty(cols)
        weighted = np.empty(cols)
        squared = np.empty(cols)
        position = np.empty(cols, dtype=np.int64)
        stop = min(rows, (t + 1) * chunk)
        for r in range(t * chunk, stop):
            scale = np.float64(row_scale[r])
            if not scale > 0.0 or not np.isfinite(scale):
                continue
            inv = 1.0 / scale
            base = r * cols
            decode_row(suspect, r, suspect_kind, d)
            if has_reference:
                decode_row(reference, r, reference_kind, ref)
                for c in range(cols):
                    d[c] -= ref[c]
            for c in range(cols):
                # Zero differences add nothing; non-finite ones are dropped.
                e = d[c] * inv if np.isfinite(d[c]) else 0.0
                h = element_hash(seed, base + c)
                position[c] = position_of(h, code_length)
                weighted[c] = chip_of(h) * e
                squared[c] = e * e
            for c in range(cols):
                p = position[c]
                num[t, p] += weighted[c]
                den[t, p] += squared[c]


# Row blocks of extract's partial sums (per-block buffers are L float64s each).
EXTRACT_PARTS = 64
_GRID_DTYPE = np.dtype(np.uint16)
# The embed kernels take the code position as a 32 x 32-bit product (prng.short_position_of).
_MAX_CODE_LENGTH = 2**32 - 1
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_carrier(name: str, array: np.ndarray, kind: int) -> None:
    if array.ndim != 2:
        raise ValueError(f"{name}: carriers are 2-D [out, in] views, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name}: carrier must be C-contiguous")
    if kind == FLOAT:
        if array.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: kind FLOAT needs float32 or float64, got {array.dtype}")
    elif kind in (BF16, F16):
        if array.dtype != _GRID_DTYPE:
            raise ValueError(f"{name}: bf16/f16 carriers are uint16 bit patterns, got {array.dtype}")
    else:
        raise ValueError(f"{name}: unknown kind {kind}")


def _check_scale_and_code(rows: int, row_scale: np.ndarray, codeword: np.ndarray | None) -> None:
    if row_scale.shape != (rows,):
        raise ValueError(f"row_scale has shape {row_scale.shape}, carrier has {rows} rows")
    if codeword is not None:
        if codeword.ndim != 1 or codeword.size == 0 or codeword.dtype != np.int8:
            raise ValueError("codeword must be a non-empty 1-D int8 array of +-1")
        if codeword.size > _MAX_CODE_LENGTH:
            raise ValueError(f"codeword of {codeword.size} entries: at most {_MAX_CODE_LENGTH}")


def embed(
    weights: np.ndarray,
    kind: int,
    row_scale: np.ndarray,
    codeword: np.ndarray,
    seed: int,
    alpha: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Return the stamped carrier: w + alpha * s_row * r_j * c[p_j], on w's own grid.

    float32/float64 weights get the perturbation added (computed in float64, rounded once);
    bf16/f16 bit patterns get keyed stochastic rounding so the expected value is w + delta.
    """
    _check_carrier("weights", weights, kind)
    _check_scale_and_code(weights.shape[0], row_scale, codeword)
    if out is None:
        out = np.empty_like(weights)
    elif out.shape != weights.shape or out.dtype != weights.dtype or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous array of the weights' shape and dtype")
    if weights.size == 0:
        return out
    seed64 = np.uint64(seed)
    code = codeword.astype(np.float64)  # exact; the kernels gather float64s
    if kind == FLOAT:
        _embed_float(weights, out, row_scale, code, seed64, float(alpha))
    elif kind == BF16:
        _embed_bf16(weights, out, row_scale, code, seed64, float(alpha))
    else:
        _embed_f16(weights, out, row_scale, code, seed64, float(alpha))
    return out


def extract(
    suspect: np.ndarray,
    suspect_kind: int,
    reference: np.ndarray | None,
    reference_kind: int,
    row_scale: np.ndarray,
    seed: int,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """Add this carrier's per-position sums into num and den (float64, length L).

    num_i += sum r_j d_j / s_j and den_i += sum (d_j / s_j)^2 over the elements at position i,
    with d = suspect - reference (non-blind) or d = suspect (blind, reference None).
    Rows whose scale is zero and non-finite differences are skipped.
    """
    _check_carrier("suspect", suspect, suspect_kind)
    _check_scale_and_code(suspect.shape[0], row_scale, None)
    if reference is not None:
        _check_carrier("reference", reference, reference_kind)
        if reference.shape != suspect.shape:
            raise ValueError(f"reference shape {reference.shape} != suspect shape {suspect.shape}")
    if num.shape != den.shape or num.ndim != 1 or num.dtype != np.float64 or den.dtype != np.float64:
        raise ValueError("num and den must be float64 vectors of the code length")
    if suspect.size == 0:
        return
    # A fixed number of row blocks whatever the thread count: the sums are then bit-identical
    # on 1 thread or 64 (a scan on cluster workers with fewer threads agrees with a serial one).
    parts = max(1, min(EXTRACT_PARTS, suspect.shape[0]))
    part_num = np.zeros((parts, num.shape[0]))
    part_den = np.zeros((parts, num.shape[0]))
    has_reference = reference is not None
    _extract(
        suspect,
        suspect_kind,
        reference if has_reference else suspect,
        reference_kind if has_reference else suspect_kind,
        has_reference,
        row_scale,
        np.uint64(seed),
        part_num,
        part_den,
    )
    num += part_num.sum(axis=0)
    den += part_den.sum(axis=0)
