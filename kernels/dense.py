"""Embed and extract the spread-spectrum watermark over dense carriers (f32/f64, bf16, f16 bits).

A carrier is viewed as a 2-D [out, in] array, element j = row * in + column. Element j gets
hash h = H(seed, j), chip r_j = +-1 and code position p_j; its amplitude is alpha * s_row.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from weightmark.kernels.bits import (
    BF16,
    BF16_ROUND_DOMAIN,
    F16,
    F16_ROUND_DOMAIN,
    FLOAT,
    bf16_round_bits,
    bf16_stochastic_round,
    bf16_to_f64,
    decode_difference,
    decode_span,
    f16_round_bits,
    f16_stochastic_round,
    f16_to_f64,
    outside_bf16,
    outside_f16,
)
from weightmark.kernels.config import INLINE, PARALLEL, SERIAL
from weightmark.kernels.prng import (
    GOLDEN,
    chip_from_bits,
    chip_of,
    chip_times,
    counter_of,
    draw_of,
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


# Elements per step of extraction: a tile's positions and terms stay in L1 between the
# vectorised map (decode, hash, weigh) and the scatter into the sums.
TILE = 512


_LANES = 8  # elements per step of _weigh_lanes: one 512-bit vector of uint64 hashes


def _i64(value: int) -> int:
    """A uint64 constant as the signed value LLVM's i64 takes."""
    return value - (1 << 64) if value >= 1 << 63 else value


