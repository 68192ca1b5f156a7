"""Mixture-of-Experts layouts: which tensors are a layer's experts and router, and GGUF's fused experts.

Experts are carriers like any linear weight. Hugging Face checkpoints store one 2-D tensor per
expert and projection (Mixtral `block_sparse_moe.experts.E.w1/w2/w3`, Qwen-MoE and DeepSeek
`mlp.experts.E.gate_proj/up_proj/down_proj`), with the router as `block_sparse_moe.gate` or
`mlp.gate` ([n_expert, hidden]); shared experts are plain linears. GGUF stores each layer's
experts fused into one 3-D tensor `blk.N.ffn_{gate,up,down}_exps.weight` (GGUF dims
[in, out, n_expert], canonical [n_expert, out, in]); expert e's bytes are the e-th contiguous
slice of it (every row of a block type is whole blocks).

Decision: the GGUF reader shows a fused tensor as its n_expert per-expert 2-D tensors under the
per-expert Hugging Face names (`split_fused_experts`), with the source name `<gguf name>[e]`. A
GGUF MoE leak then matches a model registered from Hugging Face safetensors carrier by carrier,
a GGUF MoE base registers per-expert carriers with per-row scales, and its copies are stamped
in place slice by slice. `fuse_experts` is the converter's direction (per-expert -> fused), for
writing GGUF MoE files.

Hugging Face checkpoints may also fuse a layer's experts into 3-D tensors
(`mlp.experts.gate_up_proj` [n_expert, hidden, 2 * intermediate] and `mlp.experts.down_proj`
[n_expert, intermediate, hidden] in gpt-oss, Llama-4 and fused Qwen3-MoE layouts; routers
`mlp.router.weight` or `feed_forward.router.weight`). Each expert's slice is then a carrier unit
of its own, `<fused name>[e]`, with the slice's shape and one row scale per slice row
(`fused_expert_units`); readers of safetensors resolve such a unit name to the e-th contiguous
slice. Stored slices keep their own orientation (no per-expert Hugging Face name claims them).

The order of experts is a function-preserving permutation (each expert with its router row):
`expert_layers` groups the tensors that move together, and `weightmark.align` undoes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from weightmark.formats.gguf import GGUFTensorInfo

__all__ = [
    "ExpertLayer",
    "expert_layers",
    "expert_unit",
    "fuse_experts",
    "fused_expert_units",
    "is_fused_experts",
    "is_fused_hf_experts",
    "moe_forward",
    "split_fused_experts",
]

_EXPERT = re.compile(
    r"^(?P<block>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp|feed_forward))"
    r"\.experts\.(?P<expert>\d+)\.(?P<part>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_ROUTER = re.compile(
    r"^(?P<block>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp|feed_forward))\.(?:gate|router)\.weight$"
)
# Fused Hugging Face expert tensors [n_expert, ., .] and their per-expert units "<name>[e]".
_FUSED_ST = re.compile(
    r"^(?P<block>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp|feed_forward))"
    r"\.experts\.(?P<part>gate_up_proj|gate_proj|up_proj|down_proj)(?:\.weight)?$"
)
_UNIT = re.compile(r"^(?P<fused>.+)\[(?P<expert>\d{1,6})\]$")
_FUSED = re.compile(r"^blk\.\d+\.ffn_(?:gate|up|down)_exps\.weight$")
# Fused Hugging Face names (as gguf's tensor map lists them) that have a per-expert form: the
# expert index goes after ".experts".
_FUSED_HF = re.compile(r"^(?P<head>.*\.experts)\.(?P<part>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
# Input projections (rows are the expert's units): compared first when matching experts.
_INPUT_PARTS = ("w1", "gate_proj", "w3", "up_proj", "gate_up_proj")


@dataclass
class ExpertLayer:
    """One MoE layer: expert index -> projection -> tensor name, and the router's name."""

    layer: int
    block: str  # e.g. "model.layers.3.block_sparse_moe"
    experts: dict[int, dict[str, str]] = field(default_factory=dict)
    router: str | None = None

    @property
    def count(self) -> int:
        return len(self.experts)

    @property
    def complete(self) -> bool:
        """Experts numbered 0..E-1, each with the same projections."""
        parts = {frozenset(p) for p in self.experts.values()}
        return sorted(self.experts) == list(range(self.count)) and len(parts) == 1

    @property
    def parts(self) -> list[str]:
        """The projections of an expert, input projections first."""
        have = set(next(iter(self.experts.values()), {}))
        return sorted(have, key=lambda p: (p not in _INPUT_PARTS, _INPUT_PARTS.index(p) if p in _INPUT_PARTS else 0, p))

    def names(self) -> list[str]:
        out = [name for parts in self.experts.values() for name in parts.values()]
        return out + ([self.router] if self.router else [])


def expert_layers(names: Iterable[str]) -> dict[int, ExpertLayer]:
    """Per layer, its routed experts and router among `names` (layers with >= 2 experts)."""
    found: dict[tuple[int, str], ExpertLayer] = {}
    routers: dict[tuple[int, str], str] = {}
    for name in names:
        unit = _UNIT.match(name)
        fused = _FUSED_ST.match(unit["fused"]) if unit is not None else None
        if (m := _EXPERT.match(name)) is not None or fused is not None:
            m = m or fused
            assert m is not None
            key = (int(m["layer"]), m["block"])
            layer = found.setdefault(key, ExpertLayer(key[0], key[1]))
            expert = int(unit["expert"]) if fused is not None and unit is not None else int(m["expert"])
            layer.experts.setdefault(expert, {})[m["part"]] = name
        elif (m := _ROUTER.match(name)) is not None:
            routers[(int(m["layer"]), m["block"])] = name
    out: dict[int, ExpertLayer] = {}
    for key, layer in sorted(found.items()):
        layer.router = routers.get(key)
        if layer.count >= 2 and layer.complete and key[0] not in out:
            out[key[0]] = layer
    return out


