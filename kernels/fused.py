"""Extract straight from quantized storage: decode one row, weigh it, add it up, no float tensor.

`extract` in dense.py needs the suspect as a float32 [out, in] array, so a scan of a quantized
file used to dequantize every carrier whole and then read it again. The kernels here decode the
packed blocks of one canonical row at a time into a per-thread float64 buffer (the same float32
operations as the dequantizers, so the values are bit-identical) and accumulate num/den as
`extract` does: the same rows per thread, the same element order, the same float64 sums, so the
results equal `extract` on the dequantized tensor exactly.

Formats: GGML blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; stored row `row_map[r]`
gives canonical row r, which undoes llama.cpp's rope permutation), GPTQ (2/4/8-bit words packed
along the input axis, per-group zeros and scales, any group index) and bitsandbytes 4-bit
(NF4/FP4: a 16-entry code book times a per-block absmax over the flat tensor).
"""

import numba
import numpy as np

from weightmark.kernels.bits import BF16, F16, FLOAT, decode_span
from weightmark.kernels.config import INLINE, PARALLEL
from weightmark.kernels.dense import (
    EXTRACT_PARTS,
    TILE,
    block_sums,
    check_sums,
    fold_parts,
    scatter_tile,
    weigh_tile,
)
from weightmark.kernels.prng import counter_of
from weightmark.kernels.quant import (
    BLOCK_LAYOUTS,
    _q4_0_row,
    _q4_1_row,
    _q4_k_row,
    _q5_0_row,
    _q5_1_row,
    _q5_k_row,
    _q6_k_row,
    _q8_0_row,
    bnb4_lanes,
    gptq4_lanes,
)

__all__ = ["FUSED_GGML", "extract_bnb4", "extract_ggml", "extract_gptq"]

_NO_SCALE = np.float32(0.0)
_ROW_GROUP = 16  # GPTQ rows whose packed words are copied out together (a 64-byte line of uint32)  # the unused float arguments of the nibble unpackers

# GGML block type -> the number the kernel branches on.
FUSED_GGML: dict[str, int] = {
    "Q8_0": 0,
    "Q4_0": 1,
    "Q4_1": 2,
    "Q5_0": 3,
    "Q5_1": 4,
    "Q4_K": 5,
    "Q5_K": 6,
    "Q6_K": 7,
}


@numba.njit(**INLINE)
def _row_scale_inverse(row_scale, r):
    """1 / s_r, or 0.0 for a row the scan skips (scale zero, negative or not finite)."""
    scale = np.float64(row_scale[r])
    if not scale > 0.0 or not np.isfinite(scale):
        return 0.0
    return 1.0 / scale


