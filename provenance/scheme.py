"""The v1 spread-spectrum scheme: parameters, per-carrier seeds, codewords and p-values.

Everything that changes a stamped copy is in the scheme string recorded with each issued copy,
so a scan configures itself from the registry, never from defaults.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from weightmark.errors import UsageError

if TYPE_CHECKING:
    from weightmark.tardos import TardosParams

SCHEME_NAME = "ss-v1"
DEFAULT_CODE_LENGTH = 4096
DEFAULT_ALPHA = 0.002
DEFAULT_THRESHOLD = 1e-9
# Colluders a new copy's code is sized for (1: the v1 uniform code).
DEFAULT_COLLUSION = 8
MIN_CARRIER_ELEMENTS = 4096
FLOAT_CARRIER_DTYPES = frozenset({"F32", "F64", "F16", "BF16"})
_LN10 = math.log(10.0)


@dataclass(frozen=True)
class SchemeParams:
    """Parameters of one stamped copy; `str()` is the scheme string kept in the registry."""

    code_length: int = DEFAULT_CODE_LENGTH
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        if not (0.0 < self.alpha <= 0.1) or not math.isfinite(self.alpha):
            raise UsageError(f"alpha must be in (0, 0.1], got {self.alpha}")
        if self.code_length < 64 or self.code_length % 8 or self.code_length > 1 << 20:
            raise UsageError(f"code length must be a multiple of 8 in [64, 2^20], got {self.code_length}")

    def __str__(self) -> str:
        return (
            f"{SCHEME_NAME};L={self.code_length};alpha={self.alpha!r};shape=rowrms;"
            "round=stochastic;hash=splitmix64"
        )

    def codeword(self, model_key: bytes, index: int) -> np.ndarray:
        """Issue `index`'s codeword as int8 +-1 (what the embed kernel takes)."""
        return codeword(model_key, index, self.code_length)

    def score(self, model_key: bytes, indices: list[int], z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores S_k = c_k . z / ||z|| of the given codewords and their log10 p-values for an
        innocent (Hoeffding: the codeword is uniform and independent of z)."""
        from weightmark.kernels import score_codewords

        norm = float(np.linalg.norm(z))
        if not indices:
            return np.zeros(0), np.zeros(0)
        packed = np.stack([packed_codeword(model_key, i, self.code_length) for i in indices])
        scores = score_codewords(packed, z) / norm if norm > 0 else np.zeros(len(indices))
        return scores, np.array([log10_hoeffding(float(s)) for s in scores])

    @classmethod
    def parse(cls, text: str) -> SchemeParams:
        fields = scheme_fields(text, SCHEME_NAME)
        try:
            return cls(code_length=int(fields["L"]), alpha=float(fields["alpha"]))
        except (KeyError, ValueError):
            raise UsageError(f"malformed scheme string {text!r}") from None


def scheme_fields(text: str, name: str) -> dict[str, str]:
    """The key=value fields of a scheme string named `name` with the embedding every scheme
    shares (row-RMS shaping, stochastic rounding, SplitMix64); UsageError for anything else."""
    parts = text.split(";")
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    expected = {"shape": "rowrms", "round": "stochastic", "hash": "splitmix64"}
    if parts[0] != name or any(fields.get(k) != v for k, v in expected.items()):
        raise UsageError(f"unsupported scheme string {text!r}")
    return fields


def parse_scheme(text: str) -> SchemeParams | TardosParams:
    """The parameters a scheme string records (each issued copy keeps its own)."""
    if text.startswith("tardos-v2;"):
        from weightmark.tardos import TardosParams

        return TardosParams.parse(text)
    return SchemeParams.parse(text)


def choose_scheme(alpha: float, collusion: int, carrier_elements: int,
                  issued_schemes: Iterable[str] = ()) -> SchemeParams | TardosParams:
    """The scheme of a new copy: ss-v1 (uniform codes) for `collusion` 1, else a Tardos code
    (tardos-v2) sized for that many colluders among 10^6 licensees.

    A model's copies share one code: an earlier v2 copy with the same alpha and collusion size
    fixes L and the bias cutoff, so the (simulation-based) choice runs once per model.
    """
    if collusion < 1:
        raise UsageError(f"collusion size must be at least 1, got {collusion}")
    if collusion == 1:
        return SchemeParams(alpha=alpha)
    from weightmark.tardos import ASSUMED_LICENSEES, TardosParams, choose_parameters

    for text in issued_schemes:
        if text.startswith("tardos-v2;"):
            earlier = TardosParams.parse(text)
            if earlier.collusion == collusion and earlier.alpha == alpha:
                return earlier
    length, cutoff = choose_parameters(carrier_elements, ASSUMED_LICENSEES, collusion)
    return TardosParams(code_length=length, alpha=alpha, collusion=collusion, cutoff=cutoff)


def is_carrier(dtype: str, shape: tuple[int, ...]) -> bool:
    """Floating tensors of rank >= 2 with at least 4096 elements carry the watermark."""
    return dtype in FLOAT_CARRIER_DTYPES and len(shape) >= 2 and math.prod(shape) >= MIN_CARRIER_ELEMENTS


def canonical_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The [out, in] view of a carrier: first axis is out, the rest flattened (a scalar, which
    a hostile file may put under a carrier's name, is one row of one)."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def carrier_seed(model_key: bytes, name: str) -> int:
    """64-bit seed of carrier `name` (its canonical Hugging Face tensor name)."""
    mac = hmac.new(model_key, b"weightmark/v1/carrier\x00" + name.encode("utf-8"), hashlib.sha256)
    return int.from_bytes(mac.digest()[:8], "little")


def packed_codeword(model_key: bytes, index: int, code_length: int) -> np.ndarray:
    """Codeword of issue `index` as L bits (np.packbits order; bit 1 = +1, bit 0 = -1).

    SHAKE-256 keyed by the model key: uniform and independent across indices, unpredictable
    without the key.
    """
    xof = hashlib.shake_256(b"weightmark/v1/codeword\x00" + model_key + index.to_bytes(8, "little"))
    return np.frombuffer(xof.digest(code_length // 8), dtype=np.uint8).copy()


def codeword(model_key: bytes, index: int, code_length: int) -> np.ndarray:
    """Codeword of issue `index` as int8 +-1 (what the embed kernel takes)."""
    bits = np.unpackbits(packed_codeword(model_key, index, code_length))
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


def z_statistics(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """z_i = num_i / sqrt(den_i); positions that received nothing get 0."""
    z = np.zeros_like(num)
    ok = den > 0
    z[ok] = num[ok] / np.sqrt(den[ok])
    return z


def log10_hoeffding(score: float) -> float:
    """log10 of P(S >= score) for an innocent: exp(-S^2/2) for S > 0, else 1."""
    if not score > 0:
        return 0.0
    return -score * score / (2.0 * _LN10)


def log10_family_wise(log10_p: float, family_size: int) -> float:
    """log10 of min(1, N * p): a Bonferroni bound over the N codewords of the model."""
    return min(0.0, log10_p + math.log10(max(1, family_size)))


def log10_presence(z: np.ndarray) -> tuple[float, float, int]:
    """Test 'some watermark of this model key is present': T = sum z_i^2 against chi-square.

    Under the null each z_i is a normalised weighted sum of independent fair chips, whose even
    moments are at most a standard normal's, so the chi-square Chernoff bound holds:
    P(T >= x) <= exp(-(x - k - k ln(x / k)) / 2) for x > k, with k the positions used.
    Returns (T, log10 p, k).
    """
    used = int(np.count_nonzero(z))
    stat = float(np.dot(z, z))
    if used == 0 or stat <= used:
        return stat, 0.0, used
    log_p = -(stat - used - used * math.log(stat / used)) / 2.0
    return stat, log_p / _LN10, used


def p_from_log10(log10_p: float) -> float:
    """The p-value as a float (0.0 when below the smallest double: use the log10 then)."""
    return 10.0**log10_p if log10_p > -320 else 0.0


def row_rms(rows: np.ndarray, decode: Callable[[np.ndarray], np.ndarray] = np.asarray) -> np.ndarray:
    """RMS of each row of a 2-D view, float32, computed in float64 (non-finite -> 0).

    `decode` turns a block of stored rows into values (e.g. bf16 bits into floats); rows are
    processed in blocks of about 1M elements (8 MB of float64), so memory stays bounded
    whatever the tensor's size (each row's sum is the same whatever the block).
    """
    out = np.empty(rows.shape[0], dtype=np.float32)
    block = max(1, (1 << 20) // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], block):
        part = decode(rows[start : start + block]).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            np.multiply(part, part, out=part)
            rms = np.sqrt(np.mean(part, axis=1))
        out[start : start + block] = np.where(np.isfinite(rms), rms, 0.0)
    return out
