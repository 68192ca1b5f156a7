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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weightmark.align import _rows, _sample_index, align, relative_difference
from weightmark.canonical import as_2d, kind_of
from weightmark.errors import InputFileError, RegistryError, UsageError
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
    log10_hoeffding,
    log10_presence,
    p_from_log10,
    parse_scheme,
    z_statistics,
)
from weightmark.tardos import InnocentBound, TardosParams

CANDIDATES_SHOWN = 5
# Candidate models scanned at most, best-ranked first (each costs one pass over the suspect).
MAX_MODELS = 4


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
    # {"status": "ok" | "given" | "missing" | "changed" | "none", "path", "model_id"}
    reference_info: dict[str, Any] = field(default_factory=dict)
    elements_used: int = 0
    models_considered: int = 1  # the family-wise bound covers this many candidate models
    assume_licensees: int = 0
    realign: bool = True
    models: list[dict[str, Any]] = field(default_factory=list)  # every candidate model, ranked
    models_scanned: list[dict[str, Any]] = field(default_factory=list)
    ambiguous: bool = False  # the two best candidate models could not be told apart
    missing_shards: list[str] = field(default_factory=list)  # listed by the suspect's index, absent
    carrier_signal: list[dict[str, Any]] = field(default_factory=list, repr=False)
    carrier_signal_entries: list[int] = field(default_factory=list)
    bound_curve: list[list[float]] = field(default_factory=list, repr=False)

    @property
    def reference_warning(self) -> str | None:
        """A loud warning when the registered base could not be used (the scan went blind)."""
        status = self.reference_info.get("status")
        if status == REFERENCE_MISSING:
            return (f"the registered base of model {self.model!r} is missing at {self.reference_info.get('path')}: "
                    "this scan is blind and much weaker; point the model at its files with "
                    f"`weightmark model relocate {self.model} PATH`")
        if status == REFERENCE_CHANGED:
            return (f"the registered base of model {self.model!r} at {self.reference_info.get('path')} has changed "
                    "since registration: this scan is blind and much weaker; restore the files or run "
                    f"`weightmark model relocate {self.model} PATH`")
        return None

    @property
    def family_wise_factor(self) -> int:
        """What every p-value is multiplied by: issued codewords times candidate models."""
        return self.family_size * self.models_considered

    def innocents(self) -> dict[str, Any]:
        """The scores of every codeword not accused, as counts and statistics only."""
        accused = {c.entry_id for c in self.accused}
        rest = sorted((c for c in self.candidates if c.entry_id not in accused), key=lambda c: c.score)
        scores = np.array([c.score for c in rest], dtype=np.float64)
        return {
            "count": len(rest),
            "scores": [round(float(v), 4) for v in scores],
            "log10_p_values": [round(c.log10_p, 4) for c in rest],
            "score_max": round(float(scores.max()), 4) if scores.size else None,
            "score_mean": round(float(scores.mean()), 4) if scores.size else None,
            "score_std": round(float(scores.std()), 4) if scores.size else None,
        }

    def summary(self) -> str:
        """The finding in one sentence a non-specialist can read."""
        if self.accused:
            names = "; ".join(f"{c.name} ({c.jurisdiction})" for c in self.accused)
            worst = max(c.log10_family_wise_p for c in self.accused)
            return (f"The examined checkpoint carries the watermark issued to {names}; the chance that a "
                    f"licensee who did not receive it scores this high is below 10^{worst:.1f}.")
        return (f"The examined checkpoint was compared with the {self.family_size} copies issued of model "
                f"{self.model!r} and no licensee reached the accusation threshold "
                f"(family-wise p <= {self.threshold:g}).")

    def evidence_json(self) -> dict[str, Any]:
        """The scan as an evidence bundle records it: accused by name, innocents only as counts
        and score statistics (other customers' identities are confidential)."""
        out = self.to_json()
        del out["candidates"]
        out["innocents"] = self.innocents()
        out["bound_curve"] = self.bound_curve
        out["z"] = [round(float(v), 4) for v in (self.z if self.z is not None else [])]
        out["carrier_signal"] = self.carrier_signal
        out["summary"] = self.summary()
        return out

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
            "reference": {**self.reference_info, "path": self.reference_info.get("path")},
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
            "models_considered": self.models_considered,
            "models": self.models,
            "models_scanned": self.models_scanned,
            "ambiguous": self.ambiguous,
            "elements_used": self.elements_used,
            "missing_shards": self.missing_shards,
            "assume_licensees": self.assume_licensees,
            "realign": self.realign,
        }


