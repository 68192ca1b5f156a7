"""What every suspect-format reader gives the scanner: canonical tensors, one at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorMeta:
    """A tensor as the scanner sees it: Hugging Face name and canonical [out, in...] shape."""

    name: str  # canonical Hugging Face tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # canonical shape ([out_features, in_features] for linear weights)
    source_dtype: str  # how the file stores it: "F32", "BF16", "Q4_K", "gptq-int4-g128", "nf4", ...
    source_name: str  # the name inside the file


class QuantizedModel(Protocol):
    """A read-only view of a (possibly quantized) checkpoint in canonical float32.

    Readers validate headers, offsets and packed lengths up front and raise
    weightmark.errors.FormatError (one line, naming the file and the rule) for anything that
    does not add up. `load` dequantizes ONE tensor; peak memory must not grow with the model.

    Optional: `extract_into(name, reference, reference_kind, row_scale, seed, num, den) -> bool`
    adds a 2-D carrier's extraction sums straight from its packed storage (weightmark.kernels.
    fused), equal bit for bit to `extract` on `load(name)`, and returns False for a tensor it
    has no kernel for; the scan then loads it.
    """

    format: str  # "gguf", "gptq", "awq", "compressed-tensors", "bitsandbytes-nf4", ...
    path: Path

    def tensors(self) -> dict[str, TensorMeta]: ...

    def load(self, name: str) -> np.ndarray:
        """The canonical float32 values of tensor `name` (C-contiguous, canonical shape)."""
        ...

    def close(self) -> None: ...
