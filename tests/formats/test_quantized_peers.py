"""The quantized readers against the libraries that write and load those formats (need torch)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.conftest import StampedLab, make_stamped_lab, minilm_dir
from weightmark.formats.quantized import fp8_e4m3_table, fp8_e5m2_table, open_quantized
from weightmark.formats.safetensors import save_file

from .quant_reference import awq_layer, write_checkpoint

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def _hub_kernels_package() -> Iterator[None]:
    """The Hugging Face `kernels` package under that name while this module's tests run.

    transformers imports it (at import, and lazily when a quantized model is loaded) when it is
    installed; pytest puts tests/ and the working directory (the repository root) on sys.path,
    whose kernels/ packages would answer instead ("cannot import name 'Mode' from 'kernels'").
    Our own `kernels` modules are put back when the module's tests are done.
    """
    repo = Path(__file__).resolve().parents[2]
    ours = {repo, repo / "tests"}

    def kernels_modules() -> list[str]:
        return [name for name in sys.modules if name == "kernels" or name.startswith("kernels.")]

    saved_path, saved = sys.path[:], {name: sys.modules.pop(name) for name in kernels_modules()}
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in ours]
    try:
        for module in ("kernels", "transformers.integrations.hub_kernels"):
            try:
                importlib.import_module(module)
            except ImportError:
                pass  # not installed: transformers does without it; tests needing transformers skip
    finally:
        sys.path[:] = saved_path
    yield
    for name in kernels_modules():
        del sys.modules[name]
    sys.modules.update(saved)

PREFIX = "model.layers.0.mlp.down_proj"


def to_storage(tensor: Any) -> tuple[str, np.ndarray]:
    """A torch tensor as (safetensors dtype name, numpy storage array)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return "BF16", t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return "F16", t.numpy()
    if t.dtype == torch.float8_e4m3fn:
        return "F8_E4M3", t.view(torch.uint8).numpy()
    names = {
        torch.float32: "F32", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
        torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    }  # fmt: skip
    return names[t.dtype], t.numpy()


def save_state(folder: Path, state: dict[str, Any], quantization_config: dict[str, Any] | None) -> Path:
    tensors = [(name, *to_storage(value)) for name, value in state.items()]
    return write_checkpoint(folder, tensors, quantization_config)


def read(path: Path, name: str) -> Any:
    model = open_quantized(path)
    assert model is not None
    try:
        return torch.from_numpy(model.load(name))
    finally:
        model.close()


def assert_same_after_rounding(ours: Any, peer: Any) -> None:
    """Our exact float32 values, rounded once to the peer's dtype, are the peer's values."""
    assert ours.shape == peer.shape
    rounded = ours.to(peer.dtype)
    mismatch = (rounded != peer) & ~(torch.isnan(rounded) & torch.isnan(peer))
    assert not bool(mismatch.any()), f"{int(mismatch.sum())} of {peer.numel()} values differ"


