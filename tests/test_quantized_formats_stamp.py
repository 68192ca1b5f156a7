"""Copies stamped straight into GPTQ, AWQ, compressed-tensors and bitsandbytes NF4 folders:
read back by our readers, traced against the float base and against the unstamped quantized
reference, sharing every scale across licensees, and accusing nobody when unstamped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import LICENSEES, run_cli
from weightmark import Lab
from weightmark.errors import InputFileError, UsageError
from weightmark.formats import open_suspect
from weightmark.formats.packed_write import PACKED_FORMATS
from weightmark.formats.quantized import AWQ_ORDER, NF4_CODE
from weightmark.formats.safetensors import Checkpoint, load_file, save_file
from weightmark.kernels.quantize_int import affine_codes, codebook_codes, pack_fields
from weightmark.quantized_stamp import parse_format, write_reference_copy

LIMIT = -12.0
HIDDEN, INTER, LAYERS, VOCAB = 256, 768, 2, 512
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTER)}  # fmt: skip
# names of the tensors that hold codes (everything else in a layer is a frozen parameter)
CODE_TENSORS = (".qweight", ".weight_packed", ".weight")


def _bf16(values: np.ndarray) -> np.ndarray:
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_llama_base(folder: Path, dtype: str = "BF16") -> Path:
    """A small llama-like checkpoint (random weights, BF16 or F32) with config.json and a tokenizer."""
    rng = np.random.default_rng(7)
    folder.mkdir()

    def tensor(*shape: int, std: float = 0.02) -> np.ndarray:
        values = rng.standard_normal(shape).astype(np.float32) * np.float32(std)
        return _bf16(values) if dtype == "BF16" else values

    items = [("model.embed_tokens.weight", dtype, tensor(VOCAB, HIDDEN))]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        items.append((f"{p}.input_layernorm.weight", dtype, tensor(HIDDEN, std=0.1)))
        for module, shape in LINEARS.items():
            items.append((f"{p}.{module}.weight", dtype, tensor(*shape)))
        items.append((f"{p}.post_attention_layernorm.weight", dtype, tensor(HIDDEN, std=0.1)))
    items += [("model.norm.weight", dtype, tensor(HIDDEN, std=0.1)), ("lm_head.weight", dtype, tensor(VOCAB, HIDDEN))]
    save_file(folder / "model.safetensors", items)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16" if dtype == "BF16" else "float32"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    return folder


class QLab:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.base = write_llama_base(work / "base")
        self.lab = Lab.init(work / "lab", passphrase=None)
        self.lab.register_model(self.base, name="tiny")
        self.ids = [self.lab.add_licensee(name, cc).id for name, cc in LICENSEES]


@pytest.fixture(scope="module")
def qlab(tmp_path_factory: pytest.TempPathFactory) -> QLab:
    return QLab(tmp_path_factory.mktemp("packed"))


def _frozen_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every stored tensor of a quantized folder that is no code tensor nor a float carrier."""
    tensors = load_file(folder / "model.safetensors")
    names = {name for name in tensors if name.endswith((".qweight", ".weight_packed"))}
    names |= {name[: -len(".absmax")] for name in tensors if name.endswith(".weight.absmax")}
    return {name: array for name, (dtype, array) in tensors.items()
            if name not in names and not (dtype in ("F32", "BF16") and array.ndim == 2)}  # fmt: skip


