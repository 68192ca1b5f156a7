"""A small numpy BERT encoder that turns sentences into all-MiniLM-L6-v2 sentence embeddings."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from weightmark.canonical import to_float32
from weightmark.formats.safetensors import load_file

__all__ = ["Config", "Encoder", "erf", "gelu", "load_encoder", "load_weights"]

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_ERF_CLIP = 6.0  # erf(6) = 1 - 2e-17, i.e. exactly 1.0 in float64
_ERF_TOL = 1e-17
_ERF_BANDS_PER_UNIT = 2  # sum the series separately for |z| in [0, 0.5), [0.5, 1), ...


def _erf_series(z: np.ndarray) -> np.ndarray:
    """erf for 0 <= z <= 6 from its all-positive series, summed until every term is negligible."""
    z2 = z * z
    total = z.copy()
    term = z.copy()
    n = 0
    while True:
        n += 1
        term *= z2
        term *= 2.0 / (2 * n + 1)
        total += term
        if n % 4 == 0 and np.all(term <= _ERF_TOL * total):
            break
    return np.minimum(_TWO_OVER_SQRT_PI * np.exp(-z2) * total, 1.0)


def erf(x: np.ndarray) -> np.ndarray:
    """Error function to float64 precision (about 1e-15 relative), element-wise.

    Uses erf(z) = 2/sqrt(pi) * exp(-z^2) * sum_n 2^n z^(2n+1) / (1*3*...*(2n+1)), whose terms
    are all positive (no cancellation); |z| is clipped at 6, where erf is 1 in float64. Values
    are summed in bands of |z| so small arguments stop after a few terms.
    """
    x = np.asarray(x, dtype=np.float64)
    z = np.minimum(np.abs(x).ravel(), _ERF_CLIP)
    result = np.empty_like(z)
    band = (z * _ERF_BANDS_PER_UNIT).astype(np.intp)
    for b in range(int(band.max(initial=0)) + 1):
        members = np.flatnonzero(band == b)
        if members.size:
            result[members] = _erf_series(z[members])
    return (np.copysign(result, x.ravel())).reshape(x.shape)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)), as BERT's hidden_act 'gelu'."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {path}")
    return files


def load_weights(folder_or_file: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every floating-point tensor of a checkpoint, decoded to float32, with any 'bert.' prefix dropped."""
    weights: dict[str, np.ndarray] = {}
    for file in _weight_files(Path(folder_or_file)):
        for name, (dtype, array) in load_file(file).items():
            if dtype in ("F32", "F64", "F16", "BF16"):
                weights[name.removeprefix("bert.")] = to_float32(dtype, array)
    return weights


@dataclass(frozen=True)
class Config:
    """The few BERT hyper-parameters the forward pass needs, read from config.json."""

    hidden: int
    layers: int
    heads: int
    eps: float

    @classmethod
    def read(cls, path: Path) -> Config:
        raw = json.loads(path.read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"],
                   float(raw["layer_norm_eps"]))


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * gamma + beta


class Encoder:
    """BERT encoder + mean pooling + L2 normalisation, computed in float64 with numpy."""

    def __init__(self, weights: Mapping[str, np.ndarray], config: Config, tokenizer: Tokenizer,
                 batch_size: int = 16) -> None:
        self.config = config
        self.w = {name: np.asarray(array, dtype=np.float64) for name, array in weights.items()}
        # Linear weights come [out, in]; keep contiguous [in, out] copies so y = x @ W.T + b.
        self.wt = {name: np.ascontiguousarray(w.T) for name, w in self.w.items()
                   if w.ndim == 2 and name.startswith(("encoder.", "pooler."))}
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def with_weights(self, weights: Mapping[str, np.ndarray]) -> Encoder:
        """The same architecture and tokenizer with other weights (e.g. a quantised copy)."""
        return Encoder(weights, self.config, self.tokenizer, self.batch_size)

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        flat = x.reshape(-1, x.shape[-1]) @ self.wt[prefix + ".weight"]  # 2-D: one BLAS call
        return flat.reshape(*x.shape[:-1], -1) + self.w[prefix + ".bias"]

    def _norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return _layer_norm(x, self.w[prefix + ".weight"], self.w[prefix + ".bias"], self.config.eps)

    def _layer(self, x: np.ndarray, bias: np.ndarray, i: int) -> np.ndarray:
        p = f"encoder.layer.{i}"
        batch, length, hidden = x.shape
        heads = self.config.heads
        size = hidden // heads

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, length, heads, size).transpose(0, 2, 1, 3)

        q = split(self._linear(x, f"{p}.attention.self.query"))
        k = split(self._linear(x, f"{p}.attention.self.key"))
        v = split(self._linear(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(size) + bias
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        x = self._norm(self._linear(context, f"{p}.attention.output.dense") + x,
                       f"{p}.attention.output.LayerNorm")
        inner = gelu(self._linear(x, f"{p}.intermediate.dense"))
        return self._norm(self._linear(inner, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        length = ids.shape[1]
        x = (self.w["embeddings.word_embeddings.weight"][ids]
             + self.w["embeddings.position_embeddings.weight"][:length]
             + self.w["embeddings.token_type_embeddings.weight"][0])
        x = self._norm(x, "embeddings.LayerNorm")
        # Padded keys get a huge negative score, so softmax gives them (numerically) zero weight.
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
        for i in range(self.config.layers):
            x = self._layer(x, bias, i)
        weights = mask[:, :, None].astype(np.float64)
        pooled = (x * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)

    def embed(self, sentences: list[str]) -> np.ndarray:
        """Unit-length sentence embeddings, float64 [n, hidden], in the order given."""
        out = np.zeros((len(sentences), self.config.hidden), dtype=np.float64)
        # Batch sentences of similar length together to keep padding small.
        order = sorted(range(len(sentences)), key=lambda j: len(sentences[j]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            encodings = self.tokenizer.encode_batch([sentences[j] for j in chunk])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            out[chunk] = self._forward(ids, mask)
        return out


def _tokenizer(path: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tokenizer


def load_encoder(folder_or_file: str | os.PathLike[str],
                 assets: str | os.PathLike[str] | None = None) -> Encoder:
    """An Encoder for a model folder or a .safetensors file.

    config.json and tokenizer.json are read from `assets` if given, else from the folder (or the
    file's folder).
    """
    path = Path(folder_or_file)
    folder = Path(assets) if assets is not None else (path if path.is_dir() else path.parent)
    config = Config.read(folder / "config.json")
    return Encoder(load_weights(path), config, _tokenizer(folder / "tokenizer.json"))