# Prefixes that wrappers add to or strip from tensor names when a checkpoint is re-saved:
# a bare encoder saved through its task model gains "bert."; a llama saved without its head
# class loses "model."; DataParallel adds "module.", torch.compile "_orig_mod.", PEFT
# "base_model.model.".
NAME_PREFIXES = ("base_model.model.", "_orig_mod.", "module.", "model.", "bert.", "transformer.",
                 "roberta.", "encoder_model.", "language_model.")


def normalised_name(name: str) -> str:
    """`name` without the wrapper prefixes above (repeatedly: "module.model.x" -> "x")."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in NAME_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, stripped = name[len(prefix):], True
    return name


def name_aliases(suspect: QuantizedModel | SafetensorsSuspect, wanted: set[str]) -> dict[str, str]:
    """Registered tensor name -> the suspect's name for it.

    A registered name is found under its own name, else among the names a renaming format
    (GGUF) lists for a tensor, else as the one suspect tensor whose name equals it once wrapper
    prefixes are stripped from both ("bert.encoder.layer.0..." and "encoder.layer.0..."). A
    normalised name that two suspect tensors share is ambiguous and is not used.
    """
    metas = suspect.tensors()
    aliases = {name: name for name in wanted if name in metas}
    candidates: dict[str, tuple[str, ...]] = getattr(suspect, "name_candidates", {}) or {}
    for own, options in candidates.items():
        for option in options:
            if option in wanted and option not in aliases:
                aliases[option] = own
    missing = wanted - set(aliases)
    if missing:
        by_normal: dict[str, list[str]] = defaultdict(list)
        for own in metas:
            for option in (own, *candidates.get(own, ())):
                by_normal[normalised_name(option)].append(own)
        taken = set(aliases.values())
        for name in sorted(missing):
            owners = sorted(set(by_normal.get(normalised_name(name), ())))
            if len(owners) == 1 and owners[0] not in taken:
                aliases[name] = owners[0]
                taken.add(owners[0])
    return aliases


@dataclass(frozen=True)
class ModelMatch:
    """A registered model a suspect may be a copy of, and how well its carriers match."""

    model: Model
    matched: int  # carriers found in the suspect by (normalised) name with the registered shape
    registered: int
    distance: float | None = None  # relative distance to the base on sampled rows (None: not measured)

    @property
    def fraction(self) -> float:
        return self.matched / max(1, self.registered)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.name, "model_id": self.model.model_id, "carriers_matched": self.matched,
                "carriers_registered": self.registered,
                "distance": None if self.distance is None else round(self.distance, 6)}


def candidate_models(registry: Registry, suspect: QuantizedModel | SafetensorsSuspect) -> list[ModelMatch]:
    """Every registered model some of whose carriers the suspect holds by name and shape, most
    matched first. A partly published leak matches only some carriers; it is still a candidate."""
    known = registry.carrier_shapes()
    metas = suspect.tensors()
    aliases = name_aliases(suspect, {name for carriers in known.values() for name in carriers})
    shapes = {name: metas[own].shape for name, own in aliases.items()}
    by_id = {m.model_id: m for m in registry.models()}
    matches = []
    for model_id, carriers in known.items():
        matched = sum(1 for name, shape in carriers.items() if shapes.get(name) == shape)
        if matched and model_id in by_id:
            matches.append(ModelMatch(by_id[model_id], matched, len(carriers)))
    matches.sort(key=lambda m: (-m.fraction, m.model.entry_idx))
    return matches


def identify_model(registry: Registry, suspect: QuantizedModel | SafetensorsSuspect) -> Model:
    """The registered model most of whose carriers the suspect holds by name and shape."""
    matches = [m for m in candidate_models(registry, suspect) if m.fraction >= 0.5]
    if not matches:
        raise InputFileError(suspect.path, "matches no registered model by tensor names and shapes; pass --model NAME")
    return matches[0].model


def base_distance(suspect: QuantizedModel | SafetensorsSuspect, reference: QuantizedModel | SafetensorsSuspect,
                  carriers: dict[str, tuple[int, ...]], aliases: dict[str, str],
                  tensors: int = 4, rows: int = 16) -> float | None:
    """Median relative distance between suspect and reference on a few rows of a few carriers.

    It reads no key and no codeword, so ranking models by it leaves every licensee's p-value
    valid. None when no carrier could be compared.
    """
    names = sorted(n for n in carriers if n in aliases)
    if not names:
        return None
    picked = [names[i] for i in np.unique(np.linspace(0, len(names) - 1, min(tensors, len(names))).astype(int))]
    metas, ref_metas = suspect.tensors(), reference.tensors()
    out = []
    for name in picked:
        own = aliases[name]
        if metas[own].shape != carriers[name] or name not in ref_metas or ref_metas[name].shape != carriers[name]:
            continue
        sample = _sample_index(carriers[name][0], rows)
        with np.errstate(invalid="ignore", over="ignore"):
            d = relative_difference(_rows(suspect, own, sample), _rows(reference, name, sample))
        if math.isfinite(d):
            out.append(d)
    return float(np.median(out)) if out else None


REFERENCE_OK, REFERENCE_GIVEN, REFERENCE_MISSING, REFERENCE_CHANGED, REFERENCE_NONE = (
    "ok", "given", "missing", "changed", "none")


def _same_base(model: Model) -> tuple[QuantizedModel | SafetensorsSuspect | None, str]:
    """The registered base as reference and its status: "ok", or "missing" / "changed" (no
    reference: the scan falls back to blind and the caller must say so loudly).

    Files whose size or time changed are accepted when their weights still hash to the model
    id (a base copied without keeping times); a float base is read as stored, a base registered
    already quantized (GGUF, GPTQ) is dequantized.
    """
    from weightmark.model import (
        GGUF_FORMAT,
        PACKED_FORMATS,
        gguf_file_stats,
        gguf_manifest_id,
        manifest_id,
    )

    path = Path(model.base_path)
    if not path.exists():
        return None, REFERENCE_MISSING
    try:
        if model.format == GGUF_FORMAT:
            from weightmark.formats.gguf import GGUFModel

            base = GGUFModel(path)
            if gguf_file_stats(base) != model.files and gguf_manifest_id(base) != model.model_id:
                base.close()
                return None, REFERENCE_CHANGED
            return base, REFERENCE_OK
        ckpt = Checkpoint.open(path)
        if file_stats(ckpt) != model.files and manifest_id(ckpt) != model.model_id:
            ckpt.close()
            return None, REFERENCE_CHANGED
        if model.format in PACKED_FORMATS:
            from weightmark.formats.quantized import open_quantized

            ckpt.close()
            return open_quantized(path), REFERENCE_OK
        return SafetensorsSuspect(ckpt, path), REFERENCE_OK
    except InputFileError:
        return None, REFERENCE_CHANGED


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


@dataclass
class Extraction:
    """What one pass over the suspect's carriers gives: (num, den) per code length, and per
    carrier for the first code length its num and the sum of its den (so a report can show
    where the signal sits; 8 (L + 1) bytes kept per carrier)."""

    sums: dict[int, tuple[np.ndarray, np.ndarray]]
    used: int
    skipped: list[str]
    aligned: list[str]
    elements: int
    per_carrier: list[tuple[str, int, np.ndarray, float]]


def _extract_all(
    suspect: QuantizedModel | SafetensorsSuspect,
    reference: QuantizedModel | SafetensorsSuspect | None,
    carriers: list[Carrier],
    model_key: bytes,
    code_lengths: list[int],
    progress: Progress,
    config: dict[str, Any] | None = None,
    realign: bool = True,
    cluster: Any = None,
) -> Extraction:
    """Per code length, the (num, den) sums over every carrier found; with a reference the
    suspect is first re-aligned to it (renamed, permuted, rescaled or rotated carriers).

    With `cluster`, a sharded safetensors suspect is read one task per shard: each task returns
    its carriers' own sums, added here in carrier order as the serial loop adds them (the same
    numbers, bit for bit). The alignment is estimated here, once, and shipped with the tasks.
    """
    sums = {L: (np.zeros(L), np.zeros(L)) for L in code_lengths}
    first = code_lengths[0]
    alignment = None
    if reference is not None and realign:
        alignment = align(suspect, reference, {c.name: c.shape for c in carriers}, config)
        aliases = {c.name: own for c in carriers if (own := alignment.source(c.name)) is not None}
    else:
        aliases = name_aliases(suspect, {c.name for c in carriers})
    if cluster is not None and _sharded(suspect):
        results = cluster.carrier_sums(suspect, reference, alignment, carriers, aliases, model_key, code_lengths)
    else:
        metas = TensorTables(suspect, reference)

        def serial() -> Iterator[tuple[str | None, dict[int, tuple[np.ndarray, np.ndarray]]]]:
            for k, carrier in enumerate(carriers):
                if k + 1 < len(carriers):  # read the next carrier ahead from disk meanwhile
                    _prefetch(suspect, aliases.get(carriers[k + 1].name))
                    _prefetch(reference, carriers[k + 1].name)
                yield _carrier_sums(suspect, reference, alignment, carrier, aliases.get(carrier.name), model_key,
                                    code_lengths, metas)

        results = serial()
    used, skipped, elements, per_carrier = 0, [], 0, []
    for carrier, (problem, own_sums) in zip(carriers, results, strict=True):
        if problem is not None:
            skipped.append(f"{carrier.name}: {problem}")
            continue
        for L, (num, den) in sums.items():
            own_num, own_den = own_sums[L]
            num += own_num
            den += own_den
            if L == first:
                per_carrier.append((carrier.name, int(np.prod(carrier.shape)), own_num, float(own_den.sum())))
        used += 1
        elements += int(np.prod(carrier.shape))
        progress.advance(int(np.prod(carrier.shape)) * 2)
    return Extraction(sums, used, skipped, alignment.report if alignment is not None else [], elements,
                      per_carrier)


def _prefetch(source: QuantizedModel | SafetensorsSuspect | None, name: str | None) -> None:
    """Start reading a tensor of a safetensors suspect or reference from disk in the background."""
    if isinstance(source, SafetensorsSuspect) and name is not None and name in source.checkpoint.tensors:
        source.checkpoint.prefetch(name)


def _sharded(suspect: QuantizedModel | SafetensorsSuspect) -> bool:
    return isinstance(suspect, SafetensorsSuspect) and len(suspect.checkpoint.shards) > 1


class TensorTables:
    """The suspect's and the reference's tensor tables, read once per scan: readers build them
    on every `tensors()` call, and asking once per carrier costs time quadratic in the tensors."""

    def __init__(self, suspect: QuantizedModel | SafetensorsSuspect,
                 reference: QuantizedModel | SafetensorsSuspect | None) -> None:
        self.suspect = suspect.tensors()
        self.reference = reference.tensors() if reference is not None else {}


def _carrier_sums(
    suspect: QuantizedModel | SafetensorsSuspect,
    reference: QuantizedModel | SafetensorsSuspect | None,
    alignment: Any,
    carrier: Carrier,
    own: str | None,
    model_key: bytes,
    code_lengths: list[int],
    metas: TensorTables,
) -> tuple[str | None, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """One carrier's own (num, den) per code length, or why it was skipped."""
    if own is None:
        return "missing", {}
    meta = metas.suspect[own]
    moved = alignment is not None and not alignment.plans[carrier.name].identity
    if not moved and meta.shape != carrier.shape:
        return f"{meta.source_dtype} {list(meta.shape)} instead of {list(carrier.shape)}", {}
    if isinstance(suspect, SafetensorsSuspect) and meta.source_dtype not in FLOAT_CARRIER_DTYPES:
        return f"{meta.source_dtype} is not a float dtype", {}
    ref_raw, ref_kind = None, 0
    if reference is not None:
        ref_meta = metas.reference.get(carrier.name)
        if ref_meta is None or ref_meta.shape != carrier.shape:
            return "not in the reference", {}
        ref_raw, ref_kind = _values(reference, carrier.name, ref_meta.source_dtype)
    # Packed suspects that need no re-alignment are read straight from their blocks (one pass,
    # no float32 tensor); a reader without a kernel for this tensor says so and it is decoded.
    fused = None if moved else getattr(suspect, "extract_into", None)
    sus_raw, sus_kind = None, FLOAT
    if moved:
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            sus_raw, sus_kind = np.ascontiguousarray(alignment.tensor(carrier.name), dtype=np.float32), FLOAT
    elif fused is None:
        sus_raw, sus_kind = _values(suspect, own, meta.source_dtype)
    seed = carrier_seed(model_key, carrier.name)
    out = {}
    for L in code_lengths:
        num, den = np.zeros(L), np.zeros(L)
        if fused is not None and not fused(own, ref_raw, ref_kind, carrier.row_scale, seed, num, den):
            fused = None
            sus_raw, sus_kind = _values(suspect, own, meta.source_dtype)
        if fused is None:
            extract(sus_raw, sus_kind, ref_raw, ref_kind, carrier.row_scale, seed, num, den)
        out[L] = (num, den)
    del sus_raw, ref_raw
    for source, name in ((suspect, own), (reference, carrier.name)):
        if isinstance(source, SafetensorsSuspect):
            source.checkpoint.release(name)
        elif source is not None and hasattr(source, "release"):  # GGUF: drop the tensor's pages
            source.release(name)
    return None, out


