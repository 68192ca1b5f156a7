"""MLX quantized folders: our dequantization against mlx.core.dequantize, bit for bit (fixtures
written by real MLX 0.32, tests/data/make_mlx_fixtures.py), and malformed folders refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from weightmark.errors import FormatError
from weightmark.formats import open_suspect
from weightmark.formats.mlx import MLXModel
from weightmark.formats.safetensors import load_file, save_file
from weightmark.kernels.affine import dequantize_affine
from weightmark.kernels.bits import BF16, F16, FLOAT

DATA = Path(__file__).resolve().parents[1] / "data" / "mlx"
GRIDS = {"f32": FLOAT, "f16": F16, "bf16": BF16}


def _decode(bits: np.ndarray, dt: str) -> np.ndarray:
    if dt == "f16":
        return bits.view(np.float16).astype(np.float32)
    if dt == "bf16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.astype(np.float32)


def _same_bits(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    assert ours.shape == theirs.shape, what
    diff = np.flatnonzero(ours.view(np.uint32) != theirs.astype(np.float32).view(np.uint32))
    assert diff.size == 0, f"{what}: {diff.size} elements differ, first at {diff[:5]}"


def _cases() -> list[str]:
    with np.load(DATA / "affine.npz") as data:
        return sorted({key.rsplit(".", 1)[0] for key in data.files})


@pytest.fixture(scope="module")
def affine() -> dict[str, np.ndarray]:
    with np.load(DATA / "affine.npz") as data:
        return {key: data[key] for key in data.files}


def test_fixtures_cover_every_width_and_group(affine: dict[str, np.ndarray]) -> None:
    cases = _cases()
    assert {f"{b}_{g}_f32" for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)} <= set(cases)
    assert any(c.endswith("_bf16") for c in cases) and any(c.endswith("_f16") for c in cases)


@pytest.mark.parametrize("case", _cases())
def test_kernel_equals_mlx_dequantize(case: str, affine: dict[str, np.ndarray]) -> None:
    bits, group, dt = case.split("_")
    q = affine[f"{case}.q"]
    scales, biases = _decode(affine[f"{case}.scales"], dt), _decode(affine[f"{case}.biases"], dt)
    cols = scales.shape[1] * int(group)
    ours = dequantize_affine(q, scales, biases, int(bits), int(group), cols, GRIDS[dt])
    _same_bits(ours, affine[f"{case}.dequant"], case)


def test_mlx_lm_folder_with_overrides_matches_mlx() -> None:
    with np.load(DATA / "folder.npz") as data:
        expected = {key: data[key] for key in data.files}
    with open_suspect(DATA / "folder") as suspect:
        assert isinstance(suspect, MLXModel) and suspect.format == "mlx"
        metas = suspect.tensors()
        assert set(metas) == set(expected)
        assert metas["model.layers.0.self_attn.q_proj.weight"].source_dtype == "mlx-int4-g64"
        assert metas["model.layers.0.mlp.down_proj.weight"].source_dtype == "mlx-int8-g32"
        assert metas["model.layers.1.mlp.down_proj.weight"].source_dtype == "BF16"
        assert metas["model.embed_tokens.weight"].shape == (64, 128)
        for name in metas:
            _same_bits(suspect.load(name), expected[name], name)


def _copy(tmp_path: Path) -> Path:
    return shutil.copytree(DATA / "folder", tmp_path / "mlx")


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bits": 7}, "quantization.bits 7 is not one of"),
        ({"group_size": 48}, "quantization.group_size 48 is not one of"),
        ({"mode": "mxfp4"}, "mode 'mxfp4' is not supported"),
        ({"bits": 3}, "holds 16 words per row, but 2 groups of 64 at 3 bits need 12"),
        ({"model.layers.0.self_attn.q_proj": False}, "is packed but config.json's quantization marks the layer unquantized"),
        ({"model.layers.0.self_attn.q_proj": "yes"}, "must be an object or false"),
    ],
)
def test_config_that_does_not_fit_the_weights_is_refused(tmp_path: Path, changes: dict, message: str) -> None:
    folder = _copy(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(FormatError, match=message.replace(".", r"\.").replace("(", r"\(")):
        open_suspect(folder)


def _rewrite(folder: Path, change) -> None:  # noqa: ANN001
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(folder / "model.safetensors", [(name, dtype, raw) for name, (dtype, raw) in tensors.items()])


def test_missing_biases_are_refused(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    _rewrite(folder, lambda t: t.pop("lm_head.biases"))
    with pytest.raises(FormatError, match="companion tensor 'lm_head.biases' is missing"):
        open_suspect(folder)


def test_biases_unlike_the_scales_are_refused(tmp_path: Path) -> None:
    folder = _copy(tmp_path)

    def shrink(t: dict) -> None:
        dtype, raw = t["lm_head.biases"]
        t["lm_head.biases"] = (dtype, np.ascontiguousarray(raw[:, :1]))

    _rewrite(folder, shrink)
    with pytest.raises(FormatError, match=r"is BF16 \[64, 1\] but the scales are BF16 \[64, 2\]"):
        open_suspect(folder)


def test_leftover_scales_are_refused(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    _rewrite(folder, lambda t: t.__setitem__("model.norm.scales", t["lm_head.scales"]))
    with pytest.raises(FormatError, match="belongs to no complete mlx layer"):
        open_suspect(folder)


def test_float_mlx_folder_is_plain_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "float"
    folder.mkdir()
    save_file(folder / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": np.ones((8, 8), np.float32)})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization": {"group_size": 64, "bits": 4}}))
    with open_suspect(folder) as suspect:
        assert suspect.format == "safetensors"


def test_test_writer_packs_like_mlx(affine: dict[str, np.ndarray]) -> None:
    """The folder writer the traceability tests use packs codes exactly as mlx.core.quantize."""
    from tests.formats.mlx_writer import pack_codes

    for bits in (2, 3, 4, 5, 6, 8):
        words = affine[f"{bits}_64_f32.q"]
        rows, cols = words.shape[0], 256
        stream = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, : cols * bits]
        codes = (stream.reshape(rows, cols, bits).astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(-1)
        assert np.array_equal(pack_codes(codes, bits), words), bits


def test_mixture_of_experts_3d_weights_match_mlx() -> None:
    """switch_mlp experts are [experts, out, in]: every expert's rows are decoded as MLX does,
    the canonical shape keeps the expert axis (experts are carriers like any linear weight)."""
    with np.load(DATA / "moe.npz") as data:
        expected = {key: data[key] for key in data.files}
    with open_suspect(DATA / "moe") as suspect:
        metas = suspect.tensors()
        assert metas["model.layers.0.mlp.switch_mlp.down_proj.weight"].shape == (4, 64, 96)
        assert metas["model.layers.0.mlp.switch_mlp.gate_proj.weight"].source_dtype == "mlx-int4-g32"
        assert set(metas) == set(expected)
        for name in metas:
            _same_bits(suspect.load(name), expected[name], name)
