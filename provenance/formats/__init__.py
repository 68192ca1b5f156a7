"""Weight file formats: our safetensors reader/writer, and readers for suspects in any format.

A suspect's format is recognised by its CONTENT, never by its file name: every reader module of
this package registers a sniffer with `register_sniffer`, and `open_suspect` asks them in order
(magic numbers first, folder layouts next, plain safetensors last). Adding a format means one
new module here (and its tests); nothing else changes.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from weightmark.errors import FormatError
from weightmark.formats.base import QuantizedModel, TensorMeta
from weightmark.formats.safetensors import Checkpoint

__all__ = [
    "QuantizedModel",
    "TensorMeta",
    "SafetensorsSuspect",
    "load_formats",
    "looks_like_safetensors",
    "open_suspect",
    "register_sniffer",
]

GGUF_MAGIC = b"GGUF"

# A sniffer looks at a path and returns an open reader if the content is its format, None if
# it is not, or raises FormatError if it is its format but broken or refused.
Sniffer = Callable[[Path], "QuantizedModel | SafetensorsSuspect | None"]
_SNIFFERS: list[tuple[int, str, Sniffer]] = []
_LOADED = False


def register_sniffer(name: str, order: int) -> Callable[[Sniffer], Sniffer]:
    """Decorator: ask `sniffer` about every suspect; lower `order` asks earlier.

    Orders in use: 10-19 magic numbers of single files (10 GGUF, 11 llamafile, 12 PyTorch zip
    archives and pickles, 14 ONNX), 40 folder layouts with their own config (MLX), 45 refusal
    of single files that are not safetensors either, 50 quantized safetensors; plain
    safetensors is the fallback when nobody claims the path.
    """

    def add(sniffer: Sniffer) -> Sniffer:
        if any(known == name for _, known, _ in _SNIFFERS):
            raise ValueError(f"a sniffer named {name!r} is already registered")
        _SNIFFERS.append((order, name, sniffer))
        _SNIFFERS.sort(key=lambda item: (item[0], item[1]))
        return sniffer

    return add


def load_formats() -> None:
    """Import every reader module of this package once, so that each registers itself."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


class SafetensorsSuspect:
    """A plain float safetensors checkpoint seen through the reader protocol.

    The scanner reads its raw bf16/f16/f32 storage directly (no float32 copy); `load` exists
    for callers that want values.
    """

    format = "safetensors"

    def __init__(self, checkpoint: Checkpoint, path: Path) -> None:
        self.checkpoint = checkpoint
        self.path = path

    def tensors(self) -> dict[str, TensorMeta]:
        """Every tensor, and each expert of a fused expert tensor as its unit `<name>[e]`."""
        from weightmark.moe import fused_expert_units, is_fused_hf_experts

        out = {}
        for name, (_, info) in self.checkpoint.tensors.items():
            out[name] = TensorMeta(name, tuple(info.shape), info.dtype, name)
            if is_fused_hf_experts(name, info.shape):
                out.update({unit: TensorMeta(unit, shape, info.dtype, unit)
                            for unit, shape in fused_expert_units(name, info.shape)})
        return out

    def load(self, name: str) -> np.ndarray:
        from weightmark.canonical import to_float32

        info = self.checkpoint.info(name)
        return np.ascontiguousarray(to_float32(info.dtype, self.checkpoint.raw(name)), dtype=np.float32)

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> SafetensorsSuspect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def looks_like_safetensors(path: Path) -> bool:
    """Whether a file opens as safetensors does: an 8-byte little-endian header length that
    fits in the file, then a JSON object. Sniffers of other formats whose magic numbers a
    header length could imitate (pickles, ONNX's protobuf, zip tails) check this first."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


@register_sniffer("gguf", 10)
def _sniff_gguf(path: Path) -> QuantizedModel | None:
    """A GGUF file, or a folder of GGUF files without safetensors (the first one is read)."""
    from weightmark.formats.gguf import GGUFModel

    if _is_gguf(path):
        return GGUFModel(path)
    if path.is_dir():
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if ggufs and not any(path.glob("*.safetensors")):
            return GGUFModel(ggufs[0])
    return None


@register_sniffer("not-safetensors", 45)
def _refuse_unknown_file(path: Path) -> None:
    """A single file that no sniffer claimed must at least look like safetensors (an 8-byte
    little-endian header length, then a JSON object); say what it is not, rather than letting
    the safetensors reader complain about a nonsensical header length."""
    if not path.is_file() or path.suffix == ".safetensors":
        return None  # a file that says it is safetensors gets the safetensors reader's diagnosis
    if looks_like_safetensors(path):
        return None
    raise FormatError(
        path,
        "is not a weights file weightmark reads: not safetensors (no JSON header after the "
        "8-byte length), not GGUF, not a PyTorch zip checkpoint, not a llamafile",
    )


def open_suspect(path: str | os.PathLike[str]) -> QuantizedModel | SafetensorsSuspect:
    """Open a suspect checkpoint in whatever supported format it is (found from its contents)."""
    load_formats()
    path = Path(path)
    for _order, _name, sniff in _SNIFFERS:
        suspect = sniff(path)
        if suspect is not None:
            return suspect
    return SafetensorsSuspect(Checkpoint.open(path, partial=True), path)


@register_sniffer("quantized-safetensors", 50)
def _sniff_quantized(path: Path) -> QuantizedModel | None:
    """GPTQ, AWQ, compressed-tensors, bitsandbytes... safetensors (see formats/_quantized.py)."""
    if not path.exists():
        return None
    from weightmark.formats._quantized import open_quantized

    return open_quantized(path, partial=True)
