"""Tokenizer and descriptive metadata that a GGUF copy needs before llama.cpp can run it.

A GGUF file carries its tokenizer in `tokenizer.*` keys; without them llama.cpp refuses to load
the model. A copy stamped from a float Hugging Face base gets them from one of two sources, in
this order:

1. a donor GGUF beside the base: a `*.gguf` file the lab made from the same model with
   llama.cpp's converter (a full conversion or `--vocab-only`). If the base folder holds several,
   the one named `tokenizer.gguf` is used, and without one the stamp is refused. Its `tokenizer.*`
   keys and its descriptive `general.*` keys (name, license, ...) are copied with their GGUF value
   types; its file type, quantization version and alignment never are.
2. otherwise the model's own files: `tokenizer.json` (byte-level BPE for the llama family,
   WordPiece for BERT), `tokenizer_config.json` and `config.json`, laid out the way llama.cpp's
   `convert_hf_to_gguf.py` lays them out: tokens in id order with added tokens, `[PAD<i>]` for
   holes, token types NORMAL / CONTROL / USER_DEFINED / UNUSED, BERT's WordPiece rewritten to
   llama.cpp's phantom-space spelling ("##ing" -> "ing", "the" -> "\u2581the"). Special token ids,
   add_bos/add_eos/add_sep, merges and the chat template come from `gguf.SpecialVocab`, the
   converter's own reader of those files, so they match it by construction.

`tokenizer.ggml.pre` (the BPE pre-tokenizer llama.cpp applies) is chosen by the converter from a
hash of a tokenization, which needs the tokenizer library. Here it is read from the structure of
`tokenizer.json`'s pre_tokenizer instead: individual digits then GPT-2 byte-level splitting is
"smollm" (the converter's name for SmolLM/SmolLM2, whose regexes llama.cpp shares with
starcoder), byte-level alone is "gpt-2", and anything else is "default", with which llama.cpp
loads the model but warns that its pre-tokenization (and so generation quality) may differ from
the original tokenizer's. For WordPiece llama.cpp ignores the value; the uncased BERT vocabulary
(all-MiniLM-L6-v2, bge-small) gets the converter's "jina-v2-en", others "default".

If neither source exists, `runtime_metadata` raises InputFileError naming what is missing: a GGUF
llama.cpp cannot run is never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
from pathlib import Path
from typing import Any

import gguf
from gguf.gguf_writer import GGUFValue

from weightmark.errors import FormatError, InputFileError

__all__ = ["DONOR_NAME", "find_donor", "runtime_metadata", "tokenizer_from_donor", "tokenizer_from_files"]

DONOR_NAME = "tokenizer.gguf"
# descriptive keys a quantized copy must not inherit from a donor (llama-quantize sets the first
# two itself; alignment is the writer's)
_NOT_COPIED = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}
# SHA-256 of the uncased BERT WordPiece vocabulary (vocab.txt order) -> the pre-tokenizer name the
# converter's hash table gives it
_KNOWN_WORDPIECE = {"0f052197aac305fe42f378b5c61554b7bacb34b8be4af83fec2cfdcdffbc9973": "jina-v2-en"}

Metadata = dict[str, Any]


def find_donor(folder: Path) -> Path | None:
    """The donor GGUF in `folder`: the only `*.gguf` there, or `tokenizer.gguf` among several."""
    found = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    if (folder / DONOR_NAME).is_file():
        return folder / DONOR_NAME
    names = ", ".join(p.name for p in found)
    raise InputFileError(folder, f"several GGUF files ({names}) could give the tokenizer; "
                                 f"name the one made by llama.cpp's converter {DONOR_NAME}")


def runtime_metadata(folder: Path, arch: str, config: dict[str, Any], n_vocab: int) -> tuple[Metadata, str]:
    """(tokenizer and general keys for a GGUF copy, the source they came from).

    `n_vocab` is the number of rows of the base's token embedding: the tokenizer must have
    exactly that many tokens, or llama.cpp would refuse the copy.
    """
    donor = find_donor(folder)
    if donor is not None:
        return tokenizer_from_donor(donor, arch, n_vocab), f"donor GGUF {donor.name}"
    if (folder / "tokenizer.json").is_file():
        return tokenizer_from_files(folder, arch, config, n_vocab), "tokenizer.json"
    raise InputFileError(folder, "no tokenizer for the GGUF copy: put tokenizer.json (with tokenizer_config.json) "
                                 "or a GGUF made by llama.cpp's converter beside the base; "
                                 "llama.cpp cannot run a GGUF without one")


# ------------------------------------------------------------------------------ donor GGUF


def read_typed_metadata(path: Path) -> dict[str, GGUFValue]:
    """Every metadata key of a GGUF file with its value type, arrays in full (bounds-checked)."""
    from weightmark.formats.gguf import _ARRAY, _MAGIC, _Cursor

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cur = _Cursor(path, data, len(data))
            cur.need(24, "the GGUF header")
            if bytes(data[:4]) != _MAGIC:
                raise FormatError(path, "not a GGUF file (bad magic)")
            cur.pos = 4
            if cur.u32("version") not in (2, 3):
                raise FormatError(path, "GGUF version is not 2 or 3")
            cur.u64("tensor count")
            n_kv = cur.u64("KV count")
            cur.need(n_kv * 12, f"{n_kv} key/values")
            meta: dict[str, GGUFValue] = {}
            for i in range(n_kv):
                key = cur.string(f"key {i}")
                vtype = cur.u32(f"value type of {key}")
                if vtype != _ARRAY:
                    meta[key] = GGUFValue(cur.value(vtype, key), gguf.GGUFValueType(vtype))
                    continue
                item_type = cur.u32(f"item type of {key}")
                count = cur.u64(f"length of {key}")
                if item_type == _ARRAY:
                    raise FormatError(path, f"{key} nests arrays")
                cur.need(count, f"{count} items of {key}")
                items = [cur.value(item_type, key) for _ in range(count)]
                meta[key] = GGUFValue(items, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(item_type))
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise InputFileError(path, f"cannot read ({exc})") from None
    return meta


def tokenizer_from_donor(path: Path, arch: str, n_vocab: int) -> Metadata:
    """`tokenizer.*` and descriptive `general.*` keys of a converter-made GGUF, typed as stored."""
    stored = read_typed_metadata(path)
    donor_arch = stored.get("general.architecture")
    if donor_arch is None or donor_arch.value != arch:
        found = None if donor_arch is None else donor_arch.value
        raise InputFileError(path, f"donor GGUF is for architecture {found!r}, the base is {arch!r}")
    meta = {k: v for k, v in stored.items() if k.startswith(("tokenizer.", "general.")) and k not in _NOT_COPIED}
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None or "tokenizer.ggml.model" not in meta:
        raise InputFileError(path, "donor GGUF has no tokenizer.ggml.model / tokenizer.ggml.tokens")
    if len(tokens.value) != n_vocab:
        raise InputFileError(path, f"donor GGUF has {len(tokens.value)} tokens, the base's embedding {n_vocab} rows")
    return meta


# ------------------------------------------------------------------- the model's own files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputFileError(path, f"not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputFileError(path, "expected a JSON object")
    return data


def looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter marks CONTROL even when not flagged special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def vocab_layout(tokenizer: dict[str, Any], vocab_size: int, where: Path) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp token types, as the converter assigns them."""
    model = tokenizer.get("model") or {}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise InputFileError(where, "model.vocab is not a token -> id table (BPE or WordPiece)")
    by_id: dict[int, str] = {}
    for token, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < vocab_size:
            raise InputFileError(where, f"token {token!r} has id {i!r}, outside 0..{vocab_size - 1}")
        by_id[i] = token
    added: dict[int, dict[str, Any]] = {}
    for entry in tokenizer.get("added_tokens") or []:
        i = entry.get("id")
        if not isinstance(i, int) or not 0 <= i < vocab_size or not isinstance(entry.get("content"), str):
            raise InputFileError(where, f"added token {entry!r} has no valid id and content")
        added[i] = entry
        by_id[i] = entry["content"]
    added_contents = {e["content"] for e in added.values()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added_contents:
            entry = added.get(i, {})
            if entry.get("special") or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # user-defined tokens are stored pre-normalized
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _pre_tokenizers(node: Any) -> list[dict[str, Any]]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [p for child in node.get("pretokenizers", []) for p in _pre_tokenizers(child)]
    return [node]


def bpe_pre(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json (see the module doc)."""
    steps = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True))
             for p in _pre_tokenizers(tokenizer.get("pre_tokenizer"))]
    if steps == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    if steps == [("ByteLevel", None, True)]:
        return "gpt-2"
    return "default"


def _wordpiece_pre(tokens: list[str]) -> str:
    digest = hashlib.sha256("\n".join(tokens).encode()).hexdigest()
    return _KNOWN_WORDPIECE.get(digest, "default")


def normalizer_flags(node: Any, flags: dict[str, bool] | None = None) -> dict[str, bool]:
    """tokenizer.json's lowercasing and accent stripping, as llama.cpp's converter records them
    (`tokenizer.ggml.normalizer.lowercase` / `.strip_accents`; llama.cpp lowercases WordPiece
    input only when told so, and strips accents when lowercasing unless told otherwise)."""
    flags = {} if flags is None else flags
    if not isinstance(node, dict):
        return flags
    kind = node.get("type")
    if kind == "Lowercase":
        flags["lowercase"] = True
    elif kind == "StripAccents":
        flags["strip_accents"] = True
    elif kind == "BertNormalizer":
        for name in ("lowercase", "strip_accents"):
            if isinstance(node.get(name), bool):
                flags[name] = node[name]
    elif kind == "Sequence":
        for child in node.get("normalizers") or []:
            normalizer_flags(child, flags)
    return flags


def _special_vocab(folder: Path, n_vocab: int, merges: bool) -> Metadata:
    """Merges, special token ids, add_* flags and chat template as gguf.SpecialVocab reads them."""
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputFileError(folder, f"tokenizer files: {exc}") from None
    sink = gguf.GGUFWriter(None, "llama")
    special.add_to_gguf(sink, quiet=True)
    return {k: v for k, v in sink.kv_data[0].items() if k != "general.architecture"}


def tokenizer_from_files(folder: Path, arch: str, config: dict[str, Any], n_vocab: int) -> Metadata:
    """Tokenizer and general keys from tokenizer.json / tokenizer_config.json / config.json."""
    path = folder / "tokenizer.json"
    tokenizer = _read_json(path)
    kind = (tokenizer.get("model") or {}).get("type")
    vocab_size = config.get("vocab_size", n_vocab)
    if vocab_size != n_vocab:
        raise InputFileError(folder / "config.json", f"vocab_size {vocab_size} but the token embedding has {n_vocab} rows")
    tokens, types = vocab_layout(tokenizer, n_vocab, path)
    T = gguf.Keys.Tokenizer
    meta: Metadata = {"general.type": "model", "general.name": folder.name}
    meta.update({f"tokenizer.ggml.normalizer.{name}": value
                 for name, value in normalizer_flags(tokenizer.get("normalizer")).items()})
    if kind == "BPE" and arch == "llama":
        if not any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(tokenizer.get("pre_tokenizer"))):
            raise InputFileError(path, "BPE without a ByteLevel pre-tokenizer (SentencePiece-style) is not supported")
        meta.update({T.MODEL: "gpt2", T.PRE: bpe_pre(tokenizer), T.LIST: tokens, T.TOKEN_TYPE: types})
        meta.update(_special_vocab(folder, n_vocab, merges=True))
        if T.MERGES not in meta:
            raise InputFileError(path, "a byte-level BPE tokenizer.json without merges")
        config_path = folder / "tokenizer_config.json"
        tokenizer_config = _read_json(config_path) if config_path.is_file() else {}
        if isinstance(tokenizer_config.get("add_prefix_space"), bool):
            meta[T.ADD_PREFIX] = tokenizer_config["add_prefix_space"]
        if n_vocab == 49152:  # the converter's rule for the SmolLM/granite-small vocabulary
            meta[T.ADD_BOS] = False
    elif kind == "WordPiece" and arch == "bert":
        # llama.cpp's phantom-space spelling: continuations lose "##", words gain U+2581,
        # control tokens stay as they are
        spelled = [tok if typ == gguf.TokenType.CONTROL else tok[2:] if tok.startswith("##") else "\u2581" + tok
                   for tok, typ in zip(tokens, types, strict=True)]
        meta.update({T.TOKEN_TYPE_COUNT: int(config.get("type_vocab_size", 1)), T.MODEL: "bert",
                     T.PRE: _wordpiece_pre(tokens), T.LIST: spelled, T.TOKEN_TYPE: types})
        meta.update(_special_vocab(folder, n_vocab, merges=False))
    else:
        raise InputFileError(path, f"a {kind!r} tokenizer for architecture {arch!r}: GGUF output supports "
                                   "byte-level BPE (llama family) and WordPiece (bert)")
    return meta