def carrier_signal(per_carrier: list[tuple[str, int, np.ndarray, float]], codewords: list[np.ndarray]
                   ) -> list[dict[str, Any]]:
    """Per carrier, each given codeword's correlation with that carrier's own statistics,
    sum_i c_i num_i / sqrt(sum_i den_i): about N(0, 1) for a codeword the carrier does not carry,
    large where it does. Illustration of where the mark sits, not a p-value."""
    out = []
    for name, elements, num, den_sum in per_carrier:
        scale = math.sqrt(den_sum)
        scores = [float(np.dot(c.astype(np.float64), num) / scale) if scale > 0 else 0.0 for c in codewords]
        out.append({"name": name, "elements": elements, "scores": [round(v, 4) for v in scores]})
    return out


def bound_curve(scheme: SchemeParams | TardosParams, model_key: bytes, z: np.ndarray, top: float,
                points: int = 48) -> list[list[float]]:
    """The innocent bound log10 P(S >= s) at `points` scores from 0 to `top` (for figures)."""
    grid = np.linspace(0.0, max(top, 1.0), points)
    if isinstance(scheme, TardosParams):
        values = InnocentBound(z, scheme.biases(model_key)).log10_p_exact(grid)
    else:
        values = np.array([log10_hoeffding(float(s)) for s in grid])
    return [[round(float(s), 4), round(float(v), 4)] for s, v in zip(grid, values, strict=True)]


