"""The cumulant generating function of an innocent licensee's score and its Chernoff optimum.

Term i of an innocent's score is A_i with probability p_i and B_i otherwise, so
K(lambda) = sum_i log(p_i e^{lambda A_i} + (1 - p_i) e^{lambda B_i}). `cumulants` gives K, K'
and K'' at many lambdas, one pass over the code positions per lambda and no temporaries;
`chernoff_solve` runs a safeguarded Newton search of K'(lambda) = s for many target scores at
once, each target on its own (parallel over targets), keeps the smallest K(lambda) - lambda s
it saw and says how far that can be above the optimum. Any lambda >= 0 gives a valid bound, so
an imprecise optimum only loosens it.

Sums run in blocks of `_BLOCK` positions whose partial sums are added at the end, so the rounding
error grows like (block + L / block) ulps, not L ulps, whatever the code length.
"""

import math

import numba
import numpy as np

from weightmark.kernels.config import INLINE, PARALLEL, SERIAL

__all__ = ["cumulants", "chernoff_solve"]

_BLOCK = 256
_LN2 = math.log(2.0)
# Past this lambda the bound has long stopped changing: the bracket stops doubling there.
LAMBDA_CAP = 1e12
# Newton stops when |K'(lambda) - s| <= _TOLERANCE * max(1, s).
_TOLERANCE = 1e-13
# Fewer lambdas or targets than this run on the calling thread.
_PARALLEL_TARGETS = 16


@numba.njit(**INLINE)
def _cumulants_at(A, B, log_p, log_q, lam):
    """(K, K', K'') at one lambda: log-sum-exp of the two outcomes per position, as numpy's
    logaddexp computes it; w = P(+1 | tilted) and w (1 - w) from the same exponential."""
    n = A.shape[0]
    K = 0.0
    d1 = 0.0
    d2 = 0.0
    for start in range(0, n, _BLOCK):
        k_part = 0.0
        d1_part = 0.0
        d2_part = 0.0
        for i in range(start, min(n, start + _BLOCK)):
            a = A[i]
            b = B[i]
            u = log_p[i] + lam * a
            v = log_q[i] + lam * b
            if u > v:
                e = math.exp(v - u)
                log_sum = u + math.log1p(e)
                w = 1.0 / (1.0 + e)
                w_rest = e * w  # 1 - w without cancellation
            elif u < v:
                e = math.exp(u - v)
                log_sum = v + math.log1p(e)
                w_rest = 1.0 / (1.0 + e)
                w = e * w_rest
            else:
                log_sum = u + _LN2
                w = 0.5
                w_rest = 0.5
            diff = a - b
            k_part += log_sum
            d1_part += b + w * diff
            d2_part += w * w_rest * diff * diff
        K += k_part
        d1 += d1_part
        d2 += d2_part
    return K, d1, d2


# Each loop twice: parallel over lambdas or targets, and serial for a handful of them, where
# waking the threads costs more than the work (on a busy machine, milliseconds per call).
# Lambdas and targets are independent of each other: both give the same results.


@numba.njit(**PARALLEL)
def _cumulants_parallel(A, B, log_p, log_q, lambdas, K, d1, d2):
    for t in numba.prange(lambdas.shape[0]):
        K[t], d1[t], d2[t] = _cumulants_at(A, B, log_p, log_q, lambdas[t])


@numba.njit(**SERIAL)
def _cumulants_serial(A, B, log_p, log_q, lambdas, K, d1, d2):
    for t in range(lambdas.shape[0]):
        K[t], d1[t], d2[t] = _cumulants_at(A, B, log_p, log_q, lambdas[t])


