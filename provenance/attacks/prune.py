"""Pruning attacks: zero the smallest weights, unstructured or in N:M groups (2:4 sparsity).

Both act on every floating-point weight matrix (rank >= 2) and leave rank-1 tensors (norms,
biases) and the checkpoint's layout, dtypes and side files as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from weightmark.attacks.basic import map_floats
from weightmark.errors import UsageError
from weightmark.scheme import canonical_2d


def prune_array(values: np.ndarray, fraction: float) -> np.ndarray:
    """Zero exactly round(fraction x size) entries of smallest magnitude (ties broken by position)."""
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"pruning fraction must be in [0, 1], got {fraction}")
    flat = np.array(values, dtype=np.float32).reshape(-1)
    count = int(round(fraction * flat.size))
    if count == 0:
        return flat.reshape(values.shape)
    if count >= flat.size:
        return np.zeros(values.shape, dtype=np.float32)
    smallest = np.argpartition(np.abs(flat), count - 1)[:count]
    flat[smallest] = 0.0
    return flat.reshape(values.shape)


def semi_structured_array(values: np.ndarray, n: int = 2, m: int = 4) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive weights along the input dimension.

    The input dimension is the last axis of the canonical [out, in] view. A tensor whose input
    dimension is not a multiple of m is returned unchanged (sparse kernels cannot use it).
    """
    if not 0 < n <= m:
        raise UsageError(f"N:M sparsity needs 0 < n <= m, got {n}:{m}")
    rows, cols = canonical_2d(tuple(values.shape))
    if cols % m:
        return np.asarray(values, dtype=np.float32)
    groups = np.array(values, dtype=np.float32).reshape(rows, cols // m, m)
    # Stable sort: among equal magnitudes the later positions are the ones dropped.
    order = np.argsort(-np.abs(groups), axis=2, kind="stable")
    np.put_along_axis(groups, order[:, :, n:], 0.0, axis=2)
    return groups.reshape(values.shape)


def magnitude_prune(src: str | os.PathLike[str], dst: str | os.PathLike[str], fraction: float = 0.5) -> Path:
    """Unstructured magnitude pruning: per weight matrix, zero its `fraction` smallest |w|."""
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"pruning fraction must be in [0, 1], got {fraction}")
    return map_floats(src, dst, lambda name, w: prune_array(w, fraction))


def semi_structured(src: str | os.PathLike[str], dst: str | os.PathLike[str], n: int = 2, m: int = 4) -> Path:
    """N:M semi-structured sparsity (2:4 by default) along each weight matrix's input dimension."""
    if not 0 < n <= m:
        raise UsageError(f"N:M sparsity needs 0 < n <= m, got {n}:{m}")
    return map_floats(src, dst, lambda name, w: semi_structured_array(w, n, m))