@numba.njit(**INLINE)
def _accumulate_row(d, r, inv, reference, reference_kind, has_reference, ref, seed, sums, position, terms):
    """A block's sums (its [2 L] vector) += row r's terms, d holding the suspect's decoded row
    (as `extract`: tile by tile, in column order)."""
    cols = d.shape[0]
    code_length = np.uint32(sums.shape[0] // 2)
    for c0 in range(0, cols, TILE):
        n = min(TILE, cols - c0)
        tile = d[c0 : c0 + n]
        if has_reference:
            decode_span(reference, r, c0, n, reference_kind, ref)
            for i in range(n):
                tile[i] -= ref[i]
        weigh_tile(tile, n, counter_of(seed, r * cols + c0), inv, code_length, position, terms)
        scatter_tile(n, position, terms, sums)


@numba.njit(**PARALLEL)
def _extract_ggml(qtype, raw, row_map, cols, reference, reference_kind, has_reference, row_scale, seed, sums):
    rows = row_map.shape[0]
    threads = sums.shape[0]
    chunk = (rows + threads - 1) // threads
    for t in numba.prange(threads):
        d = np.empty(cols)
        ref = np.empty(TILE)
        terms = np.empty(2 * TILE)
        position = np.empty(TILE, dtype=np.uint32)
        part = block_sums(sums, t)
        for r in range(t * chunk, min(rows, (t + 1) * chunk)):
            inv = _row_scale_inverse(row_scale, r)
            if inv == 0.0:
                continue
            stored = row_map[r]
            if qtype == 0:
                _q8_0_row(raw, stored, d)
            elif qtype == 1:
                _q4_0_row(raw, stored, d)
            elif qtype == 2:
                _q4_1_row(raw, stored, d)
            elif qtype == 3:
                _q5_0_row(raw, stored, d)
            elif qtype == 4:
                _q5_1_row(raw, stored, d)
            elif qtype == 5:
                _q4_k_row(raw, stored, d)
            elif qtype == 6:
                _q5_k_row(raw, stored, d)
            else:
                _q6_k_row(raw, stored, d)
            _accumulate_row(d, r, inv, reference, reference_kind, has_reference, ref, seed, part, position, terms)


@numba.njit(**INLINE)
def _gptq_row(qweight, bits, zeros, scales, g_idx, runs, r, words, out):
    """Row r of a GPTQ weight into out: w[r, i] = (q[i, r] - zero[r, g(i)]) * scale[r, g(i)], each
    step rounded to float32. 4-bit rows (their words already copied to `words`) go run by run of
    inputs sharing a group (runs: where g_idx changes, then cols), 32 fields at a time where a
    run allows; other widths field by field."""
    cols = out.shape[0]
    per = 32 // bits
    if bits != 4:
        mask = np.uint32((1 << bits) - 1)
        for w in range(cols // per):
            word = qweight[w, r]
            for k in range(per):
                i = w * per + k
                g = g_idx[i]
                q = np.float32((word >> np.uint32(k * bits)) & mask)
                out[i] = (q - zeros[r, g]) * scales[r, g]
        return
    fields = words.view(np.uint8)  # little-endian words: field i is byte i // 2, low nibble first
    for k in range(runs.shape[0] - 1):
        first, stop = runs[k], runs[k + 1]
        g = g_idx[first]
        zero = zeros[r, g]
        scale = scales[r, g]
        vector_stop = first + (stop - first) // 32 * 32 if first % 32 == 0 else first
        for c in range(first, vector_stop, 32):
            gptq4_lanes(fields, c // 2, out, c, zero, scale)
        for c in range(vector_stop, stop):
            q = np.float32((words[c // 8] >> np.uint32(4 * (c % 8))) & np.uint32(15))
            out[c] = (q - zero) * scale


@numba.njit(**PARALLEL)
def _extract_gptq(qweight, bits, zeros, scales, g_idx, runs, reference, reference_kind, has_reference, row_scale,
                  seed, sums):  # fmt: skip
    rows = scales.shape[0]
    cols = g_idx.shape[0]
    threads = sums.shape[0]
    chunk = (rows + threads - 1) // threads
    for t in numba.prange(threads):
        d = np.empty(cols)
        words = np.empty((_ROW_GROUP, qweight.shape[0]), dtype=np.uint32)
        ref = np.empty(TILE)
        terms = np.empty(2 * TILE)
        position = np.empty(TILE, dtype=np.uint32)
        part = block_sums(sums, t)
        stop = min(rows, (t + 1) * chunk)
        for first in range(t * chunk, stop, _ROW_GROUP):
            group = min(_ROW_GROUP, stop - first)
            if bits == 4:
                # qweight is [words, rows]: one cache line holds a word of 16 neighbouring rows, so
                # a group's words are copied out together (one row at a time, every line was
                # fetched 16 times, at a stride that defeats the cache).
                for w in range(qweight.shape[0]):
                    line = qweight[w, first : first + group]
                    for k in range(group):
                        words[k, w] = line[k]
            for k in range(group):
                r = first + k
                inv = _row_scale_inverse(row_scale, r)
                if inv == 0.0:
                    continue
                _gptq_row(qweight, bits, zeros, scales, g_idx, runs, r, words[k], d)
                _accumulate_row(d, r, inv, reference, reference_kind, has_reference, ref, seed, part, position,
                                terms)  # fmt: skip


@numba.njit(**INLINE)
def _bnb4_row(data, code, absmax, blocksize, r, out):
    """Row r of the flat bitsandbytes tensor into out: flat element j = r * cols + c is
    code[nibble] * absmax[j // blocksize], its nibble in byte j // 2, high nibble first. Runs of
    32 that start on a byte and lie in one block are decoded as vectors; the rest one by one."""
    cols = out.shape[0]
    start = r * cols
    full = cols - cols % 32 if start % 2 == 0 else 0
    for c in range(0, full, 32):
        j = start + c
        block = j // blocksize
        if (j + 31) // blocksize == block:
            bnb4_lanes(data, j // 2, code, out, c, absmax[block])
        else:
            _bnb4_elements(data, code, absmax, blocksize, start, c, c + 32, out)
    _bnb4_elements(data, code, absmax, blocksize, start, full, cols, out)


@numba.njit(**INLINE)
def _bnb4_elements(data, code, absmax, blocksize, start, first, stop, out):
    """out[c] for c in first..stop-1, one element at a time (flat element start + c)."""
    for c in range(first, stop):
        j = start + c
        byte = np.int32(data[j >> 1])
        q = (byte >> 4) if (j & 1) == 0 else (byte & 15)
        out[c] = code[q] * absmax[j // blocksize]


@numba.njit(**PARALLEL)
def _extract_bnb4(data, code, absmax, blocksize, rows, cols, reference, reference_kind, has_reference,
                  row_scale, seed, sums):  # fmt: skip
    threads = sums.shape[0]
    chunk = (rows + threads - 1) // threads
    for t in numba.prange(threads):
        d = np.empty(cols)
        ref = np.empty(TILE)
        terms = np.empty(2 * TILE)
        position = np.empty(TILE, dtype=np.uint32)
        part = block_sums(sums, t)
        for r in range(t * chunk, min(rows, (t + 1) * chunk)):
            inv = _row_scale_inverse(row_scale, r)
            if inv == 0.0:
                continue
            _bnb4_row(data, code, absmax, blocksize, r, d)
            _accumulate_row(d, r, inv, reference, reference_kind, has_reference, ref, seed, part, position, terms)


# ------------------------------------------------------------------------------ checking wrappers

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_common(
    rows: int,
    cols: int,
    reference: np.ndarray | None,
    reference_kind: int,
    row_scale: np.ndarray,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    if row_scale.shape != (rows,):
        raise ValueError(f"row_scale has shape {row_scale.shape}, carrier has {rows} rows")
    check_sums(num, den)
    if num.shape[0] == 0:
        raise ValueError("num and den must not be empty")
    if reference is None:
        return
    if reference.shape != (rows, cols):
        raise ValueError(f"reference shape {reference.shape} != carrier shape {(rows, cols)}")
    if not reference.flags.c_contiguous:
        raise ValueError("reference must be C-contiguous")
    if reference_kind == FLOAT:
        if reference.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"reference: kind FLOAT needs float32 or float64, got {reference.dtype}")
    elif reference_kind in (BF16, F16):
        if reference.dtype != np.uint16:
            raise ValueError(f"reference: bf16/f16 carriers are uint16 bit patterns, got {reference.dtype}")
    else:
        raise ValueError(f"reference: unknown kind {reference_kind}")


def _run(kernel, args: tuple, rows: int, cols: int, reference: np.ndarray | None, reference_kind: int,
         row_scale: np.ndarray, seed: int, num: np.ndarray, den: np.ndarray) -> None:  # fmt: skip
    """Per-block sums (the same fixed row blocks as `extract`, whatever the thread count, so the
    two agree bit for bit), added up after."""
    if rows == 0 or cols == 0:
        return
    parts = max(1, min(EXTRACT_PARTS, rows))
    sums = np.empty((parts, num.shape[0], 2))
    has_reference = reference is not None
    # Without a reference the kernel is given a dummy of the right type (it is never read).
    ref = reference if has_reference else np.empty((1, 1), dtype=np.float32)
    kernel(*args, ref, reference_kind if has_reference else FLOAT, has_reference, row_scale,
           np.uint64(seed), sums)  # fmt: skip
    fold_parts(sums, num, den)


def extract_ggml(
    qtype: str,
    raw: np.ndarray,
    rows: int,
    cols: int,
    row_map: np.ndarray | None,
    reference: np.ndarray | None,
    reference_kind: int,
    row_scale: np.ndarray,
    seed: int,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """Add a GGML-quantized carrier's sums into num and den, as `extract` on its dequantized rows.

    `raw` holds the tensor's bytes (rows * cols / block * type_size of them); canonical row r is
    stored row `row_map[r]` (None: the identity). Types: FUSED_GGML.
    """
    code = FUSED_GGML.get(qtype)
    if code is None:
        raise ValueError(f"{qtype!r}: no fused kernel; types: {', '.join(FUSED_GGML)}")
    block, type_size = BLOCK_LAYOUTS[qtype]
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise ValueError(f"{qtype} [{rows}, {cols}]: raw must be a uint8 array")
    if rows < 0 or cols < 0 or cols % block:
        raise ValueError(f"{qtype} [{rows}, {cols}]: cols must be a non-negative multiple of {block}")
    row_bytes = cols // block * type_size
    if raw.size != rows * row_bytes:
        raise ValueError(f"{qtype} [{rows}, {cols}]: raw holds {raw.size} bytes, the shape needs {rows * row_bytes}")
    if row_map is None:
        row_map = np.arange(rows, dtype=np.int64)
    elif row_map.shape != (rows,) or row_map.dtype != np.int64:
        raise ValueError(f"row_map must be an int64 vector of {rows} stored row numbers")
    elif rows and (int(row_map.min()) < 0 or int(row_map.max()) >= rows):
        raise ValueError(f"row_map points outside the {rows} stored rows")
    _check_common(rows, cols, reference, reference_kind, row_scale, num, den)
    flat = np.ascontiguousarray(raw).reshape(rows, row_bytes)
    _run(_extract_ggml, (code, flat, row_map, cols), rows, cols, reference, reference_kind, row_scale, seed,
         num, den)  # fmt: skip


def extract_gptq(
    qweight: np.ndarray,
    bits: int,
    zeros: np.ndarray,
    scales: np.ndarray,
    g_idx: np.ndarray,
    reference: np.ndarray | None,
    reference_kind: int,
    row_scale: np.ndarray,
    seed: int,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """Add a GPTQ carrier's sums into num and den, as `extract` on its dequantized [out, in] values.

    qweight: uint32 [in * bits / 32, out], fields low bits first along the input axis; zeros and
    scales: float32 [out, groups] (zero points already as values, not stored-minus-one); g_idx:
    int64 [in], the group of each input. Value = float32(float32(q - zero) * scale).
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"GPTQ bits {bits}: only 2, 4 and 8")
    if qweight.ndim != 2 or qweight.dtype != np.uint32:
        raise ValueError("qweight must be a 2-D uint32 array")
    per = 32 // bits
    rows, cols = qweight.shape[1], qweight.shape[0] * per
    if scales.dtype != np.float32 or zeros.dtype != np.float32 or scales.ndim != 2 or zeros.shape != scales.shape:
        raise ValueError("zeros and scales must be float32 [out, groups] arrays of one shape")
    if scales.shape[0] != rows or scales.shape[1] == 0:
        raise ValueError(f"scales has shape {scales.shape}, qweight has {rows} outputs")
    if g_idx.shape != (cols,) or g_idx.dtype != np.int64:
        raise ValueError(f"g_idx must be an int64 vector of the {cols} inputs")
    if cols and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[1]):
        raise ValueError(f"g_idx points outside the {scales.shape[1]} groups")
    _check_common(rows, cols, reference, reference_kind, row_scale, num, den)
    # Where the group changes along the inputs (plus both ends): runs share a zero and a scale.
    runs = np.concatenate(([0], np.flatnonzero(np.diff(g_idx)) + 1, [cols])).astype(np.int64)
    args = (np.ascontiguousarray(qweight), bits, np.ascontiguousarray(zeros), np.ascontiguousarray(scales),
            np.ascontiguousarray(g_idx), runs)  # fmt: skip
    _run(_extract_gptq, args, rows, cols, reference, reference_kind, row_scale, seed, num, den)


def extract_bnb4(
    data: np.ndarray,
    code: np.ndarray,
    absmax: np.ndarray,
    blocksize: int,
    rows: int,
    cols: int,
    reference: np.ndarray | None,
    reference_kind: int,
    row_scale: np.ndarray,
    seed: int,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """Add a bitsandbytes 4-bit carrier's sums into num and den, as `extract` on its values.

    Flat element j of the [rows, cols] view is code[nibble] * absmax[j // blocksize], its nibble
    the high half of data[j // 2] for even j and the low half for odd j (float32 product).
    """
    numel = rows * cols
    if data.ndim != 1 or data.dtype != np.uint8 or data.size < (numel + 1) // 2:
        raise ValueError(f"data must be a uint8 vector of at least {(numel + 1) // 2} bytes")
    if code.shape != (16,) or code.dtype != np.float32:
        raise ValueError("code must be the 16 float32 levels of the code book")
    if blocksize <= 0 or absmax.dtype != np.float32 or absmax.ndim != 1 or absmax.size < -(-numel // blocksize):
        raise ValueError(f"absmax must be float32 with one scale per block of {blocksize}")
    _check_common(rows, cols, reference, reference_kind, row_scale, num, den)
    args = (np.ascontiguousarray(data), np.ascontiguousarray(code), absmax, np.int64(blocksize), np.int64(rows), np.int64(cols))
    _run(_extract_bnb4, args, rows, cols, reference, reference_kind, row_scale, seed, num, den)