@numba.njit(**INLINE)
def _rounding(A, B):
    """A bound on the rounding error of a computed K': every term lies between B_i and A_i, each is
    computed to a few ulps and the blocked sum adds at most (block + blocks) ulps of their total."""
    n = A.shape[0]
    total = 0.0
    for i in range(n):
        total += max(abs(A[i]), abs(B[i]))
    return (_BLOCK + n // _BLOCK + 8) * 2.0**-52 * total


@numba.njit(**INLINE)
def _certify(A, B, log_p, log_q, s, lam, residual, d2, rounding, best):
    """(best, gap) at a converged lambda. The optimum lambda* is pinned between two probes a
    little more than a Newton step either side of lambda, where the computed K' lies beyond s by
    more than its rounding error (K' is non-decreasing); by convexity K(lambda) - lambda s then
    exceeds the optimum by at most |K'(lambda) - s| |lambda - lambda*|. Where the probes do not
    pin it down (K'' vanishing: lambda* far away or infinite) the gap is inf."""
    r = abs(residual) + rounding
    if not d2 > 0.0:
        return best, np.inf
    delta = 2.0 * r / d2
    below = max(0.0, lam - delta)
    above = lam + delta
    K, d1_below, _d2 = _cumulants_at(A, B, log_p, log_q, below)
    value = K - below * s
    if value < best:
        best = value
    K, d1_above, _d2 = _cumulants_at(A, B, log_p, log_q, above)
    value = K - above * s
    if value < best:
        best = value
    if d1_below < s - rounding and d1_above > s + rounding:
        return best, r * delta
    return best, np.inf


@numba.njit(**INLINE)
def _solve_one(A, B, log_p, log_q, s, var, iterations, rounding):
    """(lambda, best, gap) of one target score s."""
    best = 0.0
    gap = np.inf
    lo = 0.0
    hi = max(1.0, 2.0 * s / var)
    # Bracket: double hi until K'(hi) >= s (K' rises to the largest reachable score).
    for _ in range(64):
        K, d1, _d2 = _cumulants_at(A, B, log_p, log_q, hi)
        value = K - hi * s
        if value < best:
            best = value
        if not (d1 < s and hi < LAMBDA_CAP):
            break
        lo = hi
        hi = hi * 2.0
    mid = 0.5 * (lo + hi)
    lam = min(s / var, mid)
    if not lam > lo:
        lam = mid
    for _ in range(iterations):
        K, d1, d2 = _cumulants_at(A, B, log_p, log_q, lam)
        value = K - lam * s
        if value < best:
            best = value
        if abs(d1 - s) <= _TOLERANCE * max(1.0, s):
            best, gap = _certify(A, B, log_p, log_q, s, lam, d1 - s, d2, rounding, best)
            break
        if d1 > s:
            hi = lam
        else:
            lo = lam
        # K'' >= 0; where it is 0 or the step leaves the bracket, bisect.
        step_ok = False
        newton = 0.0
        if d2 > 0.0:
            newton = lam - (d1 - s) / d2
            step_ok = np.isfinite(newton) and lo < newton < hi
        lam = newton if step_ok else 0.5 * (lo + hi)
    return lam, best, gap


@numba.njit(**PARALLEL)
def _solve_parallel(A, B, log_p, log_q, targets, variance, iterations, lam, best, gap):
    var = max(variance, 1e-300)
    rounding = _rounding(A, B)
    for t in numba.prange(targets.shape[0]):
        lam[t], best[t], gap[t] = _solve_one(A, B, log_p, log_q, targets[t], var, iterations, rounding)


@numba.njit(**SERIAL)
def _solve_serial(A, B, log_p, log_q, targets, variance, iterations, lam, best, gap):
    var = max(variance, 1e-300)
    rounding = _rounding(A, B)
    for t in range(targets.shape[0]):
        lam[t], best[t], gap[t] = _solve_one(A, B, log_p, log_q, targets[t], var, iterations, rounding)


def _check_terms(A: np.ndarray, B: np.ndarray, log_p: np.ndarray, log_q: np.ndarray) -> tuple[np.ndarray, ...]:
    arrays = tuple(np.ascontiguousarray(x, dtype=np.float64) for x in (A, B, log_p, log_q))
    if any(x.ndim != 1 for x in arrays) or len({x.shape[0] for x in arrays}) != 1:
        raise ValueError("A, B, log_p and log_q must be float64 vectors of one length (the code positions used)")
    return arrays


def cumulants(A: np.ndarray, B: np.ndarray, log_p: np.ndarray, log_q: np.ndarray,
              lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, K', K'') at each lambda, float64 vectors of the lambdas' length.

    A_i, B_i: the term's value when bit i is +1 and -1; log_p, log_q: log p_i and log(1 - p_i).
    """
    A, B, log_p, log_q = _check_terms(A, B, log_p, log_q)
    lam = np.ascontiguousarray(lambdas, dtype=np.float64)
    if lam.ndim != 1:
        raise ValueError("lambdas must be a vector")
    K, d1, d2 = (np.empty(lam.shape[0]) for _ in range(3))
    if lam.shape[0]:
        evaluate = _cumulants_parallel if lam.shape[0] >= _PARALLEL_TARGETS else _cumulants_serial
        evaluate(A, B, log_p, log_q, lam, K, d1, d2)
    return K, d1, d2


def chernoff_solve(A: np.ndarray, B: np.ndarray, log_p: np.ndarray, log_q: np.ndarray, targets: np.ndarray,
                   variance: float, iterations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lambda, smallest K(lambda) - lambda s seen, gap) per target score s > 0.

    Per target: double lambda from max(1, 2 s / variance) until K'(lambda) >= s (at most 64
    times, not past `LAMBDA_CAP`), then at most `iterations` safeguarded Newton steps on
    K'(lambda) = s, stopping once |K' - s| <= 1e-13 max(1, s). The second value is a natural-log
    Chernoff bound on P(S >= s), valid whatever lambdas were tried (float rounding aside). The
    gap bounds how far it can lie above min over all lambda of K(lambda) - lambda s, the tightest
    Chernoff bound (so no other lambda can beat it by more); inf where Newton did not converge.
    """
    A, B, log_p, log_q = _check_terms(A, B, log_p, log_q)
    s = np.ascontiguousarray(targets, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError("targets must be a vector")
    if iterations < 0:
        raise ValueError("iterations must be >= 0")
    lam, best, gap = (np.empty(s.shape[0]) for _ in range(3))
    if s.shape[0]:
        solve = _solve_parallel if s.shape[0] >= _PARALLEL_TARGETS else _solve_serial
        solve(A, B, log_p, log_q, s, float(variance), int(iterations), lam, best, gap)
    return lam, best, gap
