"""Stamping an already-quantized base by moving its integer codes (the lab has no float master).

A quantized base's values lie on a grid: each code's step is fixed by its block's scales. The
licensee's perturbation `delta_j` is far below a step, so each element's code moves ONE step
towards `w_j + delta_j` with probability `|delta_j| / step_j` (more steps when delta spans
several), decided by the keyed uniform of the element's hash. The expected value is exactly
`w_j + delta_j`; scales, mins, tensor order, types, alignment and metadata stay byte for byte
as in the base. The element hash is defined on the canonical Hugging Face view [out, in] of
each carrier, so delta is computed in canonical row order and applied at the stored positions
(GGUF stores q/k rows rope-permuted; GPTQ packs [in, out] words along the input axis).
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from weightmark.canonical import as_2d, kind_of, to_float32
from weightmark.errors import InputFileError, UsageError
from weightmark.formats.gguf import GGUFModel, GGUFTensorInfo, rope_permute, rope_unpermute
from weightmark.formats.safetensors import Checkpoint, TensorInfo, write_like
from weightmark.fsutil import sha256_file
from weightmark.issuing import issue_copy
from weightmark.kernels import FLOAT, element_hashes, embed
from weightmark.kernels.quantize import nudge_codes
from weightmark.keys import LabKeys
from weightmark.model import (
    GGUF_FLOAT_TYPES,
    GGUF_FORMAT,
    PACKED_FORMATS,
    open_registered_base,
)
from weightmark.outputs import STAMPED_COPY, Protected, prepare_output
from weightmark.progress import NO_PROGRESS, Progress
from weightmark.registry.policy import Policy
from weightmark.registry.store import Carrier, IssuedCopy, Model, Registry
from weightmark.scheme import DEFAULT_ALPHA, DEFAULT_COLLUSION, carrier_seed

__all__ = [
    "keyed_steps",
    "nudge_packed",
    "quantized_variant",
    "stamp_quantized_base",
    "write_code_stamped",
    "write_packed_stamped",
]

# Elements per block of rows nudged at once: bounds the hash, delta and uniform buffers.
_BLOCK_ELEMENTS = 1 << 20
_TOP = np.uint64(63)
_HIGH = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_LOW31 = np.uint64(0x7FFFFFFF)
_U_SCALE = 1.0 / 2147483648.0  # 2**-31, as the kernels' uniform_of
_FLOAT_STORAGE = {"F32": "<f4", "F16": "<u2", "BF16": "<u2"}
_SAME_FORMAT = ("", "same", GGUF_FORMAT, *PACKED_FORMATS)
_GPTQ_DTYPE = re.compile(r"^gptq-int(2|4|8)-g(\d+)(-gidx)?(-v2)?$")


def keyed_steps(
    row_scale: np.ndarray, code: np.ndarray, seed: int, alpha: float, row_start: int, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """Delta and stochastic-rounding uniforms of canonical rows [row_start, row_start + rows).

    Element j = row * cols + column gets hash h = H(seed, j): chip from the top bit, code
    position by multiply-high of the low 32 bits, uniform from bits 32..62 (the same bits the
    dense embed kernel uses). delta_j = alpha * s_row * chip_j * code[p_j] (float32); rows whose
    scale is zero or not finite get delta 0. Returns (delta float32, uniforms float64), both
    [rows, cols].
    """
    h = element_hashes(seed, row_start * cols, rows * cols).reshape(rows, cols)
    length = code.shape[0]
    # chip * code[position] in one lookup: index position + L * (top bit of h).
    signs = np.concatenate([code, -code]).astype(np.float32)
    index = ((h & _LOW32) * np.uint64(length)) >> _HIGH
    index += (h >> _TOP) * np.uint64(length)
    scale = np.asarray(row_scale[row_start : row_start + rows], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        amplitude = np.where((scale > 0.0) & np.isfinite(scale), alpha * scale, 0.0)
    # float32(a * +-1) == +-float32(a): the same delta the dense kernel adds, rounded once.
    delta = signs[index]
    delta *= amplitude.astype(np.float32)[:, None]
    h >>= _HIGH
    h &= _LOW31
    uniforms = h.astype(np.float64)
    uniforms *= _U_SCALE
    return delta, uniforms


def _block_rows(cols: int, unit: int) -> int:
    """Rows per block: about _BLOCK_ELEMENTS elements, a multiple of `unit` rows."""
    return max(1, _BLOCK_ELEMENTS // max(1, cols * unit)) * unit


def _nudged_tensor(base: GGUFModel, info: GGUFTensorInfo, carrier: Carrier, code: np.ndarray,
                   seed: int, alpha: float) -> Iterator[tuple[int, bytes]]:
    """(byte offset in the tensor, new bytes) for each block of stored rows of a code carrier."""
    cols = info.ne[0]
    rows = info.numel // cols
    raw = base.raw(info.name).reshape(rows, -1)
    heads = info.rope_heads
    head_rows = rows // heads if heads else 1
    block = _block_rows(cols, head_rows)
    for start in range(0, rows, block):
        count = min(rows - start, block)
        delta, uniforms = keyed_steps(carrier.row_scale, code, seed, alpha, start, count, cols)
        if heads:
            # The block holds whole heads; rope_permute works within each head.
            delta = np.ascontiguousarray(rope_permute(delta, count // head_rows))
            uniforms = np.ascontiguousarray(rope_permute(uniforms, count // head_rows))
        stored = np.ascontiguousarray(raw[start : start + count])
        yield start * raw.shape[1], nudge_codes(info.ggml_type, stored, delta, uniforms).tobytes()


def _rounded_float_tensor(base: GGUFModel, info: GGUFTensorInfo, carrier: Carrier, code: np.ndarray,
                          seed: int, alpha: float) -> bytes:
    """New bytes of an F32/F16/BF16 carrier: w + delta, stochastically rounded on f16/bf16 grids."""
    cols = info.ne[0]
    rows = info.numel // cols
    stored = base.raw(info.name).view(_FLOAT_STORAGE[info.ggml_type]).reshape(rows, cols)
    canonical = rope_unpermute(stored, info.rope_heads) if info.rope_heads else stored
    kind = FLOAT if info.ggml_type == "F32" else kind_of(info.ggml_type)
    stamped = embed(np.ascontiguousarray(canonical), kind, carrier.row_scale, code, seed, alpha)
    if info.rope_heads:
        stamped = rope_permute(stamped, info.rope_heads)
    return np.ascontiguousarray(stamped).tobytes()


def write_code_stamped(
    base: GGUFModel,
    carriers: dict[str, Carrier],
    code: np.ndarray,
    model_key: bytes,
    alpha: float,
    target: Path,
    progress: Progress = NO_PROGRESS,
) -> None:
    """Write `target`: the base file with every carrier's codes nudged, all else byte-identical.

    The base is copied as is (header, metadata, tensor order, alignment, every non-carrier
    byte); then each carrier's stored bytes are replaced in place, one block of rows at a time,
    and the file is synced.
    """
    for name, carrier in carriers.items():
        try:
            info = base.info(name)
        except KeyError:
            raise InputFileError(base.path, f"registered carrier {name!r} is not in the base") from None
        if (info.ggml_type, info.shape) != (carrier.dtype, carrier.shape):
            raise InputFileError(base.path, f"tensor {name!r} is {info.ggml_type} {list(info.shape)}, not the "
                                            f"registered {carrier.dtype} {list(carrier.shape)}")
    shutil.copyfile(base.path, target)
    with open(target, "r+b") as fh:
        fd = fh.fileno()
        for name, carrier in carriers.items():
            info = base.info(name)
            seed = carrier_seed(model_key, name)
            if info.ggml_type in GGUF_FLOAT_TYPES:
                os.pwrite(fd, _rounded_float_tensor(base, info, carrier, code, seed, alpha), info.begin)
            else:
                for offset, data in _nudged_tensor(base, info, carrier, code, seed, alpha):
                    os.pwrite(fd, data, info.begin + offset)
            base.release(name)
            progress.advance(info.nbytes)
        os.fsync(fd)


# -- GPTQ: int32 words packed along the input axis ------------------------------------------


def nudge_packed(words: np.ndarray, bits: int, step: np.ndarray, delta: np.ndarray,
                 uniforms: np.ndarray) -> np.ndarray:
    """Move the codes of GPTQ words [in * bits / 32, out] (low bits first, packed along the
    input axis) by keyed stochastic steps; returns new words, int32, same shape.

    step, delta and uniforms are canonical [out, in]: each code moves floor(|delta| / |step|)
    steps towards delta, plus one more with the remaining probability (uniforms < it), clamped
    to [0, 2^bits - 1]; zero steps and zero deltas leave the code as it was.
    """
    per = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits))[None, :, None]
    packed, out_features = words.shape
    u32 = np.ascontiguousarray(words).view(np.uint32)
    codes = ((u32[:, None, :] >> shifts) & mask).reshape(packed * per, out_features).T.astype(np.int64)
    step = np.asarray(step, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(delta.astype(np.float64) / step)
    ratio = np.where(np.isfinite(ratio), ratio, 0.0)
    whole = np.floor(ratio)
    moves = np.minimum(whole, 1e6).astype(np.int64) + (uniforms < ratio - whole)
    moves *= np.where((delta > 0) == (step > 0), 1, -1)
    codes = np.clip(codes + moves, 0, int(mask)).astype(np.uint32).T.reshape(packed, per, out_features)
    return np.bitwise_or.reduce(codes << shifts, axis=1).view(np.int32)


def _gptq_step(ckpt: Checkpoint, prefix: str, carrier: Carrier) -> tuple[int, np.ndarray]:
    """(bits, step [out, in]) of a GPTQ layer: one code step is the scale of its group."""
    match = _GPTQ_DTYPE.match(carrier.dtype)
    if match is None:
        raise InputFileError(ckpt.root, f"carrier {carrier.name!r} has unknown packed type {carrier.dtype!r}")
    bits, size = int(match.group(1)), int(match.group(2))
    out_features, in_features = carrier.shape
    scales_info = ckpt.info(f"{prefix}.scales")
    scales = to_float32(scales_info.dtype, ckpt.raw(f"{prefix}.scales"))  # [groups, out]
    if match.group(3):
        groups = np.asarray(ckpt.raw(f"{prefix}.g_idx")).astype(np.int64)
    else:
        groups = np.arange(in_features) // size
    return bits, np.ascontiguousarray(scales.T[:, groups])


def write_packed_stamped(
    base: Checkpoint,
    carriers: dict[str, Carrier],
    code: np.ndarray,
    model_key: bytes,
    alpha: float,
    target: Path,
    progress: Progress = NO_PROGRESS,
) -> dict[str, str]:
    """Write a GPTQ copy at `target`: qweight codes nudged, scales, zeros, g_idx, every other
    tensor, the tensor order, metadata and side files (config.json) as in the base."""
    by_packed = {name.removesuffix(".weight") + ".qweight": c for name, c in carriers.items()
                 if c.dtype.startswith("gptq-")}

    def transform(name: str, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
        carrier = by_packed.get(name) or carriers.get(name)
        if carrier is None:
            return raw
        seed = carrier_seed(model_key, carrier.name)
        if name in by_packed:
            bits, step = _gptq_step(base, name.removesuffix(".qweight"), carrier)
            out_features, in_features = carrier.shape
            words = np.empty(raw.shape, dtype=np.int32)
            block = _block_rows(in_features, 1)  # canonical rows = output columns of the words
            for start in range(0, out_features, block):
                stop = min(out_features, start + block)
                delta, uniforms = keyed_steps(carrier.row_scale, code, seed, alpha, start, stop - start,
                                              in_features)
                words[:, start:stop] = nudge_packed(raw[:, start:stop], bits, step[start:stop], delta, uniforms)
            return words
        return embed(as_2d(raw), kind_of(info.dtype), carrier.row_scale, code, seed, alpha).reshape(raw.shape)

    return write_like(base, target, transform, progress.advance)


def quantized_variant(fmt: str, carriers: dict[str, Carrier]) -> str:
    """'quantized:<format>:<types>' from the carriers' stored types (quantized:gguf:Q4_1+Q8_0)."""
    types = Counter(c.dtype for c in carriers.values())
    return f"quantized:{fmt}:" + "+".join(sorted(types))


