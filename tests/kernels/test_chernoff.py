"""Tests of the cumulant and Chernoff-optimum kernels against their numpy twins."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightmark.kernels.chernoff import chernoff_solve, cumulants

from . import twins


def score_terms(rng: np.random.Generator, n: int, spread: float, cutoff: float = 0.01
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, log p, log q) of an innocent's score: y_i sqrt(q/p) for +1, -y_i sqrt(p/q) for -1."""
    p = cutoff + (1.0 - 2.0 * cutoff) * np.sin(rng.random(n) * math.pi / 2.0) ** 2
    z = rng.standard_normal(n) * np.where(rng.random(n) < 0.05, spread, 1.0)
    y = z / math.sqrt(float(np.sum(z * z)))
    return y * np.sqrt((1 - p) / p), -y * np.sqrt(p / (1 - p)), np.log(p), np.log1p(-p)


def assert_cumulants_equal(terms: tuple[np.ndarray, ...], lambdas: np.ndarray) -> None:
    A, B, log_p, log_q = terms
    got = cumulants(A, B, log_p, log_q, lambdas)
    want = twins.cumulants_twin(A, B, log_p, log_q, lambdas)
    # Summation order differs (blocks of 256 against numpy's pairwise sums): a few ulps of the
    # sum of the magnitudes of the terms.
    lam = np.abs(lambdas)[:, None]
    scale_k = (np.abs(log_p) + np.abs(log_q) + lam * (np.abs(A) + np.abs(B))).sum(axis=1) + 1.0
    scale_d1 = (np.abs(A) + np.abs(B)).sum() + 1.0
    scale_d2 = ((A - B) ** 2).sum() + 1.0
    for g, w, scale in zip(got, want, (scale_k, scale_d1, scale_d2), strict=True):
        assert g.shape == lambdas.shape and g.dtype == np.float64
        np.testing.assert_array_less(np.abs(g - w), 1e-12 * scale)


@settings(deadline=None, max_examples=60)
@given(
    n=st.integers(1, 700),
    seed=st.integers(0, 2**32 - 1),
    spread=st.sampled_from([1.0, 30.0, 1e4]),
    cutoff=st.sampled_from([1e-4, 1 / 300, 0.1, 0.49]),
)
def test_cumulants_match_twin(n: int, seed: int, spread: float, cutoff: float) -> None:
    rng = np.random.default_rng(seed)
    terms = score_terms(rng, n, spread, cutoff)
    lambdas = np.concatenate([[0.0, 1e-9, 1.0, 1e12], rng.exponential(10.0, 8), 10.0 ** rng.uniform(-3, 9, 8)])
    assert_cumulants_equal(terms, lambdas)


def test_cumulants_landmarks() -> None:
    """K(0) = 0, K'(0) = the mean, K''(0) = the variance; one position in closed form."""
    rng = np.random.default_rng(5)
    A, B, log_p, log_q = score_terms(rng, 1000, 1.0)
    p, q = np.exp(log_p), np.exp(log_q)
    K, d1, d2 = cumulants(A, B, log_p, log_q, np.array([0.0]))
    assert abs(K[0]) < 1e-12
    assert d1[0] == pytest.approx(float(np.sum(p * A + q * B)), abs=1e-12)
    assert d2[0] == pytest.approx(float(np.sum(p * q * (A - B) ** 2)), rel=1e-12)
    lam = np.array([0.3, 7.0, 250.0])
    K, d1, d2 = cumulants(A[:1], B[:1], log_p[:1], log_q[:1], lam)
    a, b, pp, qq = A[0], B[0], p[0], q[0]
    mgf = pp * np.exp(lam * a) + qq * np.exp(lam * b)
    np.testing.assert_allclose(K, np.log(mgf), rtol=1e-12, atol=1e-15)
    w = pp * np.exp(lam * a) / mgf
    np.testing.assert_allclose(d1, w * a + (1 - w) * b, rtol=1e-12)
    np.testing.assert_allclose(d2, w * (1 - w) * (a - b) ** 2, rtol=1e-10)
    # Equal outcomes: u == v exactly, log 2 per position.
    K, d1, d2 = cumulants(np.zeros(3), np.zeros(3), np.full(3, math.log(0.5)), np.full(3, math.log(0.5)),
                          np.array([1.0]))
    assert K[0] == pytest.approx(0.0, abs=1e-15) and d1[0] == 0.0 and d2[0] == 0.0


