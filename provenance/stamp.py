"""Stamping: write a licensee's copy of a registered base with its codeword embedded."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from weightmark.canonical import as_2d, kind_of
from weightmark.errors import InputFileError, PolicyDenied, UsageError
from weightmark.facts import Fact, verified_facts
from weightmark.formats.safetensors import Checkpoint, TensorInfo, write_like
from weightmark.issuing import issue_copy
from weightmark.kernels import embed
from weightmark.keys import LabKeys
from weightmark.model import open_registered_base
from weightmark.moe import expert_unit, is_fused_hf_experts, split_unit
from weightmark.outputs import STAMPED_COPY, Protected, prepare_output
from weightmark.progress import NO_PROGRESS, Progress
from weightmark.quantized_stamp import (
    dtype_stamper,
    float_stamper,
    is_packed,
    parse_format,
    quantized_variant,
    write_stamped_copy,
)
from weightmark.registry.policy import Policy
from weightmark.registry.store import Carrier, IssuedCopy, Model, Registry
from weightmark.scheme import (
    DEFAULT_ALPHA,
    DEFAULT_COLLUSION,
    SchemeParams,
    carrier_seed,
    choose_scheme,
)
from weightmark.tardos import TardosParams


def embed_tensor(name: str, info: TensorInfo, raw: np.ndarray, out: np.ndarray, carriers: dict[str, Carrier],
                 code: np.ndarray, model_key: bytes, alpha: float, where: Path) -> np.ndarray:
    """One stored tensor of a float copy with its carriers stamped (`out`), or `raw` itself when it
    carries nothing. A fused expert tensor is stamped expert by expert, each slice with its own
    unit carrier `<name>[e]` (weightmark.moe)."""
    units = [(name, raw, out)]
    if name not in carriers and is_fused_hf_experts(name, info.shape):
        units = [(expert_unit(name, e), raw[e], out[e]) for e in range(info.shape[0])]
    stamped = False
    for unit, unit_raw, unit_out in units:
        carrier = carriers.get(unit)
        if carrier is None:
            unit_out[...] = unit_raw
            continue
        if (info.dtype, tuple(unit_raw.shape)) != (carrier.dtype, carrier.shape):
            raise InputFileError(where, f"tensor {unit!r} is not the registered {carrier.dtype} {list(carrier.shape)}")
        embed(as_2d(unit_raw), kind_of(info.dtype), carrier.row_scale, code, carrier_seed(model_key, unit), alpha,
              out=as_2d(unit_out))
        stamped = True
    return out if stamped else raw


def variant_of(ckpt: Checkpoint, carrier_names: set[str]) -> str:
    """'full-precision:<dtype>' from the carriers' dtypes (e.g. full-precision:BF16)."""
    dtypes = Counter(info.dtype for name, (_, info) in ckpt.tensors.items() if name in carrier_names)
    return "full-precision:" + "+".join(sorted(dtypes))


def policy_gate(policy: Policy | None, jurisdiction: str, variant: str,
                override_reason: str | None, facts: Callable[[], dict[str, Fact]] | None = None) -> dict[str, object]:
    """The policy record of an issue; raises PolicyDenied when refused and not overridden.

    With control classes, `facts` gives the model's facts in force; the record then holds the
    classification, the rules that decided and the facts they used. A refusal for facts the
    model lacks cannot be overridden: the facts must be declared.
    """
    reason = (override_reason or "").strip() or None
    if policy is None:
        return {"installed": False, "override_reason": reason}
    decision = policy.decide(jurisdiction, variant, facts() if policy.classes and facts is not None else None)
    if decision.refusal is not None:
        raise PolicyDenied(f"{decision.refusal}; nothing was issued")
    if not decision.allowed and reason is None:
        raise PolicyDenied(f"{decision.rule}; nothing was issued "
                           "(give --override-reason TEXT to issue anyway, recorded in the signed entry)")
    return {
        "installed": True,
        "version": policy.version,
        "date": policy.date.isoformat(),
        "sha256": policy.sha256,
        **decision.to_json(),
        "decision": "allowed" if decision.allowed else "overridden",
        "override_reason": reason,
    }


def stamp_scheme(registry: Registry, model: Model, alpha: float, collusion: int) -> SchemeParams | TardosParams:
    """The scheme of a new copy of `model` (see scheme.choose_scheme)."""
    elements = sum(math.prod(c.shape) for c in registry.carriers(model.model_id))
    return choose_scheme(alpha, collusion, elements, (c.scheme for c in registry.issued(model.model_id)))