def load_file_module(package: str, relative: str, name: str) -> ModuleType:
    """One module file of an installed package, without running the package's __init__.

    auto-gptq and autoawq import parts of transformers in __init__ that newer transformers
    releases no longer have; their packing and unpacking modules need only torch.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed")
    path = Path(spec.origin).parent / relative
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ FP8


def test_fp8_tables_match_torch() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    e4m3 = codes.view(torch.float8_e4m3fn).float().numpy()
    e5m2 = codes.view(torch.float8_e5m2).float().numpy()
    np.testing.assert_array_equal(fp8_e4m3_table(), e4m3)
    np.testing.assert_array_equal(fp8_e5m2_table(), e5m2)


# ------------------------------------------------------------------------------------ bitsandbytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_4bit_functional(tmp_path: Path, quant_type: str, double_quant: bool, dtype: str) -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    weight = torch.randn(96, 200, dtype=getattr(torch, dtype))
    packed, state = functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=double_quant, quant_type=quant_type
    )
    tensors = {f"{PREFIX}.weight": packed}
    tensors.update({f"{PREFIX}.weight.{key}": value for key, value in state.as_dict(packed=True).items()})
    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": quant_type,
              "bnb_4bit_use_double_quant": double_quant}  # fmt: skip
    folder = save_state(tmp_path / "m", tensors, config)
    peer = functional.dequantize_4bit(packed, state)
    assert_same_after_rounding(read(folder, f"{PREFIX}.weight"), peer)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_linear4bit_state_dict(tmp_path: Path, quant_type: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type=quant_type, compress_statistics=True,
                              compute_dtype=torch.bfloat16)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, compress_statistics=True)
    layer = layer.to("cpu")  # quantizes
    state = {f"{PREFIX}.{key}": value for key, value in layer.state_dict().items()}
    state["model.norm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    folder = save_state(tmp_path / "m", state, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    model = open_quantized(folder)
    assert model is not None and model.format == f"bitsandbytes-{quant_type}"
    model.close()
    peer = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert_same_after_rounding(read(folder, f"{PREFIX}.weight"), peer)


def test_bnb_linear8bit_state_dict(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(2)
    weight = torch.randn(64, 128, dtype=torch.float16)
    layer = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")  # quantizes
    state = {f"{PREFIX}.{key}": value for key, value in layer.state_dict().items()}
    folder = save_state(tmp_path / "m", state, {"quant_method": "bitsandbytes", "load_in_8bit": True})
    ours = read(folder, f"{PREFIX}.weight")
    peer = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    # bitsandbytes multiplies by a rounded 1/127 in float32; we divide by 127 exactly
    np.testing.assert_array_max_ulp(ours.numpy(), peer.float().numpy(), maxulp=2)
    # and the dequantized values are close to the original weights
    assert float((ours - weight.float()).abs().max()) <= float(weight.float().abs().max()) / 127


# ------------------------------------------------------------------------------------ compressed-tensors


def _qparams(weight: Any, args: Any) -> tuple[Any, Any]:
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.float()
    out, inp = w.shape
    if args.strategy == "group":
        w = w.reshape(out, inp // args.group_size, args.group_size)
        lo, hi = w.amin(-1), w.amax(-1)
    elif args.strategy == "channel":
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    elif args.strategy == "tensor":
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    else:  # block
        b0, b1 = args.block_structure
        padded = torch.nn.functional.pad(w, (0, -inp % b1, 0, -out % b0))
        blocks = padded.reshape(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
        lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    return calculate_qparams(lo, hi, args)


CT_CASES = [
    ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}),
    ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}),
    ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}),
    ("pack-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}),
    ("int-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}),
    ("naive-quantized", {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor"}),
    ("float-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}),
    ("float-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}),
    ("float-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                         "block_structure": [32, 32]}),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "weights_args"), CT_CASES, ids=lambda v: v if isinstance(v, str) else v["strategy"])
def test_compressed_tensors_model(tmp_path: Path, fmt: str, weights_args: dict[str, Any]) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    torch.manual_seed(3)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(128, 48, bias=False)
            self.down_proj = torch.nn.Linear(128, 80, bias=False)

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block()])
    model.norm = torch.nn.LayerNorm(128)
    model.to(torch.bfloat16)
    args = QuantizationArgs(**weights_args)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)})
    apply_quantization_config(model, config)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for module in linears.values():
        scale, zero_point = _qparams(module.weight.data, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype).reshape(
                module.weight_zero_point.shape
            )
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    folder = save_state(tmp_path / "m", dict(model.state_dict()), None)
    compressor.update_config(str(folder))  # the library writes config.json's quantization_config
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == fmt
    compressor.decompress_model(model)
    reader = open_quantized(folder)
    assert reader is not None and reader.format == f"compressed-tensors:{fmt}"
    reader.close()
    for name, module in linears.items():
        assert_same_after_rounding(read(folder, f"{name}.weight"), module.weight.data)


# ------------------------------------------------------------------------------------ GPTQ (AutoGPTQ)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("bits", [4, 8])
def test_autogptq_pack(tmp_path: Path, bits: int, act_order: bool, dtype: str) -> None:
    qlinear = load_file_module("auto_gptq", "nn_modules/qlinear/qlinear_cuda.py", "_peer_autogptq_qlinear")
    torch.manual_seed(4)
    out_f, in_f, group = 64, 256, 64
    groups = in_f // group
    maxq = 2**bits - 1
    torch_dtype = getattr(torch, dtype)
    # weights that lie exactly on the grid, so AutoGPTQ's own rounding recovers the codes
    scales = (torch.rand(out_f, groups) * 0.05 + 0.01).to(torch.float16).to(torch_dtype)
    zeros = torch.randint(1, maxq + 1, (out_f, groups)).to(torch_dtype)
    g_idx = (torch.randperm(in_f) if act_order else torch.arange(in_f)) // group
    codes = torch.randint(0, maxq + 1, (out_f, in_f)).to(torch_dtype)
    weight = (codes - zeros[:, g_idx]) * scales[:, g_idx]
    linear = torch.nn.Linear(in_f, out_f, bias=False).to(torch_dtype)
    linear.weight.data = weight
    layer = qlinear.QuantLinear(bits, group, in_f, out_f, False, weight_dtype=torch_dtype)
    layer.pack(linear, scales, zeros, g_idx.to(torch.int32))
    state = {f"{PREFIX}.{key}": value for key, value in layer.state_dict().items()}
    config = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": False}
    folder = save_state(tmp_path / "m", state, config)
    ours = read(folder, f"{PREFIX}.weight")
    # AutoGPTQ's own dequantization (its CPU path), read off with an identity input
    peer = layer(torch.eye(in_f, dtype=torch_dtype)).T
    assert_same_after_rounding(ours, peer)
    assert torch.equal(ours.to(torch_dtype), weight)


# ------------------------------------------------------------------------------------ AWQ (AutoAWQ)


def test_autoawq_dequantize(tmp_path: Path) -> None:
    packing = load_file_module("awq", "utils/packing_utils.py", "_peer_awq_packing")
    rng = np.random.default_rng(5)
    layer = awq_layer(PREFIX, rng.standard_normal((64, 256)).astype(np.float32), 64)
    path = tmp_path / "awq.safetensors"
    save_file(path, layer.tensors)
    ours = read(path, f"{PREFIX}.weight")
    qweight, qzeros, scales = (torch.from_numpy(array) for _name, _dtype, array in layer.tensors)
    peer = packing.dequantize_gemm(qweight, qzeros, scales, 4, 64).T  # AWQ gives [in, out]
    assert_same_after_rounding(ours, peer.contiguous())


# ------------------------------------------------------------------ our own packed writers


def _written(tmp_path: Path, fmt: str) -> tuple[Path, dict[str, Any]]:
    from tests.test_quantized_formats_stamp import write_llama_base
    from weightmark.quantized_stamp import write_reference_copy

    out = write_reference_copy(write_llama_base(tmp_path / "base"), tmp_path / "q", fmt)
    return out, json.loads((out / "config.json").read_text())["quantization_config"]


def _state(folder: Path, prefix: str) -> dict[str, Any]:
    from weightmark.formats.safetensors import load_file

    return {name[len(prefix) + 1 :]: torch.from_numpy(array.copy()).view(_TORCH[dtype])
            for name, (dtype, array) in load_file(folder / "model.safetensors").items()
            if name.startswith(prefix + ".")}  # fmt: skip


_TORCH = {"I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "F32": torch.float32,
          "F16": torch.float16, "BF16": torch.bfloat16}  # fmt: skip


@pytest.mark.parametrize("fmt", ["ct:w4a16", "ct:w8a16"])
def test_compressed_tensors_decompresses_our_packed_copy(tmp_path: Path, fmt: str) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    folder, qc = _written(tmp_path, fmt)
    config = QuantizationConfig.model_validate(qc)  # the library accepts our config
    scheme = config.config_groups["group_0"]
    for module in ("self_attn.q_proj", "mlp.down_proj"):
        prefix = f"model.layers.1.{module}"
        peer = PackedQuantizationCompressor.decompress(_state(folder, prefix), scheme)["weight"]
        assert_same_after_rounding(read(folder, f"{prefix}.weight"), peer)


def test_bitsandbytes_dequantizes_our_nf4_copy(tmp_path: Path) -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    folder, _qc = _written(tmp_path, "bnb:nf4")
    for module in ("self_attn.q_proj", "mlp.down_proj"):
        prefix = f"model.layers.1.{module}"
        state = _state(folder, prefix)
        packed = state.pop("weight")
        quant_state = functional.QuantState.from_dict({k[len("weight.") :]: v for k, v in state.items()}, "cpu")
        peer = functional.dequantize_4bit(packed, quant_state)
        assert_same_after_rounding(read(folder, f"{prefix}.weight"), peer)


# ------------------------------------------- our compressed-tensors copies in transformers

CT_FORMATS = ("ct:w4a16", "ct:w8a16")
CT_PRESETS = {"ct:w4a16": "W4A16", "ct:w8a16": "W8A16"}
GPTQMODEL_FORMATS = ("gptq:4bit-g128", "awq:4bit-g128")


def _transformers_child(script: str, *args: str, cwd: Path) -> str:
    """Run `script` in a child python with the repository off sys.path (-P, another cwd), as
    anything importing transformers must run here: the repository's kernels/ folders would shadow
    the Hugging Face `kernels` package transformers imports. Its last stdout line is returned."""
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(script), *args], cwd=cwd, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""


_TIED_LLAMA = """
    import sys, torch, transformers
    # the output projection tied to the embedding (no lm_head tensor, as in SmolLM2); down_proj's
    # in_features (320) not a multiple of 128, so those layers stay float and are named in `ignore`
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=320,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(11)
    transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])
