"""ONNX initializers read without the onnx package: values equal onnx.numpy_helper.to_array
(fixtures written by onnx 1.23, tests/data/make_onnx_fixtures.py), every storage form, external
data confined to the model's folder, and malformed protobuf refused with a one-line error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.formats.onnx_writer import field, model_proto, save_onnx, tensor_proto
from weightmark.errors import FormatError
from weightmark.formats import open_suspect
from weightmark.formats.onnx import ONNXModel

DATA = Path(__file__).resolve().parents[1] / "data" / "onnx"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(DATA / "expected.npz") as data:
        return {key: data[key] for key in data.files}


def test_every_storage_form_matches_onnx(expected: dict[str, np.ndarray]) -> None:
    with open_suspect(DATA / "model.onnx") as suspect:
        assert isinstance(suspect, ONNXModel) and suspect.format == "onnx"
        metas = suspect.tensors()
        assert set(metas) == set(expected)  # position_ids (int64) is no weight
        assert metas["bf16.weight"].source_dtype == "BF16" and metas["int32_data.weight"].source_dtype == "F16"
        for name, want in expected.items():
            got = suspect.load(name)
            assert got.shape == want.shape and got.tobytes() == want.tobytes(), name


def test_external_data_matches_onnx(expected: dict[str, np.ndarray]) -> None:
    with open_suspect(DATA / "external.onnx") as suspect:
        assert suspect.load("fc.weight").tobytes() == expected["fc.weight"].tobytes()


def test_folder_with_one_model(tmp_path: Path, expected: dict[str, np.ndarray]) -> None:
    shutil.copy(DATA / "external.onnx", tmp_path / "external.onnx")
    shutil.copy(DATA / "external.onnx.data", tmp_path / "external.onnx.data")
    with open_suspect(tmp_path) as suspect:
        assert suspect.load("fc.weight").tobytes() == expected["fc.weight"].tobytes()


def test_our_writer_round_trips(tmp_path: Path) -> None:
    w = np.random.default_rng(1).standard_normal((40, 24)).astype(np.float32)
    with open_suspect(save_onnx(tmp_path / "m.onnx", {"a.weight": ("F32", w)})) as suspect:
        assert suspect.load("a.weight").tobytes() == w.tobytes()


def _external(location: str, offset: int = 0, length: int = 64) -> bytes:
    entries = b"".join(field(13, field(1, k.encode()) + field(2, v.encode()))
                       for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))))
    dims = field(1, bytes([4, 4]))
    return field(1, 8) + field(7, field(5, dims + field(2, 1) + field(8, b"w") + entries + field(14, 1)))


@pytest.mark.parametrize(
    ("case", "content", "message"),
    [
        ("escaping location", _external("../secret.bin"), "is not a file name in the model's folder"),
        ("absolute location", _external("/etc/passwd"), "is not a file name in the model's folder"),
        ("missing external file", _external("absent.bin"), "external file 'absent.bin' is missing"),
        ("external length", _external("w.bin", length=60), "external length 60 at offset 0"),
        ("external past the end", _external("w.bin", offset=8), "run past the end of the file"),
        ("raw_data length", model_proto([tensor_proto("w", "F32", np.zeros((4, 4), np.float32), raw=b"\0" * 60)]),
         "raw is 60 bytes, shape [4, 4] of F32 needs 64"),
        ("field past its message", field(1, 8) + b"\x3a\x7f" + b"\0" * 10, "runs past its message"),
        ("group wire type", field(1, 8) + field(7, b"\x2b"), "wire type 3"),
        ("no graph", field(1, 8) + field(2, b"x"), "has no graph"),
        ("duplicate initializer", model_proto([tensor_proto("w", "F32", np.zeros(2, np.float32))] * 2),
         "initializer 'w' appears twice"),
    ],
)
def test_malformed_models_are_refused(case: str, content: bytes, message: str, tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        open_suspect(path)
    assert str(tmp_path) in str(info.value), case
