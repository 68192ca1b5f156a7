"""Dequantize GGML block types (Q8_0 ... Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS) to float32 rows.

Every kernel takes the raw bytes of a tensor as a [rows, bytes_per_row] uint8 array and fills a
float32 [rows, cols] array, one row per prange iteration (threads never write the same row).
Each value is computed with the same float32 operations, in the same order, as ggml's reference
dequantizers (and the `gguf` package's numpy ones), so results agree bit for bit: f16 scales are
decoded exactly, products are rounded to float32 once per operation, and there is no fast-math.

The `_*_row` functions decode one row into a 1-D buffer for the fused kernels (kernels/fused.py).
They repeat the arithmetic of the whole-tensor kernels on purpose: calling them from those
kernels made Q6_K dequantization about 2x slower. tests/kernels/test_fused.py checks both
against gguf's dequantizer bit for bit.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from weightmark.kernels.bits import f16_to_f64
from weightmark.kernels.config import INLINE, PARALLEL, targets_host_with

__all__ = ["BLOCK_LAYOUTS", "IQ4_NL_VALUES", "QUANTIZED", "dequantize"]

QK_K = 256  # elements per K-quant super-block

# type name -> (block size in elements, bytes per block). Layouts, byte offsets within a block:
#   Q8_0: d f16 | qs int8[32]
#   Q4_0: d f16 | qs u8[16] (element j in the low nibble of qs[j], element j + 16 in the high)
#   Q4_1: d f16 | m f16 | qs u8[16]
#   Q5_0: d f16 | qh u32 (bit j = 5th bit of element j) | qs u8[16]
#   Q5_1: d f16 | m f16 | qh u32 | qs u8[16]
#   Q4_K: d f16 | dmin f16 | scales u8[12] (8 six-bit scales and mins) | qs u8[128]
#   Q5_K: d f16 | dmin f16 | scales u8[12] | qh u8[32] | qs u8[128]
#   Q6_K: ql u8[128] | qh u8[64] | scales int8[16] | d f16
#   Q2_K: scales u8[16] (low nibble scale, high nibble min) | qs u8[64] | d f16 | dmin f16
#   Q3_K: hmask u8[32] | qs u8[64] | scales u8[12] (16 six-bit scales, offset 32) | d f16
#   IQ4_NL: d f16 | qs u8[16] (4-bit indices into the non-linear table IQ4_NL_VALUES)
#   IQ4_XS: d f16 | scales_h u16 | scales_l u8[4] (8 six-bit scales, offset 32) | qs u8[128]
BLOCK_LAYOUTS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (QK_K, 144),
    "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
    "Q2_K": (QK_K, 84),
    "Q3_K": (QK_K, 110),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (QK_K, 136),
}
# The block types that have a numba kernel (the rest of BLOCK_LAYOUTS is decoded in numpy).
QUANTIZED = frozenset(BLOCK_LAYOUTS) - {"F32", "F16", "BF16"}
# ggml's kvalues_iq4nl: the 16 levels IQ4_NL and IQ4_XS indices select (times the scale).
IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)


@numba.njit(**INLINE)
def _f16(raw, r, offset):
    """The float32 value of the little-endian f16 at raw[r, offset:offset + 2] (exact)."""
    bits = np.uint32(raw[r, offset]) | (np.uint32(raw[r, offset + 1]) << np.uint32(8))
    return np.float32(f16_to_f64(bits))


@numba.njit(**INLINE)
def _i8(byte):
    """A uint8 reinterpreted as a signed int8 value."""
    v = np.int32(byte)
    return v - ((v & np.int32(128)) << np.int32(1))


@numba.njit(**INLINE)
def _u32(raw, r, offset):
    """The little-endian uint32 at raw[r, offset:offset + 4]."""
    return (
        np.uint32(raw[r, offset])
        | (np.uint32(raw[r, offset + 1]) << np.uint32(8))
        | (np.uint32(raw[r, offset + 2]) << np.uint32(16))
        | (np.uint32(raw[r, offset + 3]) << np.uint32(24))
    )


# Which 32 nibbles an unpacker takes, in what order: of 16 bytes, GGML's Q4_0/Q4_1 order (byte
# j's low nibble at element j, its high one at j + 16) or GPTQ's little-endian words (low nibble
# first); or of 32 bytes, only the low or only the high nibbles (Q4_K).
SPLIT, LOW_FIRST, LOW_ONLY, HIGH_ONLY = 0, 1, 2, 3
# What it makes of each nibble q (a, b: float32; the value widened to float64): Q4_0's
# a * float32(q - 8), Q4_1's a * float32(q) + b, Q4_K's a * float32(q) - b, GPTQ's
# (float32(q) - a) * b.
_Q4_0_FORM, _Q4_1_FORM, _Q4_K_FORM, _GPTQ_FORM = 0, 1, 2, 3


def _nibble_unpacker(order: int, form: int):
    """An intrinsic (src, offset, out, at, a, b): 32 nibbles of the bytes at src[offset:], taken
    and ordered by `order`, made into values by `form` and stored at out[at:at + 32] (in range,
    unchecked). Written as explicit vector operations: a loop over a block's 16 bytes is fully
    unrolled by LLVM and then left scalar. Each value takes the same float32 steps as the
    scalar decoders, so the results are the same bits."""

    @intrinsic
    def unpack(typingctx, src, offset, out, at, a, b):
        if not (isinstance(src, types.Array) and src.dtype == types.uint8 and src.ndim == 1 and src.layout == "C"):
            raise TypingError("a nibble unpacker reads a C-contiguous 1-D uint8 array")
        if out != types.Array(types.float64, 1, "C") or a != types.float32 or b != types.float32:
            raise TypingError("a nibble unpacker writes a C-contiguous 1-D float64 array, a and b float32")

        def codegen(context, builder, signature, args):
            src_arg, offset_arg, out_arg, at_arg, a_arg, b_arg = args
            i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
            v16, v32 = ir.VectorType(i32, 16), ir.VectorType(i32, 32)

            def address(arg, index_arg, position, element):
                array = context.make_array(signature.args[position])(context, builder, arg)
                index = context.cast(builder, index_arg, signature.args[position + 1], types.intp)
                return builder.bitcast(builder.gep(array.data, [index]), element.as_pointer())

            def splat(value, vector_type):
                lanes = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(i32, 0))
                return builder.shuffle_vector(lanes, lanes, ir.Constant(ir.VectorType(i32, vector_type.count),
                                                                        [0] * vector_type.count))  # fmt: skip

            if order in (LOW_ONLY, HIGH_ONLY):
                raw = builder.load(address(src_arg, offset_arg, 0, ir.VectorType(i8, 32)), align=1)
                wide = builder.zext(raw, v32)
                if order == LOW_ONLY:
                    q = builder.and_(wide, ir.Constant(v32, [15] * 32))
                else:
                    q = builder.lshr(wide, ir.Constant(v32, [4] * 32))
            else:
                raw = builder.load(address(src_arg, offset_arg, 0, ir.VectorType(i8, 16)), align=1)
                wide = builder.zext(raw, v16)
                low = builder.and_(wide, ir.Constant(v16, [15] * 16))
                high = builder.lshr(wide, ir.Constant(v16, [4] * 16))
                mask = list(range(32)) if order == SPLIT else [k // 2 + (k % 2) * 16 for k in range(32)]
                q = builder.shuffle_vector(low, high, ir.Constant(v32, mask))
            v32f = ir.VectorType(f32, 32)
            if form == _Q4_0_FORM:
                value = builder.fmul(splat(a_arg, v32f), builder.sitofp(builder.sub(q, ir.Constant(v32, [8] * 32)), v32f))
            elif form == _GPTQ_FORM:
                value = builder.fmul(builder.fsub(builder.uitofp(q, v32f), splat(a_arg, v32f)), splat(b_arg, v32f))
            elif form == _Q4_1_FORM:
                value = builder.fadd(builder.fmul(splat(a_arg, v32f), builder.uitofp(q, v32f)), splat(b_arg, v32f))
            else:
                value = builder.fsub(builder.fmul(splat(a_arg, v32f), builder.uitofp(q, v32f)), splat(b_arg, v32f))
            wide_value = builder.fpext(value, ir.VectorType(ir.DoubleType(), 32))
            builder.store(wide_value, address(out_arg, at_arg, 2, wide_value.type), align=8)
            return context.get_dummy_value()

        return types.void(src, offset, out, at, a, b), codegen

    return unpack


# AVX-512's 16-lane permute, where numba targets this very machine and the machine has it.
_PERMUTE_16 = targets_host_with("avx512f")


@intrinsic
def bnb4_lanes(typingctx, src, offset, code, out, at, scale):
    """out[at:at + 32] = code[q] * scale (float32, widened) for the 32 nibbles of the bytes
    src[offset:offset + 16], high nibble first (bitsandbytes' order), in range, unchecked. The
    16-entry look-up is one AVX-512 permute per 16 values where numba compiles for this machine
    and it has AVX-512, else a tree of selects on the nibble's bits (either way it picks, it does
    not compute), then one float32 multiply per value, as code[q] * scale."""
    if not (isinstance(src, types.Array) and src.dtype == types.uint8 and src.ndim == 1 and src.layout == "C"):
        raise TypingError("bnb4_lanes reads a C-contiguous 1-D uint8 array")
    if not (isinstance(code, types.Array) and code.dtype == types.float32 and code.ndim == 1 and code.layout == "C"):
        raise TypingError("bnb4_lanes takes the code book as a C-contiguous float32 array of 16")
    if out != types.Array(types.float64, 1, "C") or scale != types.float32:
        raise TypingError("bnb4_lanes writes a C-contiguous float64 array and takes a float32 scale")

    def codegen(context, builder, signature, args):
        src_arg, offset_arg, code_arg, out_arg, at_arg, scale_arg = args
        i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
        v16, v32, v32f = ir.VectorType(i32, 16), ir.VectorType(i32, 32), ir.VectorType(f32, 32)

        def address(arg, position, index_arg, index_position, element):
            array = context.make_array(signature.args[position])(context, builder, arg)
            index = context.cast(builder, index_arg, signature.args[index_position], types.intp)
            return builder.bitcast(builder.gep(array.data, [index]), element.as_pointer())

        raw = builder.load(address(src_arg, 0, offset_arg, 1, ir.VectorType(i8, 16)), align=1)
        wide = builder.zext(raw, v16)
        low = builder.and_(wide, ir.Constant(v16, [15] * 16))
        high = builder.lshr(wide, ir.Constant(v16, [4] * 16))
        q = builder.shuffle_vector(high, low, ir.Constant(v32, [k // 2 + (k % 2) * 16 for k in range(32)]))
        book = context.make_array(signature.args[2])(context, builder, code_arg).data
        table = builder.load(builder.bitcast(book, ir.VectorType(f32, 16).as_pointer()), align=4)
        if _PERMUTE_16:
            # one vpermps per 16 lanes
            v16f = ir.VectorType(f32, 16)
            permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16]),
                                                     "llvm.x86.avx512.permvar.sf.512")  # fmt: skip
            halves = [builder.call(permute, [table, builder.shuffle_vector(q, q, ir.Constant(v16, list(range(h, h + 16))))])
                      for h in (0, 16)]  # fmt: skip
            looked_up = builder.shuffle_vector(halves[0], halves[1], ir.Constant(v32, list(range(32))))
        else:
            candidates = [builder.shuffle_vector(table, table, ir.Constant(v32, [k] * 32)) for k in range(16)]
            for bit in range(4):
                taken = builder.icmp_unsigned("!=", builder.and_(q, ir.Constant(v32, [1 << bit] * 32)),
                                              ir.Constant(v32, [0] * 32))  # fmt: skip
                candidates = [builder.select(taken, candidates[2 * k + 1], candidates[2 * k])
                              for k in range(len(candidates) // 2)]  # fmt: skip
            looked_up = candidates[0]
        lanes = builder.insert_element(ir.Constant(v32f, None), scale_arg, ir.Constant(i32, 0))
        scales = builder.shuffle_vector(lanes, lanes, ir.Constant(v32, [0] * 32))
        value = builder.fpext(builder.fmul(looked_up, scales), ir.VectorType(ir.DoubleType(), 32))
        builder.store(value, address(out_arg, 3, at_arg, 4, value.type), align=8)
        return context.get_dummy_value()

    return types.void(src, offset, code, out, at, scale), codegen


_q4_0_block = _nibble_unpacker(SPLIT, _Q4_0_FORM)
_q4_1_block = _nibble_unpacker(SPLIT, _Q4_1_FORM)
_q4_k_low = _nibble_unpacker(LOW_ONLY, _Q4_K_FORM)
_q4_k_high = _nibble_unpacker(HIGH_ONLY, _Q4_K_FORM)
gptq4_lanes = _nibble_unpacker(LOW_FIRST, _GPTQ_FORM)
_NO_OFFSET = np.float32(0.0)


@numba.njit(**INLINE)
def _q8_0_row(raw, r, out):
    """Row r of raw into the 1-D out (the fused kernels' decoder; the same float32 steps)."""
    cols = out.shape[0]
    for b in range(cols // 32):
        o = b * 34
        d = _f16(raw, r, o)
        base = b * 32
        for j in range(32):
            out[base + j] = d * np.float32(_i8(raw[r, o + 2 + j]))


@numba.njit(**PARALLEL)
def _q8_0(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // 32):
            o = b * 34
            d = _f16(raw, r, o)
            base = b * 32
            for j in range(32):
                out[r, base + j] = d * np.float32(_i8(raw[r, o + 2 + j]))


@numba.njit(**INLINE)
def _q4_0_row(raw, r, out):
    """Row r of raw into the 1-D out (the fused kernels' decoder; the same float32 steps)."""
    row = raw[r]
    for b in range(out.shape[0] // 32):
        _q4_0_block(row, b * 18 + 2, out, b * 32, _f16(raw, r, b * 18), _NO_OFFSET)


@numba.njit(**PARALLEL)
def _q4_0(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // 32):
            o = b * 18
            d = _f16(raw, r, o)
            base = b * 32
            for j in range(16):
                q = np.int32(raw[r, o + 2 + j])
                out[r, base + j] = d * np.float32((q & 15) - 8)
                out[r, base + j + 16] = d * np.float32((q >> 4) - 8)


@numba.njit(**INLINE)
def _q4_1_row(raw, r, out):
    """Row r of raw into the 1-D out (the fused kernels' decoder; the same float32 steps)."""
    row = raw[r]
    for b in range(out.shape[0] // 32):
        _q4_1_block(row, b * 20 + 4, out, b * 32, _f16(raw, r, b * 20), _f16(raw, r, b * 20 + 2))


@numba.njit(**PARALLEL)
def _q4_1(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // 32):
            o = b * 20
            d = _f16(raw, r, o)
            m = _f16(raw, r, o + 2)
            base = b * 32
            for j in range(16):
                q = np.int32(raw[r, o + 4 + j])
                out[r, base + j] = d * np.float32(q & 15) + m
                out[r, base + j + 16] = d * np.float32(q >> 4) + m


@numba.njit(**INLINE)
def _q5_0_row(raw, r, out):
    """Row r of raw into the 1-D out (the fused kernels' decoder; the same float32 steps)."""
    cols = out.shape[0]
    for b in range(cols // 32):
        o = b * 22
        d = _f16(raw, r, o)
        qh = _u32(raw, r, o + 2)
        base = b * 32
        for j in range(16):
            q = np.int32(raw[r, o + 6 + j])
            h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
            h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
            out[base + j] = d * np.float32(((q & 15) | h0) - 16)
            out[base + j + 16] = d * np.float32(((q >> 4) | h1) - 16)


@numba.njit(**PARALLEL)
def _q5_0(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // 32):
            o = b * 22
            d = _f16(raw, r, o)
            qh = _u32(raw, r, o + 2)
            base = b * 32
            for j in range(16):
                q = np.int32(raw[r, o + 6 + j])
                h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
                h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
                out[r, base + j] = d * np.float32(((q & 15) | h0) - 16)
                out[r, base + j + 16] = d * np.float32(((q >> 4) | h1) - 16)


@numba.njit(**INLINE)
def _q5_1_row(raw, r, out):
    """Row r of raw into the 1-D out (the fused kernels' decoder; the same float32 steps)."""
    cols = out.shape[0]
    for b in range(cols // 32):
        o = b * 24
        d = _f16(raw, r, o)
        m = _f16(raw, r, o + 2)
        qh = _u32(raw, r, o + 4)
        base = b * 32
        for j in range(16):
            q = np.int32(raw[r, o + 8 + j])
            h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
            h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
            out[base + j] = d * np.float32((q & 15) | h0) + m
            out[base + j + 16] = d * np.float32((q >> 4) | h1) + m


@numba.njit(**PARALLEL)
def _q5_1(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // 32):
            o = b * 24
            d = _f16(raw, r, o)
            m = _f16(raw, r, o + 2)
            qh = _u32(raw, r, o + 4)
            base = b * 32
            for j in range(16):
                q = np.int32(raw[r, o + 8 + j])
                h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
                h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
                out[r, base + j] = d * np.float32((q & 15) | h0) + m
                out[r, base + j + 16] = d * np.float32((q >> 4) | h1) + m


@numba.njit(**INLINE)
def _scale_min_k4(raw, r, offset, j):
    """Six-bit scale and min of sub-block j (0..7) from the 12 packed bytes at offset."""
    if j < 4:
        sc = np.int32(raw[r, offset + j]) & 63
        mn = np.int32(raw[r, offset + j + 4]) & 63
    else:
        hi = np.int32(raw[r, offset + j + 4])
        sc = (hi & 15) | ((np.int32(raw[r, offset + j - 4]) >> 6) << 4)
        mn = (hi >> 4) | ((np.int32(raw[r, offset + j]) >> 6) << 4)
    return np.float32(sc), np.float32(mn)


@numba.njit(**INLINE)
def _q4_k_row(raw, r, out):
    """Row r of raw into the 1-D out (the fused kernels' decoder; the same float32 steps)."""
    row = raw[r]
    for b in range(out.shape[0] // QK_K):
        o = b * 144
        d = _f16(raw, r, o)
        dmin = _f16(raw, r, o + 2)
        for c in range(4):  # 64 elements per chunk: 32 low nibbles, then 32 high nibbles
            sc1, m1 = _scale_min_k4(raw, r, o + 4, 2 * c)
            sc2, m2 = _scale_min_k4(raw, r, o + 4, 2 * c + 1)
            y = b * QK_K + 64 * c
            _q4_k_low(row, o + 16 + 32 * c, out, y, d * sc1, dmin * m1)
            _q4_k_high(row, o + 16 + 32 * c, out, y + 32, d * sc2, dmin * m2)


@numba.njit(**PARALLEL)
def _q4_k(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // QK_K):
            o = b * 144
            d = _f16(raw, r, o)
            dmin = _f16(raw, r, o + 2)
            qs = o + 16
            base = b * QK_K
            for c in range(4):  # 64 elements per chunk: 32 low nibbles, then 32 high nibbles
                sc1, m1 = _scale_min_k4(raw, r, o + 4, 2 * c)
                sc2, m2 = _scale_min_k4(raw, r, o + 4, 2 * c + 1)
                d1 = d * sc1
                d2 = d * sc2
                min1 = dmin * m1
                min2 = dmin * m2
                y = base + 64 * c
                for j in range(32):
                    q = np.int32(raw[r, qs + 32 * c + j])
                    out[r, y + j] = d1 * np.float32(q & 15) - min1
                    out[r, y + 32 + j] = d2 * np.float32(q >> 4) - min2


@numba.njit(**INLINE)
def _q5_k_row(raw, r, out):
    """Row r of raw into the 1-D out (the fused kernels' decoder; the same float32 steps)."""
    cols = out.shape[0]
    for b in range(cols // QK_K):
        o = b * 176
        d = _f16(raw, r, o)
        dmin = _f16(raw, r, o + 2)
        qh = o + 16
        qs = o + 48
        base = b * QK_K
        for c in range(4):
            sc1, m1 = _scale_min_k4(raw, r, o + 4, 2 * c)
            sc2, m2 = _scale_min_k4(raw, r, o + 4, 2 * c + 1)
            d1 = d * sc1
            d2 = d * sc2
            min1 = dmin * m1
            min2 = dmin * m2
            y = base + 64 * c
            for j in range(32):
                q = np.int32(raw[r, qs + 32 * c + j])
                h = np.int32(raw[r, qh + j])
                q1 = (q & 15) | (((h >> (2 * c)) & 1) << 4)
                q2 = (q >> 4) | (((h >> (2 * c + 1)) & 1) << 4)
                out[y + j] = d1 * np.float32(q1) - min1
                out[y + 32 + j] = d2 * np.float32(q2) - min2


@numba.njit(**PARALLEL)
def _q5_k(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // QK_K):
            o = b * 176
            d = _f16(raw, r, o)
            dmin = _f16(raw, r, o + 2)
            qh = o + 16
            qs = o + 48
            base = b * QK_K
            for c in range(4):
                sc1, m1 = _scale_min_k4(raw, r, o + 4, 2 * c)
                sc2, m2 = _scale_min_k4(raw, r, o + 4, 2 * c + 1)
                d1 = d * sc1
                d2 = d * sc2
                min1 = dmin * m1
                min2 = dmin * m2
                y = base + 64 * c
                for j in range(32):
                    q = np.int32(raw[r, qs + 32 * c + j])
                    h = np.int32(raw[r, qh + j])
                    q1 = (q & 15) | (((h >> (2 * c)) & 1) << 4)
                    q2 = (q >> 4) | (((h >> (2 * c + 1)) & 1) << 4)
                    out[r, y + j] = d1 * np.float32(q1) - min1
                    out[r, y + 32 + j] = d2 * np.float32(q2) - min2


@numba.njit(**INLINE)
def _q6_k_row(raw, r, out):
    """Row r of raw into the 1-D out (the fused kernels' decoder; the same float32 steps)."""
    cols = out.shape[0]
    for b in range(cols // QK_K):
        o = b * 210
        d = _f16(raw, r, o + 208)
        base = b * QK_K
        for half in range(2):  # 128 elements each: ql[64], qh[32], scales[8]
            ql = o + 64 * half
            qh = o + 128 + 32 * half
            sc = o + 192 + 8 * half
            y = base + 128 * half
            for j in range(32):
                s = j // 16
                lo = np.int32(raw[r, ql + j])
                lo2 = np.int32(raw[r, ql + 32 + j])
                h = np.int32(raw[r, qh + j])
                q1 = ((lo & 15) | ((h & 3) << 4)) - 32
                q2 = ((lo2 & 15) | (((h >> 2) & 3) << 4)) - 32
                q3 = ((lo >> 4) | (((h >> 4) & 3) << 4)) - 32
                q4 = ((lo2 >> 4) | (((h >> 6) & 3) << 4)) - 32
                out[y + j] = (d * np.float32(_i8(raw[r, sc + s]))) * np.float32(q1)
                out[y + 32 + j] = (d * np.float32(_i8(raw[r, sc + s + 2]))) * np.float32(q2)
                out[y + 64 + j] = (d * np.float32(_i8(raw[r, sc + s + 4]))) * np.float32(q3)
                out[y + 96 + j] = (d * np.float32(_i8(raw[r, sc + s + 6]))) * np.float32(q4)


@numba.njit(**PARALLEL)
def _q6_k(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // QK_K):
            o = b * 210
            d = _f16(raw, r, o + 208)
            base = b * QK_K
            for half in range(2):  # 128 elements each: ql[64], qh[32], scales[8]
                ql = o + 64 * half
                qh = o + 128 + 32 * half
                sc = o + 192 + 8 * half
                y = base + 128 * half
                for j in range(32):
                    s = j // 16
                    lo = np.int32(raw[r, ql + j])
                    lo2 = np.int32(raw[r, ql + 32 + j])
                    h = np.int32(raw[r, qh + j])
                    q1 = ((lo & 15) | ((h & 3) << 4)) - 32
                    q2 = ((lo2 & 15) | (((h >> 2) & 3) << 4)) - 32
                    q3 = ((lo >> 4) | (((h >> 4) & 3) << 4)) - 32
                    q4 = ((lo2 >> 4) | (((h >> 6) & 3) << 4)) - 32
                    out[r, y + j] = (d * np.float32(_i8(raw[r, sc + s]))) * np.float32(q1)
                    out[r, y + 32 + j] = (d * np.float32(_i8(raw[r, sc + s + 2]))) * np.float32(q2)
                    out[r, y + 64 + j] = (d * np.float32(_i8(raw[r, sc + s + 4]))) * np.float32(q3)
                    out[r, y + 96 + j] = (d * np.float32(_i8(raw[r, sc + s + 6]))) * np.float32(q4)


@numba.njit(**PARALLEL)
def _q2_k(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // QK_K):
            o = b * 84
            d = _f16(raw, r, o + 80)
            dmin = _f16(raw, r, o + 82)
            base = b * QK_K
            for e in range(QK_K):  # element e: 2 bits of qs[32 * half + j] at shift 2 * k
                half = e // 128
                k = (e // 32) % 4
                j = e % 32
                sc = np.int32(raw[r, o + e // 16])
                dl = d * np.float32(sc & 15)
                ml = dmin * np.float32(sc >> 4)
                q = (np.int32(raw[r, o + 16 + 32 * half + j]) >> (2 * k)) & 3
                out[r, base + e] = dl * np.float32(q) - ml


@numba.njit(**INLINE)
def _q3_k_scale(raw, r, offset, i):
    """Signed six-bit scale i (0..15) from the 12 packed bytes at offset (stored + 32)."""
    low = np.int32(raw[r, offset + i % 8])
    low = (low >> 4) if i >= 8 else (low & 15)
    high = (np.int32(raw[r, offset + 8 + i % 4]) >> (2 * (i // 4))) & 3
    return np.float32((low | (high << 4)) - 32)


@numba.njit(**PARALLEL)
def _q3_k(raw, out):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // QK_K):
            o = b * 110
            d = _f16(raw, r, o + 108)
            base = b * QK_K
            for s in range(16):
                dl = d * _q3_k_scale(raw, r, o + 96, s)
                for t in range(16):
                    e = 16 * s + t
                    k = e // 32  # the hmask bit and, within a half, the 2-bit shift
                    j = e % 32
                    q = (np.int32(raw[r, o + 32 + 32 * (k // 4) + j]) >> (2 * (k % 4))) & 3
                    if not (np.int32(raw[r, o + j]) >> k) & 1:  # a clear mask bit subtracts 4
                        q -= 4
                    out[r, base + e] = dl * np.float32(q)


@numba.njit(**PARALLEL)
def _iq4_nl(raw, out, values):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // 32):
            o = b * 18
            d = _f16(raw, r, o)
            base = b * 32
            for j in range(16):
                q = np.int32(raw[r, o + 2 + j])
                out[r, base + j] = d * values[q & 15]
                out[r, base + j + 16] = d * values[q >> 4]


@numba.njit(**PARALLEL)
def _iq4_xs(raw, out, values):
    rows, cols = out.shape
    for r in numba.prange(rows):
        for b in range(cols // QK_K):
            o = b * 136
            d = _f16(raw, r, o)
            high = np.int32(raw[r, o + 2]) | (np.int32(raw[r, o + 3]) << 8)
            base = b * QK_K
            for s in range(8):  # sub-blocks of 32: 16 bytes, low nibbles then high nibbles
                low = (np.int32(raw[r, o + 4 + s // 2]) >> (4 * (s % 2))) & 15
                dl = d * np.float32((low | (((high >> (2 * s)) & 3) << 4)) - 32)
                qs = o + 8 + 16 * s
                y = base + 32 * s
                for j in range(16):
                    q = np.int32(raw[r, qs + j])
                    out[r, y + j] = dl * values[q & 15]
                    out[r, y + j + 16] = dl * values[q >> 4]


_KERNELS = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
}
# Kernels that take the IQ4_NL level table as a third argument.
_TABLE_KERNELS = {"IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}


def _dense(qtype: str, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """F32, F16 and BF16 rows decoded in numpy (exact: every value is representable)."""
    if qtype == "F32":
        return raw.view("<f4").astype(np.float32).reshape(rows, cols)
    if qtype == "F16":
        return raw.view("<f2").astype(np.float32).reshape(rows, cols)
    bits = raw.view("<u2").astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32).reshape(rows, cols)


def dequantize(qtype: str, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The float32 [rows, cols] values of a tensor stored as `qtype` in the bytes `raw`.

    `raw` is a uint8 array of exactly rows * (cols / block) * type_size bytes (any shape, C
    order); cols must be a whole number of blocks. The result is a new C-contiguous array.
    """
    layout = BLOCK_LAYOUTS.get(qtype)
    if layout is None:
        raise ValueError(
            f"{qtype!r}: unknown type; dequantize handles {', '.join(sorted(BLOCK_LAYOUTS))}"
        )
    block, type_size = layout
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        kind = raw.dtype if isinstance(raw, np.ndarray) else type(raw).__name__
        raise ValueError(f"{qtype} [{rows}, {cols}]: raw must be a uint8 array, got {kind}")
    if rows < 0 or cols < 0:
        raise ValueError(f"{qtype} [{rows}, {cols}]: rows and cols must be non-negative")
    if cols % block:
        raise ValueError(
            f"{qtype} [{rows}, {cols}]: cols {cols} is not a multiple of the block size {block}"
        )
    row_bytes = cols // block * type_size
    if raw.size != rows * row_bytes:
        raise ValueError(
            f"{qtype} [{rows}, {cols}]: raw holds {raw.size} bytes but rows * (cols / {block}) "
            f"* {type_size} = {rows * row_bytes}"
        )
    flat = np.ascontiguousarray(raw).reshape(rows, row_bytes)
    if qtype not in QUANTIZED:
        return _dense(qtype, flat, rows, cols)
    out = np.empty((rows, cols), dtype=np.float32)
    if out.size and qtype in _TABLE_KERNELS:
        _TABLE_KERNELS[qtype](flat, out, IQ4_NL_VALUES)
    elif out.size:
        _KERNELS[qtype](flat, out)
    return out