"""


@pytest.fixture(scope="module")
def ct_stamped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny tied llama saved by transformers, registered in a lab and stamped for one licensee
    in both compressed-tensors formats, GPTQ and AWQ."""
    pytest.importorskip("compressed_tensors")
    from weightmark import Lab

    work = tmp_path_factory.mktemp("ct-runtime")
    base = work / "base"
    _transformers_child(_TIED_LLAMA, str(base), cwd=work)
    lab = Lab.init(work / "lab", passphrase=None)
    lab.register_model(base, name="tied")
    licensee = lab.add_licensee("Northwind Research Ltd", "GB").id
    copies = {"base": base}
    for fmt in (*CT_FORMATS, *GPTQMODEL_FORMATS):
        copies[fmt] = work / fmt.replace(":", "-")
        lab.stamp("tied", licensee, copies[fmt], fmt=fmt)
    lab.close()
    return copies


_LOAD_AND_GENERATE = """
    import json, sys, torch, transformers
    from safetensors.torch import save_file
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
    model.eval()
    prompt = torch.tensor([[1, 17, 99, 256, 3]])
    with torch.no_grad():  # the first forward pass decompresses every quantized layer
        generated = model.generate(input_ids=prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tied = torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    save_file(state, sys.argv[2])
    print(json.dumps({"generated": generated[0].tolist(), "lm_head_tied": tied}))
"""


