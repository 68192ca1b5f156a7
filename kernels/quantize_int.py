"""Integer and code-book quantization against given scales, and packing codes into int32 words.

These are the loops behind GPTQ, AWQ, compressed-tensors and bitsandbytes NF4 outputs: the
scales are computed elsewhere (from the unstamped weights) and only the codes are computed here.
"""

import numba
import numpy as np

from weightmark.kernels.config import PARALLEL

__all__ = ["affine_codes", "codebook_codes", "pack_fields"]


@numba.njit(**PARALLEL)
def _affine_codes(x, scale, zero, group, top, out, bad):
    rows, cols = x.shape
    for r in numba.prange(rows):
        for c in range(cols):
            v = x[r, c]
            if not np.isfinite(v):
                bad[r] = True
                out[r, c] = 0
                continue
            g = c // group
            q = np.rint(v / scale[r, g]) + zero[r, g]  # float32 division, ties to even
            if not q >= 0:  # also catches NaN from a zero scale
                q = 0
            elif q > top:
                q = top
            out[r, c] = np.uint8(q)


@numba.njit(**PARALLEL)
def _codebook_codes(x, absmax, blocksize, mids, zero_code, out, bad):
    """Nearest code-book entry of x / absmax[block], two 4-bit codes per byte, first one high."""
    n = x.size
    pairs = out.size
    for p in numba.prange(pairs):
        byte = 0
        for half in range(2):
            j = 2 * p + half
            code = 0
            if j < n:
                v = x[j]
                if not np.isfinite(v):
                    bad[j // blocksize] = True
                a = absmax[j // blocksize]
                if a > 0:
                    t = v / a
                    for m in range(mids.size):  # code index = midpoints below the value
                        if t > mids[m]:
                            code = m + 1
                else:
                    code = zero_code
            byte = byte * 16 + code
        out[p] = np.uint8(byte)


@numba.njit(**PARALLEL)
def _pack_fields(u, bits, order, out):
    rows, cols = u.shape
    words = out.shape[1]
    per = 32 // bits
    for r in numba.prange(rows):
        for w in range(words):
            acc = np.uint32(0)
            for k in range(per):
                c = w * per + order[k]
                if c < cols:
                    acc |= np.uint32(u[r, c]) << np.uint32(bits * k)
            out[r, w] = acc


def _check_2d(name: str, array: np.ndarray, dtype: type) -> tuple[int, int]:
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = list(array.shape) if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{name} must be a 2-D numpy array, got {shape}")
    if array.dtype != dtype:
        raise ValueError(f"{name} {list(array.shape)} must be {np.dtype(dtype).name}, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} {list(array.shape)} must be C-contiguous")
    return array.shape


def affine_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int, bits: int) -> np.ndarray:
    """Codes u = clamp(rint(x / scale[g]) + zero[g], 0, 2**bits - 1) as uint8 [rows, cols].

    x: float32 [rows, cols]; scale and zero: float32 [rows, cols / group], group g = col // group
    (zero holds the unsigned code of the value zero, e.g. 8 for symmetric 4-bit). Dequantized
    value: (u - zero) * scale. Rows holding inf or NaN are refused.
    """
    rows, cols = _check_2d("x", x, np.float32)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits {bits} is not in 1..8")
    if group <= 0 or cols % group:
        raise ValueError(f"x [{rows}, {cols}]: group size {group} does not divide cols {cols}")
    want = (rows, cols // group)
    for name, array in (("scale", scale), ("zero", zero)):
        if _check_2d(name, array, np.float32) != want:
            raise ValueError(f"{name} has shape {list(array.shape)}, expected {list(want)}")
    out = np.empty((rows, cols), dtype=np.uint8)
    bad = np.zeros(rows, dtype=np.bool_)
    if out.size:
        _affine_codes(x, scale, zero, group, float((1 << bits) - 1), out, bad)
    if bad.any():
        where = np.flatnonzero(bad)
        raise ValueError(f"x [{rows}, {cols}]: rows {where[:10].tolist()} ({where.size} in all) hold inf or NaN")
    return out


def codebook_codes(x: np.ndarray, absmax: np.ndarray, blocksize: int, codebook: np.ndarray) -> np.ndarray:
    """Nearest 4-bit code-book index of x / absmax[block], packed two per byte (first high).

    x: float32, any shape (read flat); absmax: float32 [ceil(size / blocksize)]; codebook: 16
    increasing float32 values (bitsandbytes NF4 / FP4 order is increasing for NF4). Blocks
    with absmax 0 get the code of 0.0. Returns uint8 [ceil(size / 2)], as bitsandbytes packs.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("x must be a C-contiguous float32 numpy array")
    codebook = np.asarray(codebook, dtype=np.float32)
    if codebook.shape != (16,) or not np.all(np.diff(codebook) > 0):
        raise ValueError("codebook must hold 16 increasing values")
    zero = np.flatnonzero(codebook == 0)
    if zero.size != 1:
        raise ValueError("codebook must hold the value 0.0 exactly once")
    if blocksize <= 0:
        raise ValueError(f"blocksize {blocksize} is not positive")
    flat = x.reshape(-1)
    blocks = -(-flat.size // blocksize)
    if not isinstance(absmax, np.ndarray) or absmax.dtype != np.float32 or absmax.shape != (blocks,):
        raise ValueError(f"absmax must be float32 [{blocks}] for {flat.size} values in blocks of {blocksize}")
    mids = ((codebook[1:].astype(np.float64) + codebook[:-1]) / 2).astype(np.float32)
    out = np.empty(-(-flat.size // 2), dtype=np.uint8)
    bad = np.zeros(blocks, dtype=np.bool_)
    if out.size:
        _codebook_codes(flat, np.ascontiguousarray(absmax), blocksize, mids, int(zero[0]), out, bad)
    if bad.any():
        where = np.flatnonzero(bad)
        raise ValueError(f"x: blocks {where[:10].tolist()} ({where.size} in all) hold inf or NaN")
    return out


def pack_fields(u: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Pack uint8 codes [rows, cols] along cols into int32 [rows, ceil(cols / (32 / bits))].

    Bits k*bits .. k*bits+bits-1 of word w hold code w*per + order[k] (per = 32 // bits; the
    default order is low bits first, codes in column order); a short last word is zero-padded.
    """
    rows, cols = _check_2d("u", u, np.uint8)
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits {bits} does not divide 32 into whole fields")
    per = 32 // bits
    slots = np.arange(per, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    if sorted(slots.tolist()) != list(range(per)):
        raise ValueError(f"order {list(slots)} is not a permutation of 0..{per - 1}")
    if cols and int(u.max()) >= 1 << bits:
        raise ValueError(f"u holds codes above {(1 << bits) - 1}, the {bits}-bit maximum")
    out = np.empty((rows, -(-cols // per)), dtype=np.uint32)
    if out.size:
        _pack_fields(u, bits, slots, out)
    return out.view(np.int32)
