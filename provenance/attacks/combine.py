"""Attacks that combine several checkpoints of one base: model merging and collusion.

Colluding licensees hold k differently stamped copies and build one from them, element-wise
(average, median, min, max, a random min/max mix, a random pick per weight) or by taking
whole tensors or rows from one copy or another. Everything streams: one tensor at a time,
read from all k files in blocks of rows, written in the first source's layout and dtypes.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from weightmark.canonical import from_float32, to_float32
from weightmark.errors import UsageError
from weightmark.formats.safetensors import FLOAT_DTYPES, Checkpoint, TensorInfo, write_like
from weightmark.fsutil import staged_output
from weightmark.scheme import canonical_2d

COLLUSIONS = ("average", "interleave-tensor", "interleave-row", "median", "min", "max", "minmax",
              "random-pick")
BLOCK_ELEMENTS = 1 << 20  # per source: rows are combined in blocks of about this many weights

# (k x rows x cols stack of the sources' values, random generator) -> rows x cols combined
BlockRule = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _pick(stack: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """stack[choice[i, j], i, j] for every (i, j); choice broadcasts against stack[0]."""
    choice = np.broadcast_to(choice, stack.shape[1:])
    return np.take_along_axis(stack, choice[None], axis=0)[0]


def _minmax(stack: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    use_max = rng.random(stack.shape[1:]) < 0.5
    return np.where(use_max, stack.max(axis=0), stack.min(axis=0))


_RULES: dict[str, BlockRule] = {
    "average": lambda stack, rng: stack.mean(axis=0, dtype=np.float64),
    "median": lambda stack, rng: np.median(stack, axis=0),
    "min": lambda stack, rng: stack.min(axis=0),
    "max": lambda stack, rng: stack.max(axis=0),
    "minmax": _minmax,
    "interleave-row": lambda stack, rng: _pick(stack, rng.integers(0, len(stack), (stack.shape[1], 1))),
    "random-pick": lambda stack, rng: _pick(stack, rng.integers(0, len(stack), stack.shape[1:])),
}


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, tensor): each tensor's choices do not depend on the others."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def _check_same_layout(first: Checkpoint, others: Sequence[Checkpoint], labels: Sequence[object]) -> None:
    for ckpt, label in zip(others, labels, strict=True):
        for name, (_, info) in first.tensors.items():
            if name not in ckpt.tensors:
                raise UsageError(f"{label}: has no tensor {name!r}; only copies of one base can be combined")
            other = ckpt.info(name)
            if other.shape != info.shape or (other.dtype in FLOAT_DTYPES) != (info.dtype in FLOAT_DTYPES):
                raise UsageError(f"{label}: tensor {name!r} is {other.dtype} {list(other.shape)}, "
                                 f"not {info.dtype} {list(info.shape)} as in the first copy")


def _combine_files(
    sources: Sequence[str | os.PathLike[str]],
    dst: str | os.PathLike[str],
    combine: Callable[[str, TensorInfo, list[Checkpoint]], np.ndarray],
) -> Path:
    """Write dst in sources[0]'s layout; each float tensor is combine(name, info, checkpoints)."""
    dst = Path(dst)
    with ExitStack() as stack:
        ckpts = [stack.enter_context(Checkpoint.open(path)) for path in sources]
        _check_same_layout(ckpts[0], ckpts[1:], sources[1:])

        def transform(name: str, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
            if info.dtype not in FLOAT_DTYPES:
                return raw
            out = combine(name, info, ckpts)
            for ckpt in ckpts[1:]:
                ckpt.release(name)
            return from_float32(info.dtype, out.astype(np.float32).reshape(info.shape))

        staging = stack.enter_context(staged_output(dst, is_dir=ckpts[0].is_folder))
        write_like(ckpts[0], staging.path, transform)
        staging.publish()
    return dst


def _values_2d(ckpt: Checkpoint, name: str, rows: slice) -> np.ndarray:
    """Rows of a tensor's canonical [out, in] view, decoded to float32."""
    info = ckpt.info(name)
    shape = canonical_2d(info.shape) if len(info.shape) >= 2 else (1, info.numel)
    return to_float32(info.dtype, ckpt.raw(name).reshape(shape)[rows])


def merge(a: str | os.PathLike[str], b: str | os.PathLike[str], dst: str | os.PathLike[str],
          weight: float = 0.5) -> Path:
    """Linear merge of two checkpoints of one base: dst = weight x a + (1 - weight) x b.

    Every float tensor is merged (norms and biases too, as merging tools do); the output
    has a's layout and dtypes.
    """
    if not 0.0 <= weight <= 1.0:
        raise UsageError(f"merge weight must be in [0, 1], got {weight}")

    def combine(name: str, info: TensorInfo, ckpts: list[Checkpoint]) -> np.ndarray:
        wa = to_float32(info.dtype, ckpts[0].raw(name)).astype(np.float64)
        wb = to_float32(ckpts[1].info(name).dtype, ckpts[1].raw(name)).astype(np.float64)
        return weight * wa + (1.0 - weight) * wb

    return _combine_files([a, b], dst, combine)


def collude(sources: Sequence[str | os.PathLike[str]], dst: str | os.PathLike[str], how: str,
            seed: int = 0) -> Path:
    """Combine k copies of one base the way colluding licensees would.

    `how`: "average", "median", "min", "max" (element-wise, as numpy computes them);
    "minmax" (element-wise min or max by a random mask); "random-pick" (each weight from a
    random copy); "interleave-row" (each row of the [out, in] view from a random copy);
    "interleave-tensor" (each whole tensor from a random copy). Random choices come from
    `seed` and the tensor's name, so the output is deterministic. Applies to every float
    tensor; non-float tensors come from the first copy.
    """
    if how not in COLLUSIONS:
        raise UsageError(f"unknown collusion {how!r}; choose one of {', '.join(COLLUSIONS)}")
    if len(sources) < 2:
        raise UsageError(f"collusion needs at least 2 copies, got {len(sources)}")

    def combine(name: str, info: TensorInfo, ckpts: list[Checkpoint]) -> np.ndarray:
        rng = _tensor_rng(seed, name)
        if how == "interleave-tensor":
            source = ckpts[int(rng.integers(0, len(ckpts)))]
            return to_float32(source.info(name).dtype, source.raw(name))
        rule = _RULES[how]
        rows, cols = canonical_2d(info.shape) if len(info.shape) >= 2 else (1, info.numel)
        out = np.empty((rows, cols), dtype=np.float32)
        step = max(1, BLOCK_ELEMENTS // max(cols, 1))
        for start in range(0, rows, step):
            block = slice(start, min(rows, start + step))
            values = np.stack([_values_2d(ckpt, name, block) for ckpt in ckpts])
            out[block] = rule(values, rng)
        return out

    return _combine_files(sources, dst, combine)