@pytest.mark.parametrize("fmt", CT_FORMATS)
def test_transformers_runs_our_stamped_ct_copy_with_our_weights(ct_stamped: dict[str, Path], fmt: str,
                                                                 tmp_path: Path) -> None:
    """transformers + compressed-tensors load the stamped folder and generate, and the weights they
    decompress are our reader's dequantized view, value for value."""
    from weightmark.formats.safetensors import load_file

    folder = ct_stamped[fmt]
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    loaded = tmp_path / "loaded.safetensors"
    said = json.loads(_transformers_child(_LOAD_AND_GENERATE, str(folder), str(loaded), cwd=tmp_path))
    assert len(said["generated"]) == 9 and said["lm_head_tied"]
    theirs = load_file(loaded)
    reader = open_quantized(folder)
    assert reader is not None and reader.format == "compressed-tensors:pack-quantized"
    try:
        quantized = [name for name, meta in reader.tensors().items() if meta.source_dtype.startswith("ct-int")]
        # every q/k/v/o/gate/up of both layers (in_features 256), no down_proj (320)
        assert len(quantized) == 12 and not any("down_proj" in name for name in quantized)
        # decompressed: every layer has its float weight again, beside its kept scale and shape
        extra = set(theirs) - set(reader.tensors())
        assert set(reader.tensors()) <= set(theirs)
        assert {name.rsplit(".", 1)[1] for name in extra} == {"weight_scale", "weight_shape"}
        for name in reader.tensors():
            dtype, array = theirs[name]
            assert dtype == "F32", name
            assert np.array_equal(array, reader.load(name)), name
    finally:
        reader.close()


_PROBE_LAYERS = """
    import importlib.util, json, sys, torch, transformers
    from safetensors.torch import save_file
    if importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None:
        print(json.dumps({"skip": "gptqmodel and optimum are not installed (make runtimes installs them)"}))
        sys.exit(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([[1, 17, 99, 256, 3]]), max_new_tokens=2,
                                   min_new_tokens=2, do_sample=False)
        probes = {}  # each quantized layer's weight as its kernel applies it: identity in, W^T out
        for name, module in model.named_modules():
            if name.startswith("model.layers.") and hasattr(module, "qweight"):
                eye = torch.eye(module.in_features, dtype=model.dtype)
                probes[name + ".weight"] = module(eye).T.float().contiguous()
                kernel = type(module).__name__
    save_file(probes, sys.argv[2])
    print(json.dumps({"generated": generated[0].tolist(), "kernel": kernel}))
"""