def stamp_quantized_base(
    registry: Registry,
    keys: LabKeys,
    model: Model,
    licensee_id: str,
    out: str | os.PathLike[str],
    alpha: float = DEFAULT_ALPHA,
    overwrite: bool = False,
    progress: Progress = NO_PROGRESS,
    policy: Policy | None = None,
    override_reason: str | None = None,
    fmt: str = "same",
    collusion: int = DEFAULT_COLLUSION,
) -> IssuedCopy:
    """Issue a licensee's copy of a quantized base, in the base's own format (see stamp.stamp).

    Policy first (a refused issue writes nothing), then the copy is made by issuing.issue_copy
    (journalled, staged, synced, recorded as a signed entry, and only then moved to `out`).
    """
    from weightmark.facts import verified_facts
    from weightmark.stamp import policy_gate, stamp_scheme

    if model.format != GGUF_FORMAT and model.format not in PACKED_FORMATS:
        raise UsageError(f"model {model.name!r} has a {model.format} base, which cannot be stamped by "
                         "moving codes")
    if fmt not in _SAME_FORMAT:
        raise UsageError(f"model {model.name!r} was registered from a quantized {model.format} base; its copies "
                         f"are written in that same format, so --format {fmt!r} is not available")
    licensee = registry.licensee(licensee_id)
    params = stamp_scheme(registry, model, alpha, collusion)
    carriers = {c.name: c for c in registry.carriers(model.model_id)}
    target = prepare_output(out, STAMPED_COPY, force=overwrite, registry=registry,
                            protected=Protected.of_lab(registry.home, registry))
    is_gguf = model.format == GGUF_FORMAT
    opened = open_registered_base(model)
    with opened as base:
        variant = quantized_variant(model.format, carriers)
        policy_record = policy_gate(policy, licensee.jurisdiction, variant, override_reason,
                                    lambda: verified_facts(registry, model))
        model_key = keys.model_key(model.model_id)
        index = registry.reserve_codeword(model.model_id)
        code = params.codeword(model_key, index)
        if is_gguf:
            total = sum(base.info(name).nbytes for name in carriers)
        else:
            total = sum(info.nbytes for _, info in base.tensors.values())
        folder = not is_gguf and base.is_folder

        def write(staging: Path) -> tuple[dict[str, str], str]:
            if is_gguf:
                write_code_stamped(base, carriers, code, model_key, params.alpha, staging, progress)
                return {target.final.name: sha256_file(staging)}, model.format
            return write_packed_stamped(base, carriers, code, model_key, params.alpha, staging, progress), model.format

        def record(files: dict[str, str], output_format: str) -> IssuedCopy:
            return registry.record_issue(model, licensee, index, str(params), output_format, variant,
                                         str(target.final), files, keys, policy_record)

        progress.begin(f"stamping {model.name} for {licensee.name}", total)
        try:
            issued = issue_copy(registry, keys, model, licensee, index, target, folder, write, record)
        finally:
            progress.end()
    return issued