def _scan_model(
    registry: Registry,
    keys: LabKeys,
    suspect: QuantizedModel | SafetensorsSuspect,
    suspect_path: str | os.PathLike[str],
    model: Model,
    ref: QuantizedModel | SafetensorsSuspect | None,
    reference_info: dict[str, Any],
    threshold: float,
    assume_licensees: int,
    models_considered: int,
    progress: Progress,
    realign: bool,
    cluster: Any = None,
) -> ScanReport:
    """Extract and score one registered model's issued codewords against the suspect."""
    carriers = registry.carriers(model.model_id)
    issued = registry.issued(model.model_id)
    params = {copy.entry_idx: parse_scheme(copy.scheme) for copy in issued}
    code_lengths = sorted({p.code_length for p in params.values()}) or [DEFAULT_CODE_LENGTH]
    model_key = keys.model_key(model.model_id)
    total = sum(int(np.prod(c.shape)) * 2 for c in carriers)
    progress.begin(f"scanning {Path(suspect_path).name} ({suspect.format}) as {model.name}", total)
    try:
        ex = _extract_all(suspect, ref, carriers, model_key, code_lengths, progress, _base_config(model), realign,
                          cluster)
    finally:
        progress.end()
    if ex.used == 0:
        raise InputFileError(suspect_path, f"holds none of model {model.name!r}'s carriers with matching shapes")

    family = max(len(issued), assume_licensees, 1)
    by_scheme: dict[str, list] = defaultdict(list)
    for copy in issued:
        by_scheme[copy.scheme].append(copy)
    z_by_length = {L: z_statistics(*ex.sums[L]) for L in code_lengths}
    presence = None
    for z in z_by_length.values():
        stat, log_p, k = log10_presence(z)
        # One presence test per code length in use and per model considered: Bonferroni.
        log_p = min(0.0, log_p + math.log10(len(code_lengths) * models_considered))
        if presence is None or log_p < presence[1]:
            presence = (stat, log_p, k)
    candidates: list[Candidate] = []
    licensees = {lic.id: lic for lic in registry.licensees()}  # every row checked against its entry
    voided = registry.voided_issues()  # still scored: the codeword was reserved for that licensee
    for text, copies in by_scheme.items():
        scheme = params[copies[0].entry_idx]
        scores, log_ps = scheme.score(model_key, [c.codeword_index for c in copies],
                                      z_by_length[scheme.code_length])
        for copy, score, lp in zip(copies, scores, log_ps, strict=True):
            lic = licensees.get(copy.licensee_id)
            if lic is None:
                raise RegistryError(f"registry entry {copy.entry_idx}: its licensee {copy.licensee_id} has no "
                                    "licensee row; run `weightmark registry verify`")
            candidates.append(Candidate(lic.id, lic.name, lic.jurisdiction, copy.entry_idx, copy.codeword_index,
                                        text, float(score), float(lp),
                                        log10_family_wise(float(lp), family * models_considered),
                                        copy.entry_idx not in voided))
    candidates.sort(key=lambda c: (c.log10_p, -c.score))
    scheme_text = candidates[0].scheme if candidates else str(SchemeParams(code_length=code_lengths[0]))
    report = ScanReport(
        suspect=str(Path(suspect_path).resolve()), format=suspect.format, model=model.name, model_id=model.model_id,
        scheme=scheme_text, mode="non-blind" if ref is not None else "blind",
        reference=reference_info.get("path") if ref is not None else None, threshold=threshold,
        family_size=family, carriers_used=ex.used, carriers_total=len(carriers), carriers_skipped=ex.skipped,
        presence_statistic=presence[0], presence_log10_p=presence[1], positions_used=presence[2],
        candidates=candidates, aligned=ex.aligned, z=z_by_length[code_lengths[0]],
        reference_info=reference_info, elements_used=ex.elements, models_considered=models_considered,
        assume_licensees=assume_licensees, realign=realign,
        missing_shards=list(getattr(getattr(suspect, "checkpoint", None), "missing_shards", [])),
    )
    # Figures for reports: where the accused's codewords sit, and the innocents' bound.
    first = code_lengths[0]
    accused = [c for c in report.accused if parse_scheme(c.scheme).code_length == first]
    report.carrier_signal = carrier_signal(
        ex.per_carrier, [parse_scheme(c.scheme).codeword(model_key, c.codeword_index) for c in accused])
    report.carrier_signal_entries = [c.entry_id for c in accused]
    top = max((c.score for c in candidates), default=1.0)
    report.bound_curve = bound_curve(parse_scheme(scheme_text), model_key, z_by_length[parse_scheme(scheme_text).code_length],
                                     top * 1.1)
    return report


