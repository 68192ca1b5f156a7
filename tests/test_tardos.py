"""Tests of the v2 Tardos code: biases, codewords, packed scoring, the innocent bound, collusion."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from weightmark.errors import UsageError
from weightmark.scheme import SchemeParams
from weightmark.tardos import (
    ATTACKS,
    InnocentBound,
    TardosParams,
    arcsine_biases,
    bias_thresholds,
    biases,
    choose_parameters,
    codeword,
    codeword_seed,
    collude,
    log10_family_wise,
    never_issued_check,
    packed_codewords,
    packed_codewords_from_seeds,
    score_direction,
    score_weights,
    scores,
    signal_strength,
    simulate,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
MINILM_ELEMENTS = 21.3e6


def arcsine_cdf(p: np.ndarray, t: float) -> np.ndarray:
    r_low = math.asin(math.sqrt(t))
    return (np.arcsin(np.sqrt(p)) - r_low) / (math.pi / 2 - 2 * r_low)


def twin_packed_codewords(seeds: list[int], p: np.ndarray) -> np.ndarray:
    """Obvious twin of the codeword kernel: SplitMix64 of seed + (i + 1) * golden, top 32 bits."""
    mask = (1 << 64) - 1
    thresholds = [int(q) for q in bias_thresholds(p)]
    rows = []
    for seed in seeds:
        bits = []
        for i in range(p.shape[0]):
            x = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
            x ^= x >> 31
            bits.append(1 if (x >> 32) < thresholds[i] else 0)
        rows.append(np.packbits(np.array(bits, dtype=np.uint8)))
    return np.stack(rows)


def innocent_packed(rng: np.random.Generator, p: np.ndarray, count: int) -> np.ndarray:
    """Independent codewords drawn from the biases with numpy's generator (the model)."""
    return np.packbits(rng.random((count, p.shape[0])) < p, axis=1)


def direct_scores(packed: np.ndarray, z: np.ndarray, p: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(packed, axis=1).astype(bool)
    a, b = score_weights(p)
    return (np.where(bits, a, -b) * score_direction(z, p)).sum(axis=1)


# -- biases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cutoff", [1 / 300, 1 / 40, 0.1])
def test_biases_in_range_and_arcsine(cutoff: float) -> None:
    p = biases(KEY, 16384, cutoff)
    grid = 2.0**-32
    assert p.dtype == np.float64 and p.shape == (16384,)
    assert p.min() >= cutoff - grid and p.max() <= 1 - cutoff + grid
    # Kolmogorov-Smirnov against the arcsine law on [t, 1-t]; 1.63 / sqrt(n) is the 1% level.
    s = np.sort(p)
    n = s.size
    cdf = arcsine_cdf(s, cutoff)
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert d < 1.63 / math.sqrt(n)
    # And not uniform: the arcsine law puts ~2x as much mass near the ends.
    uniform_cdf = (s - cutoff) / (1 - 2 * cutoff)
    d_uniform = max(np.max(np.arange(1, n + 1) / n - uniform_cdf), np.max(uniform_cdf - np.arange(n) / n))
    assert d_uniform > 2 * 1.63 / math.sqrt(n)


def test_biases_keyed_and_on_the_grid() -> None:
    p = biases(KEY, 4096, 0.01)
    np.testing.assert_array_equal(p, biases(KEY, 4096, 0.01))
    assert not np.array_equal(p, biases(OTHER_KEY, 4096, 0.01))
    assert not np.array_equal(p[:2048], biases(KEY, 2048, 0.01))
    np.testing.assert_array_equal(p * 2.0**32, np.rint(p * 2.0**32))
    with pytest.raises(UsageError):
        arcsine_biases(np.full(8, 0.5), 0.5)


# -- codewords --------------------------------------------------------------------------------------


def test_codeword_kernel_matches_twin() -> None:
    p = biases(KEY, 200, 0.02)
    seeds = [codeword_seed(KEY, i, 200) for i in range(5)] + [0, 2**64 - 1]
    got = packed_codewords_from_seeds(np.array(seeds, dtype=np.uint64), p)
    np.testing.assert_array_equal(got, twin_packed_codewords(seeds, p))


def test_codewords_deterministic_and_keyed() -> None:
    p = biases(KEY, 1024, 0.01)
    a = packed_codewords(KEY, [0, 1, 7], p)
    np.testing.assert_array_equal(a, packed_codewords(KEY, [0, 1, 7], p))
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, packed_codewords(OTHER_KEY, [0, 1, 7], p))
    assert not np.array_equal(a, packed_codewords(KEY, [0, 1, 7], p, label=b"never-issued"))
    c = codeword(KEY, 7, p)
    assert c.dtype == np.int8 and set(np.unique(c)) <= {-1, 1}
    np.testing.assert_array_equal(c, np.unpackbits(a[2]).astype(np.int8) * 2 - 1)


