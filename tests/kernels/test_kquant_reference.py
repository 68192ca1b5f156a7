"""K-quant blocks byte for byte against llama.cpp's reference quantizers, written out here.

quantize_row_q4_K_ref, quantize_row_q5_K_ref (make_qkx2_quants with weights rms + |x|) and
quantize_row_q6_K_ref (make_qx_quants with weights x^2) of ggml/src/ggml-quants.c (llama.cpp as
vendored by llama-cpp-python 0.3.36), transcribed line by line in float32 numpy scalars, plain
loops, no numba: an implementation independent of weightmark.kernels.quantize. llama-quantize
makes the same bytes (benchmarks/check_kquant_peer.py compares whole files with it).
"""

from __future__ import annotations

import numpy as np
import pytest

from weightmark.kernels.quantize import quantize

F = np.float32


def nearest_int(v: np.float32) -> int:
    """float + 12582912 keeps the integer part in the mantissa: round half to even."""
    return int(np.rint(F(v)))


def f16_bytes(v: np.float32) -> bytes:
    return np.array([v], dtype=np.float32).astype(np.float16).tobytes()


def f16_value(v: np.float32) -> np.float32:
    return F(np.array([v], dtype=np.float32).astype(np.float16)[0])


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.float32, np.float32, list[int]]:
    n = len(x)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w = F(sum_w + w)
        sum_x = F(sum_x + F(w * x[i]))
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return F(0), F(-mn), [0] * n
    iscale = F(F(nmax) / F(mx - mn))
    scale = F(F(1) / iscale)
    L = [max(0, min(nmax, nearest_int(F(iscale * F(x[i] - mn))))) for i in range(n)]
    best_error = F(0)
    for i in range(n):
        diff = F(F(F(scale * F(L[i])) + mn) - x[i])
        best_error = F(best_error + F(weights[i] * F(diff * diff)))
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + F(nmax)) / F(mx - mn))
        sum_l = sum_l2 = sum_xl = F(0)
        aux = []
        for i in range(n):
            lv = max(0, min(nmax, nearest_int(F(iscale * F(x[i] - mn)))))
            aux.append(lv)
            w = weights[i]
            sum_l = F(sum_l + F(w * F(lv)))
            sum_l2 = F(sum_l2 + F(F(w * F(lv)) * F(lv)))
            sum_xl = F(sum_xl + F(F(w * F(lv)) * x[i]))
        det = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if det > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / det)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / det)
            if this_min > 0:
                this_min = F(0)
                this_scale = F(sum_xl / sum_l2)
            cur_error = F(0)
            for i in range(n):
                diff = F(F(F(this_scale * F(aux[i])) + this_min) - x[i])
                cur_error = F(cur_error + F(weights[i] * F(diff * diff)))
            if cur_error < best_error:
                L = aux
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, F(-mn), L


