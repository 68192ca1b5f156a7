"""Scheme v2: a symmetric Tardos code with secret biases, a soft-decision score and an exact
Chernoff bound on an innocent licensee's score, for leaks made by several licensees together.

The code. Per model key and code length L, secret biases p_i (i < L) are drawn from the arcsine
distribution restricted to [t, 1 - t]; licensee k's codeword has c_k[i] = +1 with probability
p_i, independently across positions and across codeword indices. Biases are kept on the grid
q / 2^32 and a codeword bit is "+1 iff a keyed 32-bit uniform is below q_i", so the probability
of +1 is exactly the p_i the bound uses.

The score. With y = z / ||z|| (z: the per-position statistics a scan extracts),
S_k = sum_i U(c_k[i], p_i) y_i, U(+1, p) = sqrt((1-p)/p), U(-1, p) = -sqrt(p/(1-p)).

The p-value. Given the biases and z, an innocent's codeword is drawn independently of both,
so S_k is a sum of independent bounded zero-mean terms and
P(S_k >= s) <= min_{lambda > 0} exp(-lambda s + sum_i log(p_i e^{lambda y_i a_i}
+ (1 - p_i) e^{-lambda y_i b_i})) holds for every z, whatever the colluders did.
docs/collusion.md derives it step by step.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

from weightmark.errors import UsageError
from weightmark.kernels import score_codewords
from weightmark.kernels.chernoff import chernoff_solve, cumulants
from weightmark.kernels.config import PARALLEL
from weightmark.kernels.prng import element_hash
from weightmark.scheme import scheme_fields

SCHEME_NAME = "tardos-v2"
DEFAULT_ALPHA = 0.002
DEFAULT_THRESHOLD = 1e-9
ASSUMED_LICENSEES = 10**6
_LN10 = math.log(10.0)
_TWO32 = float(1 << 32)
# Candidates considered by choose_parameters: powers of two, cutoffs t = 1 / (k * c).
CODE_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
CUTOFF_DIVISORS = (4, 10, 30, 100, 300)
# Slack added to every natural-log bound: covers float rounding in sum_i log(...) over L terms.
_LOG_SLACK_ABS = 1e-6
_LOG_SLACK_REL = 1e-9
# An exact Chernoff optimum within this many nats of the true one needs no tangent to check it
# (1e-8 nats: 4e-9 in log10 p, far below the slack and the 4 decimals reported).
_CERTIFIED_GAP = 1e-8


@dataclass(frozen=True)
class TardosParams:
    """Parameters of a v2 copy; `str()` is the scheme string kept in the registry."""

    code_length: int
    alpha: float = DEFAULT_ALPHA
    collusion: int = 8
    cutoff: float = 1.0 / 300.0

    def __post_init__(self) -> None:
        if not (0.0 < self.alpha <= 0.1) or not math.isfinite(self.alpha):
            raise UsageError(f"alpha must be in (0, 0.1], got {self.alpha}")
        if self.code_length < 64 or self.code_length % 8 or self.code_length > 1 << 20:
            raise UsageError(f"code length must be a multiple of 8 in [64, 2^20], got {self.code_length}")
        if not 1 <= self.collusion <= 1024:
            raise UsageError(f"collusion size must be in [1, 1024], got {self.collusion}")
        if not (1e-6 <= self.cutoff < 0.5) or not math.isfinite(self.cutoff):
            raise UsageError(f"bias cutoff must be in [1e-6, 0.5), got {self.cutoff}")

    def __str__(self) -> str:
        return (
            f"{SCHEME_NAME};L={self.code_length};alpha={self.alpha!r};c={self.collusion};"
            f"t={self.cutoff!r};shape=rowrms;round=stochastic;hash=splitmix64"
        )

    @classmethod
    def parse(cls, text: str) -> TardosParams:
        fields = scheme_fields(text, SCHEME_NAME)
        try:
            return cls(
                code_length=int(fields["L"]),
                alpha=float(fields["alpha"]),
                collusion=int(fields["c"]),
                cutoff=float(fields["t"]),
            )
        except (KeyError, ValueError):
            raise UsageError(f"malformed scheme string {text!r}") from None

    def biases(self, model_key: bytes) -> np.ndarray:
        """The secret biases of this model key and code length (see `biases`)."""
        return biases(model_key, self.code_length, self.cutoff)

    def codeword(self, model_key: bytes, index: int) -> np.ndarray:
        """Issue `index`'s codeword as int8 +-1 (what the embed kernel takes)."""
        return codeword(model_key, index, self.biases(model_key))

    def score(self, model_key: bytes, indices: Sequence[int], z: np.ndarray,
              block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """(S_k, log10 p_k) of the given codewords against the raw z statistics, `block`
        codewords at a time so a million licensees never need their codewords all at once."""
        p = self.biases(model_key)
        bound = InnocentBound(z, p)
        out = [scores(packed_codewords(model_key, indices[i:i + block], p), z, p)
               for i in range(0, len(indices), block)]
        s = np.concatenate(out) if out else np.zeros(0)
        return s, bound.log10_p(s)


# -- biases and codewords -------------------------------------------------------------------------


def bias_uniforms(model_key: bytes, code_length: int) -> np.ndarray:
    """L keyed uniforms in (0, 1) (53 bits each), SHAKE-256 of the model key and code length."""
    label = b"weightmark/v2/biases\x00" + code_length.to_bytes(8, "little")
    raw = np.frombuffer(hashlib.shake_256(label + model_key).digest(8 * code_length), dtype="<u8")
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def arcsine_biases(uniforms: np.ndarray, cutoff: float) -> np.ndarray:
    """Map uniforms to the arcsine law on [t, 1 - t] (p = sin^2 r, r uniform), on the 2^-32 grid.

    The returned values are exactly the probabilities a codeword bit is +1 (see `codewords`).
    """
    if not 0.0 < cutoff < 0.5:
        raise UsageError(f"bias cutoff must be in (0, 0.5), got {cutoff}")
    r_low = math.asin(math.sqrt(cutoff))
    r = r_low + uniforms * (math.pi / 2.0 - 2.0 * r_low)
    return bias_thresholds(np.sin(r) ** 2).astype(np.float64) / _TWO32


def bias_thresholds(biases: np.ndarray) -> np.ndarray:
    """32-bit thresholds q_i = round(p_i 2^32) in [1, 2^32 - 1]: bit i is +1 iff u32 < q_i."""
    q = np.rint(np.asarray(biases, dtype=np.float64) * _TWO32)
    return np.clip(q, 1.0, _TWO32 - 1.0).astype(np.uint64)


def biases(model_key: bytes, code_length: int, cutoff: float) -> np.ndarray:
    """Secret biases p_i of a model key and code length, float64 on the 2^-32 grid."""
    return arcsine_biases(bias_uniforms(model_key, code_length), cutoff)


def codeword_seed(model_key: bytes, index: int, code_length: int, label: bytes = b"codeword") -> int:
    """64-bit seed of codeword `index` (HMAC-SHA256 of the model key; `label` separates domains)."""
    msg = b"weightmark/v2/" + label + b"\x00" + code_length.to_bytes(8, "little") + index.to_bytes(8, "little")
    return int.from_bytes(hmac.new(model_key, msg, hashlib.sha256).digest()[:8], "little")


@numba.njit(**PARALLEL)
def _pack_codewords(seeds, thresholds, out):
    count, nbytes = out.shape
    for k in numba.prange(count):
        seed = seeds[k]
        for b in range(nbytes):
            byte = 0
            for bit in range(8):
                i = b * 8 + bit
                # Top 32 bits of the keyed hash: a uniform u32; +1 with probability q_i / 2^32.
                u = element_hash(seed, i) >> np.uint64(32)
                byte = (byte << 1) | (1 if u < thresholds[i] else 0)
            out[k, b] = byte


def packed_codewords_from_seeds(seeds: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Codewords [N, L/8] in np.packbits order (bit 1 = +1) from 64-bit seeds."""
    if biases.ndim != 1 or biases.shape[0] % 8:
        raise ValueError("biases must be 1-D with a length that is a multiple of 8")
    seeds = np.ascontiguousarray(seeds, dtype=np.uint64)
    out = np.empty((seeds.shape[0], biases.shape[0] // 8), dtype=np.uint8)
    if seeds.shape[0]:
        _pack_codewords(seeds, bias_thresholds(biases), out)
    return out


def packed_codewords(model_key: bytes, indices: Sequence[int], biases: np.ndarray,
                     label: bytes = b"codeword") -> np.ndarray:
    """Codewords of the given issue indices, packed [N, L/8] (what `scores` takes)."""
    L = biases.shape[0]
    seeds = np.array([codeword_seed(model_key, int(i), L, label) for i in indices], dtype=np.uint64)
    return packed_codewords_from_seeds(seeds, biases)


def codeword(model_key: bytes, index: int, biases: np.ndarray) -> np.ndarray:
    """Codeword of issue `index` as int8 +-1 (what the embed kernel takes)."""
    bits = np.unpackbits(packed_codewords(model_key, [index], biases)[0])
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


# -- the score ------------------------------------------------------------------------------------


def score_weights(biases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with U(+1, p) = a = sqrt((1-p)/p) and U(-1, p) = -b = -sqrt(p/(1-p))."""
    p = np.asarray(biases, dtype=np.float64)
    return np.sqrt((1.0 - p) / p), np.sqrt(p / (1.0 - p))


def _dot(u: np.ndarray, v: np.ndarray) -> float:
    """1-D dot product without BLAS (whose threads contend on busy machines for no gain here)."""
    return float(np.multiply(u, v).sum())


def normalised(z: np.ndarray) -> np.ndarray:
    """y = z / ||z|| (all zeros when z is)."""
    z = np.asarray(z, dtype=np.float64)
    norm = math.sqrt(_dot(z, z))
    return z / norm if norm > 0 else np.zeros_like(z)


def score_direction(z: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """y: z with its component along (2p - 1) removed, normalised to unit length.

    Colluders' codewords share the biases, so their mixture puts mu (2 p_i - 1) into every z_i,
    a component no licensee's score gains from (E U(c, p) = 0) but which inflates ||z||.
    Removing it is a function of z and p only, so the innocent bound still holds.
    """
    z = np.asarray(z, dtype=np.float64)
    d = 2.0 * np.asarray(biases, dtype=np.float64) - 1.0
    if z.ndim != 1 or z.shape != d.shape:
        raise ValueError(f"z has shape {z.shape}, the biases {d.shape}: one value per code position")
    dd = _dot(d, d)
    if dd > 0:
        z = z - (_dot(z, d) / dd) * d
    return normalised(z)


def scores(packed: np.ndarray, z: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """S_k = sum_i U(c_k[i], p_i) y_i for each packed codeword, in one pass of the packed kernel.

    With w_i = y_i (a_i + b_i), S_k = sum_i bit_ki w_i - sum_i b_i y_i, and the kernel returns
    sum_i (2 bit_ki - 1) w_i, so sum_i bit_ki w_i = (kernel + sum_i w_i) / 2.
    """
    y = score_direction(z, biases)
    a, b = score_weights(biases)
    w = np.ascontiguousarray(y * (a + b))
    raw = score_codewords(packed, w)
    return 0.5 * (raw + float(w.sum())) - _dot(b, y)


# -- the innocent bound ---------------------------------------------------------------------------


class InnocentBound:
    """Upper bounds on P(S >= s) for a licensee whose codeword is independent of z, given z.

    Term i of an innocent's score is X_i = y_i a_i with probability p_i and -y_i b_i otherwise;
    the X_i are independent, so log E e^{lambda S} = K(lambda) = sum_i log(p_i e^{lambda A_i} +
    (1 - p_i) e^{lambda B_i}) exactly and P(S >= s) <= exp(K(lambda) - lambda s) for every
    lambda >= 0. Hoeffding's and Bernstein's bounds are also kept; the minimum of valid bounds is
    valid. Every method returns log10 of a bound, never below what the mathematics gives.

    The tangent grid (K at `grid_points` fixed lambdas, for scoring many codewords at once) is
    built on first use: a scan of a few issued copies solves for the optimum of each score and
    needs the grid only where that optimum cannot be certified.
    """

    def __init__(self, z: np.ndarray, biases: np.ndarray, grid_points: int = 160) -> None:
        p = np.asarray(biases, dtype=np.float64)
        y = score_direction(z, p)
        a, b = score_weights(p)
        used = y != 0
        self.A = y[used] * a[used]  # value of the term when the bit is +1
        self.B = -y[used] * b[used]  # value when the bit is -1
        self.log_p = np.log(p[used])
        self.log_q = np.log1p(-p[used])
        top = np.maximum(self.A, self.B)
        self.max_score = float(top.sum())
        # log P(every term at its maximum) = the bound's limit as lambda -> infinity.
        self.log_p_max = float(np.where(self.A >= self.B, self.log_p, self.log_q).sum())
        span = np.abs(self.A - self.B)
        self._hoeffding_denominator = _dot(span, span)
        self._variance = float(np.sum(np.exp(self.log_p) * self.A**2 + np.exp(self.log_q) * self.B**2))
        self._upside = float(top.max()) if top.size else 0.0
        self._grid_points = grid_points
        self._grid: tuple[np.ndarray, np.ndarray] | None = None

    def _cumulants(self, lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(K, K', K'') at each lambda."""
        return cumulants(self.A, self.B, self.log_p, self.log_q, lambdas)

    def _safe(self, log_bound: np.ndarray) -> np.ndarray:
        """Natural-log bound -> log10, with slack for rounding, capped at 0."""
        log_bound = log_bound + _LOG_SLACK_ABS + _LOG_SLACK_REL * np.abs(log_bound)
        return np.minimum(0.0, log_bound / _LN10)

    def _classical(self, s: np.ndarray) -> np.ndarray:
        """min(Hoeffding, Bernstein) in natural log, for s > 0."""
        out = np.zeros_like(s)
        if self._hoeffding_denominator > 0:
            out = np.minimum(out, -2.0 * s * s / self._hoeffding_denominator)
        denom = 2.0 * (self._variance + self._upside * s / 3.0)
        if self._variance > 0:
            out = np.minimum(out, -s * s / denom)
        return out

    def _chernoff_exact(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(min over lambda of K(lambda) - lambda s, gap): every lambda tried gives a valid bound
        and the smallest value seen is returned, so an imprecise optimum only loosens the bound;
        no lambda does better by more than the gap (inf where the optimum was not pinned down)."""
        _, best, gap = self._solve(s)
        # For s <= max_score, K(lambda) - lambda s >= log_p_max at every lambda (each term's
        # log-sum is at least the log-probability of its maximum plus lambda times it), so a
        # value near log_p_max is near the optimum: how Newton's stall at the largest
        # reachable score (a pristine copy, non-blind) is certified.
        return best, np.minimum(gap, best - self.log_p_max)

    def _solve(self, s: np.ndarray, iterations: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Safeguarded Newton on K'(lambda) = s: (lambda, smallest K(lambda) - lambda s seen, gap)."""
        return chernoff_solve(self.A, self.B, self.log_p, self.log_q, s, self._variance, iterations)

    @property
    def _tangents(self) -> tuple[np.ndarray, np.ndarray]:
        """(lambda_j, K(lambda_j)) of the tangent grid, built on first use."""
        if self._grid is None:
            self._grid = self._tangent_grid(self._grid_points)
        return self._grid

    def _tangent_grid(self, points: int) -> tuple[np.ndarray, np.ndarray]:
        """K(lambda_j) at lambdas whose tangent points spread over the range of scores."""
        if self.A.size == 0 or points <= 0:
            return np.zeros(0), np.zeros(0)
        sigma = math.sqrt(max(self._variance, 1e-300))
        targets = np.concatenate([
            np.linspace(0.05, 12.0, points // 2) * sigma,
            np.geomspace(12.0 * sigma, 0.999 * self.max_score, points - points // 2)
            if self.max_score > 12.0 * sigma else np.zeros(0),
        ])
        targets = targets[targets < self.max_score]
        lambdas = self._solve(targets, iterations=12)[0]
        K = self._cumulants(lambdas)[0]
        return lambdas, K

    def log10_p_exact(self, score: np.ndarray | float) -> np.ndarray:
        """log10 of the tightest bound (exact Chernoff optimum, Hoeffding, Bernstein) per score."""
        s = np.atleast_1d(np.asarray(score, dtype=np.float64))
        out = np.zeros_like(s)
        positive = s > 0
        if not positive.any() or self.A.size == 0:
            return out
        sp = s[positive]
        beyond = sp >= self.max_score
        log_bound = self._classical(sp)
        inner = ~beyond
        uncertain = beyond.copy()
        if inner.any():
            best, gap = self._chernoff_exact(sp[inner])
            log_bound[inner] = np.minimum(log_bound[inner], best)
            uncertain[inner] = ~(gap <= _CERTIFIED_GAP)
        # At or past the largest reachable score: P(S >= s) <= P(every term at its maximum).
        log_bound[beyond] = np.minimum(log_bound[beyond], self.log_p_max)
        out[positive] = self._safe(log_bound)
        # Newton may stall for s near the largest reachable score; the tangents are bounds too.
        # Where the optimum is certified, no tangent (a Chernoff bound at some lambda) beats it.
        if uncertain.any():
            where = np.flatnonzero(positive)[uncertain]
            out[where] = np.minimum(out[where], self.log10_p_grid(s[where]))
        return out

    def log10_p_grid(self, score: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """log10 bounds from the precomputed tangents: min_j K(lambda_j) - lambda_j s.

        Each tangent is a Chernoff bound at a fixed lambda, valid for every s; at s at or above
        a grid point's score it is at least as tight as the exact bound at that point.
        """
        s = np.asarray(score, dtype=np.float64).ravel()
        out = np.zeros_like(s)
        positive = np.flatnonzero(s > 0)
        lams, vals = self._tangents if positive.size else (np.zeros(0), np.zeros(0))
        for start in range(0, positive.size, chunk):
            idx = positive[start : start + chunk]
            sp = s[idx]
            log_bound = self._classical(sp)
            if lams.size:
                log_bound = np.minimum(log_bound, (vals[None, :] - sp[:, None] * lams[None, :]).min(axis=1))
            at_max = sp >= self.max_score
            log_bound[at_max] = np.minimum(log_bound[at_max], self.log_p_max)
            out[idx] = self._safe(log_bound)
        return out

    def log10_p(self, scores: np.ndarray, exact_top: int = 64) -> np.ndarray:
        """log10 bound per score: exact optimum for the `exact_top` highest, tangents for the rest."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        top = np.argsort(-s, kind="stable")[:max(0, exact_top)]
        rest = np.ones(s.shape, dtype=bool)
        rest[top] = False
        out = np.zeros_like(s)
        if rest.any():
            out[rest] = self.log10_p_grid(s[rest])
        if top.size:
            out[top] = self.log10_p_exact(s[top])
        return out


def log10_family_wise(log10_p: np.ndarray | float, family_size: int) -> np.ndarray:
    """log10 of min(1, N p): Bonferroni over the N codewords of the model."""
    return np.minimum(0.0, np.asarray(log10_p, dtype=np.float64) + math.log10(max(1, family_size)))


def score_issued(model_key: bytes, indices: Sequence[int], z: np.ndarray, biases: np.ndarray,
                 exact_top: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(S_k, log10 p_k) for the codewords of the given issue indices against z."""
    packed = packed_codewords(model_key, indices, biases)
    s = scores(packed, z, biases)
    return s, InnocentBound(z, biases).log10_p(s, exact_top=exact_top)


# -- the false-accusation check -------------------------------------------------------------------


@dataclass(frozen=True)
class NeverIssuedCheck:
    """Scores of codewords that were never issued, against the bound they must respect."""

    count: int
    thresholds: tuple[float, ...]  # x: log10 p levels
    empirical: tuple[float, ...]  # fraction of never-issued codewords with log10 p <= x
    bound: tuple[float, ...]  # 10^x, what a valid p-value guarantees
    max_score: float
    min_log10_p: float
    min_log10_family_wise_p: float  # over the `count` never-issued codewords

    @property
    def consistent(self) -> bool:
        """Every empirical tail at or below its bound, with 3 binomial standard errors of slack."""
        return all(
            e <= b + 3.0 * math.sqrt(b * (1.0 - b) / self.count) + 1.0 / self.count
            for e, b in zip(self.empirical, self.bound, strict=True)
        )


def never_issued_check(z: np.ndarray, biases: np.ndarray, key: bytes, count: int = 100_000,
                       thresholds: Sequence[float] = (-0.5, -1.0, -2.0, -3.0, -4.0)) -> NeverIssuedCheck:
    """Score `count` codewords from a domain no issued copy uses and compare their p-values with
    the bound: a valid p-value has P(p <= 10^x) <= 10^x for an innocent."""
    out_s: list[np.ndarray] = []
    out_p: list[np.ndarray] = []
    bound = InnocentBound(z, biases)
    block = 16384
    for start in range(0, count, block):
        idx = range(start, min(count, start + block))
        packed = packed_codewords(key, idx, biases, label=b"never-issued")
        s = scores(packed, z, biases)
        out_s.append(s)
        out_p.append(bound.log10_p(s, exact_top=16))
    s = np.concatenate(out_s) if out_s else np.zeros(0)
    lp = np.concatenate(out_p) if out_p else np.zeros(0)
    emp = tuple(float(np.mean(lp <= x)) if lp.size else 0.0 for x in thresholds)
    low = float(lp.min()) if lp.size else 0.0
    return NeverIssuedCheck(
        count=count, thresholds=tuple(float(x) for x in thresholds), empirical=emp,
        bound=tuple(10.0**x for x in thresholds), max_score=float(s.max()) if s.size else 0.0,
        min_log10_p=low, min_log10_family_wise_p=float(log10_family_wise(low, count)),
    )


# -- z-level simulation of collusion and the choice of L and t -------------------------------------

ATTACKS = ("average", "random-pick", "interleave", "median", "minmax")
# Calibration: one copy of MiniLM (21.3M carrier elements) after Q4_0 at L = 4096 scores S = 55,
# and S = sqrt(L) mu / sqrt(1 + mu^2) for z_i = mu c_i + N(0, 1).
CALIBRATION_ELEMENTS = 21.3e6
CALIBRATION_LENGTH = 4096
CALIBRATION_SCORE = 55.0


def signal_strength(n_carrier_elements: float, code_length: int) -> float:
    """mu of one copy's z statistics: mu scales like sqrt(elements per position)."""
    r = CALIBRATION_SCORE / math.sqrt(CALIBRATION_LENGTH)
    mu_cal = r / math.sqrt(1.0 - r * r)
    return mu_cal * math.sqrt(n_carrier_elements / CALIBRATION_ELEMENTS * CALIBRATION_LENGTH / code_length)


def collude(codewords: np.ndarray, attack: str, rng: np.random.Generator,
            elements_per_position: int = 1000) -> np.ndarray:
    """The mean signal v_i each position carries after the colluders' attack (z_i = mu v_i + noise).

    codewords: int8 +-1 [m, L]. average: equal mix; interleave: per-tensor or per-row mix with
    unequal shares; random-pick: each element from a random copy; median: majority (0 on ties);
    minmax: element-wise min or max, the agreed value where all agree and 0 (erasure) elsewhere.
    """
    c = codewords.astype(np.float64)
    m, L = c.shape
    if attack == "average":
        return c.mean(axis=0)
    if attack == "interleave":
        shares = rng.dirichlet(np.ones(m))
        return (shares[:, None] * c).sum(axis=0)
    if attack == "random-pick":
        counts = rng.multinomial(elements_per_position, np.full(m, 1.0 / m), size=L)
        return (counts.T * c).sum(axis=0) / elements_per_position
    if attack == "median":
        return np.sign(c.sum(axis=0))
    if attack == "minmax":
        agree = np.all(c == c[0], axis=0)
        return np.where(agree, c[0], 0.0)
    raise UsageError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")


@dataclass(frozen=True)
class SimulatedTrial:
    best_score: float  # the highest colluder score
    mean_colluder_score: float
    best_log10_p: float  # its bound
    best_log10_family_wise_p: float


def simulate(code: str, attack: str, collusion: int, code_length: int, mu: float,
             cutoff: float = 0.01, trials: int = 8, seed: int = 0, family_size: int = ASSUMED_LICENSEES,
             ) -> list[SimulatedTrial]:
    """z-level simulation: colluders' codewords, their attack, z = mu v + N(0, 1), and the
    accusation of the best-scoring colluder (v2 bound for "tardos", Hoeffding for "uniform")."""
    rng = np.random.default_rng([seed, collusion, code_length, ATTACKS.index(attack)])
    per_position = 1000
    out = []
    for _ in range(trials):
        if code == "tardos":
            u = rng.random(code_length)
            p = arcsine_biases(u, cutoff)
            c = np.where(rng.random((collusion, code_length)) < p, 1, -1).astype(np.int8)
        elif code == "uniform":
            p = np.full(code_length, 0.5)
            c = np.where(rng.random((collusion, code_length)) < 0.5, 1, -1).astype(np.int8)
        else:
            raise UsageError(f"unknown code {code!r}")
        z = mu * collude(c, attack, rng, per_position) + rng.standard_normal(code_length)
        if code == "tardos":
            a, b = score_weights(p)
            s = (np.where(c > 0, a, -b) * score_direction(z, p)).sum(axis=1)
            best = float(s.max())
            lp = float(InnocentBound(z, p, grid_points=0).log10_p_exact(best)[0])
        else:
            s = (c * normalised(z)).sum(axis=1)
            best = float(s.max())
            lp = min(0.0, -best * best / (2.0 * _LN10)) if best > 0 else 0.0
        out.append(SimulatedTrial(best, float(s.mean()), lp, float(log10_family_wise(lp, family_size))))
    return out


def best_cutoff(n_carrier_elements: float, code_length: int, collusion: int,
                licensees: int = ASSUMED_LICENSEES, trials: int = 6, seed: int = 0) -> tuple[float, float]:
    """(t, worst family-wise log10 p): the candidate cutoff t = 1 / (k c) whose worst simulated
    trial over every attack accuses a colluder most strongly, and that worst value."""
    mu = signal_strength(n_carrier_elements, code_length)
    best: tuple[float, float] | None = None
    for k in CUTOFF_DIVISORS:
        t = 1.0 / (k * collusion)
        if t >= 0.5:
            continue
        worst = max(
            trial.best_log10_family_wise_p
            for attack in ATTACKS
            for trial in simulate("tardos", attack, collusion, code_length, mu, t, trials, seed, licensees)
        )
        if best is None or worst < best[1]:
            best = (t, worst)
    if best is None:
        raise UsageError(f"no cutoff candidate below 1/2 for collusion size {collusion}")
    return best


def choose_parameters(n_carrier_elements: float, licensees: int = ASSUMED_LICENSEES, collusion: int = 8,
                      threshold: float = DEFAULT_THRESHOLD, margin: float = 2.0, trials: int = 6,
                      seed: int = 0, min_length: int = 4096) -> tuple[int, float]:
    """(L, cutoff): the shortest power-of-two code length from `min_length` (v1's default, so a
    single copy is traced at least as well as by v1), and the cutoff t = 1 / (k c) for it,
    under which every simulated trial of every attack by `collusion` colluders accuses one of
    them at family-wise p <= threshold / 10^margin among `licensees` codewords.

    Longer codes spread fewer elements over each position (mu ~ sqrt(n / L)) but give each
    innocent's score a lighter tail and the colluders more positions where they all agree; the
    shortest passing L keeps scoring 10^6 codewords cheap. Positions get at least 256 elements.
    When no candidate passes, the allowed (L, t) whose worst trial came closest is returned.
    Deterministic for a given seed; takes seconds to tens of seconds.
    """
    if n_carrier_elements <= 0 or licensees < 1 or collusion < 1:
        raise UsageError("carrier elements, licensees and collusion size must be positive")
    limit = math.log10(threshold) - margin
    lengths = [L for L in CODE_LENGTHS if L >= min_length and n_carrier_elements / L >= 256]
    lengths = lengths or [max(CODE_LENGTHS[0], min(min_length, CODE_LENGTHS[-1]))]
    fallback: tuple[float, int, float] | None = None
    for L in lengths:
        t, worst = best_cutoff(n_carrier_elements, L, collusion, licensees, trials, seed)
        if worst <= limit:
            return L, t
        if fallback is None or worst < fallback[0]:
            fallback = (worst, L, t)
    assert fallback is not None
    return fallback[1], fallback[2]