def test_plus_frequency_matches_bias_and_indices_independent() -> None:
    L, count = 512, 20000
    p = biases(KEY, L, 0.01)
    bits = np.unpackbits(packed_codewords(KEY, range(count), p), axis=1).astype(np.float64)
    # Per position, the frequency of +1 is binomial(count, p_i): standardised deviations ~ N(0,1).
    dev = (bits.mean(axis=0) - p) / np.sqrt(p * (1 - p) / count)
    assert np.abs(dev).max() < 5.0
    assert 0.8 < np.mean(dev**2) < 1.2  # chi-square / L with L = 512: sd 0.0625
    # Across indices: bits of codewords k and k + 1 at a position are both +1 with frequency p^2.
    both = (bits[0::2] * bits[1::2]).mean(axis=0)
    pairs = count // 2
    dev = (both - p**2) / np.sqrt(p**2 * (1 - p**2) / pairs)
    assert np.abs(dev).max() < 5.0
    assert 0.8 < np.mean(dev**2) < 1.2
    # And standardised codewords are uncorrelated: r has variance 1/L off the diagonal.
    std = (bits[:300] - p) / np.sqrt(p * (1 - p))
    r = std @ std.T / L
    off = r[~np.eye(300, dtype=bool)]
    assert abs(np.mean(off**2) * L - 1.0) < 0.15
    assert abs(np.mean(off)) < 0.01


# -- scoring ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [8, 64, 1000])
def test_packed_scores_equal_direct(L: int) -> None:
    rng = np.random.default_rng(L)
    p = arcsine_biases(rng.random(L), 0.005)
    packed = innocent_packed(rng, p, 257)
    for z in (rng.standard_normal(L), rng.standard_cauchy(L) * 1e3, np.zeros(L)):
        np.testing.assert_allclose(scores(packed, z, p), direct_scores(packed, z, p), rtol=0, atol=1e-9)


def test_shape_mismatch_refused() -> None:
    p = biases(KEY, 64, 0.01)
    with pytest.raises(ValueError, match="one value per code position"):
        scores(packed_codewords(KEY, [0], p), np.zeros(72), p)
    with pytest.raises(ValueError, match="one value per code position"):
        InnocentBound(np.zeros(56), p)


def test_scores_unit_variance_for_innocents() -> None:
    rng = np.random.default_rng(5)
    p = arcsine_biases(rng.random(2048), 0.01)
    s = scores(innocent_packed(rng, p, 20000), rng.standard_normal(2048), p)
    assert abs(s.mean()) < 0.04 and abs(s.std() - 1.0) < 0.03


# -- the innocent bound -----------------------------------------------------------------------------


