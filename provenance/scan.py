"""Scanning a suspect checkpoint: extract the z statistics, score every issued codeword, accuse.

The only p-values reported are those the scheme supports. An innocent licensee's codeword is
independent of the suspect (and of the re-alignment, which reads only the suspect and the
reference): under ss-v1 (uniform codes) P(S >= t) <= exp(-t^2/2) (Hoeffding); under tardos-v2
the exact Chernoff bound of the Tardos score given the biases and z (weightmark.tardos). Over
the N codewords of the model the family-wise bound is min(1, N p).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weightmark.align import align
from weightmark.canonical import as_2d, kind_of
from weightmark.errors import InputFileError, UsageError
from weightmark.formats import QuantizedModel, SafetensorsSuspect, open_suspect
from weightmark.formats.safetensors import Checkpoint
from weightmark.kernels import FLOAT, extract
from weightmark.keys import LabKeys
from weightmark.model import file_stats
from weightmark.progress import NO_PROGRESS, Progress
from weightmark.registry.store import Carrier, Model, Registry
from weightmark.scheme import (
    DEFAULT_CODE_LENGTH,
    DEFAULT_THRESHOLD,
    FLOAT_CARRIER_DTYPES,
    SchemeParams,
    carrier_seed,
    log10_family_wise,
    log10_presence,
    p_from_log10,
    parse_scheme,
    z_statistics,
)

CANDIDATES_SHOWN = 5


@dataclass(frozen=True)
class Candidate:
    licensee_id: str
    name: str
    jurisdiction: str
    entry_id: int
    codeword_index: int
    scheme: str
    score: float
    log10_p: float
    log10_family_wise_p: float
    delivered: bool = True  # False: an issue-void entry says this copy never left the lab

    def to_json(self) -> dict[str, Any]:
        return {
            "licensee_id": self.licensee_id,
            "name": self.name,
            "jurisdiction": self.jurisdiction,
            "entry_id": self.entry_id,
            "codeword_index": self.codeword_index,
            "score": round(self.score, 6),
            "p_value": p_from_log10(self.log10_p),
            "log10_p_value": round(self.log10_p, 4),
            "family_wise_p_value": p_from_log10(self.log10_family_wise_p),
            "log10_family_wise_p_value": round(self.log10_family_wise_p, 4),
            "delivered": self.delivered,
        }


@dataclass
class ScanReport:
    suspect: str
    format: str  # the suspect's format as found: "safetensors", "gguf", "gptq", ...
    model: str
    model_id: str
    scheme: str
    mode: str  # "non-blind" or "blind"
    reference: str | None
    threshold: float
    family_size: int
    carriers_used: int
    carriers_total: int
    carriers_skipped: list[str]
    presence_statistic: float
    presence_log10_p: float
    positions_used: int
    candidates: list[Candidate] = field(default_factory=list)  # every codeword, best first
    aligned: list[str] = field(default_factory=list)  # what re-alignment to the reference undid
    z: np.ndarray | None = field(default=None, repr=False)  # z statistics of the first code length

    @property
    def accused(self) -> list[Candidate]:
        limit = math.log10(self.threshold)
        return [c for c in self.candidates if c.log10_family_wise_p <= limit]

    @property
    def watermark_present(self) -> bool:
        return self.presence_log10_p <= math.log10(self.threshold)

    def to_json(self) -> dict[str, Any]:
        return {
            "suspect": self.suspect,
            "format": self.format,
            "model": self.model,
            "model_id": self.model_id,
            "scheme": self.scheme,
            "mode": self.mode,
            "reference": self.reference,
            "carriers": {"used": self.carriers_used, "registered": self.carriers_total,
                         "skipped": self.carriers_skipped},
            "aligned": self.aligned,
            "watermark_present": {
                "present": self.watermark_present,
                "statistic": round(self.presence_statistic, 4),
                "degrees_of_freedom": self.positions_used,
                "p_value": p_from_log10(self.presence_log10_p),
                "log10_p_value": round(self.presence_log10_p, 4),
            },
            "accused": [c.to_json() for c in self.accused],
            "candidates": [c.to_json() for c in self.candidates[:CANDIDATES_SHOWN]],
            "threshold": self.threshold,
            "family_size": self.family_size,
        }


def name_aliases(suspect: QuantizedModel | SafetensorsSuspect, wanted: set[str]) -> dict[str, str]:
    """Registered tensor name -> the suspect's name for it.

    Formats that rename tensors (GGUF) list every Hugging Face name a tensor could have; a
    registered name found among a tensor's candidates is taken as that tensor.
    """
    metas = suspect.tensors()
    aliases = {name: name for name in wanted if name in metas}
    candidates: dict[str, tuple[str, ...]] = getattr(suspect, "name_candidates", {}) or {}
    for own, options in candidates.items():
        for option in options:
            if option in wanted and option not in aliases:
                aliases[option] = own
    return aliases


def identify_model(registry: Registry, suspect: QuantizedModel | SafetensorsSuspect) -> Model:
    """The registered model most of whose carriers the suspect holds by name and shape."""
    known = registry.carrier_shapes()
    metas = suspect.tensors()
    aliases = name_aliases(suspect, {name for carriers in known.values() for name in carriers})
    shapes = {name: metas[own].shape for name, own in aliases.items()}
    best: tuple[float, str] | None = None
    for model_id, carriers in known.items():
        matched = sum(1 for name, shape in carriers.items() if shapes.get(name) == shape)
        fraction = matched / len(carriers)
        if fraction >= 0.5 and (best is None or fraction > best[0]):
            best = (fraction, model_id)
    if best is None:
        raise InputFileError(suspect.path, "matches no registered model by tensor names and shapes; pass --model NAME")
    return registry.model_by_id(best[1])


def _same_base(model: Model) -> QuantizedModel | SafetensorsSuspect | None:
    """The registered base as reference, when its files are still there and unchanged.

    A float base is read as stored; a base registered already quantized (GGUF, GPTQ) is
    dequantized.
    """
    from weightmark.model import GGUF_FORMAT, PACKED_FORMATS, gguf_file_stats

    path = Path(model.base_path)
    if not path.exists():
        return None
    if model.format in PACKED_FORMATS:
        from weightmark.formats.quantized import open_quantized

        try:
            with Checkpoint.open(path) as ckpt:
                unchanged = file_stats(ckpt) == model.files
            return open_quantized(path) if unchanged else None
        except InputFileError:
            return None
    if model.format == GGUF_FORMAT:
        from weightmark.formats.gguf import GGUFModel

        try:
            base = GGUFModel(path)
        except InputFileError:
            return None
        if gguf_file_stats(base) != model.files:
            base.close()
            return None
        return base
    try:
        ckpt = Checkpoint.open(path)
    except InputFileError:
        return None
    if file_stats(ckpt) != model.files:
        ckpt.close()
        return None
    return SafetensorsSuspect(ckpt, path)


def _values(source: QuantizedModel | SafetensorsSuspect, name: str, dtype: str) -> tuple[np.ndarray, int]:
    """A carrier's [out, in] view and how the kernels read it: plain safetensors as stored
    (bf16/f16/f32 bits, no copy), every other format dequantized to float32."""
    if isinstance(source, SafetensorsSuspect):
        return as_2d(source.checkpoint.raw(name)), kind_of(dtype)
    return as_2d(source.load(name)), FLOAT


def _base_config(model: Model) -> dict[str, Any] | None:
    """The base's config.json (head counts for re-alignment), if it is there and readable."""
    base = Path(model.base_path)
    path = (base if base.is_dir() else base.parent) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _extract_all(
    suspect: QuantizedModel | SafetensorsSuspect,
    reference: QuantizedModel | SafetensorsSuspect | None,
    carriers: list[Carrier],
    model_key: bytes,
    code_lengths: list[int],
    progress: Progress,
    config: dict[str, Any] | None = None,
    realign: bool = True,
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int, list[str], list[str]]:
    """Per code length, the (num, den) sums over every carrier found; with a reference the
    suspect is first re-aligned to it (renamed, permuted, rescaled or rotated carriers)."""
    sums = {L: (np.zeros(L), np.zeros(L)) for L in code_lengths}
    metas = suspect.tensors()
    alignment = None
    if reference is not None and realign:
        alignment = align(suspect, reference, {c.name: c.shape for c in carriers}, config)
        aliases = {c.name: own for c in carriers if (own := alignment.source(c.name)) is not None}
    else:
        aliases = name_aliases(suspect, {c.name for c in carriers})
    used, skipped = 0, []
    for carrier in carriers:
        own = aliases.get(carrier.name)
        if own is None:
            skipped.append(f"{carrier.name}: missing")
            continue
        meta = metas[own]
        moved = alignment is not None and not alignment.plans[carrier.name].identity
        if not moved and meta.shape != carrier.shape:
            skipped.append(f"{carrier.name}: {meta.source_dtype} {list(meta.shape)} instead of {list(carrier.shape)}")
            continue
        if isinstance(suspect, SafetensorsSuspect) and meta.source_dtype not in FLOAT_CARRIER_DTYPES:
            skipped.append(f"{carrier.name}: {meta.source_dtype} is not a float dtype")
            continue
        ref_raw, ref_kind = None, 0
        if reference is not None:
            ref_meta = reference.tensors().get(carrier.name)
            if ref_meta is None or ref_meta.shape != carrier.shape:
                skipped.append(f"{carrier.name}: not in the reference")
                continue
            ref_raw, ref_kind = _values(reference, carrier.name, ref_meta.source_dtype)
        if moved:
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                sus_raw, sus_kind = np.ascontiguousarray(alignment.tensor(carrier.name), dtype=np.float32), FLOAT
        else:
            sus_raw, sus_kind = _values(suspect, own, meta.source_dtype)
        seed = carrier_seed(model_key, carrier.name)
        for num, den in sums.values():
            extract(sus_raw, sus_kind, ref_raw, ref_kind, carrier.row_scale, seed, num, den)
        del sus_raw, ref_raw
        for source, name in ((suspect, own), (reference, carrier.name)):
            if isinstance(source, SafetensorsSuspect):
                source.checkpoint.release(name)
        used += 1
        progress.advance(int(np.prod(carrier.shape)) * 2)
    return sums, used, skipped, alignment.report if alignment is not None else []


