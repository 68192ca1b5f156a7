"""Write the PyTorch checkpoints under tests/data/torch/ with real torch, with torch's own values.

Run once, in an environment with torch (not a dependency of weightmark), and optionally the
fickling attack tool (its injected checkpoints become fixtures too):

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy fickling==0.1.12
    /tmp/torchenv/bin/python -P tests/data/make_torch_fixtures.py

Every `.npz` holds what torch itself says the tensors are: `NAME` the float32 values
(`tensor.float()`), `NAME.bits` the stored bit patterns (bf16/f16 as uint16) or values.
The outputs are small (tens of KB) and committed; the tests read them without torch.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "torch"


def expected(state: dict[str, torch.Tensor], path: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.dtype.is_floating_point:
            arrays[name] = tensor.float().numpy()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            arrays[f"{name}.bits"] = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            arrays[f"{name}.bits"] = tensor.contiguous().view(torch.uint8).numpy()
        else:
            arrays[f"{name}.bits"] = tensor.contiguous().numpy()
    np.savez_compressed(path, **arrays)


def state_dict() -> None:
    """Every dtype, a strided view with a storage offset, two tensors sharing a storage, a
    Parameter, an integer buffer, and the `_metadata` a module's state_dict() carries."""
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(48, 96)
    state = lin.state_dict()  # OrderedDict with _metadata
    state["f32"] = torch.randn(64, 80, generator=gen)
    state["f16"] = torch.randn(64, 80, generator=gen).half()
    state["bf16"] = torch.randn(64, 80, generator=gen).bfloat16()
    state["f64"] = torch.randn(8, 9, generator=gen).double()
    state["i64"] = torch.arange(17, dtype=torch.int64)
    base = torch.randn(40 * 30, generator=gen).bfloat16()
    state["view"] = base[7:].view(-1)[: 30 * 36].view(30, 36)[2:, ::3]  # offset 7 + 72, stride (36, 3)
    state["view_t"] = torch.randn(20, 24, generator=gen).t()  # transposed: stride (1, 24)
    shared = torch.randn(100, 64, generator=gen).half()
    state["shared_a"] = shared[:50]
    state["shared_b"] = shared[50:]
    state["param"] = torch.nn.Parameter(torch.randn(32, 32, generator=gen))
    state["f8"] = torch.randn(16, 16, generator=gen).to(torch.float8_e4m3fn)
    assert state["view"].storage_offset() > 0 and not state["view"].is_contiguous()
    assert state["shared_a"].untyped_storage().data_ptr() == state["shared_b"].untyped_storage().data_ptr()
    torch.save(state, OUT / "state_dict.pt")
    expected(state, OUT / "state_dict.npz")


def sharded() -> None:
    """A save_pretrained-style pair: pytorch_model-0000N-of-00002.bin plus the index."""
    folder = OUT / "sharded"
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(2)
    state = collections.OrderedDict(
        (f"model.layers.{i}.mlp.up_proj.weight", torch.randn(64, 32, generator=gen).bfloat16()) for i in range(4)
    )
    state["model.norm.weight"] = torch.ones(32)
    names = list(state)
    shards = [names[:2], names[2:]]
    weight_map = {}
    for k, part in enumerate(shards, 1):
        file = f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    expected(state, OUT / "sharded.npz")


def meta_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's convert_llama_weights_to_hf permutation (Meta rows -> HF rows)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta() -> None:
    """Meta's layout: consolidated.00.pth + params.json; expected values under HF names."""
    folder = OUT / "meta"
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(3)
    dim, heads, kv_heads, hidden = 64, 4, 2, 96
    head_dim = dim // heads
    state = {
        "tok_embeddings.weight": torch.randn(50, dim, generator=gen).bfloat16(),
        "norm.weight": torch.ones(dim).bfloat16(),
        "output.weight": torch.randn(50, dim, generator=gen).bfloat16(),
        "layers.0.attention.wq.weight": torch.randn(dim, dim, generator=gen).bfloat16(),
        "layers.0.attention.wk.weight": torch.randn(kv_heads * head_dim, dim, generator=gen).bfloat16(),
        "layers.0.attention.wv.weight": torch.randn(kv_heads * head_dim, dim, generator=gen).bfloat16(),
        "layers.0.attention.wo.weight": torch.randn(dim, dim, generator=gen).bfloat16(),
        "layers.0.feed_forward.w1.weight": torch.randn(hidden, dim, generator=gen).bfloat16(),
        "layers.0.feed_forward.w2.weight": torch.randn(dim, hidden, generator=gen).bfloat16(),
        "layers.0.feed_forward.w3.weight": torch.randn(hidden, dim, generator=gen).bfloat16(),
        "layers.0.attention_norm.weight": torch.ones(dim).bfloat16(),
        "layers.0.ffn_norm.weight": torch.ones(dim).bfloat16(),
    }
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps({"dim": dim, "n_layers": 1, "n_heads": heads,
                                                    "n_kv_heads": kv_heads, "norm_eps": 1e-5}))
    hf_names = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "layers.0.attention.wq.weight": "model.layers.0.self_attn.q_proj.weight",
        "layers.0.attention.wk.weight": "model.layers.0.self_attn.k_proj.weight",
        "layers.0.attention.wv.weight": "model.layers.0.self_attn.v_proj.weight",
        "layers.0.attention.wo.weight": "model.layers.0.self_attn.o_proj.weight",
        "layers.0.feed_forward.w1.weight": "model.layers.0.mlp.gate_proj.weight",
        "layers.0.feed_forward.w2.weight": "model.layers.0.mlp.down_proj.weight",
        "layers.0.feed_forward.w3.weight": "model.layers.0.mlp.up_proj.weight",
        "layers.0.attention_norm.weight": "model.layers.0.input_layernorm.weight",
        "layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    }
    hf = {}
    for name, tensor in state.items():
        if name.endswith("wq.weight"):
            tensor = meta_permute(tensor, heads)
        elif name.endswith("wk.weight"):
            tensor = meta_permute(tensor, kv_heads)
        hf[hf_names[name]] = tensor
    expected(hf, OUT / "meta.npz")


def refused() -> None:
    """Files that must be refused: the legacy pickle format and a TorchScript archive."""
    torch.save({"w": torch.ones(3)}, OUT / "legacy.pt", _use_new_zipfile_serialization=False)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    torch.jit.save(torch.jit.script(Tiny()), OUT / "torchscript.pt")


FICKLING_MARKER = "/tmp/weightmark-fickling-pwned"


def fickling_samples() -> None:
    """Malicious checkpoints made by a real attack tool (fickling, if installed): its
    "insertion" (exec spliced into data.pkl) and "combination" (an object whose reduce runs
    the payload, saved with torch.save) injections into a genuine torch.save file."""
    try:
        from fickling.pytorch import PyTorchModelWrapper
    except ImportError:
        print("fickling is not installed: no fickling samples written")
        return
    payload = f"open({FICKLING_MARKER!r}, 'w').close()"
    clean = OUT / "fickling_clean.pt"
    torch.save({"w": torch.ones(4, 4)}, clean)
    for injection in ("insertion", "combination"):
        PyTorchModelWrapper(clean).inject_payload(payload, OUT / f"fickling_{injection}.pt", injection=injection)
    clean.unlink()


def main() -> None:
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    state_dict()
    sharded()
    meta()
    refused()
    fickling_samples()
    (OUT / "VERSION").write_text(f"written by torch {torch.__version__} with tests/data/make_torch_fixtures.py\n")


if __name__ == "__main__":
    main()
