"""open_suspect recognises formats by content, whatever the file is called, through the table
of sniffers every reader module registers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.formats.test_llamafile import make_llamafile, tiny_gguf
from weightmark.formats import _SNIFFERS, load_formats, open_suspect, register_sniffer
from weightmark.formats.safetensors import save_file

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sniff")
    gguf = tiny_gguf(root / "t.gguf")
    plain = root / "plain.safetensors"
    save_file(plain, {"w": np.ones((4, 4), np.float32)})
    return {
        "gguf": gguf,
        "pytorch": DATA / "torch" / "state_dict.pt",
        "onnx": DATA / "onnx" / "model.onnx",
        "llamafile": make_llamafile(root / "t.llamafile", gguf),
        "safetensors": plain,
    }


@pytest.mark.parametrize("disguise", [".safetensors", ".bin", ".pt", ".gguf", ".onnx", ".exe", ""])
@pytest.mark.parametrize("kind", ["gguf", "pytorch", "onnx", "llamafile", "safetensors"])
def test_format_follows_content_not_name(kind: str, disguise: str, samples: dict[str, Path], tmp_path: Path) -> None:
    renamed = tmp_path / f"suspect{disguise}"
    shutil.copy(samples[kind], renamed)
    with open_suspect(renamed) as suspect:
        assert suspect.format == kind


def test_every_reader_module_registers_itself() -> None:
    load_formats()
    assert [name for _order, name, _ in _SNIFFERS] == [
        "gguf", "llamafile", "pytorch", "onnx", "mlx", "not-safetensors", "quantized-safetensors"]


def test_a_sniffer_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="'pytorch' is already registered"):
        register_sniffer("pytorch", 99)(lambda path: None)


def _padded_safetensors(path: Path, header_length: int) -> Path:
    """A valid safetensors file whose header (padded with spaces, as the format allows) has
    exactly `header_length` bytes, so its first bytes are chosen by the test."""
    data = np.arange(16, dtype=np.float32).tobytes()
    header = b'{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}'
    path.write_bytes(header_length.to_bytes(8, "little") + header.ljust(header_length, b" ") + data)
    return path


@pytest.mark.parametrize(
    ("imitates", "header_length"),
    [("a protocol-2 pickle", 0x0280), ("an ONNX ModelProto", 0x3A_05_08), ("a bare pickle", 0x0580)],
)
def test_safetensors_whose_length_imitates_another_magic(imitates: str, header_length: int, tmp_path: Path) -> None:
    path = _padded_safetensors(tmp_path / "model.bin", header_length)
    with open_suspect(path) as suspect:
        assert suspect.format == "safetensors", imitates
        assert suspect.load("w").ravel().tolist() == list(range(16))
