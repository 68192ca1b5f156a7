"""Tests for the GPTQ, AWQ, compressed-tensors and bitsandbytes readers against our own quantizers."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightmark.errors import FormatError
from weightmark.formats import open_suspect
from weightmark.formats.quantized import fp8_e4m3_table, fp8_e5m2_table, open_quantized
from weightmark.formats.safetensors import save_file

from .quant_reference import (
    E4M3_TABLE,
    Layer,
    Tensor,
    awq_layer,
    bnb4_layer,
    bnb8_layer,
    ct_fp8_layer,
    ct_int_layer,
    e4m3_reference,
    float_extras,
    gptq_layer,
    pack_words,
    write_checkpoint,
)

OUT, IN = 48, 128
PREFIXES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def rng_for(*key: Any) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in key])


def weights(rng: np.random.Generator, out: int = OUT, inp: int = IN) -> np.ndarray:
    return rng.standard_normal((out, inp)).astype(np.float32)


def check_reads(path: Path, layers: list[Layer], floats: dict[str, np.ndarray], fmt: str) -> None:
    """The reader lists every layer and float tensor and loads exactly the represented values."""
    model = open_quantized(path)
    assert model is not None
    try:
        assert model.format == fmt
        metas = model.tensors()
        assert set(metas) == {layer.name for layer in layers} | set(floats)
        for layer in layers:
            meta = metas[layer.name]
            assert meta.shape == layer.expected.shape
            got = model.load(layer.name)
            assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
            np.testing.assert_array_equal(got, layer.expected)
        for name, expected in floats.items():
            assert metas[name].source_dtype in ("F32", "F16", "BF16")
            got = model.load(name)
            assert got.dtype == np.float32 and got.flags.writeable
            np.testing.assert_array_equal(got, expected)
    finally:
        model.close()


def build(
    tmp_path: Path,
    layers: list[Layer],
    config: dict[str, Any] | None,
    shards: int = 1,
    config_name: str = "config.json",
) -> tuple[Path, dict[str, np.ndarray]]:
    extra, floats = float_extras(rng_for("floats", tmp_path.name), IN)
    tensors: list[Tensor] = [t for layer in layers for t in layer.tensors] + extra
    folder = write_checkpoint(tmp_path / "model", tensors, config, shards, config_name)
    return folder, floats


def lone_file(tmp_path: Path, layers: list[Layer]) -> tuple[Path, dict[str, np.ndarray]]:
    extra, floats = float_extras(rng_for("floats", tmp_path.name), IN)
    path = tmp_path / "lone.safetensors"
    save_file(path, [t for layer in layers for t in layer.tensors] + extra)
    return path, floats


# ------------------------------------------------------------------------------------ GPTQ


def gptq_config(bits: int, group: int, act_order: bool, v2: bool, sym: bool = True) -> dict[str, Any]:
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "desc_act": act_order,
        "sym": sym,
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
    }


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_gptq(tmp_path: Path, v2: bool, act_order: bool, bits: int, sym: bool) -> None:
    rng = rng_for("gptq", v2, act_order, bits, sym)
    layers = [gptq_layer(p, weights(rng), bits, 32, act_order, v2, sym, rng) for p in PREFIXES]
    folder, floats = build(tmp_path, layers, gptq_config(bits, 32, act_order, v2, sym))
    check_reads(folder, layers, floats, "gptq")


def test_gptq_act_order_is_really_permuted(tmp_path: Path) -> None:
    rng = rng_for("gptq-perm")
    layer = gptq_layer(PREFIXES[0], weights(rng), 4, 32, True, False, False, rng)
    assert not np.array_equal(layer.extra["g_idx"], np.arange(IN) // 32)
    folder, _floats = build(tmp_path, [layer], gptq_config(4, 32, True, False, False))
    model = open_quantized(folder)
    assert model is not None
    np.testing.assert_array_equal(model.load(layer.name), layer.expected)
    assert model.tensors()[layer.name].source_dtype == "gptq-int4-g32-gidx"
    model.close()
    # the same tensors without g_idx (groups in input order) give other values: g_idx is used
    path = tmp_path / "no-gidx.safetensors"
    save_file(path, replace(layer.tensors, f"{PREFIXES[0]}.g_idx", None))
    model = open_quantized(path)
    assert model is not None
    assert not np.array_equal(model.load(layer.name), layer.expected)
    model.close()


def test_gptq_v2_from_meta_and_v1_default(tmp_path: Path) -> None:
    rng = rng_for("gptq-meta")
    layer = gptq_layer(PREFIXES[0], weights(rng), 4, 64, False, True, False, rng)
    config = {"quant_method": "gptq", "bits": 4, "group_size": 64, "meta": {"checkpoint_format": "gptq_v2"}}
    folder, floats = build(tmp_path, [layer], config)
    check_reads(folder, [layer], floats, "gptq")
    # the same v2 tensors read as v1 are off by one zero point: the convention matters
    config.pop("meta")
    (folder / "config.json").write_text(json.dumps({"quantization_config": config}))
    model = open_quantized(folder)
    assert model is not None
    assert not np.array_equal(model.load(layer.name), layer.expected)
    model.close()


def test_gptq_channel_group_and_sharded_folder(tmp_path: Path) -> None:
    rng = rng_for("gptq-shards")
    layers = [gptq_layer(p, weights(rng), 4, IN, False, False, True, rng) for p in PREFIXES]
    folder, floats = build(tmp_path, layers, gptq_config(4, -1, False, False), shards=3)
    assert (folder / "model.safetensors.index.json").exists()
    check_reads(folder, layers, floats, "gptq")


def test_gptq_quantize_config_json(tmp_path: Path) -> None:
    rng = rng_for("gptq-qcfg")
    layer = gptq_layer(PREFIXES[0], weights(rng), 4, 32, True, False, True, rng)
    config = {"bits": 4, "group_size": 32, "desc_act": True, "sym": True}
    folder, floats = build(tmp_path, [layer], config, config_name="quantize_config.json")
    check_reads(folder, [layer], floats, "gptq")


def test_gptq_lone_file_from_names(tmp_path: Path) -> None:
    rng = rng_for("gptq-lone")
    layers = [gptq_layer(PREFIXES[0], weights(rng), 8, 32, True, False, False, rng)]
    path, floats = lone_file(tmp_path, layers)
    check_reads(path, layers, floats, "gptq")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bits=st.sampled_from([2, 4, 8]),
    out_words=st.integers(1, 3),
    groups=st.integers(1, 4),
    group_words=st.integers(1, 3),
    act_order=st.booleans(),
    v2=st.booleans(),
    sym=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_gptq_shapes(
    tmp_path_factory: pytest.TempPathFactory,
    bits: int, out_words: int, groups: int, group_words: int, act_order: bool, v2: bool, sym: bool, seed: int,
) -> None:  # fmt: skip
    per = 32 // bits
    group = group_words * per
    rng = np.random.default_rng(seed)
    layer = gptq_layer("m", weights(rng, out_words * per, groups * group), bits, group, act_order, v2, sym, rng)
    folder = write_checkpoint(tmp_path_factory.mktemp("gptq"), layer.tensors, gptq_config(bits, group, act_order, v2))
    check_reads(folder, [layer], {}, "gptq")


# ------------------------------------------------------------------------------------ AWQ


def test_awq(tmp_path: Path) -> None:
    rng = rng_for("awq")
    layers = [awq_layer(p, weights(rng), 32) for p in PREFIXES]
    config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    folder, floats = build(tmp_path, layers, config)
    check_reads(folder, layers, floats, "awq")


def test_awq_lone_file_and_slot_order(tmp_path: Path) -> None:
    rng = rng_for("awq-lone")
    layer = awq_layer(PREFIXES[0], weights(rng), 64)
    path, floats = lone_file(tmp_path, [layer])
    check_reads(path, [layer], floats, "awq")
    # the test's packer puts output ORDER[k] in nibble k: outputs 0..7 -> 0x75316420
    word = pack_words(np.arange(8)[None, :], 4, axis=1, slot_order=[0, 2, 4, 6, 1, 3, 5, 7])[0, 0]
    assert int(np.array([word], dtype=np.int32).view(np.uint32)[0]) == 0x75316420


# ------------------------------------------------------------------------------------ compressed-tensors


def ct_config(fmt: str, weights_args: dict[str, Any], input_activations: Any = None) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"dynamic": False, "observer": "minmax", "actorder": None, **weights_args},
                "input_activations": input_activations,
                "output_activations": None,
            }
        },
    }


@pytest.mark.parametrize(
    ("strategy", "symmetric", "scale_dtype"),
    [
        ("group", True, "BF16"),
        ("group", False, "BF16"),
        ("channel", True, "F16"),
        ("channel", False, "F32"),
        ("tensor", False, "F32"),
    ],
)
def test_ct_pack_quantized_int4(tmp_path: Path, strategy: str, symmetric: bool, scale_dtype: str) -> None:
    rng = rng_for("ct-pack", strategy, symmetric)
    layers = [
        ct_int_layer(p, weights(rng), 4, strategy, 32, symmetric, scale_dtype, packed=True) for p in PREFIXES
    ]
    args = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": 32 if strategy == "group" else None}  # fmt: skip
    folder, floats = build(tmp_path, layers, ct_config("pack-quantized", args))
    check_reads(folder, layers, floats, "compressed-tensors:pack-quantized")
    model = open_quantized(folder)
    assert model is not None
    meta = model.tensors()[layers[0].name]
    model.close()
    assert meta.source_name == f"{PREFIXES[0]}.weight_packed"
    assert meta.source_dtype.startswith("ct-int4-") and meta.source_dtype.endswith("-sym" if symmetric else "-asym")


def test_ct_pack_quantized_padding_and_8bit(tmp_path: Path) -> None:
    rng = rng_for("ct-pad")
    # in_features 100 is not a multiple of 8: the last word of each row is zero-padded
    layer4 = ct_int_layer(PREFIXES[0], weights(rng, 24, 100), 4, "channel", 0, False, "F32", packed=True)
    layer8 = ct_int_layer(PREFIXES[1], weights(rng, 24, 100), 8, "channel", 0, True, "F32", packed=True)
    assert layer4.tensors[0][2].shape == (24, 13)
    path, floats = lone_file(tmp_path, [layer4, layer8])
    check_reads(path, [layer4, layer8], floats, "compressed-tensors:pack-quantized")


def test_ct_pack_quantized_symmetric_offset(tmp_path: Path) -> None:
    # a symmetric int4 code q is stored as q + 8: an all-zero word is eight values of -8
    packed = np.zeros((2, 1), dtype=np.int32)
    scale = np.full((2, 1), 0.5, dtype=np.float32)
    tensors: list[Tensor] = [
        ("m.weight_packed", "I32", packed),
        ("m.weight_shape", "I32", np.array([2, 8], dtype=np.int32)),
        ("m.weight_scale", "F32", scale),
    ]
    folder = write_checkpoint(
        tmp_path / "m", tensors,
        ct_config("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}),
    )  # fmt: skip
    model = open_quantized(folder)
    assert model is not None
    np.testing.assert_array_equal(model.load("m.weight"), np.full((2, 8), -4.0, dtype=np.float32))
    model.close()


@pytest.mark.parametrize(("strategy", "symmetric"), [("channel", True), ("channel", False), ("tensor", True)])
def test_ct_int_quantized_int8(tmp_path: Path, strategy: str, symmetric: bool) -> None:
    rng = rng_for("ct-int8", strategy, symmetric)
    layers = [
        ct_int_layer(p, weights(rng), 8, strategy, 0, symmetric, "BF16", packed=False) for p in PREFIXES
    ]
    args = {"num_bits": 8, "type": "int", "symmetric": symmetric, "strategy": strategy}
    act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    folder, floats = build(tmp_path, layers, ct_config("int-quantized", args, act))
    check_reads(folder, layers, floats, "compressed-tensors:int-quantized")


@pytest.mark.parametrize(("strategy", "scale_dtype"), [("channel", "BF16"), ("tensor", "F32")])
def test_ct_float_quantized_fp8(tmp_path: Path, strategy: str, scale_dtype: str) -> None:
    rng = rng_for("ct-fp8", strategy)
    finite = np.array([c for c in range(256) if (c & 0x7F) != 0x7F])
    layers = [
        ct_fp8_layer(p, rng.choice(finite, size=(OUT, IN)), strategy, scale_dtype, rng) for p in PREFIXES
    ]
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy}
    act = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    folder, floats = build(tmp_path, layers, ct_config("float-quantized", args, act))
    check_reads(folder, layers, floats, "compressed-tensors:float-quantized")


def test_ct_config_groups_by_regex(tmp_path: Path) -> None:
    rng = rng_for("ct-groups")
    q4 = ct_int_layer(PREFIXES[0], weights(rng), 4, "group", 32, True, "BF16", packed=True)
    q8 = ct_int_layer(PREFIXES[1], weights(rng), 8, "channel", 0, False, "F32", packed=True)
    config = ct_config("pack-quantized", {})
    config["config_groups"] = {
        "group_0": {"targets": ["re:.*q_proj$"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                              "strategy": "group", "group_size": 32}},
        "group_1": {"targets": ["re:.*down_proj$"], "weights": {"num_bits": 8, "type": "int",
                                                                 "symmetric": False, "strategy": "channel"}},
    }  # fmt: skip
    folder, floats = build(tmp_path, [q4, q8], config)
    check_reads(folder, [q4, q8], floats, "compressed-tensors:pack-quantized")
    # two groups that both claim every Linear cannot be told apart
    for group in config["config_groups"].values():
        group["targets"] = ["Linear"]
    (folder / "config.json").write_text(json.dumps({"quantization_config": config}))
    assert_format_error(folder, folder / "config.json", "cannot tell which config group")


def test_fp8_e4m3_all_codes(tmp_path: Path) -> None:
    table = fp8_e4m3_table()
    np.testing.assert_array_equal(table, E4M3_TABLE.astype(np.float32))  # NaNs compare equal here
    assert np.isnan(table[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(table, [0x7F, 0xFF])).all()
    # anchors from the OCP FP8 spec: max normal, min normal, min subnormal, one, minus zero
    assert table[0x7E] == 448 and table[0xFE] == -448
    assert table[0x08] == 2.0**-6 and table[0x01] == 2.0**-9 and table[0x38] == 1.0
    assert table[0x80] == 0 and math.copysign(1, table[0x80]) == -1
    positives = table[:0x7F]
    assert np.all(np.diff(positives) > 0)
    # through the reader: a 16 x 16 weight holding every code once, scale 1
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tensors: list[Tensor] = [
        ("m.weight", "F8_E4M3", codes),
        ("m.weight_scale", "F32", np.ones(1, dtype=np.float32)),
    ]
    path = tmp_path / "fp8.safetensors"
    save_file(path, tensors)
    model = open_quantized(path)
    assert model is not None and model.format == "compressed-tensors:float-quantized"
    got = model.load("m.weight").reshape(-1)
    model.close()
    expected = np.array([e4m3_reference(c) for c in range(256)], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)


def test_fp8_e5m2_table() -> None:
    table = fp8_e5m2_table()
    assert table[0x7B] == 57344 and table[0x7C] == np.inf and np.isnan(table[0x7D])
    assert table[0x01] == 2.0**-16 and table[0x3C] == 1.0


# ------------------------------------------------------------------------------------ bitsandbytes


def bnb_config(quant_type: str, double_quant: bool) -> dict[str, Any]:
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
    }


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_4bit(tmp_path: Path, quant_type: str, double_quant: bool) -> None:
    rng = rng_for("bnb4", quant_type, double_quant)
    layers = [
        bnb4_layer(PREFIXES[0], weights(rng), quant_type, 64, double_quant, nested_blocksize=16),
        # 7 x 45 = 315 values: odd count (last byte half used) and a partial last block
        bnb4_layer(PREFIXES[1], weights(rng, 7, 45), quant_type, 64, double_quant, nested_blocksize=2),
    ]
    folder, floats = build(tmp_path, layers, bnb_config(quant_type, double_quant))
    check_reads(folder, layers, floats, f"bitsandbytes-{quant_type}")
    model = open_quantized(folder)
    assert model is not None
    assert model.tensors()[layers[0].name].source_dtype == quant_type + ("-dq" if double_quant else "")
    model.close()


def test_bnb_4bit_high_nibble_first(tmp_path: Path) -> None:
    # one byte 0x0F holds code 0 (-1.0) then code 15 (+1.0) for nf4
    layer = bnb4_layer("m", np.array([[-2.0, 2.0]], dtype=np.float32), "nf4", 64, False)
    assert layer.tensors[0][2].reshape(-1).tolist() == [0x0F]
    path = tmp_path / "one.safetensors"
    save_file(path, layer.tensors)
    model = open_quantized(path)
    assert model is not None
    np.testing.assert_array_equal(model.load("m.weight"), [[-2.0, 2.0]])
    model.close()


def test_bnb_4bit_bf16_quant_storage(tmp_path: Path) -> None:
    # bnb_4bit_quant_storage=bfloat16 keeps the same bytes in a BF16 tensor of half the length
    rng = rng_for("bnb-storage")
    layer = bnb4_layer(PREFIXES[0], weights(rng), "nf4", 64, True, 8)
    name, _dtype, packed = layer.tensors[0]
    layer.tensors[0] = (name, "BF16", packed.reshape(-1).view(np.uint16).reshape(-1, 1))
    config = {**bnb_config("nf4", True), "bnb_4bit_quant_storage": "bfloat16"}
    folder, floats = build(tmp_path, [layer], config)
    check_reads(folder, [layer], floats, "bitsandbytes-nf4")


@pytest.mark.parametrize("with_format", [False, True])
def test_bnb_int8(tmp_path: Path, with_format: bool) -> None:
    rng = rng_for("bnb8", with_format)
    layers = [bnb8_layer(p, weights(rng), with_format) for p in PREFIXES]
    config = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": 6.0}
    folder, floats = build(tmp_path, layers, config)
    check_reads(folder, layers, floats, "bitsandbytes-int8")


def test_bnb_lone_file(tmp_path: Path) -> None:
    rng = rng_for("bnb-lone")
    layers = [bnb4_layer(p, weights(rng), "nf4", 64, True, 4) for p in PREFIXES]
    path, floats = lone_file(tmp_path, layers)
    check_reads(path, layers, floats, "bitsandbytes-nf4")


# ------------------------------------------------------------------------------------ plain / dispatch


def test_plain_float_checkpoint_is_none(tmp_path: Path) -> None:
    extra, _floats = float_extras(rng_for("plain"), IN)
    folder = write_checkpoint(tmp_path / "plain", extra, None)
    assert open_quantized(folder) is None
    path = tmp_path / "plain.safetensors"
    save_file(path, extra + [("position_ids", "I64", np.arange(8, dtype=np.int64))])
    assert open_quantized(path) is None
    suspect = open_suspect(path)
    assert suspect.format == "safetensors"
    suspect.close()


def test_open_suspect_dispatches_to_quantized(tmp_path: Path) -> None:
    rng = rng_for("suspect")
    layer = awq_layer(PREFIXES[0], weights(rng), 32)
    folder, _floats = build(tmp_path, [layer], {"quant_method": "awq", "bits": 4, "group_size": 32})
    suspect = open_suspect(folder)
    try:
        assert suspect.format == "awq"
        np.testing.assert_array_equal(suspect.load(layer.name), layer.expected)
    finally:
        suspect.close()


def test_integer_buffers_are_not_listed(tmp_path: Path) -> None:
    rng = rng_for("buffers")
    layer = bnb8_layer(PREFIXES[0], weights(rng), False)
    path = tmp_path / "b.safetensors"
    save_file(path, layer.tensors + [("embeddings.position_ids", "I64", np.arange(4, dtype=np.int64))])
    model = open_quantized(path)
    assert model is not None
    assert set(model.tensors()) == {layer.name}
    model.close()


# ------------------------------------------------------------------------------------ hostile files


def replace(tensors: list[Tensor], name: str, array: np.ndarray | None, dtype: str | None = None) -> list[Tensor]:
    result: list[Tensor] = []
    for n, d, a in tensors:
        if n == name:
            if array is not None:
                result.append((n, dtype or d, array))
        else:
            result.append((n, d, a))
    return result


def assert_format_error(path: Path, file: Path, *words: str, load: str | None = None) -> None:
    with pytest.raises(FormatError) as info:
        model = open_quantized(path)
        assert model is not None
        try:
            if load is not None:
                model.load(load)
        finally:
            model.close()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(file)), message
    for word in words:
        assert word in message, message


def test_hostile_gptq_packed_length(tmp_path: Path) -> None:
    rng = rng_for("h-gptq")
    layer = gptq_layer(PREFIXES[0], weights(rng), 4, 32, True, False, True, rng)
    qweight = layer.tensors[0][2]
    tensors = replace(layer.tensors, layer.tensors[0][0], qweight[:-1])  # one packed row short
    folder = write_checkpoint(tmp_path / "a", tensors, gptq_config(4, 32, True, False))
    assert_format_error(folder, folder / "model.safetensors", "qweight", "g_idx has 128 entries")
    # qzeros packed for 5 bits' worth of columns
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.qzeros", np.zeros((4, 7), dtype=np.int32))
    folder = write_checkpoint(tmp_path / "b", tensors, gptq_config(4, 32, True, False))
    assert_format_error(folder, folder / "model.safetensors", "qzeros", "packed columns")


def test_hostile_gptq_g_idx_out_of_range(tmp_path: Path) -> None:
    rng = rng_for("h-gidx")
    layer = gptq_layer(PREFIXES[0], weights(rng), 4, 32, True, False, True, rng)
    g_idx = layer.extra["g_idx"].astype(np.int32)
    g_idx[17] = 4  # only groups 0..3 exist
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.g_idx", g_idx)
    folder = write_checkpoint(tmp_path / "m", tensors, gptq_config(4, 32, True, False))
    assert_format_error(folder, folder / "model.safetensors", "g_idx", "value 4 is outside [0, 4)", load=layer.name)
    g_idx[17] = -1
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.g_idx", g_idx)
    folder = write_checkpoint(tmp_path / "n", tensors, gptq_config(4, 32, True, False))
    assert_format_error(folder, folder / "model.safetensors", "value -1", load=layer.name)


def test_hostile_group_size_not_dividing(tmp_path: Path) -> None:
    rng = rng_for("h-group")
    layer = gptq_layer(PREFIXES[0], weights(rng), 4, 32, False, False, True, rng)
    folder = write_checkpoint(tmp_path / "a", layer.tensors, gptq_config(4, 48, False, False))
    assert_format_error(folder, folder / "model.safetensors", "group size 48 does not divide in_features 128")
    # lone file: 3 groups of scales for 128 inputs
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.scales", np.ones((3, OUT), dtype=np.float16))
    tensors = replace(tensors, f"{PREFIXES[0]}.qzeros", np.zeros((3, OUT // 8), dtype=np.int32))
    path = tmp_path / "lone.safetensors"
    save_file(path, tensors)
    assert_format_error(path, path, "3 groups do not divide in_features 128")
    # AWQ: group size that does not divide
    awq = awq_layer(PREFIXES[0], weights(rng), 32)
    folder = write_checkpoint(tmp_path / "awq", awq.tensors, {"quant_method": "awq", "bits": 4, "group_size": 96})
    assert_format_error(folder, folder / "model.safetensors", "group size 96")
    # compressed-tensors group strategy
    ct = ct_int_layer(PREFIXES[0], weights(rng), 4, "group", 32, True, "F16", packed=True)
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 40}
    folder = write_checkpoint(tmp_path / "ct", ct.tensors, ct_config("pack-quantized", args))
    assert_format_error(folder, folder / "model.safetensors", "weight_scale", "group size 40 does not divide")


def test_hostile_ct_packed_length(tmp_path: Path) -> None:
    rng = rng_for("h-ct")
    layer = ct_int_layer(PREFIXES[0], weights(rng), 4, "group", 32, False, "BF16", packed=True)
    packed = layer.tensors[0][2]
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.weight_packed", packed[:, :-1].copy())
    args = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    folder = write_checkpoint(tmp_path / "a", tensors, ct_config("pack-quantized", args))
    assert_format_error(folder, folder / "model.safetensors", "weight_packed", "15 packed columns", "needs 16")
    # weight_shape that disagrees with the packed rows
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.weight_shape", np.array([OUT + 1, IN], dtype=np.int64))
    folder = write_checkpoint(tmp_path / "b", tensors, ct_config("pack-quantized", args))
    assert_format_error(folder, folder / "model.safetensors", "weight_shape says 49")
    # asymmetric by the config but no zero point
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.weight_zero_point", None)
    folder = write_checkpoint(tmp_path / "c", tensors, ct_config("pack-quantized", args))
    assert_format_error(folder, folder / "model.safetensors", "no weight_zero_point")


def test_hostile_bnb_packed_length(tmp_path: Path) -> None:
    rng = rng_for("h-bnb")
    layer = bnb4_layer(PREFIXES[0], weights(rng), "nf4", 64, False)
    packed = layer.tensors[0][2]
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.weight", packed[:-3].copy())
    folder = write_checkpoint(tmp_path / "a", tensors, bnb_config("nf4", False))
    assert_format_error(folder, folder / "model.safetensors", "packed bytes", "needs 3072")
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.weight.absmax", np.ones(95, dtype=np.float32))
    folder = write_checkpoint(tmp_path / "b", tensors, bnb_config("nf4", False))
    assert_format_error(folder, folder / "model.safetensors", "absmax", "need 96")


@pytest.mark.parametrize(
    ("blob", "words"),
    [
        (b"{not json", ["quant_state is not valid JSON"]),
        (b"\xff\xfe", ["not valid UTF-8"]),
        (b"[1, 2, 3]", ["must be a JSON object"]),
        (b'{"quant_type": "nf4", "dtype": "float32", "shape": [48, 128]}', ["no 'blocksize'"]),
        (b'{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [48, 128]}', ["'quant_type'"]),
        (b'{"quant_type": "nf4", "blocksize": 0, "dtype": "float32", "shape": [48, 128]}', ["'blocksize'"]),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": "48x128"}', ["'shape'"]),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [48, 128]}', ["'dtype'"]),
        (b'{"quant_type": "nf4", "blocksize": 64, "blocksize": 64}', ["more than once"]),
    ],
)
def test_hostile_bnb_quant_state(tmp_path: Path, blob: bytes, words: list[str]) -> None:
    rng = rng_for("h-blob")
    layer = bnb4_layer(PREFIXES[0], weights(rng), "nf4", 64, False)
    state = f"{PREFIXES[0]}.weight.quant_state.bitsandbytes__nf4"
    tensors = replace(layer.tensors, state, np.frombuffer(blob, dtype=np.uint8).copy())
    folder = write_checkpoint(tmp_path / "m", tensors, bnb_config("nf4", False))
    assert_format_error(folder, folder / "model.safetensors", "bitsandbytes__nf4", *words)


def test_hostile_bnb_nested_and_code_book(tmp_path: Path) -> None:
    rng = rng_for("h-nested")
    layer = bnb4_layer(PREFIXES[0], weights(rng), "nf4", 64, True, 16)
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.weight.nested_absmax", np.ones(5, dtype=np.float32))
    folder = write_checkpoint(tmp_path / "a", tensors, bnb_config("nf4", True))
    assert_format_error(folder, folder / "model.safetensors", "nested_absmax", "need 6")
    book = np.linspace(-1, 1, 16).astype(np.float32)
    tensors = replace(layer.tensors, f"{PREFIXES[0]}.weight.quant_map", book)
    folder = write_checkpoint(tmp_path / "b", tensors, bnb_config("nf4", True))
    assert_format_error(folder, folder / "model.safetensors", "quant_map", "nf4 code book")


def test_hostile_shard_is_named(tmp_path: Path) -> None:
    rng = rng_for("h-shard")
    layers = [gptq_layer(p, weights(rng), 4, 32, False, False, True, rng) for p in PREFIXES]
    layers[1].tensors[0] = (layers[1].tensors[0][0], "I32", layers[1].tensors[0][2][:-2].copy())
    tensors = [t for layer in layers for t in layer.tensors]
    folder = write_checkpoint(tmp_path / "m", tensors, gptq_config(4, 32, False, False), shards=2)
    bad = folder / "model-00002-of-00002.safetensors"
    assert_format_error(folder, bad, PREFIXES[1])


def test_hostile_configs(tmp_path: Path) -> None:
    rng = rng_for("h-config")
    layer = gptq_layer(PREFIXES[0], weights(rng), 4, 32, False, False, True, rng)
    folder = write_checkpoint(tmp_path / "a", layer.tensors, {"quant_method": "hqq"})
    assert_format_error(folder, folder / "config.json", "'hqq' is not supported")
    (folder / "config.json").write_text("{\"quantization_config\": ")
    assert_format_error(folder, folder / "config.json", "not valid JSON")
    (folder / "config.json").write_text(json.dumps({"quantization_config": [1]}))
    assert_format_error(folder, folder / "config.json", "must be an object")
    folder = write_checkpoint(tmp_path / "b", layer.tensors, gptq_config(3, 32, False, False))
    assert_format_error(folder, folder / "config.json", "bits 3 is not supported")
    folder = write_checkpoint(tmp_path / "c", layer.tensors, {**gptq_config(4, 32, False, False), "checkpoint_format": "marlin"})
    assert_format_error(folder, folder / "config.json", "marlin")


def test_hostile_orphans_and_mixtures(tmp_path: Path) -> None:
    rng = rng_for("h-orphan")
    layer = gptq_layer(PREFIXES[0], weights(rng), 4, 32, False, False, True, rng)
    tensors = layer.tensors + [("model.layers.9.mlp.up_proj.qzeros", "I32", np.zeros((4, 6), dtype=np.int32))]
    path = tmp_path / "orphan.safetensors"
    save_file(path, tensors)
    assert_format_error(path, path, "up_proj.qzeros", "belongs to no complete gptq layer")
    # a companion that is missing
    path = tmp_path / "missing.safetensors"
    save_file(path, replace(layer.tensors, f"{PREFIXES[0]}.scales", None))
    assert_format_error(path, path, "scales", "is missing")
    # GPTQ and bitsandbytes layers in one file
    bnb = bnb8_layer(PREFIXES[1], weights(rng), False)
    path = tmp_path / "mixed.safetensors"
    save_file(path, layer.tensors + bnb.tensors)
    assert_format_error(path, path, "layers")
    # a float weight stored beside its quantized form
    path = tmp_path / "twice.safetensors"
    save_file(path, layer.tensors + [(layer.name, "F32", layer.expected)])
    assert_format_error(path, path, "quantized form")
    # an integer weight that no layer explains, in a GPTQ checkpoint
    path = tmp_path / "intweight.safetensors"
    save_file(path, layer.tensors + [("model.layers.1.mlp.up_proj.weight", "I8", np.zeros((2, 2), np.int8))])
    assert_format_error(path, path, "up_proj.weight", "I8")