@intrinsic
def _weigh_lanes(typingctx, d, i, key, inv, code_length, position, terms):
    """weigh_tile's body for elements i..i+7 (in range, unchecked), written as explicit 8-lane
    vector operations: LLVM's vectoriser stops at 256 bits on this hardware, where the two 64-bit
    multiplies of each hash cost as much per 512-bit vector as per 256-bit one. Lane by lane the
    same integer and IEEE operations, in the same order, as the scalar loop."""
    f64_vector = types.Array(types.float64, 1, "C")
    if d != f64_vector or terms != f64_vector or position != types.Array(types.uint32, 1, "C"):
        raise TypingError("_weigh_lanes takes C-contiguous float64 d and terms and uint32 position")
    if key != types.uint64 or inv != types.float64 or code_length != types.uint32:
        raise TypingError("_weigh_lanes takes a uint64 key, a float64 inverse and a uint32 length")

    def codegen(context, builder, signature, args):
        d_arg, i_arg, key_arg, inv_arg, length_arg, position_arg, terms_arg = args
        i64, i32, f64 = ir.IntType(64), ir.IntType(32), ir.DoubleType()
        v_i64, v_f64 = ir.VectorType(i64, _LANES), ir.VectorType(f64, _LANES)

        def splat(value, vector_type):
            lanes = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(lanes, lanes, ir.Constant(ir.VectorType(i32, _LANES), [0] * _LANES))

        def const(values):
            return ir.Constant(v_i64, [_i64(v) for v in values])

        def data(arg, index):
            array = context.make_array(signature.args[args.index(arg)])(context, builder, arg)
            return array.data if index is None else builder.gep(array.data, [index])

        index = context.cast(builder, i_arg, signature.args[1], types.intp)
        x = builder.load(builder.bitcast(data(d_arg, index), v_f64.as_pointer()), align=8)
        # np.isfinite: x - x is NaN exactly for inf and NaN
        diff = builder.fsub(x, x)
        finite = builder.fcmp_unordered("uno", diff, diff)
        e = builder.select(finite, ir.Constant(v_f64, [0.0] * _LANES), builder.fmul(x, splat(inv_arg, v_f64)))
        golden = int(GOLDEN)
        z = builder.add(splat(key_arg, v_i64), const([(k * golden) % (1 << 64) for k in range(_LANES)]))
        for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            z = builder.mul(builder.xor(z, builder.lshr(z, const([shift] * _LANES))), const([multiplier] * _LANES))
        h = builder.xor(z, builder.lshr(z, const([31] * _LANES)))
        length = splat(builder.zext(length_arg, i64), v_i64)
        product = builder.mul(builder.and_(h, const([0xFFFFFFFF] * _LANES)), length)
        p = builder.trunc(builder.lshr(product, const([32] * _LANES)), ir.VectorType(i32, _LANES))
        builder.store(p, builder.bitcast(data(position_arg, index), p.type.as_pointer()), align=4)
        chip_bits = builder.or_(builder.and_(h, const([1 << 63] * _LANES)), const([0x3FF0000000000000] * _LANES))
        weighted = builder.fmul(builder.bitcast(chip_bits, v_f64), e)
        squared = builder.fmul(e, e)
        pairs = builder.shuffle_vector(weighted, squared, ir.Constant(ir.VectorType(i32, 2 * _LANES),
                                       [k // 2 + (k % 2) * _LANES for k in range(2 * _LANES)]))  # fmt: skip
        slot = data(terms_arg, builder.mul(index, ir.Constant(index.type, 2)))
        builder.store(pairs, builder.bitcast(slot, pairs.type.as_pointer()), align=8)
        return context.get_dummy_value()

    return types.void(d, i, key, inv, code_length, position, terms), codegen


@numba.njit(**INLINE)
def weigh_tile(d, n, key, inv, code_length, position, terms):
    """Map of extraction over d[:n], the differences of n consecutive elements whose first has
    hash key `key` (seed + (j + 1) * GOLDEN): position[i] = p_j, terms[2i:2i + 2] = (r_j e_j, e_j^2)
    with e_j = d_j / s (non-finite differences weigh nothing). code_length is a uint32, so the
    position's multiply-high is 32 x 32 -> 64 bits (the same integer as position_of)."""
    full = n - n % _LANES
    for i in range(0, full, _LANES):
        _weigh_lanes(d, i, key + np.uint64(i) * GOLDEN, inv, code_length, position, terms)
    for i in range(full, n):
        x = d[i]
        # Zero differences add nothing; non-finite ones are dropped.
        e = x * inv if np.isfinite(x) else 0.0
        h = mix64(key + np.uint64(i) * GOLDEN)
        position[i] = np.uint32(short_position_of(h, code_length))
        terms[2 * i] = chip_from_bits(h) * e
        terms[2 * i + 1] = e * e


@intrinsic
def _add_pair(typingctx, sums, k, a, b):
    """sums[k] += a and sums[k + 1] += b (a C-contiguous float64 vector, k in range, unchecked)
    as one two-lane load, add and store: each lane the same IEEE addition as the scalar one."""
    if not (isinstance(sums, types.Array) and sums.dtype == types.float64 and sums.ndim == 1
            and sums.layout == "C"):  # fmt: skip
        raise TypingError("_add_pair takes a C-contiguous 1-D float64 array")
    if not isinstance(k, types.Integer) or a != types.float64 or b != types.float64:
        raise TypingError("_add_pair takes an integer index and two float64 terms")

    def codegen(context, builder, signature, args):
        array, index, x, y = args
        data = context.make_array(signature.args[0])(context, builder, array).data
        pair_type = ir.VectorType(ir.DoubleType(), 2)
        index = context.cast(builder, index, signature.args[1], types.intp)
        slot = builder.bitcast(builder.gep(data, [index]), pair_type.as_pointer())
        term = builder.insert_element(ir.Constant(pair_type, None), x, ir.Constant(ir.IntType(32), 0))
        term = builder.insert_element(term, y, ir.Constant(ir.IntType(32), 1))
        total = builder.fadd(builder.load(slot, align=8), term)
        builder.store(total, slot, align=8)
        return context.get_dummy_value()

    return types.void(sums, k, a, b), codegen


@numba.njit(**INLINE)
def scatter_tile(n, position, terms, sums):
    """sums[2p] += r e and sums[2p + 1] += e^2 for each of the tile's n elements, in order
    (num and den of a position side by side: one cache line per element). sums is one block's
    [2 L] vector; positions are below L by construction, so no bounds are checked."""
    for i in range(n):
        _add_pair(sums, np.intp(position[i]) * 2, terms[2 * i], terms[2 * i + 1])


@numba.njit(**INLINE)
def block_sums(sums, t):
    """Block t's [2 L] slice of the [blocks, L, 2] sums, zeroed by the thread that adds into it
    (allocated empty: its pages are first touched here, and its lines are warm for the scatter)."""
    part = sums[t].reshape(2 * sums.shape[1])
    part[:] = 0.0
    return part


@numba.njit(**PARALLEL)
def _extract(suspect, suspect_kind, reference, reference_kind, has_reference, row_scale, seed, sums):
    rows, cols = suspect.shape
    threads, code_length = sums.shape[0], np.uint32(sums.shape[1])
    chunk = (rows + threads - 1) // threads
    for t in numba.prange(threads):
        # Per tile of a row: decode, then hash and weigh every element (vectorisable maps),
        # then scatter into this block's own sums (the only part with random access).
        d = np.empty(TILE)
        terms = np.empty(2 * TILE)
        position = np.empty(TILE, dtype=np.uint32)
        part = block_sums(sums, t)
        stop = min(rows, (t + 1) * chunk)
        for r in range(t * chunk, stop):
            scale = np.float64(row_scale[r])
            if not scale > 0.0 or not np.isfinite(scale):
                continue
            inv = 1.0 / scale
            for c0 in range(0, cols, TILE):
                n = min(TILE, cols - c0)
                if has_reference:
                    decode_difference(suspect, suspect_kind, reference, reference_kind, r, c0, n, d)
                else:
                    decode_span(suspect, r, c0, n, suspect_kind, d)
                weigh_tile(d, n, counter_of(seed, r * cols + c0), inv, code_length, position, terms)
                scatter_tile(n, position, terms, part)


@numba.njit(**SERIAL)
def _fold_columns(sums, num, den):
    parts, length = sums.shape[0], sums.shape[1]
    flat = sums.reshape(parts, 2 * length)
    total = np.zeros(2 * length)
    # Block after block, each a contiguous sweep (every position's additions stay in block order).
    for t in range(parts):
        row = flat[t]
        for k in range(2 * length):
            total[k] += row[k]
    for i in range(length):
        num[i] += total[2 * i]
        den[i] += total[2 * i + 1]


def fold_parts(sums: np.ndarray, num: np.ndarray, den: np.ndarray) -> None:
    """num += the blocks' num sums added up, den likewise ([blocks, L, 2] sums), in numpy's order
    for a [blocks, L] array summed over axis 0: from 0.0, block after block, for L > 1; a single
    column (L = 1) is one contiguous run, which numpy sums pairwise, so numpy sums it here."""
    if sums.shape[1] == 1:
        num += np.ascontiguousarray(sums[:, :, 0]).sum(axis=0)
        den += np.ascontiguousarray(sums[:, :, 1]).sum(axis=0)
    else:
        _fold_columns(sums, num, den)


# Embed and extract find code positions by a 32 x 32-bit multiply-high (prng.short_position_of),
# and extraction keeps them as uint32s.
MAX_CODE_LENGTH = 2**32 - 1
# Row blocks of extract's partial sums (per-block buffers are L float64s each).
EXTRACT_PARTS = 64
_GRID_DTYPE = np.dtype(np.uint16)
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


def check_sums(num: np.ndarray, den: np.ndarray) -> None:
    """num and den, which extraction adds into: float64 vectors of one code length, at most
    MAX_CODE_LENGTH."""
    if num.shape != den.shape or num.ndim != 1 or num.dtype != np.float64 or den.dtype != np.float64:
        raise ValueError("num and den must be float64 vectors of the code length")
    if num.shape[0] > MAX_CODE_LENGTH:
        raise ValueError(f"code length {num.shape[0]} is above {MAX_CODE_LENGTH} (positions are uint32)")


def _check_scale_and_code(rows: int, row_scale: np.ndarray, codeword: np.ndarray | None) -> None:
    if row_scale.shape != (rows,):
        raise ValueError(f"row_scale has shape {row_scale.shape}, carrier has {rows} rows")
    if codeword is not None:
        if codeword.ndim != 1 or codeword.size == 0 or codeword.dtype != np.int8:
            raise ValueError("codeword must be a non-empty 1-D int8 array of +-1")
        if codeword.size > MAX_CODE_LENGTH:
            raise ValueError(f"codeword of {codeword.size} entries: at most {MAX_CODE_LENGTH}")


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
    check_sums(num, den)
    if suspect.size == 0:
        return
    # A fixed number of row blocks whatever the thread count: the sums are then bit-identical
    # on 1 thread or 64 (a scan on cluster workers with fewer threads agrees with a serial one).
    parts = max(1, min(EXTRACT_PARTS, suspect.shape[0]))
    sums = np.empty((parts, num.shape[0], 2))
    has_reference = reference is not None
    _extract(
        suspect,
        suspect_kind,
        reference if has_reference else suspect,
        reference_kind if has_reference else suspect_kind,
        has_reference,
        row_scale,
        np.uint64(seed),
        sums,
    )
    fold_parts(sums, num, den)