def quantize_row_k4_ref(x: np.ndarray, five: bool) -> bytes:
    """One 256-element block of quantize_row_q4_K_ref (five=False) or quantize_row_q5_K_ref."""
    nmax, rmin, nstep = (31, -0.5, 15) if five else (15, -1.0, 20)
    scales, mins, L = [], [], []
    max_scale = max_min = F(0)
    for j in range(8):
        sub = x[32 * j:32 * j + 32]
        sum_x2 = F(0)
        for v in sub:
            sum_x2 = F(sum_x2 + F(v * v))
        av_x = F(np.sqrt(F(sum_x2 / F(32))))
        weights = [F(av_x + abs(v)) for v in sub]
        scale, the_min, codes = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
        scales.append(scale)
        mins.append(the_min)
        L.extend(codes)
        max_scale = max(max_scale, scale)
        max_min = max(max_min, the_min)
    inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
    inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
    packed = [0] * 12
    for j in range(8):
        ls = min(63, nearest_int(F(inv_scale * scales[j])) & 0xFF)
        lm = min(63, nearest_int(F(inv_min * mins[j])) & 0xFF)
        if j < 4:
            packed[j] = ls
            packed[j + 4] = lm
        else:
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6
    d_bytes = f16_bytes(F(max_scale / F(63)))
    m_bytes = f16_bytes(F(max_min / F(63)))
    d_all = F(np.frombuffer(d_bytes, np.float16)[0])
    dmin_all = F(np.frombuffer(m_bytes, np.float16)[0])
    for j in range(8):
        if j < 4:
            sc, m = packed[j] & 63, packed[j + 4] & 63
        else:
            sc = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4)
            m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)
        d = F(d_all * F(sc))
        if not d:
            continue
        dm = F(dmin_all * F(m))
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, nearest_int(F(F(x[32 * j + i] + dm) / d))))
    head = d_bytes + m_bytes + bytes(packed)
    if not five:
        qs = bytes(L[j + i] | (L[j + i + 32] << 4) for j in range(0, 256, 64) for i in range(32))
        return head + qs
    qh = [0] * 32
    for i in range(256):
        if L[i] > 15:
            qh[i % 32] |= 1 << (i // 32)
    qs = bytes((L[j + i] & 15) | ((L[j + i + 32] & 15) << 4) for j in range(0, 256, 64) for i in range(32))
    return head + bytes(qh) + qs


def make_qx_quants_1(x: np.ndarray) -> tuple[np.float32, list[int]]:
    """make_qx_quants(16, 32, x, L, rmse_type 1, NULL): weights x^2."""
    n, nmax = 16, 32
    amax = mx = F(0)
    for v in x:
        if abs(v) > amax:
            amax = abs(v)
            mx = v
    if amax < F(1e-15):
        return F(0), [0] * n

    def grid(iscale: np.float32) -> tuple[list[int], np.float32, np.float32]:
        codes = [max(-nmax, min(nmax - 1, nearest_int(F(iscale * v)))) for v in x]
        sumlx = suml2 = F(0)
        for v, lv in zip(x, codes, strict=True):
            w = F(v * v)
            sumlx = F(sumlx + F(F(w * v) * F(lv)))
            suml2 = F(suml2 + F(F(w * F(lv)) * F(lv)))
        return codes, sumlx, suml2

    codes, sumlx, suml2 = grid(F(F(-nmax) / mx))
    L = [c + nmax for c in codes]
    scale = F(sumlx / suml2) if suml2 else F(0)
    best = F(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        codes, sumlx, suml2 = grid(F(F(-F(F(nmax) + F(F(0.1) * F(step)))) / mx))
        if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
            L = [c + nmax for c in codes]
            scale = F(sumlx / suml2)
            best = F(scale * sumlx)
    return scale, L


def quantize_row_q6_k_ref(x: np.ndarray) -> bytes:
    scales, L = [], []
    max_scale = max_abs = F(0)
    for j in range(16):
        scale, codes = make_qx_quants_1(x[16 * j:16 * j + 16])
        scales.append(scale)
        L.extend(codes)
        if abs(scale) > max_abs:
            max_abs = abs(scale)
            max_scale = scale
    if max_abs < F(1e-15):
        return bytes(210)
    iscale = F(F(-128) / max_scale)
    d_bytes = f16_bytes(F(F(1) / iscale))
    sc = [min(127, nearest_int(F(iscale * s))) for s in scales]
    d_all = F(np.frombuffer(d_bytes, np.float16)[0])
    for j in range(16):
        d = F(d_all * F(sc[j]))
        if not d:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, nearest_int(F(x[16 * j + i] / d)))) + 32
    ql = [0] * 128
    qh = [0] * 64
    for half in range(2):
        e = 128 * half
        for i in range(32):
            a, b, c, d = L[e + i], L[e + 32 + i], L[e + 64 + i], L[e + 96 + i]
            ql[64 * half + i] = (a & 15) | ((c & 15) << 4)
            ql[64 * half + 32 + i] = (b & 15) | ((d & 15) << 4)
            qh[32 * half + i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((d >> 4) << 6)
    return bytes(ql) + bytes(qh) + bytes(s & 0xFF for s in sc) + d_bytes


REFERENCE = {"Q4_K": lambda x: quantize_row_k4_ref(x, False), "Q5_K": lambda x: quantize_row_k4_ref(x, True),
             "Q6_K": quantize_row_q6_k_ref}


def _blocks(seed: int) -> np.ndarray:
    """Blocks of the shapes weights take: gaussian, heavy-tailed, all positive, one outlier, a
    zero sub-block and a block on a coarse grid (a checkpoint dequantized from 4 bits)."""
    rng = np.random.default_rng(seed)
    rows = [rng.normal(0, 0.02, 256), rng.standard_t(3, 256) * 0.01, np.abs(rng.normal(0, 1, 256)) + 0.5,
            rng.normal(0, 0.02, 256)]
    rows[3][17] = 0.9
    zero = rng.normal(0, 0.05, 256)
    zero[32:64] = 0.0
    zero[96:112] = 0.0
    rows.append(zero)
    rows.append(np.round(rng.normal(0, 1, 256) * 4) / 64)
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("qtype", list(REFERENCE))
def test_k_quants_equal_the_reference_quantizer_byte_for_byte(qtype: str) -> None:
    x = _blocks(7)
    ours = quantize(qtype, x)
    for r in range(x.shape[0]):
        want = REFERENCE[qtype](x[r])
        assert ours[r].tobytes() == want, f"{qtype} block {r} differs from quantize_row_{qtype.lower()}_ref"


@pytest.mark.parametrize("qtype", list(REFERENCE))
def test_k_quants_equal_the_reference_on_many_blocks(qtype: str) -> None:
    """More blocks, so that the search's later steps replace the min again and again (each
    replacement makes the kernel redo the steps after it): gaussian and heavy-tailed blocks at
    several scales, skewed blocks whose min the search moves far, tiny-range blocks."""
    rng = np.random.default_rng(29)
    rows = [rng.normal(0, 0.02, 256), rng.standard_t(2, 256) * 0.05, rng.normal(0.3, 0.1, 256),
            rng.exponential(1.0, 256) - 0.2, rng.normal(0, 1e-3, 256) + 5.0, rng.normal(0, 1e-30, 256),
            rng.uniform(-1, 1, 256) ** 3, rng.normal(0, 0.02, 256) * (rng.uniform(0, 1, 256) < 0.2)]
    x = np.asarray(rows, dtype=np.float32)
    ours = quantize(qtype, x)
    for r in range(x.shape[0]):
        assert ours[r].tobytes() == REFERENCE[qtype](x[r]), f"{qtype} block {r} differs from the reference"


def test_all_zero_q6_k_block_is_all_zero_bytes() -> None:
    assert not quantize("Q6_K", np.zeros((1, 256), np.float32)).any()


def test_hand_checked_q6_k_block() -> None:
    """Each sub-block holds the codes -32, -28, ..., 28 times s = 2^-10. make_qx_quants: the peak
    -32 s gives iscale -32 / (-32 s) = 1 / s, the codes are exact and the least-squares scale is
    s itself, which no other grid beats; every sub-block's scale is s, so iscale = -128 / s,
    d = 1 / iscale = -2^-17 (f16 subnormal 0x8080), every int8 scale is -128 and the stored code
    of c s is c + 32."""
    codes = np.arange(-32, 32, 4)
    x = np.tile(codes * 2.0**-10, 16).astype(np.float32).reshape(1, 256)
    raw = quantize("Q6_K", x)[0]
    assert raw[208:210].tobytes() == bytes([0x80, 0x80])
    assert (raw[192:208] == 0x80).all()
    assert (_q6_codes(raw) == np.tile(codes + 32, 16)).all()
    assert raw.tobytes() == quantize_row_q6_k_ref(x[0])


def _q6_codes(raw: np.ndarray) -> np.ndarray:
    codes = np.zeros(256, np.int64)
    for half in range(2):
        for i in range(32):
            lo1, lo2, h = int(raw[64 * half + i]), int(raw[64 * half + 32 + i]), int(raw[128 + 32 * half + i])
            e = 128 * half
            codes[e + i] = (lo1 & 15) | ((h & 3) << 4)
            codes[e + 32 + i] = (lo2 & 15) | (((h >> 2) & 3) << 4)
            codes[e + 64 + i] = (lo1 >> 4) | (((h >> 4) & 3) << 4)
            codes[e + 96 + i] = (lo2 >> 4) | (((h >> 6) & 3) << 4)
    return codes