@pytest.mark.parametrize("fmt", GPTQMODEL_FORMATS)
def test_transformers_runs_our_stamped_gptq_awq_copy_with_our_weights(ct_stamped: dict[str, Path], fmt: str,
                                                                       tmp_path: Path) -> None:
    """transformers loads the stamped GPTQ/AWQ folder through gptqmodel's CPU kernels and
    generates; each quantized layer, probed with the identity, applies our reader's dequantized
    weights rounded once to float16 (the kernels' arithmetic): no value differs."""
    folder = ct_stamped[fmt]
    probed = tmp_path / "probed.safetensors"
    said = json.loads(_transformers_child(_PROBE_LAYERS, str(folder), str(probed), cwd=tmp_path))
    if "skip" in said:
        pytest.skip(said["skip"])
    print(f"{fmt}: {said['kernel']}")
    assert len(said["generated"]) == 7
    from weightmark.formats.safetensors import load_file

    theirs = load_file(probed)
    assert len(theirs) == 12  # q/k/v/o/gate/up of both layers
    reader = open_quantized(folder)
    assert reader is not None and reader.format == fmt.split(":")[0]
    try:
        for name, (_dtype, array) in theirs.items():
            peer = torch.from_numpy(array.copy())
            assert torch.equal(peer.half().float(), peer), f"{name}: the kernel's values are not float16"
            assert_same_after_rounding(torch.from_numpy(reader.load(name)), peer.half())
    finally:
        reader.close()


_CT_COMPRESS = """
    import json, sys, torch, transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    base, preset, out = sys.argv[1:4]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # what the library must leave alone: the tied output, and layers group 128 does not divide
    ignore = ["lm_head"] + [name for name, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear) and m.in_features % scheme.weights.group_size]
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    for module in model.modules():
        if hasattr(module, "weight_scale"):  # min-max over each group, the library's qparams
            w = module.weight.data
            w = w.reshape(w.shape[0], -1, scheme.weights.group_size)
            scale, _zero = calculate_qparams(w.amin(-1), w.amax(-1), scheme.weights)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    print(json.dumps({"ignore": ignore, "weights": json.loads(scheme.weights.model_dump_json())}))
"""


@pytest.mark.parametrize("fmt", CT_FORMATS)
def test_our_unstamped_ct_copy_is_what_compressed_tensors_writes(ct_stamped: dict[str, Path], fmt: str,
                                                                  tmp_path: Path) -> None:
    """The library's own preset and min-max scales on the same float model, compressed by
    ModelCompressor and saved by transformers: the same tensors, scales and codes as our writer's
    unstamped copy, and a quantization_config that leaves the same layers alone."""
    from weightmark.formats.safetensors import load_file
    from weightmark.quantized_stamp import write_reference_copy

    ours_folder = write_reference_copy(ct_stamped["base"], tmp_path / "ours", fmt)
    peer_folder = tmp_path / "peer"
    said = json.loads(_transformers_child(_CT_COMPRESS, str(ct_stamped["base"]), CT_PRESETS[fmt], str(peer_folder),
                                          cwd=tmp_path))  # fmt: skip
    ours_qc = json.loads((ours_folder / "config.json").read_text())["quantization_config"]
    peer_qc = json.loads((peer_folder / "config.json").read_text())["quantization_config"]
    assert sorted(ours_qc["ignore"]) == sorted(said["ignore"]) == sorted(peer_qc["ignore"])
    assert ours_qc["format"] == peer_qc["format"] == "pack-quantized"
    ours_weights = ours_qc["config_groups"]["group_0"]["weights"]
    for field in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder"):
        assert ours_weights.get(field) == said["weights"].get(field), field
    ours, peer = load_file(ours_folder / "model.safetensors"), load_file(peer_folder / "model.safetensors")
    assert sorted(ours) == sorted(peer)
    for name, (dtype, array) in peer.items():
        assert ours[name][0] == dtype, name
        assert ours[name][1].shape == array.shape, name
        differ = int((ours[name][1] != array).sum())
        assert differ == 0, f"{name}: {differ} of {array.size} values differ"


# ---------------------------------------- traceability through the libraries' own quantization

TRACE_LIMIT = -12.0  # log10 of the family-wise p-value a traced leak must reach
TRACE_FAMILY = 10**6  # scans assume a million licensees, as a lab with many customers would


@pytest.fixture(scope="module")
def traced_lab(tmp_path_factory: pytest.TempPathFactory) -> StampedLab:
    """The real MiniLM (F32) registered, and three licensees' copies under the default code."""
    return make_stamped_lab(tmp_path_factory.mktemp("peer-trace"), minilm_dir(), "F32")


