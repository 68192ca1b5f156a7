"""llamafiles: the GGUF stored in an executable's appended zip is read in place, value for value
as the same GGUF on its own; compressed or ambiguous members are refused."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from weightmark.errors import FormatError
from weightmark.formats import open_suspect
from weightmark.formats.gguf import GGUFModel, write_gguf
from weightmark.formats.llamafile import LlamafileModel

HPARAMS = {"attention.head_count": 4, "attention.head_count_kv": 2, "context_length": 64,
           "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0}


def tiny_gguf(path: Path, qtype: str = "Q8_0") -> Path:
    rng = np.random.default_rng(4)
    tensors = [
        ("model.embed_tokens.weight", rng.standard_normal((64, 64)).astype(np.float32)),
        ("model.layers.0.self_attn.q_proj.weight", rng.standard_normal((64, 64)).astype(np.float32)),
        ("model.layers.0.self_attn.k_proj.weight", rng.standard_normal((32, 64)).astype(np.float32)),
        ("model.layers.0.mlp.up_proj.weight", rng.standard_normal((96, 64)).astype(np.float32)),
        ("model.norm.weight", np.ones(64, np.float32)),
    ]
    write_gguf(path, "llama", tensors, qtype, HPARAMS)
    return path


def make_llamafile(path: Path, gguf_path: Path, *, member: str = "model.gguf", compress: bool = False,
                   extra: dict[str, bytes] | None = None) -> Path:
    """A fake APE executable stub with a zip appended (as llamafile's zipalign does), the GGUF
    stored uncompressed."""
    stub = b"MZqFpD='\n" + bytes(np.random.default_rng(0).integers(0, 256, 4099, dtype=np.uint8)) + b"\nexit 1\n"
    path.write_bytes(stub)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(zipfile.ZipInfo(".args"), "-m\nmodel.gguf\n")
        info = zipfile.ZipInfo(member)
        archive.writestr(info, gguf_path.read_bytes(),
                         compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
        for name, data in (extra or {}).items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return path


def test_llamafile_reads_like_its_gguf(tmp_path: Path) -> None:
    plain = tiny_gguf(tmp_path / "model.gguf")
    llamafile = make_llamafile(tmp_path / "model.llamafile", plain)
    assert llamafile.read_bytes()[:2] == b"MZ"
    with open_suspect(llamafile) as suspect, GGUFModel(plain) as ref:
        assert isinstance(suspect, LlamafileModel) and suspect.format == "llamafile"
        assert suspect.member.offset > 4099 and suspect.member.name == "model.gguf"
        assert suspect.tensors() == ref.tensors()
        for name in ref.tensors():
            a, b = suspect.load(name), ref.load(name)
            assert a.tobytes() == b.tobytes(), name
            assert bytes(suspect.raw(name)) == bytes(ref.raw(name)), name


def test_vision_projector_is_not_taken_for_the_model(tmp_path: Path) -> None:
    plain = tiny_gguf(tmp_path / "model.gguf")
    llamafile = make_llamafile(tmp_path / "llava.llamafile", plain,
                               extra={"mmproj-f16.gguf": (tmp_path / "model.gguf").read_bytes()[:100]})
    with open_suspect(llamafile) as suspect:
        assert suspect.member.name == "model.gguf"


def test_two_model_members_are_refused(tmp_path: Path) -> None:
    plain = tiny_gguf(tmp_path / "model.gguf")
    llamafile = make_llamafile(tmp_path / "two.llamafile", plain, extra={"other.gguf": plain.read_bytes()})
    with pytest.raises(FormatError, match="holds 2 GGUF members"):
        open_suspect(llamafile)


def test_compressed_gguf_member_is_refused(tmp_path: Path) -> None:
    plain = tiny_gguf(tmp_path / "model.gguf")
    llamafile = make_llamafile(tmp_path / "z.llamafile", plain, compress=True)
    with pytest.raises(FormatError, match="zip member 'model.gguf' is compressed"):
        open_suspect(llamafile)


def test_truncated_gguf_member_is_a_gguf_error(tmp_path: Path) -> None:
    """The GGUF reader sees only the member's bytes: a header claiming more runs out at its end."""
    plain = tiny_gguf(tmp_path / "model.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(plain.read_bytes()[:200])
    llamafile = make_llamafile(tmp_path / "cut.llamafile", cut, extra={"padding": b"\0" * 100_000})
    with pytest.raises(FormatError, match=f"{llamafile.name}: .*cannot fit in the 176 bytes after the header"):
        open_suspect(llamafile)
