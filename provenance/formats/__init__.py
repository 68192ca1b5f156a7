"""Weight file formats: our safetensors reader/writer, and readers for quantized suspects."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from weightmark.formats.base import QuantizedModel, TensorMeta
from weightmark.formats.safetensors import Checkpoint

__all__ = ["QuantizedModel", "TensorMeta", "SafetensorsSuspect", "open_suspect"]

GGUF_MAGIC = b"GGUF"


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
        return {name: TensorMeta(name, tuple(info.shape), info.dtype, name)
                for name, (_, info) in self.checkpoint.tensors.items()}

    def load(self, name: str) -> np.ndarray:
        from weightmark.canonical import to_float32

        info = self.checkpoint.info(name)
        return np.ascontiguousarray(to_float32(info.dtype, self.checkpoint.raw(name)), dtype=np.float32)

    def close(self) -> None:
        self.checkpoint.close()


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def open_suspect(path: str | os.PathLike[str]) -> QuantizedModel | SafetensorsSuspect:
    """Open a suspect checkpoint in whatever supported format it is (found from its contents)."""
    path = Path(path)
    if _is_gguf(path):
        from weightmark.formats.gguf import GGUFModel

        return GGUFModel(path)
    if path.is_dir():
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if ggufs and not any(path.glob("*.safetensors")):
            from weightmark.formats.gguf import GGUFModel

            return GGUFModel(ggufs[0])
    from weightmark.formats.quantized import open_quantized

    quantized = open_quantized(path, partial=True)
    if quantized is not None:
        return quantized
    return SafetensorsSuspect(Checkpoint.open(path, partial=True), path)
