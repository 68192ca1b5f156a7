"""Function-preserving attacks: move every weight without changing what the model computes.

A leaker can permute FFN units and attention heads, rescale rows against the columns that
consume them, rescale norm weights, rotate a llama model's residual stream by an orthogonal
matrix, and rename, transpose or drop tensors. Each leaves the outputs equal (to float
rounding) and puts every element of every carrier at a different index, so a scan that
does not first align the suspect to the reference (`weightmark.align`) reads noise.

Each function reads a safetensors file or folder whose config.json says `model_type`
(llama-family or bert) and writes the attacked copy in the same layout, config and tokenizer
files included. Permutations and scales come from `seed` (per layer), so a tensor is
transformed on its own and the copy is written one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightmark.attacks.basic import map_floats
from weightmark.canonical import from_float32, to_float32
from weightmark.errors import InputFileError, UsageError
from weightmark.formats.safetensors import Checkpoint, save_file
from weightmark.fsutil import staged_output

__all__ = [
    "Architecture",
    "function_preserving",
    "head_permutations",
    "expert_permutations",
    "permute_experts",
    "permute_ffn",
    "permute_heads",
    "random_orthogonal",
    "rename_transpose_drop",
    "rescale",
    "rotate_residual",
    "tensor_role",
]

LLAMA_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm", "smollm2"})

_LLAMA_LAYER = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\."
    r"(?P<part>self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
    r"|input_layernorm|post_attention_layernorm)"
    r"\.(?P<kind>weight|bias)$"
)
_BERT_LAYER = re.compile(
    r"^(?:.*\.)?encoder\.layer\.(?P<layer>\d+)\."
    r"(?P<part>attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense"
    r"|output\.dense|attention\.output\.LayerNorm|output\.LayerNorm)"
    r"\.(?P<kind>weight|bias)$"
)
_ROLES = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k",
    "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.output.dense": "o", "intermediate.dense": "up", "output.dense": "down",
    "attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "mlp_norm",
}  # fmt: skip


def tensor_role(name: str) -> tuple[int, str, str] | None:
    """(layer, role, "weight" or "bias") of a transformer-layer tensor, else None.

    Roles: q, k, v, o (attention), gate, up, down (FFN; BERT's intermediate.dense is "up" and
    output.dense is "down"), attn_norm and mlp_norm (the norm whose output feeds attention or
    the FFN in llama; BERT's post-attention and post-FFN LayerNorms).
    """
    for pattern in (_LLAMA_LAYER, _BERT_LAYER):
        m = pattern.match(name)
        if m:
            return int(m["layer"]), _ROLES[m["part"]], m["kind"]
    return None


def _is_embedding(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "word_embeddings.weight"))


def _is_lm_head(name: str) -> bool:
    return name.endswith("lm_head.weight")


def _is_final_norm(name: str) -> bool:
    return name.endswith("model.norm.weight") or name == "norm.weight"


@dataclass(frozen=True)
class Architecture:
    """What the transforms need to know about a model: family, widths and head layout."""

    kind: str  # "llama" or "bert"
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    tied: bool  # lm_head shares the input embedding matrix

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config: dict, where: object = "config.json") -> Architecture:
        model_type = str(config.get("model_type", "")).lower()
        if model_type == "bert":
            kind = "bert"
        elif model_type in LLAMA_TYPES or "num_key_value_heads" in config:
            kind = "llama"
        else:
            raise UsageError(
                f"{where}: model_type {model_type!r} is neither a llama-family model nor bert"
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{where}: missing or bad {exc}") from None
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise UsageError(
                f"{where}: {heads} attention heads are not a multiple of {kv_heads} kv heads"
            )
        tied = bool(config.get("tie_word_embeddings", kind == "bert"))
        return cls(kind, hidden, heads, kv_heads, head_dim, layers, tied)

    @classmethod
    def read(cls, src: str | os.PathLike[str]) -> Architecture:
        """The architecture of the checkpoint at `src` (a folder, or a file beside config.json)."""
        src = Path(src)
        path = (src if src.is_dir() else src.parent) / "config.json"
        try:
            config = json.loads(path.read_text())
        except OSError as exc:
            raise InputFileError(path, f"cannot read the model's config: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise InputFileError(path, f"is not valid JSON ({exc.msg})") from None
        return cls.from_config(config, path)


def _rng(seed: int, *purpose: int | str) -> np.random.Generator:
    words = [int(seed) & 0xFFFFFFFF]
    for item in purpose:
        words.extend(item.encode() if isinstance(item, str) else [int(item)])
    return np.random.default_rng(words)


def _log_uniform(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    """n factors in [1/spread, spread], log-uniform (positive, so activations keep their sign)."""
    return np.exp(rng.uniform(-np.log(spread), np.log(spread), n))


def _moving_permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation of n items other than the identity (when n > 1)."""
    while True:
        perm = rng.permutation(n)
        if n < 2 or np.any(perm != np.arange(n)):
            return perm


def _head_rows(head_order: np.ndarray, head_dim: int) -> np.ndarray:
    """Row indices of whole heads taken in `head_order`."""
    return (head_order[:, None] * head_dim + np.arange(head_dim)).ravel()


def _apply(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    fn: Callable[[str, np.ndarray, Architecture], np.ndarray],
) -> Path:
    arch = Architecture.read(src)
    # Everything float goes through fn (biases and norms too); fn leaves what it does not touch.
    return map_floats(src, dst, lambda name, w: fn(name, w, arch), only_matrices=False)


def permute_ffn(src: str | os.PathLike[str], dst: str | os.PathLike[str], seed: int) -> Path:
    """Shuffle every layer's FFN hidden units: rows (and biases) of gate/up, columns of down."""

    def fn(name: str, w: np.ndarray, arch: Architecture) -> np.ndarray:
        role = tensor_role(name)
        if role is None or role[1] not in ("gate", "up", "down"):
            return w
        layer, part, kind = role
        if part == "down" and kind == "bias":
            return w
        units = w.shape[1] if part == "down" else w.shape[0]
        perm = _moving_permutation(_rng(seed, "ffn", layer), units)
        return w[:, perm] if part == "down" else w[perm]

    return _apply(src, dst, fn)


def expert_permutations(src: str | os.PathLike[str], seed: int) -> dict[int, np.ndarray]:
    """Per MoE layer of `src`, new expert -> old expert (never the identity)."""
    from weightmark.moe import expert_layers

    with Checkpoint.open(src) as ckpt:
        return _expert_permutations(expert_layers(ckpt.tensors), seed)


def _expert_permutations(layers: dict, seed: int) -> dict[int, np.ndarray]:
    return {layer: _moving_permutation(_rng(seed, "experts", layer), group.count)
            for layer, group in layers.items()}


def permute_experts(src: str | os.PathLike[str], dst: str | os.PathLike[str], seed: int) -> Path:
    """Reorder every MoE layer's routed experts together with the router's rows.

    Expert j of the copy is expert perm[j] of `src` (all its projections) and router row j is
    router row perm[j], so every token picks the same experts with the same weights: the
    model computes the same function. Shared experts stay. Streams tensor by tensor and keeps
    the shards, dtypes and other files.
    """
    from weightmark.formats.safetensors import write_like
    from weightmark.moe import expert_layers

    dst = Path(dst)
    with Checkpoint.open(src) as ckpt:
        layers = expert_layers(ckpt.tensors)
        if not layers:
            raise UsageError(f"{src}: no Mixture-of-Experts layer (per-expert tensors and a router) found")
        perms = _expert_permutations(layers, seed)
        source: dict[str, str] = {}
        router_rows: dict[str, np.ndarray] = {}
        for layer, group in layers.items():
            for j, parts in group.experts.items():
                for part, name in parts.items():
                    source[name] = group.experts[int(perms[layer][j])][part]
            if group.router is not None:
                router_rows[group.router] = perms[layer]

        def transform(name: str, info: object, raw: np.ndarray) -> np.ndarray:
            if name in source:
                return ckpt.raw(source[name])
            if name in router_rows:
                return np.ascontiguousarray(raw[router_rows[name]])
            return raw

        with staged_output(dst, is_dir=ckpt.is_folder) as staging:
            write_like(ckpt, staging.path, transform)
            staging.publish()
    return dst


def head_permutations(arch: Architecture, seed: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(new kv head -> old kv head, new query head -> old query head) for one layer.

    Key/value heads move together with their group of query heads; query heads are also
    shuffled within their group.
    """
    rng = _rng(seed, "heads", layer)
    kv_order = _moving_permutation(rng, arch.kv_heads)
    g = arch.group
    q_order = np.concatenate([kv * g + rng.permutation(g) for kv in kv_order])
    return kv_order, q_order


def permute_heads(src: str | os.PathLike[str], dst: str | os.PathLike[str], seed: int) -> Path:
    """Shuffle every layer's attention heads: q/k/v rows (and biases) in head blocks, o columns."""

    def fn(name: str, w: np.ndarray, arch: Architecture) -> np.ndarray:
        role = tensor_role(name)
        if role is None or role[1] not in ("q", "k", "v", "o"):
            return w
        layer, part, kind = role
        kv_order, q_order = head_permutations(arch, seed, layer)
        if part == "o":
            return w if kind == "bias" else w[:, _head_rows(q_order, arch.head_dim)]
        order = q_order if part == "q" else kv_order
        return w[_head_rows(order, arch.head_dim)]

    return _apply(src, dst, fn)


@dataclass(frozen=True)
class _LayerScales:
    up: np.ndarray | None  # FFN unit scale (llama: up rows x s, down columns / s)
    v: np.ndarray  # value row scale (v rows x s, o columns / s)
    qk: np.ndarray  # query row scale, key rows / s (llama: equal within each rope pair)
    attn_norm: np.ndarray | None  # norm weight x s, the next linears' columns / s
    mlp_norm: np.ndarray | None


def _layer_scales(
    arch: Architecture, seed: int, layer: int, spread: float, intermediate: int
) -> _LayerScales:
    rng = _rng(seed, "scale", layer)
    kv_dim = arch.kv_heads * arch.head_dim
    v = _log_uniform(rng, kv_dim, spread)
    if arch.kind == "llama":
        half = _log_uniform(rng, arch.kv_heads * arch.head_dim // 2, spread).reshape(
            arch.kv_heads, -1
        )
        qk = np.concatenate([half, half], axis=1).ravel()  # rope rotates dims i and i + head_dim/2
        return _LayerScales(
            _log_uniform(rng, intermediate, spread),
            v,
            qk,
            _log_uniform(rng, arch.hidden, spread),
            _log_uniform(rng, arch.hidden, spread),
        )
    # BERT: GELU is not homogeneous and post-LN LayerNorm outputs feed the residual stream,
    # so only the attention's linear pairs can be rescaled.
    return _LayerScales(None, v, _log_uniform(rng, kv_dim, spread), None, None)


def _expand_to_queries(kv_vector: np.ndarray, arch: Architecture) -> np.ndarray:
    """A per-(kv head, dim) vector repeated for each query head of the group."""
    per_head = kv_vector.reshape(arch.kv_heads, 1, arch.head_dim)
    return np.broadcast_to(per_head, (arch.kv_heads, arch.group, arch.head_dim)).ravel()


def rescale(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], seed: int, spread: float = 4.0
) -> Path:
    """Rescale rows against the columns that read them, by factors in [1/spread, spread].

    llama: up rows x s with down columns / s; v rows x s with o columns / s; q rows x s with
    k rows / s (equal within each rope pair); RMSNorm weights x s with the following linears'
    columns / s (the final norm too when lm_head is not tied). BERT: v/o and q/k pairs
    (weights and biases).
    """
    if spread < 1.0:
        raise UsageError(f"spread must be >= 1, got {spread}")
    with Checkpoint.open(src) as ckpt:
        sizes = {}
        for name, (_, info) in ckpt.tensors.items():
            role = tensor_role(name)
            if role and role[1] == "down" and role[2] == "weight":
                sizes[role[0]] = info.shape[1]

    def fn(name: str, w: np.ndarray, arch: Architecture) -> np.ndarray:
        role = tensor_role(name)
        w64 = w.astype(np.float64)
        final_scale = None
        if arch.kind == "llama" and not arch.tied:
            final_scale = _log_uniform(_rng(seed, "scale", "final"), arch.hidden, spread)
        if role is None:
            if final_scale is not None and _is_final_norm(name):
                return (w64 * final_scale).astype(np.float32)
            if final_scale is not None and _is_lm_head(name):
                return (w64 / final_scale).astype(np.float32)
            return w
        layer, part, kind = role
        s = _layer_scales(arch, seed, layer, spread, sizes.get(layer, 1))
        if part == "attn_norm" and s.attn_norm is not None:
            out = w64 * s.attn_norm
        elif part == "mlp_norm" and s.mlp_norm is not None:
            out = w64 * s.mlp_norm
        elif part == "q":
            q = _expand_to_queries(s.qk, arch)
            out = w64 * (q[:, None] if kind == "weight" else q)
        elif part == "k":
            out = w64 / (s.qk[:, None] if kind == "weight" else s.qk)
        elif part == "v":
            out = w64 * (s.v[:, None] if kind == "weight" else s.v)
        elif part == "o":
            out = w64 if kind == "bias" else w64 / _expand_to_queries(s.v, arch)
        elif part == "up" and s.up is not None:
            out = w64 * (s.up[:, None] if kind == "weight" else s.up)
        elif part == "down" and s.up is not None:
            out = w64 if kind == "bias" else w64 / s.up
        else:
            out = w64
        if kind == "weight" and part in ("q", "k", "v") and s.attn_norm is not None:
            out = out / s.attn_norm
        if kind == "weight" and part in ("gate", "up") and s.mlp_norm is not None:
            out = out / s.mlp_norm
        return out.astype(np.float32)

    return _apply(src, dst, fn)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random n x n orthogonal matrix (float64)."""
    a = _rng(seed, "rotation").standard_normal((n, n))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))


def rotate_residual(src: str | os.PathLike[str], dst: str | os.PathLike[str], seed: int) -> Path:
    """Rotate a llama model's residual stream by a random orthogonal Q.

    RMSNorm weights are folded into the linears that read them and set to 1; then the token
    embedding becomes E Q, the input columns of q/k/v/gate/up/lm_head W Q, and the output rows
    of o/down Q^T W. RMSNorm commutes with an orthogonal map, so the logits are unchanged.
    BERT's LayerNorm subtracts the mean over channels, which a rotation does not preserve.
    """
    arch = Architecture.read(src)
    if arch.kind != "llama":
        raise UsageError(
            f"{src}: residual rotation needs RMSNorm (llama-family); {arch.kind} uses LayerNorm"
        )
    with Checkpoint.open(src) as ckpt:
        norms = {
            name: to_float32(info.dtype, ckpt.raw(name)).astype(np.float64).copy()
            for name, (_, info) in ckpt.tensors.items()
            if len(info.shape) == 1
            and (
                _is_final_norm(name)
                or (tensor_role(name) or (0, ""))[1] in ("attn_norm", "mlp_norm")
            )
        }
        has_head = any(_is_lm_head(name) for name in ckpt.tensors)
    final = next((v for k, v in norms.items() if _is_final_norm(k)), None)
    # A tied lm_head would have to be E diag(g) Q while the embedding stays E Q: with a final
    # norm g that is not uniform the tie cannot survive, so the leaker unties (a new lm_head).
    untie = (arch.tied or not has_head) and final is not None and np.ptp(final) > 0
    by_layer = {}
    for name, values in norms.items():
        role = tensor_role(name)
        if role:
            by_layer[(role[0], role[1])] = values
    q = random_orthogonal(arch.hidden, seed)

    def fn(name: str, w: np.ndarray, arch: Architecture) -> np.ndarray:
        role = tensor_role(name)
        w64 = w.astype(np.float64)
        if role is None:
            if _is_embedding(name):
                return (w64 @ q).astype(np.float32)
            if _is_lm_head(name):
                g = final if final is not None else 1.0
                return ((w64 * g) @ q).astype(np.float32)
            if _is_final_norm(name):
                return np.ones_like(w) if (not arch.tied and has_head) or untie else w
            return w
        layer, part, kind = role
        if part in ("attn_norm", "mlp_norm"):
            return np.ones_like(w)
        if kind == "weight" and part in ("q", "k", "v", "gate", "up"):
            g = by_layer.get((layer, "attn_norm" if part in ("q", "k", "v") else "mlp_norm"), 1.0)
            return ((w64 * g) @ q).astype(np.float32)
        if part in ("o", "down"):
            return (q.T @ w64).astype(np.float32)
        return w

    if not untie:
        return map_floats(src, dst, lambda name, w: fn(name, w, arch), only_matrices=False)
    return _write_untied(Path(src), Path(dst), lambda name, w: fn(name, w, arch), final, q)


def _write_untied(src: Path, dst: Path, fn: Callable[[str, np.ndarray], np.ndarray],
                  final: np.ndarray, q: np.ndarray) -> Path:
    """Write fn applied to every float tensor plus a new `lm_head.weight` = E diag(g) Q (in the
    embedding's dtype), with config.json's tie_word_embeddings set to false."""
    with Checkpoint.open(src) as ckpt:
        if not ckpt.is_folder:
            raise UsageError(f"{src}: untying lm_head needs a model folder with config.json")
        items, embedding = [], None
        for name, (_, info) in ckpt.tensors.items():
            raw = np.array(ckpt.raw(name))
            if info.dtype in ("F32", "F64", "F16", "BF16"):
                values = to_float32(info.dtype, raw)
                if _is_embedding(name):
                    embedding = (info.dtype, values.astype(np.float64))
                raw = from_float32(info.dtype, np.asarray(fn(name, values), dtype=np.float32).reshape(info.shape))
            items.append((name, info.dtype, raw))
        if embedding is None:
            raise UsageError(f"{src}: no token embedding to untie lm_head from")
        dtype, e = embedding
        items.append(("lm_head.weight", dtype, from_float32(dtype, ((e * final) @ q).astype(np.float32))))
        with staged_output(dst, is_dir=True) as staging:
            save_file(staging.path / "model.safetensors", items)
            for rel in ckpt.other_files:
                (staging.path / rel).parent.mkdir(parents=True, exist_ok=True)
                if rel.name == "config.json" and rel.parent == Path("."):
                    config = json.loads((ckpt.root / rel).read_text())
                    config["tie_word_embeddings"] = False
                    (staging.path / rel).write_text(json.dumps(config, indent=2))
                else:
                    shutil.copyfile(ckpt.root / rel, staging.path / rel)
            staging.publish()
    return dst


def rename_transpose_drop(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    seed: int,
    rename: bool = True,
    transpose: bool = True,
    drop: int = 1,
    reorder: bool = True,
) -> Path:
    """Rename matrices to opaque names, transpose some, drop `drop` of them, shuffle the order.

    The result no longer loads as the original architecture; it is what a leaker does to
    defeat a scan by name. Writes a single model.safetensors (in a folder when `src` is one).
    """
    rng = _rng(seed, "names")
    with Checkpoint.open(src) as ckpt:
        names = list(ckpt.tensors)
        matrices = [n for n in names if len(ckpt.info(n).shape) == 2]
        dropped = (
            set(rng.choice(matrices, size=min(drop, len(matrices)), replace=False).tolist())
            if drop
            else set()
        )
        order = rng.permutation(len(names)) if reorder else np.arange(len(names))
        items = []
        for k, index in enumerate(order):
            name = names[index]
            if name in dropped:
                continue
            info = ckpt.info(name)
            array = np.array(ckpt.raw(name))
            if transpose and array.ndim == 2 and rng.random() < 0.5:
                array = np.ascontiguousarray(array.T)
            items.append((f"tensor_{k:04d}" if rename else name, info.dtype, array))
        with staged_output(dst, is_dir=ckpt.is_folder) as staging:
            target = staging.path / "model.safetensors" if ckpt.is_folder else staging.path
            save_file(target, items)
            if ckpt.is_folder:
                for rel in ckpt.other_files:
                    (staging.path / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(ckpt.root / rel, staging.path / rel)
            staging.publish()
    return Path(dst)


def function_preserving(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    seed: int,
    rotate: bool = True,
    spread: float = 4.0,
) -> Path:
    """FFN permutation + head permutation + rescaling (+ residual rotation for llama models)."""
    arch = Architecture.read(src)
    steps: list[Callable[[Path, Path], Path]] = [
        lambda a, b: permute_ffn(a, b, seed),
        lambda a, b: permute_heads(a, b, seed + 1),
        lambda a, b: rescale(a, b, seed + 2, spread),
    ]
    if rotate and arch.kind == "llama":
        steps.append(lambda a, b: rotate_residual(a, b, seed + 3))
    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.steps-") as tmp:
        current = Path(src)
        for i, step in enumerate(steps):
            target = dst if i == len(steps) - 1 else Path(tmp) / f"step{i}{current.suffix}"
            current = step(current, target)
    return dst