def _open_reference(model: Model, reference: str | os.PathLike[str] | None, blind: bool
                    ) -> tuple[QuantizedModel | SafetensorsSuspect | None, dict[str, Any]]:
    """The reference of a non-blind scan of `model` and what to report about it."""
    if blind:
        return None, {"status": REFERENCE_NONE, "path": None, "model_id": model.model_id}
    if reference is not None:
        return open_suspect(reference), {"status": REFERENCE_GIVEN, "path": str(Path(reference).resolve()),
                                         "model_id": model.model_id}
    ref, status = _same_base(model)
    return ref, {"status": status, "path": str(Path(model.base_path).resolve()), "model_id": model.model_id}


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
    max_models: int = MAX_MODELS,
    *,
    cluster: Any = None,
) -> ScanReport:
    """Scan a suspect checkpoint and name the licensees whose codeword it carries.

    Without `model_name`, every registered model some of whose carriers the suspect holds (by
    name, after normalising prefixes, and shape) is a candidate. Candidates are ranked by how
    many carriers match and, for a non-blind scan, by the suspect's distance to each base on a
    few sampled rows (no key or codeword is read, so ranking keeps every p-value valid). Up to
    `max_models` of them are scanned in that order, stopping at the first that accuses; every
    family-wise p-value is multiplied by the number of models that could be scanned, so the
    bound covers the choice. Non-blind scans first re-align the suspect to the reference.
    With `cluster` (weightmark.cluster.Cluster), a sharded suspect is read one task per shard.
    """
    if blind and reference is not None:
        raise UsageError("--blind and --reference exclude each other")
    if not 0.0 < threshold < 1.0:
        raise UsageError(f"threshold must be in (0, 1), got {threshold}")
    if max_models < 1:
        raise UsageError(f"max models must be at least 1, got {max_models}")
    suspect = open_suspect(suspect_path)
    try:
        if model_name:
            matches = [ModelMatch(registry.model(model_name), 0, 0)]
        else:
            matches = candidate_models(registry, suspect)
            if not matches:
                raise InputFileError(suspect_path, "matches no registered model by tensor names and shapes; "
                                                   "pass --model NAME")
        references: dict[str, tuple[Any, dict[str, Any]]] = {}
        try:
            if len(matches) > 1 and not blind and reference is None:
                ranked = []
                for match in matches:
                    ref, info = references[match.model.model_id] = _open_reference(match.model, None, False)
                    distance = None
                    if ref is not None:
                        shapes = {c.name: c.shape for c in registry.carriers(match.model.model_id)}
                        distance = base_distance(suspect, ref, shapes, name_aliases(suspect, set(shapes)))
                    ranked.append(ModelMatch(match.model, match.matched, match.registered, distance))
                # Most carriers matched first (a partial leak of one model over a full one of
                # another); among equals, the closest base.
                matches = sorted(ranked, key=lambda m: (-round(m.fraction, 3), math.inf if m.distance is None
                                                        else m.distance, m.model.entry_idx))
            considered = matches[:max_models]
            reports: list[ScanReport] = []
            for match in considered:
                key = match.model.model_id
                if key not in references:
                    references[key] = _open_reference(match.model, reference, blind)
                ref, info = references[key]
                report = _scan_model(registry, keys, suspect, suspect_path, match.model, ref, info, threshold,
                                     assume_licensees, len(considered), progress, realign, cluster)
                reports.append(report)
                if report.accused:
                    break
        finally:
            for ref, _ in references.values():
                if ref is not None:
                    ref.close()
    finally:
        suspect.close()
    chosen = next((r for r in reports if r.accused), reports[0])
    chosen.models = [m.to_json() for m in matches]
    chosen.models_scanned = [{"model": r.model, "model_id": r.model_id, "accused": len(r.accused),
                              "best_score": round(r.candidates[0].score, 4) if r.candidates else None}
                             for r in reports]
    chosen.ambiguous = _ambiguous(matches)
    return chosen


def _ambiguous(matches: list[ModelMatch]) -> bool:
    """Whether the two best candidates could not be told apart by carriers and distance."""
    if len(matches) < 2:
        return False
    a, b = matches[0], matches[1]
    if round(a.fraction, 3) != round(b.fraction, 3):
        return False
    if a.distance is None or b.distance is None:
        return True
    return b.distance < 1.5 * a.distance
