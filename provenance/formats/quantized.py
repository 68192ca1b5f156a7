"""The quantized safetensors families in one import: GPTQ, AWQ, compressed-tensors and
bitsandbytes readers, their code books, and `open_quantized` (each family lives in its own
module; this one only re-exports them)."""

from __future__ import annotations

from ._quantized import FP8_DTYPES, INT_DTYPES, fp8_e4m3_table, fp8_e5m2_table, open_quantized
from .awq import AWQ_NIBBLE, AWQ_ORDER, AWQModel
from .bitsandbytes import FP4_CODE, NF4_CODE, BitsAndBytesModel
from .compressed_tensors import CompressedTensorsModel
from .gptq import GPTQModel

__all__ = [
    "AWQ_NIBBLE",
    "AWQ_ORDER",
    "AWQModel",
    "BitsAndBytesModel",
    "CompressedTensorsModel",
    "FP4_CODE",
    "FP8_DTYPES",
    "GPTQModel",
    "INT_DTYPES",
    "NF4_CODE",
    "fp8_e4m3_table",
    "fp8_e5m2_table",
    "open_quantized",
]