def exact_tail(p: np.ndarray, y: np.ndarray, s: float) -> float:
    """P(S >= s) by enumerating every codeword of a short code."""
    a, b = score_weights(p)
    total = 0.0
    for bits in itertools.product((0, 1), repeat=p.shape[0]):
        c = np.array(bits, dtype=bool)
        if float(np.where(c, a, -b) @ y) >= s - 1e-12:
            total += float(np.prod(np.where(c, p, 1 - p)))
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_dominates_exact_tail_of_short_codes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    L = 12
    p = arcsine_biases(rng.random(L), 0.02)
    z = rng.standard_normal(L) * rng.choice([0.1, 1.0, 10.0], L)
    y = score_direction(z, p)
    bound = InnocentBound(z, p)
    a, b = score_weights(p)
    reachable = np.where(y >= 0, y * a, -y * b).sum()
    for s in np.linspace(0.1, reachable, 15):
        exact = exact_tail(p, y, s)
        assert 10 ** bound.log10_p_exact(s)[0] >= exact * (1 - 1e-9)
        assert 10 ** bound.log10_p_grid(np.array([s]))[0] >= exact * (1 - 1e-9)


def test_bound_holds_where_a_gaussian_tail_would_not() -> None:
    """z dominated by a position with a small bias: the score is skewed and exp(-s^2/2) (v1's
    bound) is optimistic by more than 10x; the Chernoff bound still dominates the exact
    tail."""
    rng = np.random.default_rng(4)
    L = 12
    p = arcsine_biases(rng.random(L), 0.01)
    z = 0.05 * rng.standard_normal(L)
    z[np.argmin(p)] = 1.0
    y = score_direction(z, p)
    a, b = score_weights(p)
    i = int(np.argmax(np.abs(y)))
    s = 0.9 * y[i] * (a[i] if y[i] > 0 else -b[i])
    exact = exact_tail(p, y, s)
    assert exact > 10 * math.exp(-s * s / 2)
    assert 10 ** InnocentBound(z, p).log10_p_exact(s)[0] >= exact


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "colluded"])
def test_bound_valid_empirically(kind: str) -> None:
    L = 1024
    count = 200_000 if kind == "gaussian" else 100_000
    rng = np.random.default_rng(11)
    p = arcsine_biases(rng.random(L), 1 / 100)
    if kind == "gaussian":
        z = rng.standard_normal(L)
    elif kind == "heavy":  # a few positions dominate ||z||: the tail of S gets heavier
        z = rng.standard_normal(L) * np.where(rng.random(L) < 0.02, 8.0, 1.0)
    else:  # z from four colluders' min/max attack: correlated with the biases
        c = np.where(rng.random((4, L)) < p, 1, -1).astype(np.int8)
        z = 1.5 * collude(c, "minmax", rng) + rng.standard_normal(L)
    bound = InnocentBound(z, p)
    s = np.concatenate([scores(innocent_packed(rng, p, 20000), z, p) for _ in range(count // 20000)])
    log10_p = bound.log10_p(s)
    for x in (-1.0, -2.0, -3.0):
        level = 10.0**x
        slack = 3 * math.sqrt(level / count) + 1 / count
        assert np.mean(log10_p <= x) <= level + slack
    for threshold in (1.0, 2.0, 3.0, 3.5):
        tail = float(np.mean(s >= threshold))
        bnd = 10 ** bound.log10_p_exact(threshold)[0]
        assert tail <= bnd + 3 * math.sqrt(bnd / count) + 1 / count
    # The bound is not vacuous: within a factor 30 of the observed tail at S = 3.
    assert 10 ** bound.log10_p_exact(3.0)[0] < 30 * max(np.mean(s >= 3.0), 1 / count)


def test_bound_monotone_and_tightest() -> None:
    rng = np.random.default_rng(3)
    L = 4096
    p = arcsine_biases(rng.random(L), 1 / 240)
    z = rng.standard_normal(L)
    bound = InnocentBound(z, p)
    s = np.linspace(-1, bound.max_score * 1.01, 120)
    exact = bound.log10_p_exact(s)
    grid = bound.log10_p_grid(s)
    assert np.all(np.diff(exact) <= 1e-12) and np.all(np.diff(grid) <= 1e-12)
    assert np.all(exact[s <= 0] == 0.0) and np.all(exact <= 0)
    assert np.all(grid >= exact)  # the exact optimum also takes the tangents into account
    # ... which stay close to it wherever p-values matter (far beyond 1e-100 they are sparser).
    relevant = exact > -100
    assert np.all((grid - exact)[relevant] < 0.05 + 0.002 * np.abs(exact[relevant]))
    mixed = bound.log10_p(s, exact_top=10)
    assert np.all(mixed >= exact - 1e-12) and np.all(mixed <= grid)
    # Tighter than Hoeffding over the ranges, and than Bernstein, wherever they are not vacuous.
    y = score_direction(z, p)
    a, b = score_weights(p)
    span2 = np.sum((y * (a + b)) ** 2)
    positive = (s > 0.5) & (s < bound.max_score)
    hoeffding = -2 * s**2 / span2 / math.log(10)
    assert np.all(exact[positive] <= hoeffding[positive] + 1e-6)
    # Past the largest reachable score (probability 0) the bound stays finite and at most
    # P(every term at its maximum).
    assert s[-1] > bound.max_score and np.isfinite(exact[-1])
    assert exact[-1] <= bound.log_p_max / math.log(10) * (1 - 1e-6)


def test_family_wise() -> None:
    np.testing.assert_allclose(log10_family_wise(np.array([-20.0, -3.0]), 10**6), [-14.0, 0.0])


def test_never_issued_check() -> None:
    rng = np.random.default_rng(8)
    L = 2048
    p = biases(KEY, L, 1 / 100)
    c = np.stack([codeword(KEY, i, p) for i in range(4)])
    z = signal_strength(MINILM_ELEMENTS, L) * collude(c, "average", rng) + rng.standard_normal(L)
    check = never_issued_check(z, p, KEY, count=50_000)
    assert check.count == 50_000 and check.consistent
    for emp, bnd in zip(check.empirical, check.bound, strict=True):
        assert emp <= bnd + 3 * math.sqrt(bnd / 50_000) + 1 / 50_000
    assert check.min_log10_family_wise_p > -2.0  # no never-issued codeword comes near an accusation
    # The issued colluders, scored the same way, are accused.
    s = scores(packed_codewords(KEY, range(4), p), z, p)
    assert s.max() > 5 * check.max_score / 2
    assert InnocentBound(z, p).log10_p(s).min() + 6 < -9


# -- collusion at the z level -----------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["average", "minmax", "median", "interleave"])
def test_colluders_accused(attack: str) -> None:
    """Four colluders, MiniLM-sized signal at L = 4096: one is accused at family-wise 1e-9 over
    10^6 licensees, through the same packed scoring and bound a scan uses."""
    L, collusion = 4096, 4
    mu = signal_strength(MINILM_ELEMENTS, L)
    p = biases(KEY, L, 1 / (10 * collusion))
    issued = list(range(40))
    colluders = [3, 17, 22, 35]
    rng = np.random.default_rng(ATTACKS.index(attack))
    c = np.stack([codeword(KEY, i, p) for i in colluders])
    z = mu * collude(c, attack, rng) + rng.standard_normal(L)
    s = scores(packed_codewords(KEY, issued, p), z, p)
    fw = log10_family_wise(InnocentBound(z, p).log10_p(s), 10**6)
    accused = {issued[k] for k in np.flatnonzero(fw <= -9)}
    assert accused and accused <= set(colluders)


def test_v1_fails_minmax_with_eight_colluders_where_v2_does_not() -> None:
    L = 8192
    mu = signal_strength(MINILM_ELEMENTS, L)
    v1 = simulate("uniform", "minmax", 8, L, mu, trials=3, seed=4)
    v2 = simulate("tardos", "minmax", 8, L, mu, cutoff=1 / 240, trials=3, seed=4)
    assert all(t.best_log10_family_wise_p > -2 for t in v1)
    assert all(t.best_log10_family_wise_p <= -9 for t in v2)


def test_collude_models() -> None:
    rng = np.random.default_rng(0)
    c = np.array([[1, 1, -1, -1, 1], [1, -1, -1, 1, 1], [1, -1, -1, 1, -1]], dtype=np.int8)
    np.testing.assert_allclose(collude(c, "average", rng), c.mean(axis=0))
    np.testing.assert_array_equal(collude(c, "median", rng), [1, -1, -1, 1, 1])
    np.testing.assert_array_equal(collude(c, "minmax", rng), [1, 0, -1, 0, 0])
    np.testing.assert_array_equal(collude(c[:2], "median", rng), [1, 0, -1, 0, 1])
    with pytest.raises(UsageError):
        collude(c, "shuffle", rng)


def test_signal_strength_calibration() -> None:
    mu = signal_strength(MINILM_ELEMENTS, 4096)
    assert math.sqrt(4096) * mu / math.sqrt(1 + mu * mu) == pytest.approx(55.0)
    assert signal_strength(4 * MINILM_ELEMENTS, 4096) == pytest.approx(2 * mu)


@pytest.mark.slow
def test_choose_parameters_meets_target_on_fresh_trials() -> None:
    for elements in (MINILM_ELEMENTS, 134e6):
        for collusion in (2, 8):
            L, t = choose_parameters(elements, 10**6, collusion)
            assert L % 8 == 0 and 0 < t < 0.5
            mu = signal_strength(elements, L)
            for attack in ATTACKS:
                for trial in simulate("tardos", attack, collusion, L, mu, t, trials=4, seed=99):
                    assert trial.best_log10_family_wise_p <= -9


# -- scheme string ----------------------------------------------------------------------------------


def test_scheme_string_round_trip() -> None:
    params = TardosParams(code_length=16384, alpha=0.002, collusion=8, cutoff=1 / 240)
    text = str(params)
    assert text.startswith("tardos-v2;L=16384;alpha=0.002;c=8;t=0.004166")
    assert text.endswith(";shape=rowrms;round=stochastic;hash=splitmix64")
    assert TardosParams.parse(text) == params
    np.testing.assert_array_equal(params.biases(KEY), biases(KEY, 16384, 1 / 240))
    for bad in (str(SchemeParams()), text.replace("c=8", "c=x"), text.replace("hash=splitmix64", "hash=md5"),
                text.replace(";t=", ";u=")):
        with pytest.raises(UsageError):
            TardosParams.parse(bad)
    for kwargs in ({"code_length": 100}, {"collusion": 0}, {"cutoff": 0.5}, {"alpha": 0.0}):
        with pytest.raises(UsageError):
            TardosParams(**{"code_length": 1024, **kwargs})


def test_grid_built_only_when_needed_and_its_tangents_converged() -> None:
    """A few scores below the largest reachable one are certified without the tangent grid, and
    agree with the minimum over the grid; the grid's lambdas sit where K'(lambda) = target."""
    rng = np.random.default_rng(12)
    L = 4096
    p = arcsine_biases(rng.random(L), 1 / 240)
    z = rng.standard_normal(L) * np.where(rng.random(L) < 0.02, 8.0, 1.0)
    bound = InnocentBound(z, p)
    s = np.array([0.5, 3.0, 7.5, 20.0, 0.9 * bound.max_score])
    exact = bound.log10_p(s)
    assert bound._grid is None
    np.testing.assert_array_less(exact, bound.log10_p_grid(s) + 1e-8)
    lambdas, values = bound._grid
    K, d1, _ = bound._cumulants(lambdas)
    np.testing.assert_array_equal(K, values)
    sigma = math.sqrt(bound._variance)
    below = np.linspace(0.05, 12.0, 80) * sigma  # the grid's first 80 targets
    np.testing.assert_allclose(d1[:80], below, rtol=1e-12)