@settings(deadline=None, max_examples=25)
@given(
    n=st.integers(8, 600),
    seed=st.integers(0, 2**32 - 1),
    spread=st.sampled_from([1.0, 30.0]),
    iterations=st.sampled_from([0, 3, 12, 60]),
)
def test_solve_matches_twin(n: int, seed: int, spread: float, iterations: int) -> None:
    rng = np.random.default_rng(seed)
    A, B, log_p, log_q = score_terms(rng, n, spread)
    p, q = np.exp(log_p), np.exp(log_q)
    variance = float(np.sum(p * A**2 + q * B**2))
    top = float(np.maximum(A, B).sum())
    s = np.concatenate([rng.uniform(0.01, 8.0, 6), top * np.array([0.5, 0.9, 0.999, 0.99999])])
    lam, best, gap = chernoff_solve(A, B, log_p, log_q, s, variance, iterations)
    lam_t, best_t, gap_t = twins.chernoff_solve_twin(A, B, log_p, log_q, s, variance, iterations)
    np.testing.assert_allclose(lam, lam_t, rtol=1e-9)
    np.testing.assert_allclose(best, best_t, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(np.isfinite(gap), np.isfinite(gap_t))
    # The gap hangs on residuals of a few ulps: equal in magnitude, not in digits.
    np.testing.assert_allclose(gap[np.isfinite(gap)], gap_t[np.isfinite(gap)], rtol=0.05, atol=1e-18)
    assert np.all(best <= 0.0) and np.all(gap >= 0.0)
    assert iterations > 0 or not np.isfinite(gap).any()
    # Where Newton converged, the value kept is the bound at the lambda returned.
    K, d1, _ = cumulants(A, B, log_p, log_q, lam)
    converged = np.isfinite(gap)
    assert np.all(np.abs(d1 - s)[converged] <= 1e-13 * np.maximum(1.0, s[converged]))
    assert np.all((best <= K - lam * s + 1e-12 * (1 + np.abs(K)))[converged])


def test_solve_reaches_the_optimum() -> None:
    """With enough iterations K'(lambda) = s, and no lambda on a fine grid does better."""
    rng = np.random.default_rng(9)
    A, B, log_p, log_q = score_terms(rng, 4096, 1.0)
    p, q = np.exp(log_p), np.exp(log_q)
    variance = float(np.sum(p * A**2 + q * B**2))
    s = np.array([0.5, 3.0, 6.0, 9.0])
    lam, best, gap = chernoff_solve(A, B, log_p, log_q, s, variance, 60)
    d1 = cumulants(A, B, log_p, log_q, lam)[1]
    np.testing.assert_allclose(d1, s, rtol=1e-12)
    assert np.all(gap < 1e-20)  # one probe a Newton step beyond pins lambda* down
    grid = np.linspace(0.0, 3.0 * lam.max(), 2001)
    K = cumulants(A, B, log_p, log_q, grid)[0]
    brute = (K[None, :] - grid[None, :] * s[:, None]).min(axis=1)
    assert np.all(best <= brute + 1e-12)
    assert np.all(best >= brute - 1e-3 * np.abs(brute))  # the grid is fine enough to come close
    # Around lambda itself, on the finest scale: nothing beats it by more than the gap.
    near = lam[:, None] * (1.0 + np.linspace(-1e-6, 1e-6, 201))[None, :]
    for t in range(s.shape[0]):
        K = cumulants(A, B, log_p, log_q, near[t])[0]
        assert (K - near[t] * s[t]).min() >= best[t] - gap[t] - 1e-12 * abs(best[t])


def test_gap_infinite_where_newton_stalls() -> None:
    """Scores at the largest reachable score: K' only reaches it as lambda -> infinity."""
    rng = np.random.default_rng(2)
    A, B, log_p, log_q = score_terms(rng, 64, 1.0)
    top = float(np.maximum(A, B).sum())
    lam, best, gap = chernoff_solve(A, B, log_p, log_q, np.array([top, 2 * top]), 1.0, 12)
    assert not np.isfinite(gap).any()
    assert np.all(best <= 0.0)


def test_inputs_checked() -> None:
    x = np.zeros(4)
    with pytest.raises(ValueError, match="one length"):
        cumulants(x, x, x, np.zeros(5), np.array([1.0]))
    with pytest.raises(ValueError, match="vector"):
        cumulants(x, x, x, x, np.ones((2, 2)))
    with pytest.raises(ValueError, match="iterations"):
        chernoff_solve(x, x, x, x, np.array([1.0]), 1.0, -1)
    # Read-only (memory-mapped) inputs are accepted.
    zero, half = np.zeros(4), np.full(4, math.log(0.5))
    for a in (zero, half):
        a.setflags(write=False)
    assert cumulants(zero, zero, half, half, np.array([1.0]))[0][0] == pytest.approx(0.0, abs=1e-15)


def test_parallel_and_serial_paths_agree_bit_for_bit() -> None:
    """Many targets run in parallel, a few on the calling thread: each target's answer is the same."""
    rng = np.random.default_rng(6)
    A, B, log_p, log_q = score_terms(rng, 3000, 30.0)
    s = np.linspace(0.1, 0.99 * float(np.maximum(A, B).sum()), 40)
    together = chernoff_solve(A, B, log_p, log_q, s, 1.0, 60)
    alone = [chernoff_solve(A, B, log_p, log_q, s[i:i + 1], 1.0, 60) for i in range(s.shape[0])]
    for k in range(3):
        np.testing.assert_array_equal(together[k], np.concatenate([a[k] for a in alone]))
    lam = np.geomspace(1e-3, 1e4, 40)
    many = cumulants(A, B, log_p, log_q, lam)
    few = [cumulants(A, B, log_p, log_q, lam[i:i + 1]) for i in range(lam.shape[0])]
    for k in range(3):
        np.testing.assert_array_equal(many[k], np.concatenate([f[k] for f in few]))
