"""Readers that extract straight from storage (`extract_into`: GGUF blocks and F32/F16/BF16, GPTQ,
NF4) give exactly the sums `extract` gives on `load`, and a scan reports exactly the same either
way, also when some carriers have no such path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import StampedLab, make_stamped_lab
from tests.formats.quant_reference import bnb4_layer, gptq_layer
from tests.test_attacks_functional import make_tiny_llama
from tests.test_quantized_traceability import FORMATS, quantize_folder
from weightmark.canonical import as_2d, to_float32
from weightmark.formats import open_suspect
from weightmark.formats._quantized import _QuantizedReader
from weightmark.formats.gguf import GGUFModel, write_gguf
from weightmark.formats.safetensors import Checkpoint
from weightmark.kernels import FLOAT, extract
from weightmark.kernels.quantize import quantize

CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
HPARAMS = {"attention.head_count": 4, "attention.head_count_kv": 2, "context_length": 256,
           "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0}  # fmt: skip
CODE_LENGTH = 64
LEAKS = ("gguf-Q4_0", "gguf-Q8_0", "gguf-Q4_K", "gguf-Q6_K", "gguf-F16", "gguf-BF16", "gptq-4bit-g128",
         "gptq-4bit-actorder", "bnb-nf4", "bnb-nf4-dq")  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> StampedLab:
    work = tmp_path_factory.mktemp("fused")
    base = make_tiny_llama(work / "base", seed=5, config=CONFIG)
    return make_stamped_lab(work, base, "F32")


def float_tensors(path: Path) -> list[tuple[str, np.ndarray]]:
    with Checkpoint.open(path) as ckpt:
        return [(n, to_float32(i.dtype, ckpt.raw(n)).copy()) for n, (_, i) in ckpt.tensors.items()]


def leak(lab: StampedLab, kind: str, folder: Path) -> Path:
    """Copy 1 as a third party would quantize it."""
    copy = lab.copies[1]
    if kind.startswith("gguf-"):
        qtype = kind.removeprefix("gguf-")
        path = folder / f"{kind}.gguf"
        if qtype in ("Q4_K", "Q6_K"):  # our own K-quant encoder (the gguf package has none)
            def encode(name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
                # Q4_K leaves down_proj in F32, as mixed files do
                plain = w.ndim != 2 or (qtype == "Q4_K" and "down_proj" in name)
                return ("F32", w) if plain else (qtype, quantize(qtype, w))

            write_gguf(path, "llama", float_tensors(copy), "F32", HPARAMS, encode=encode)
        else:
            write_gguf(path, "llama", float_tensors(copy), qtype, HPARAMS)
        return path
    rng = np.random.default_rng(7)
    makers: dict[str, tuple[Any, dict[str, Any]]] = {
        "gptq-4bit-g128": FORMATS["gptq-4bit-g128"],
        "gptq-4bit-actorder": (lambda p, w: gptq_layer(p, w, 4, 64, True, False, False, rng),
                               {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True,
                                "sym": False}),
        "bnb-nf4": FORMATS["bnb-nf4"],
        "bnb-nf4-dq": (lambda p, w: bnb4_layer(p, w, "nf4", 64, True), FORMATS["bnb-nf4"][1]),
    }  # fmt: skip
    make, config = makers[kind]
    return quantize_folder(copy, folder / kind, make, config)


@pytest.fixture(scope="module")
def leaks(lab: StampedLab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fused-leaks")
    return {kind: leak(lab, kind, folder) for kind in LEAKS}


@pytest.mark.parametrize("kind", LEAKS)
def test_extract_into_equals_extract_of_load(lab: StampedLab, leaks: dict[str, Path], kind: str) -> None:
    base = dict(float_tensors(lab.base))
    suspect = open_suspect(leaks[kind])
    fused_names, plain_names = [], []
    try:
        for name, meta in suspect.tensors().items():
            if len(meta.shape) != 2 or name not in base:
                continue
            rows = meta.shape[0]
            scale = np.linspace(0.5, 2.0, rows).astype(np.float32)
            scale[rows // 3] = 0.0  # a skipped row
            for reference in (None, as_2d(base[name])):
                got = np.zeros(CODE_LENGTH), np.zeros(CODE_LENGTH)
                if not suspect.extract_into(name, reference, FLOAT, scale, 11, *got):
                    # only a quantized folder's float pass-throughs (embeddings, lm_head) go without
                    assert not kind.startswith("gguf-") and meta.source_dtype == "F32", name
                    plain_names.append(name)
                    continue
                want = np.zeros(CODE_LENGTH), np.zeros(CODE_LENGTH)
                extract(as_2d(suspect.load(name)), FLOAT, reference, FLOAT, scale, 11, *want)
                np.testing.assert_array_equal(got[0], want[0], err_msg=name)
                np.testing.assert_array_equal(got[1], want[1], err_msg=name)
                assert np.any(got[1] > 0), name
            if name not in plain_names:
                fused_names.append(name)
    finally:
        suspect.close()
    projections = {n.rsplit(".", 2)[-2] for n in fused_names if ".layers." in n}
    assert {"gate_proj", "up_proj", "down_proj", "o_proj", "v_proj", "q_proj", "k_proj"} <= projections


def _outcome(report: Any) -> dict[str, Any]:
    return {
        "candidates": [(c.licensee_id, c.score, c.log10_p) for c in report.candidates],
        "presence": (report.presence_statistic, report.presence_log10_p),
        "z": report.z.tolist(),
        "used": (report.carriers_used, report.elements_used, report.carriers_skipped),
        "signal": report.carrier_signal,
    }


@pytest.mark.parametrize(("kind", "blind"), [("gguf-Q4_K", False), ("gptq-4bit-g128", True), ("bnb-nf4", False)])
def test_scan_report_is_the_same_with_and_without_the_fused_path(
    lab: StampedLab, leaks: dict[str, Path], kind: str, blind: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = GGUFModel if kind.startswith("gguf-") else _QuantizedReader
    fused_calls = []
    original = reader.extract_into

    def counting(self: Any, name: str, *args: Any) -> bool:
        # as if down_proj were stored in a type without a kernel: it must take load + extract
        done = "down_proj" not in name and original(self, name, *args)
        fused_calls.append(done)
        return done

    monkeypatch.setattr(reader, "extract_into", counting)
    fused = lab.lab.scan(leaks[kind], blind=blind)
    assert len(fused_calls) == fused.carriers_used >= 15
    assert fused_calls.count(False) == 2
    monkeypatch.setattr(reader, "extract_into", lambda *_args: False)
    before = lab.lab.scan(leaks[kind], blind=blind)
    assert _outcome(fused) == _outcome(before)
    if not blind:
        assert fused.accused and fused.accused[0].licensee_id == lab.ids[1]