def stamp(
    registry: Registry,
    keys: LabKeys,
    model_name: str,
    licensee_id: str,
    out: str | os.PathLike[str],
    alpha: float = DEFAULT_ALPHA,
    overwrite: bool = False,
    progress: Progress = NO_PROGRESS,
    policy: Policy | None = None,
    override_reason: str | None = None,
    fmt: str = "same",
    collusion: int = DEFAULT_COLLUSION,
    cluster: Any = None,
) -> IssuedCopy:
    """Write the licensee's stamped copy at `out` (same format, layout and dtypes as the base).

    With `cluster` (weightmark.cluster.Cluster) a float safetensors copy in the base's format is
    written one task per shard; the entry is still appended here, after every shard is in.

    The jurisdiction policy is consulted first: a refused issue raises PolicyDenied before
    anything is written, unless `override_reason` is given (it goes into the signed entry).
    `out` must not exist, or with `overwrite` hold a copy this lab issued there (see outputs).
    The copy is made by issuing.issue_copy: journalled, written to a temporary name, synced,
    recorded as a signed registry entry, and only then moved to `out`; a crash at any point is
    finished or rolled back by the next command that opens the lab.
    `fmt` "same" keeps the base's format; "gguf:Q4_K_M" and the like write a quantized GGUF,
    "gptq:4bit-g128", "awq:4bit-g128", "ct:w4a16", "ct:w8a16" and "bnb:nf4" a quantized
    safetensors folder, with scales frozen from the unstamped base (see quantized_stamp).
    A base registered already quantized (GGUF, GPTQ) is stamped by moving its codes (see
    code_stamp).
    """
    if (quantized := registry.model(model_name)).format != "safetensors":
        from weightmark.code_stamp import stamp_quantized_base

        return stamp_quantized_base(registry, keys, quantized, licensee_id, out, alpha, overwrite, progress,
                                    policy, override_reason, fmt, collusion)
    file_type = parse_format(fmt)
    model = registry.model(model_name)
    licensee = registry.licensee(licensee_id)
    params = stamp_scheme(registry, model, alpha, collusion)
    carriers = {c.name: c for c in registry.carriers(model.model_id)}
    if file_type is not None and (fused := next((n for n in carriers if split_unit(n) is not None), None)):
        # The quantized writers stamp whole 2-D tensors; a fused expert tensor's units would be
        # written unstamped, a copy that traces to nobody through its experts.
        raise UsageError(f"{model_name}: {fmt} copies of a base with fused expert tensors "
                         f"({split_unit(fused)[0]}) are not supported; stamp with --format same")
    target = prepare_output(out, STAMPED_COPY, force=overwrite, registry=registry,
                            protected=Protected.of_lab(registry.home, registry))
    with open_registered_base(model) as base:
        variant = variant_of(base, set(carriers)) if file_type is None else quantized_variant(file_type)
        policy_record = policy_gate(policy, licensee.jurisdiction, variant, override_reason,
                                    lambda: verified_facts(registry, model))
        model_key = keys.model_key(model.model_id)
        index = registry.reserve_codeword(model.model_id)
        code = params.codeword(model_key, index)

        def transform(name: str, info: TensorInfo, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
            return embed_tensor(name, info, raw, out, carriers, code, model_key, params.alpha, base.root)

        total = sum(info.nbytes for _, info in base.tensors.values())
        is_dir = (base.is_folder and file_type is None) or is_packed(file_type)

        def write(staging: Path) -> tuple[dict[str, str], str]:
            if file_type is None:
                # On a cluster: one task per output shard (weightmark.cluster), the same bytes.
                shards = None if cluster is None else cluster.shard_stamper(
                    base, carriers, code, model_key, params.alpha, progress.advance)
                return write_like(base, staging, transform, progress.advance, scratch=True,
                                  write_shards=shards), "safetensors"
            seeds = {name: carrier_seed(model_key, name) for name in carriers}
            stamper = float_stamper(carriers, code, seeds, params.alpha)
            raw_stamper = dtype_stamper(carriers, code, seeds, params.alpha, base.root)
            return write_stamped_copy(base, Path(model.base_path), staging, target.final.name, file_type, stamper,
                                      raw_stamper, progress.advance)

        def record(files: dict[str, str], output_format: str) -> IssuedCopy:
            return registry.record_issue(model, licensee, index, str(params), output_format, variant,
                                         str(target.final), files, keys, policy_record)

        progress.begin(f"stamping {model.name} for {licensee.name}", total)
        try:
            issued = issue_copy(registry, keys, model, licensee, index, target, is_dir, write, record)
        finally:
            progress.end()
    return issued