def _strip_floats(src: Path, dst: Path) -> Path:
    """The folder with every float 2-D weight dropped: only quantized layers can carry a mark."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    kept = [(name, dtype, array) for name, (dtype, array) in tensors.items()
            if not (name.endswith(".weight") and dtype in ("F32", "BF16", "F16") and array.ndim == 2)]  # fmt: skip
    save_file(dst / "model.safetensors", kept)
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    return dst


@pytest.mark.parametrize("fmt", list(PACKED_FORMATS))
def test_directly_stamped_packed_copies_are_traced(qlab: QLab, fmt: str, tmp_path: Path) -> None:
    spec = PACKED_FORMATS[fmt]
    reference = write_reference_copy(qlab.base, tmp_path / "reference", fmt)
    copies = []
    for i, lid in enumerate(qlab.ids):
        out = tmp_path / f"copy-{i}"
        issued = qlab.lab.stamp("tiny", lid, out, fmt=fmt)
        assert issued.output_format == spec.output_format and issued.variant == f"quantized:{fmt}"
        assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer_config.json"}
        copies.append(out)
    for path in (reference, *copies):
        model = open_suspect(path)
        try:
            assert model.format == spec.output_format
            metas = model.tensors()
            quantized = [m for m in metas.values() if m.source_dtype not in ("F32", "BF16")]
            assert len(quantized) == LAYERS * len(LINEARS)
            assert metas["model.embed_tokens.weight"].source_dtype == "BF16"
            assert metas["lm_head.weight"].source_dtype == "BF16"
        finally:
            model.close()
    for lid, copy in zip(qlab.ids, copies, strict=True):
        for ref in (None, reference):
            report = qlab.lab.scan(copy, reference=ref)
            best = report.candidates[0]
            print(f"{fmt} vs {'float base' if ref is None else 'quantized reference'}: "
                  f"S {best.score:.1f}, log10 fw p {best.log10_family_wise_p:.1f}")
            assert report.format == spec.output_format
            assert [c.licensee_id for c in report.accused] == [lid]
            assert report.accused[0].log10_family_wise_p <= LIMIT
    assert qlab.lab.scan(reference, model_name="tiny").accused == []
    # licensees' copies share every scale, zero point, absmax and index; only codes differ
    frozen = [_frozen_tensors(path) for path in (reference, *copies)]
    assert frozen[0] and all(f.keys() == frozen[0].keys() for f in frozen)
    for other in frozen[1:]:
        for name, array in frozen[0].items():
            np.testing.assert_array_equal(other[name], array, err_msg=name)
    # the quantized layers alone carry the mark (floats stripped from copy and reference)
    stripped = _strip_floats(copies[1], tmp_path / "stripped")
    stripped_ref = _strip_floats(reference, tmp_path / "stripped-ref")
    report = qlab.lab.scan(stripped, model_name="tiny", reference=stripped_ref)
    print(f"{fmt} quantized layers only: S {report.candidates[0].score:.1f}")
    assert [c.licensee_id for c in report.accused] == [qlab.ids[1]]
    assert report.accused[0].log10_family_wise_p <= LIMIT


def test_config_and_layout_follow_the_tools(qlab: QLab, tmp_path: Path) -> None:
    """Config fields the loaders key on, and layouts by shape, for every format."""
    expect = {
        "gptq:4bit-g128": ("gptq", {"qweight": ("I32", [HIDDEN // 8, INTER]), "qzeros": ("I32", [2, INTER // 8]),
                                    "scales": ("F16", [2, INTER]), "g_idx": ("I32", [HIDDEN])}),
        "awq:4bit-g128": ("awq", {"qweight": ("I32", [HIDDEN, INTER // 8]), "qzeros": ("I32", [2, INTER // 8]),
                                  "scales": ("F16", [2, INTER])}),
        "ct:w4a16": ("compressed-tensors", {"weight_packed": ("I32", [INTER, HIDDEN // 8]),
                                            "weight_scale": ("BF16", [INTER, 2]), "weight_shape": ("I64", [2])}),
        "ct:w8a16": ("compressed-tensors", {"weight_packed": ("I32", [INTER, HIDDEN // 4]),
                                            "weight_scale": ("BF16", [INTER, 2]), "weight_shape": ("I64", [2])}),
        "bnb:nf4": ("bitsandbytes", {"weight": ("U8", [INTER * HIDDEN // 2, 1]),
                                     "weight.absmax": ("F32", [INTER * HIDDEN // 64]),
                                     "weight.quant_map": ("F32", [16])}),
    }  # fmt: skip
    for fmt, (method, parts) in expect.items():
        out = write_reference_copy(qlab.base, tmp_path / fmt.replace(":", "-"), fmt)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == method
        with Checkpoint.open(out) as ckpt:
            for part, (dtype, shape) in parts.items():
                info = ckpt.info(f"model.layers.0.mlp.up_proj.{part}")
                assert (info.dtype, list(info.shape)) == (dtype, shape), (fmt, part)
            assert "model.layers.0.mlp.up_proj.weight" not in ckpt.tensors or method == "bitsandbytes"
            assert ckpt.info("model.norm.weight").dtype == "BF16"
    assert json.loads((tmp_path / "gptq-4bit-g128" / "quantize_config.json").read_text())["bits"] == 4
    with Checkpoint.open(tmp_path / "bnb-nf4") as ckpt:
        blob = ckpt.raw("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4").tobytes()
    assert json.loads(blob) == {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [INTER, HIDDEN]}
    ct = json.loads((tmp_path / "ct-w8a16" / "config.json").read_text())["quantization_config"]
    assert ct["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert ct["ignore"] == ["lm_head"]


def test_unknown_or_unusable_formats_are_refused(qlab: QLab, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        parse_format("gptq:3bit-g64")
    assert parse_format("ct:w4a16") == "ct:w4a16"
    # no config.json beside the base: refused, nothing written
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((qlab.base / "model.safetensors").read_bytes())
    with pytest.raises(InputFileError, match="config.json"):
        write_reference_copy(lone / "model.safetensors", tmp_path / "out", "awq:4bit-g128")
    assert not (tmp_path / "out").exists()


def test_cli_unknown_format_exits_2(qlab: QLab, tmp_path: Path) -> None:
    r = run_cli("stamp", "tiny", "--licensee", qlab.ids[0], "--out", str(tmp_path / "x"),
                "--format", "gptq:3bit-g64", home=qlab.work / "lab")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown --format" in lines[0] and "gptq:4bit-g128" in lines[0]
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ kernels against numpy twins


def _affine_twin(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int, bits: int) -> np.ndarray:
    s = np.repeat(scale, group, axis=1)
    z = np.repeat(zero, group, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(x / s) + z
    return np.clip(np.nan_to_num(q, nan=0.0), 0, (1 << bits) - 1).astype(np.uint8)


def _pack_twin(u: np.ndarray, bits: int, order: tuple[int, ...]) -> np.ndarray:
    per = 32 // bits
    cols = -(-u.shape[1] // per) * per
    padded = np.zeros((u.shape[0], cols), np.uint64)
    padded[:, : u.shape[1]] = u
    fields = padded.reshape(u.shape[0], -1, per)[:, :, list(order)]
    words = (fields << (np.arange(per, dtype=np.uint64) * bits)).sum(axis=2)
    return words.astype(np.uint32).view(np.int32)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), groups=st.integers(1, 3), group=st.sampled_from([1, 4, 8]),
       bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**31))
def test_affine_codes_match_numpy(rows: int, groups: int, group: int, bits: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, groups * group)) * 10).astype(np.float32)
    x.flat[0] = 0.5  # a tie: rounds to even
    scale = rng.uniform(0.01, 2, (rows, groups)).astype(np.float32)
    scale.flat[0] = 1.0
    zero = rng.integers(0, 1 << bits, (rows, groups)).astype(np.float32)
    np.testing.assert_array_equal(affine_codes(x, scale, zero, group, bits), _affine_twin(x, scale, zero, group, bits))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(1, 40), bits=st.sampled_from([4, 8]), awq=st.booleans(),
       seed=st.integers(0, 2**31))
def test_pack_fields_match_numpy(rows: int, cols: int, bits: int, awq: bool, seed: int) -> None:
    order = AWQ_ORDER if awq and bits == 4 else tuple(range(32 // bits))
    u = np.random.default_rng(seed).integers(0, 1 << bits, (rows, cols)).astype(np.uint8)
    np.testing.assert_array_equal(pack_fields(u, bits, order), _pack_twin(u, bits, order))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_codebook_codes_match_numpy(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    blocks = -(-n // 64)
    absmax = np.array([np.abs(x[i * 64:(i + 1) * 64]).max() for i in range(blocks)], np.float32)
    absmax[-1] = 0 if n % 3 == 0 else absmax[-1]  # a zero block gets the code of 0.0
    norm = x / np.repeat(absmax, 64)[:n] if absmax.all() else np.divide(
        x, np.repeat(absmax, 64)[:n], out=np.zeros_like(x), where=np.repeat(absmax, 64)[:n] > 0)
    codes = np.abs(norm[:, None] - NF4_CODE[None, :]).argmin(axis=1).astype(np.uint8)
    codes[np.repeat(absmax, 64)[:n] == 0] = 7
    if n % 2:
        codes = np.append(codes, 0)
    want = (codes[0::2] << 4) | codes[1::2]
    np.testing.assert_array_equal(codebook_codes(x, absmax, 64, NF4_CODE), want)


def test_kernels_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="inf or NaN"):
        affine_codes(np.array([[np.nan, 1]], np.float32), np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32), 2, 4)
    with pytest.raises(ValueError, match="does not divide"):
        affine_codes(np.ones((1, 3), np.float32), np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32), 2, 4)
    with pytest.raises(ValueError, match="4-bit maximum"):
        pack_fields(np.full((1, 8), 16, np.uint8), 4)


# ------------------------------------------------------------------ the real MiniLM


def test_minilm_stamped_as_gptq_is_traced(minilm: Path, tmp_path: Path) -> None:
    lab = Lab.init(tmp_path / "lab", passphrase=None)
    lab.register_model(minilm, name="minilm")
    ids = [lab.add_licensee(name, cc).id for name, cc in LICENSEES]
    copy = tmp_path / "copy"
    lab.stamp("minilm", ids[2], copy, fmt="gptq:4bit-g128")
    reference = write_reference_copy(minilm, tmp_path / "reference", "gptq:4bit-g128")
    with Checkpoint.open(copy) as ckpt:  # the 36 block linears quantized, the pooler kept float
        assert sum(name.endswith(".qweight") for name in ckpt.tensors) == 36
        assert ckpt.info("pooler.dense.weight").dtype == "F32"
    assert json.loads((copy / "config.json").read_text())["quantization_config"]["sym"] is True
    for ref in (None, reference):
        report = lab.scan(copy, reference=ref)
        print(f"MiniLM GPTQ vs {'float base' if ref is None else 'quantized reference'}: "
              f"S {report.candidates[0].score:.1f}, log10 fw p {report.candidates[0].log10_family_wise_p:.1f}")
        assert [c.licensee_id for c in report.accused] == [ids[2]]
        assert report.accused[0].log10_family_wise_p <= LIMIT
    assert lab.scan(reference, model_name="minilm").accused == []
