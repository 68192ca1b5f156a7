"""Our torch-free PyTorch reader against torch itself (needs torch; run by `make peers`).

torch.save of the real MiniLM state dict (F32 and BF16) and, when transformers is installed,
`save_pretrained(safe_serialization=False)` sharded with `max_shard_size` (transformers 5 writes
safetensors regardless; then its state dict is sharded into .bin files with huggingface_hub's
splitter, as transformers 4 did): every tensor our
reader gives equals what torch.load gives, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import minilm_dir
from weightmark.formats import open_suspect
from weightmark.formats.pytorch import PyTorchModel

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _expected(tensor: object) -> np.ndarray:
    return tensor.detach().float().contiguous().numpy()  # type: ignore[attr-defined]


def _compare(ours: PyTorchModel, theirs: dict[str, object]) -> int:
    floats = {k: v for k, v in theirs.items() if v.dtype.is_floating_point}  # type: ignore[attr-defined]
    assert set(ours.tensors()) == set(floats)
    for name, tensor in floats.items():
        got, want = ours.load(name), _expected(tensor)
        assert got.shape == want.shape, name
        differ = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
        assert differ.size == 0, f"{name}: {differ.size} elements differ, first at {differ[:5]}"
    return len(floats)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_save_of_minilm(dtype: str, tmp_path: Path) -> None:
    state = safetensors_torch.load_file(str(minilm_dir() / "model.safetensors"))
    state = {k: v.to(getattr(torch, dtype)) if v.dtype.is_floating_point else v for k, v in state.items()}
    # a strided view and a shared storage too, as real checkpoints have (tied embeddings ...)
    first = next(k for k, v in state.items() if v.ndim == 2)
    state["tied.weight"] = state[first]
    state["transposed.weight"] = state[first].t()
    path = tmp_path / "minilm.pt"
    torch.save(state, path)
    with open_suspect(path) as ours:
        assert isinstance(ours, PyTorchModel)
        assert _compare(ours, torch.load(path, weights_only=True)) == len(state) - sum(
            1 for v in state.values() if not v.dtype.is_floating_point)


def test_save_pretrained_bin_shards(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    script = textwrap.dedent(f"""
        import sys
        try:
            from transformers import AutoModel
        except ImportError:
            sys.exit(77)
        model = AutoModel.from_pretrained({str(minilm_dir())!r})
        try:
            model.save_pretrained({str(out)!r}, safe_serialization=False, max_shard_size="20MB")
        except TypeError as exc:
            print(exc, file=sys.stderr)
            sys.exit(78)
    """)
    # -P and another cwd: the repository's kernels/ folder must not shadow the `kernels` package
    r = subprocess.run([sys.executable, "-P", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if r.returncode == 77:
        pytest.skip("transformers is not installed")
    if r.returncode == 78:
        pytest.skip(f"this transformers cannot write .bin checkpoints: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    shards = sorted(out.glob("pytorch_model-*.bin"))
    if not shards:
        # transformers 5 writes safetensors whatever safe_serialization says: shard its state
        # dict into .bin files the way transformers 4 did (huggingface_hub's splitter, torch.save)
        shards = _bin_shards_like_transformers4(out)
    assert len(shards) >= 2 and (out / "pytorch_model.bin.index.json").is_file(), sorted(os.listdir(out))
    theirs: dict[str, object] = {}
    for shard in shards:
        theirs.update(torch.load(shard, weights_only=True))
    with open_suspect(out) as ours:
        assert ours.format == "pytorch"
        assert _compare(ours, theirs) > 50


def _bin_shards_like_transformers4(out: Path) -> list[Path]:
    hub = pytest.importorskip("huggingface_hub")
    state: dict[str, object] = {}
    for file in sorted(out.glob("*.safetensors")):
        state.update(safetensors_torch.load_file(str(file)))
        file.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    split = hub.split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                                   max_shard_size="20MB")
    for file, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, out / file)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return sorted(out / file for file in split.filename_to_tensors)