def scan(
    registry: Registry,
    keys: LabKeys,
    suspect_path: str | os.PathLike[str],
    model_name: str | None = None,
    reference: str | os.PathLike[str] | None = None,
    blind: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    assume_licensees: int = 0,
    progress: Progress = NO_PROGRESS,
    realign: bool = True,
) -> ScanReport:
    """Scan a suspect checkpoint and name the licensees whose codeword it carries.

    Non-blind scans first re-align the suspect to the reference (`realign`, on by default).
    """
    if blind and reference is not None:
        raise UsageError("--blind and --reference exclude each other")
    if not 0.0 < threshold < 1.0:
        raise UsageError(f"threshold must be in (0, 1), got {threshold}")
    suspect = open_suspect(suspect_path)
    try:
        model = registry.model(model_name) if model_name else identify_model(registry, suspect)
        carriers = registry.carriers(model.model_id)
        issued = registry.issued(model.model_id)
        params = {copy.entry_idx: parse_scheme(copy.scheme) for copy in issued}
        code_lengths = sorted({p.code_length for p in params.values()}) or [DEFAULT_CODE_LENGTH]
        ref = None
        if reference is not None:
            ref = open_suspect(reference)
        elif not blind:
            ref = _same_base(model)
        try:
            model_key = keys.model_key(model.model_id)
            total = sum(int(np.prod(c.shape)) * 2 for c in carriers)
            progress.begin(f"scanning {Path(suspect_path).name} ({suspect.format})", total)
            sums, used, skipped, aligned = _extract_all(suspect, ref, carriers, model_key, code_lengths,
                                                        progress, _base_config(model), realign)
            progress.end()
            mode = "non-blind" if ref is not None else "blind"
            ref_path = str(Path(reference if reference is not None else model.base_path).resolve()) if ref else None
        finally:
            if ref is not None:
                ref.close()
    finally:
        suspect.close()
    if used == 0:
        raise InputFileError(suspect_path, f"holds none of model {model.name!r}'s carriers with matching shapes")

    family = max(len(issued), assume_licensees, 1)
    by_scheme: dict[str, list] = defaultdict(list)
    for copy in issued:
        by_scheme[copy.scheme].append(copy)
    z_by_length = {L: z_statistics(*sums[L]) for L in code_lengths}
    presence = None
    for z in z_by_length.values():
        stat, log_p, k = log10_presence(z)
        # One presence test per code length in use: Bonferroni over them.
        log_p = min(0.0, log_p + math.log10(len(code_lengths)))
        if presence is None or log_p < presence[1]:
            presence = (stat, log_p, k)
    licensees = {lic.id: lic for lic in registry.licensees()}
    voided = registry.voided_issues()  # still scored: the codeword was reserved for that licensee
    candidates: list[Candidate] = []
    for text, copies in by_scheme.items():
        scheme = params[copies[0].entry_idx]
        scores, log_ps = scheme.score(model_key, [c.codeword_index for c in copies],
                                      z_by_length[scheme.code_length])
        for copy, score, lp in zip(copies, scores, log_ps, strict=True):
            lic = licensees[copy.licensee_id]
            candidates.append(Candidate(lic.id, lic.name, lic.jurisdiction, copy.entry_idx, copy.codeword_index,
                                        text, float(score), float(lp), log10_family_wise(float(lp), family),
                                        copy.entry_idx not in voided))
    candidates.sort(key=lambda c: (c.log10_p, -c.score))
    scheme = candidates[0].scheme if candidates else str(SchemeParams(code_length=code_lengths[0]))
    return ScanReport(
        suspect=str(Path(suspect_path).resolve()), format=suspect.format, model=model.name, model_id=model.model_id, scheme=scheme,
        mode=mode, reference=ref_path, threshold=threshold, family_size=family, carriers_used=used,
        carriers_total=len(carriers), carriers_skipped=skipped, presence_statistic=presence[0],
        presence_log10_p=presence[1], positions_used=presence[2], candidates=candidates, aligned=aligned,
        z=z_by_length[code_lengths[0]],
    )