def _copy_other_files(src: Path, dst: Path) -> None:
    """The tokenizer and sentence-transformers files travel with the quantized weights."""
    import shutil

    for item in src.iterdir():
        target = dst / item.name
        if target.exists() or item.suffix == ".safetensors" or item.name.endswith(".index.json"):
            continue
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)


def _bnb_quantize(src: Path, dst: Path, kind: str) -> Path:
    """transformers loading the copy with a BitsAndBytesConfig on CPU, then save_pretrained."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    if kind == "int8":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:  # NF4 as QLoRA configures it (double quant), FP4 plain
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=kind == "nf4",
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    model = transformers.AutoModel.from_pretrained(src, quantization_config=config, device_map="cpu",
                                                   dtype=torch.float32)  # fmt: skip
    linear = bnb_linear = 0
    for module in model.modules():
        linear += isinstance(module, torch.nn.Linear)
        bnb_linear += type(module).__module__.startswith("bitsandbytes")
    assert bnb_linear > 0 and bnb_linear == linear, "bitsandbytes must have replaced every linear layer"
    model.save_pretrained(dst)
    _copy_other_files(src, dst)
    return dst


def _ct_quantize(src: Path, dst: Path, kind: str) -> Path:
    """compressed-tensors: the scheme applied to every Linear of the float16 model, min-max scales
    (round to nearest, no calibration), compressed by ModelCompressor and saved by transformers."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    if kind == "W4A16":  # the library's preset: int4, group 128, symmetric
        scheme = preset_name_to_scheme("W4A16", ["Linear"])
    else:  # int8, one scale per output channel, symmetric
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="channel"))  # fmt: skip
    model = transformers.AutoModel.from_pretrained(src, dtype=torch.float16)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}))
    args = scheme.weights
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            scale, zero_point = _qparams(module.weight.data, args)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape
                )
    compressor = ModelCompressor.from_pretrained_model(model)  # the library picks the format
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(str(dst))  # the library writes config.json's quantization_config
    written = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert written["config_groups"]["group_0"]["weights"]["strategy"] == args.strategy
    _copy_other_files(src, dst)
    return dst


PEER_QUANTIZERS = {
    "bnb-nf4": (_bnb_quantize, "nf4", "bitsandbytes-nf4"),
    "bnb-fp4": (_bnb_quantize, "fp4", "bitsandbytes-fp4"),
    "bnb-int8": (_bnb_quantize, "int8", "bitsandbytes-int8"),
    "ct-w4a16": (_ct_quantize, "W4A16", "compressed-tensors:pack-quantized"),
    "ct-w8a16": (_ct_quantize, "W8A16", "compressed-tensors:pack-quantized"),
}


@pytest.mark.parametrize("fmt", list(PEER_QUANTIZERS))
def test_stamped_copy_quantized_by_the_library_is_traced(traced_lab: StampedLab, fmt: str, tmp_path: Path) -> None:
    quantize, kind, expected_format = PEER_QUANTIZERS[fmt]
    lab = traced_lab.lab
    which = list(PEER_QUANTIZERS).index(fmt) % len(traced_lab.ids)
    leaked = quantize(traced_lab.copies[which], tmp_path / "leaked", kind)
    report = lab.scan(leaked, assume_licensees=TRACE_FAMILY)
    best = report.candidates[0]
    top = traced_lab.ids.index(best.licensee_id) if best.licensee_id in traced_lab.ids else best.licensee_id
    print(f"{fmt}: read as {report.format}, leaked by {which}, best candidate {top} scores {best.score:.1f}, "
          f"log10 family-wise p {best.log10_family_wise_p:.1f} over {report.family_size} licensees")  # fmt: skip
    assert report.format == expected_format
    assert report.family_size >= TRACE_FAMILY
    assert [c.licensee_id for c in report.accused] == [traced_lab.ids[which]]
    assert report.accused[0].log10_family_wise_p <= TRACE_LIMIT

    base_only = quantize(traced_lab.base, tmp_path / "base-only", kind)
    control = lab.scan(base_only, assume_licensees=TRACE_FAMILY)
    clean = control.candidates[0]
    print(f"{fmt} base only: best score {clean.score:.1f}, log10 family-wise p {clean.log10_family_wise_p:.1f}")
    assert control.format == expected_format
    assert control.accused == []
