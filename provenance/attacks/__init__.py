"""What leakers do to weights, as functions from one checkpoint folder or file to another.

Used by the tests, the demo and the robustness evaluation (`make eval`). Each attack reads a
safetensors file or folder and writes the attacked copy in the same layout.
"""

from weightmark.attacks.basic import (
    add_noise,
    cast,
    map_floats,
    quantization_error,
    relative_error,
    requantize,
    requantize_array,
)
from weightmark.attacks.combine import COLLUSIONS, collude, merge
from weightmark.attacks.functional import (
    function_preserving,
    permute_experts,
    permute_ffn,
    permute_heads,
    rename_transpose_drop,
    rescale,
    rotate_residual,
)
from weightmark.attacks.prune import magnitude_prune, semi_structured

__all__ = ["COLLUSIONS", "collude", "merge", "magnitude_prune", "semi_structured", "function_preserving", "permute_experts", "permute_ffn", "permute_heads", "rename_transpose_drop", "rescale",
           "rotate_residual", "add_noise", "cast", "map_floats", "quantization_error", "relative_error", "requantize",
           "requantize_array"]
