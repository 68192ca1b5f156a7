"""Leaks in the formats people post are traced: a stamped MiniLM copy re-saved as a torch.save
zip pickle, re-quantized to MLX 4-bit (group 64) and 8-bit, exported as ONNX initializers and
wrapped in a llamafile is
traced to its licensee at family-wise p <= 1e-12; the same leaks of the unstamped base accuse
nobody."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import StampedLab, make_stamped_lab
from tests.formats.mlx_writer import save_mlx_folder
from tests.formats.onnx_writer import save_onnx
from tests.formats.test_llamafile import make_llamafile
from tests.formats.torch_writer import save_state_dict
from weightmark.formats.safetensors import load_file

LIMIT = -12.0  # log10 of the family-wise p-value a trace must reach


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> StampedLab:
    return make_stamped_lab(tmp_path_factory.mktemp("leak-formats"), minilm, "F32", collusion=1)


def _floats(folder: Path) -> dict[str, np.ndarray]:
    return {name: raw for name, (dtype, raw) in load_file(folder / "model.safetensors").items() if dtype == "F32"}


def _as_torch(src: Path, out: Path) -> Path:
    return save_state_dict(out, {name: ("F32", value) for name, value in _floats(src).items()})


def _as_mlx(src: Path, out: Path, bits: int, group: int, scale_dtype: str) -> Path:
    config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    return save_mlx_folder(out, _floats(src), bits, group, scale_dtype, config)


LEAKS = {
    "torch-zip": lambda src, out: _as_torch(src, out / "pytorch_model.bin"),
    "onnx": lambda src, out: save_onnx(out / "model.onnx", {n: ("F32", v) for n, v in _floats(src).items()}),
    "mlx-4bit-g64": lambda src, out: _as_mlx(src, out / "mlx4", 4, 64, "BF16"),
    "mlx-8bit-g64": lambda src, out: _as_mlx(src, out / "mlx8", 8, 64, "F32"),
}
FORMATS = {"torch-zip": "pytorch", "onnx": "onnx", "mlx-4bit-g64": "mlx", "mlx-8bit-g64": "mlx"}


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_leak_is_traced_to_its_licensee(lab: StampedLab, leak: str, tmp_path: Path) -> None:
    which = sorted(LEAKS).index(leak) % len(lab.ids)
    path = LEAKS[leak](lab.copies[which], tmp_path)
    report = lab.lab.scan(path)
    best = report.candidates[0]
    print(f"{leak}: score {best.score:.1f}, log10 family-wise p {best.log10_family_wise_p:.1f}")
    assert report.format == FORMATS[leak]
    assert [c.licensee_id for c in report.accused] == [lab.ids[which]]
    assert report.accused[0].log10_family_wise_p <= LIMIT


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_leak_of_the_base_accuses_nobody(lab: StampedLab, leak: str, tmp_path: Path) -> None:
    path = LEAKS[leak](lab.base, tmp_path)
    report = lab.lab.scan(path, model_name="minilm")
    assert report.format == FORMATS[leak]
    assert report.accused == []


def test_llamafile_of_a_stamped_gguf_copy_is_traced(lab: StampedLab, tmp_path: Path) -> None:
    lid = lab.ids[2]
    lab.lab.stamp("minilm", lid, tmp_path / "shipped.gguf", fmt="gguf:Q8_0")
    llamafile = make_llamafile(tmp_path / "minilm.llamafile", tmp_path / "shipped.gguf")
    (tmp_path / "shipped.gguf").unlink()
    report = lab.lab.scan(llamafile)
    assert report.format == "llamafile"
    assert [c.licensee_id for c in report.accused] == [lid]
    assert report.accused[0].log10_family_wise_p <= LIMIT