def is_fused_hf_experts(name: str, shape: Sequence[int]) -> bool:
    """A Hugging Face fused expert tensor: `...experts.gate_up_proj` / `down_proj`, 3-D, with
    at least two experts on its first axis."""
    return len(shape) == 3 and shape[0] >= 2 and _FUSED_ST.match(name) is not None


def expert_unit(name: str, expert: int) -> str:
    """The carrier name of one expert's slice of a fused tensor: `<name>[e]`."""
    return f"{name}[{expert}]"


def fused_expert_units(name: str, shape: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(unit name, slice shape) of every expert of a fused Hugging Face expert tensor."""
    return [(expert_unit(name, e), tuple(shape[1:])) for e in range(shape[0])]


def split_unit(name: str) -> tuple[str, int] | None:
    """(fused tensor name, expert) of a unit name `<name>[e]`; None for any other name."""
    m = _UNIT.match(name)
    return None if m is None else (m["fused"], int(m["expert"]))


def is_fused_experts(gguf_name: str, ne: Sequence[int]) -> bool:
    """A GGUF `blk.N.ffn_*_exps.weight` tensor with dims [in, out, n_expert]."""
    return len(ne) == 3 and _FUSED.match(gguf_name) is not None


def _per_expert_names(candidates: Sequence[str], expert: int, prefer_mlp: bool) -> tuple[str, ...]:
    names = []
    for fused in candidates:
        if (m := _FUSED_HF.match(fused)) is not None:
            names.append(f"{m['head']}.{expert}.{m['part']}.weight")
    # Qwen-MoE and DeepSeek name their experts mlp.experts.E.{gate,up,down}_proj, Mixtral (a
    # llama-architecture GGUF) block_sparse_moe.experts.E.w1/w2/w3; transformers' names first.
    own = ".mlp.experts." if prefer_mlp else ".block_sparse_moe.experts."
    names.sort(key=lambda n: (own not in n, not n.startswith("model.layers.")))
    return tuple(dict.fromkeys(names))


def split_fused_experts(info: GGUFTensorInfo, architecture: str | None) -> list[GGUFTensorInfo]:
    """A fused GGUF expert tensor as its per-expert 2-D tensors (contiguous byte slices).

    Each gets the per-expert Hugging Face name (Mixtral's `block_sparse_moe.experts.E.w1` for
    llama-architecture files, `mlp.experts.E.gate_proj` for qwen*/deepseek* ones; every
    convention gguf knows is among its candidates) and the source name `<gguf name>[E]`.
    """
    cols, rows, n_expert = info.ne
    step = info.nbytes // n_expert
    prefer_mlp = bool(architecture) and architecture.startswith(("qwen", "deepseek"))
    out = []
    for e in range(n_expert):
        candidates = _per_expert_names(info.candidates, e, prefer_mlp)
        name = candidates[0] if candidates else f"{info.name}[{e}]"
        out.append(replace(info, source_name=f"{info.source_name}[{e}]", name=name, candidates=candidates,
                           ne=(cols, rows), begin=info.begin + e * step, nbytes=step))
    return out


def fuse_experts(tensors: Sequence[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """Per-expert Hugging Face tensors -> one [n_expert, out, in] tensor per layer and projection
    (named `...experts.<part>.weight`, which gguf's tensor map knows), as llama.cpp's converter
    stacks them; everything else passes through in order (each fused tensor where its first
    expert was)."""
    layers = expert_layers(name for name, _ in tensors)
    owner: dict[str, tuple[int, str]] = {}
    for layer in layers.values():
        for parts in layer.experts.values():
            for part, name in parts.items():
                owner[name] = (layer.layer, part)
    values = dict(tensors)
    out: list[tuple[str, np.ndarray]] = []
    done: set[tuple[int, str]] = set()
    for name, array in tensors:
        key = owner.get(name)
        if key is None:
            out.append((name, array))
            continue
        if key in done:
            continue
        done.add(key)
        layer = layers[key[0]]
        stacked = np.stack([values[layer.experts[e][key[1]]] for e in range(layer.count)])
        out.append((f"{layer.block}.experts.{key[1]}.weight", stacked))
    return out


def moe_forward(x: np.ndarray, router: np.ndarray, experts: Sequence[dict[str, np.ndarray]], top_k: int,
                gate: str = "w1", up: str = "w3", down: str = "w2") -> np.ndarray:
    """A reference MoE block on tokens x [n, hidden]: softmax router, top-k experts, SwiGLU each,
    weighted by the renormalised top-k probabilities (Mixtral's rule)."""
    logits = x @ router.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        weights = probs[t, top[t]] / probs[t, top[t]].sum()
        for w, e in zip(weights, top[t], strict=True):
            h = x[t] @ experts[e][gate].T
            h = h / (1.0 + np.exp(-h)) * (x[t] @ experts[e][up].T)
            out[t] += w * (h @ experts[e][down].T)
    return out
