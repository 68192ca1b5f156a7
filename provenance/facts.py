"""Model facts for export-control classification: measured from a base's weights, declared by the lab.

Measured facts come from the tensors and config of a registered base (total parameters, MoE
experts, active parameters per token, architecture, context length, dtypes, quantization) and
are recorded in the signed model entry (or a later signed `model-facts` entry from
`weightmark model measure`). Declared facts (training compute and tokens, benchmark scores,
capabilities) are signed `model-facts` entries naming who declared them and when. The facts in
force for a model are the latest value of each fact over its entries, in log order: a later
declaration amends an earlier one for later decisions, while issued copies keep the facts they
recorded.

Parameter counts are logical weights: the element count of every tensor as the model computes
with it. For GGUF, a tensor's dimensions (ne) are logical, so quantized blocks count their
weights, not their bytes; for GPTQ, each quantized layer counts out x in weights (its packed
qweight words, qzeros, scales and g_idx are quantization side data and are not counted).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import tomllib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightmark.errors import InputFileError, RegistryError, UsageError

if TYPE_CHECKING:
    from weightmark.registry.log import LogEntry, Trust
    from weightmark.registry.store import Model, Registry

__all__ = [
    "BENCHMARK_NAME",
    "check_fact_index",
    "MEASURED_FACTS",
    "NUMERIC_FACTS",
    "Fact",
    "declaration",
    "facts_in_force",
    "load_declaration_file",
    "measure",
    "parse_benchmark",
    "recorded_control_classes",
    "signed_statement",
    "verified_facts",
]

MAX_CONFIG_BYTES = 1 << 20
# Facts a policy rule may compare, beyond benchmark scores (which are named freely).
NUMERIC_FACTS = ("params", "active_params", "moe_total_params", "experts", "experts_active",
                 "context_length", "training_flops", "training_tokens")
MEASURED_FACTS = ("params", "active_params", "moe_total_params", "moe", "experts", "experts_active",
                  "architecture", "context_length", "dtypes", "quantization")  # experts: 0 for dense
BENCHMARK_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_CAPABILITY = re.compile(r"[a-z0-9][a-z0-9-]*")

# Config keys, in the order they are tried (Mixtral, Qwen-MoE, DeepSeek, DBRX, OLMoE, ...).
_EXPERT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
_ACTIVE_KEYS = ("num_experts_per_tok", "moe_top_k", "num_selected_experts", "top_k")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_PER_EXPERT = re.compile(r"^(?P<layer>.*?)(?:^|\.)experts\.(?P<expert>\d+)\.")


@dataclass(frozen=True)
class Fact:
    """One fact in force: its value and where it comes from (the signed entry that says so)."""

    name: str
    value: Any
    source: str  # "measured", "declared" or "estimated"
    entry: int  # the log index of the signed entry
    key_id: str  # the key that signed it
    at: str  # when it was measured or declared (UTC)
    by: str | None = None  # who declared it (--by), if given
    note: str | None = None  # the declaration's source text, or how an estimate was made

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "entry": self.entry, "key_id": self.key_id,
                "at": self.at, "by": self.by, "note": self.note}


# -- measuring -----------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model folder ({} when there is none); bounded, never executed."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    with open(path, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise InputFileError(path, f"is larger than {MAX_CONFIG_BYTES} bytes; not a model config")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(path, f"is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InputFileError(path, "is not a JSON object, so not a model config")
    text = doc.get("text_config")  # multimodal configs keep the language model's numbers here
    return {**doc, **text} if isinstance(text, dict) else doc


def _config_int(config: Mapping[str, Any], keys: Iterable[str]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _moe_counts(tensors: Iterable[tuple[str, tuple[int, ...], bool]], experts_active: int | None,
                ) -> tuple[int, int, int | None, int | None]:
    """(total, routed-expert params, experts per layer, active params per token) from
    (name, shape, fused_expert) triples.

    Per-expert tensors are `...experts.<E>.` names; fused expert tensors hold every expert of a
    layer along their first dimension. Active parameters are the non-expert parameters plus, in
    each layer, `experts_active` times that layer's mean expert size (experts of one layer have
    the same shapes in every MoE architecture we know; unknown when experts_active is unknown).
    """
    total = 0
    expert_params: dict[str, int] = defaultdict(int)
    expert_ids: dict[str, set[int]] = defaultdict(set)
    fused_experts: dict[str, int] = {}
    for name, shape, fused in tensors:
        n = math.prod(shape)
        total += n
        match = _PER_EXPERT.match(name)
        if match is not None:
            expert_params[match["layer"]] += n
            expert_ids[match["layer"]].add(int(match["expert"]))
        elif fused and len(shape) == 3:
            layer = name.rsplit(".", 2)[0]
            expert_params[layer] += n
            fused_experts[layer] = shape[0]
    routed = sum(expert_params.values())
    per_layer = {layer: len(ids) for layer, ids in expert_ids.items()} | fused_experts
    experts = max(per_layer.values()) if per_layer else None
    if not routed:
        return total, 0, None, total
    if experts_active is None:
        return total, routed, experts, None
    active = total - routed + sum(
        params * min(experts_active, per_layer[layer]) // per_layer[layer] for layer, params in expert_params.items())
    return total, routed, experts, active


def _facts_from(total_and_moe: tuple[int, int, int | None, int | None], config: Mapping[str, Any],
                architecture: str | None, context: int | None, dtypes: Counter[str],
                quantization: str | None, how: str, experts_active: int | None) -> dict[str, Any]:
    total, routed, observed_experts, active = total_and_moe
    experts = _config_int(config, _EXPERT_KEYS) or observed_experts
    moe = bool(routed) or (experts or 0) > 1
    if not moe:
        active_how = "a dense model: every parameter is active"
    elif not routed:
        active = total
        active_how = ("the config declares experts but no expert tensor was recognised by name, so every "
                      "parameter is counted as active (an upper bound)")
    elif active is None:
        active_how = "unknown: the config does not say how many experts are active per token"
    else:
        active_how = (f"non-expert parameters plus {experts_active} of each layer's experts "
                      "(each layer's expert parameters x active / experts)")
    return {
        "params": total,
        "params_method": how,
        "moe": moe,
        "experts": experts if moe else 0,
        "experts_active": experts_active if moe else 0,
        "active_params": active,
        "active_params_method": active_how,
        "moe_total_params": total if moe else 0,
        "architecture": architecture,
        "context_length": context,
        "dtypes": dict(sorted(dtypes.items())),
        "quantization": quantization,
    }


def _hf_architecture(config: Mapping[str, Any]) -> str | None:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs):
        return "+".join(archs)
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def _measure_safetensors(path: Path, packed: bool) -> dict[str, Any]:
    folder = path if path.is_dir() else path.parent
    config = _read_config(folder)
    k = _config_int(config, _ACTIVE_KEYS)
    dtypes: Counter[str] = Counter()
    if packed:
        from weightmark.formats.quantized import open_quantized

        reader = open_quantized(path)
        if reader is None:
            raise InputFileError(path, "holds no quantized layers")
        try:
            metas = list(reader.tensors().values())
            fmt = reader.format
        finally:
            reader.close()
        for m in metas:
            dtypes[m.source_dtype] += math.prod(m.shape)
        triples = [(m.name, tuple(m.shape), "experts" in m.name) for m in metas]
        how = (f"sum of logical weights over every tensor: {fmt} layers count out x in weights, "
               "not packed words; zeros, scales and g_idx are not counted")
        quant = config.get("quantization_config")
        bits = quant.get("bits") if isinstance(quant, dict) else None
        quantization = f"{fmt}" + (f" {bits}-bit" if isinstance(bits, int) else "")
    else:
        from weightmark.formats.safetensors import Checkpoint

        with Checkpoint.open(path) as ckpt:
            infos = [(name, info) for name, (_, info) in ckpt.tensors.items()]
        for _, info in infos:
            dtypes[info.dtype] += math.prod(info.shape)
        triples = [(name, tuple(info.shape), "experts" in name) for name, info in infos]
        how = "sum of the element counts of every tensor"
        quantization = None
    counts = _moe_counts(triples, k)
    return _facts_from(counts, config, _hf_architecture(config), _config_int(config, _CONTEXT_KEYS),
                       dtypes, quantization, how, k)


def _measure_gguf(path: Path) -> dict[str, Any]:
    from weightmark.formats.gguf import GGUFModel

    with GGUFModel(path) as model:
        arch = model.architecture
        meta = model.metadata
        infos = [model.info(name) for name in model.tensors()]

    def key(name: str) -> int | None:
        value = meta.get(f"{arch}.{name}") if arch else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    k = key("expert_used_count")
    dtypes: Counter[str] = Counter()
    for info in infos:
        dtypes[info.ggml_type] += info.numel
    triples = [(info.name, info.shape, "_exps" in info.source_name) for info in infos]
    counts = _moe_counts(triples, k)
    quantized = sorted({t for t in dtypes if t not in ("F32", "F16", "BF16")})
    config = {"num_local_experts": key("expert_count")} if key("expert_count") else {}
    return _facts_from(counts, config, arch, key("context_length"), dtypes,
                       ("gguf " + "+".join(quantized)) if quantized else None,
                       "sum of logical weights over every tensor (product of its GGUF dimensions), "
                       "not of stored block bytes", k)


def measure(path: str | Path, fmt: str) -> dict[str, Any]:
    """The measured facts of a base in format `fmt` ("safetensors", "gguf", "gptq")."""
    path = Path(path)
    if fmt == "gguf":
        return _measure_gguf(path)
    return _measure_safetensors(path, packed=fmt != "safetensors")


# -- declaring -----------------------------------------------------------------------------------


def _positive(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{option} {value!r} must be a positive number (e.g. 3.1e25)")
    return float(value)


def _benchmark(name: object, value: object) -> tuple[str, float]:
    if not isinstance(name, str) or not BENCHMARK_NAME.fullmatch(name):
        raise UsageError(f"benchmark name {name!r} must be lower-case letters, digits, '.', '_' or '-' "
                         "(e.g. mmlu, gpqa-diamond)")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise UsageError(f"benchmark {name}={value!r} must be a score between 0 and 1 "
                         "(write 0.862 for 86.2%)")
    return name, float(value)


def parse_benchmark(text: str) -> tuple[str, float]:
    """'mmlu=0.862' -> ('mmlu', 0.862)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise UsageError(f"--benchmark {text!r} must be NAME=SCORE, e.g. mmlu=0.862")
    try:
        score = float(value)
    except ValueError:
        raise UsageError(f"--benchmark {text!r}: {value!r} is not a number") from None
    return _benchmark(name.strip(), score)


def declaration(params: int | None, training_flops: float | None = None, training_tokens: float | None = None,
                benchmarks: Mapping[str, float] | None = None, capabilities: Iterable[str] = (),
                source: str | None = None) -> dict[str, Any]:
    """The validated facts of one declaration; tokens without flops give an estimate of
    6 x params x tokens, with `params` the active parameters per token (total for a dense model)."""
    facts: dict[str, Any] = {}
    if training_flops is not None:
        facts["training_flops"] = _positive("--training-flops", training_flops)
    if training_tokens is not None:
        facts["training_tokens"] = _positive("--training-tokens", training_tokens)
    for name, score in (benchmarks or {}).items():
        name, score = _benchmark(name, score)
        facts[name] = score
    caps = []
    for cap in capabilities:
        if not isinstance(cap, str) or not _CAPABILITY.fullmatch(cap):
            raise UsageError(f"capability {cap!r} must be lower-case letters, digits and '-' (e.g. agentic)")
        caps.append(cap)
    if caps:
        facts["capabilities"] = sorted(set(caps))
    if not facts:
        raise UsageError("nothing to declare: give --training-flops, --training-tokens, --benchmark or "
                         "--capability (or --from FILE)")
    estimate = None
    if "training_tokens" in facts and "training_flops" not in facts:
        if params is None:
            raise UsageError("--training-tokens without --training-flops needs the model's measured active "
                             "parameters to estimate compute; run `weightmark model measure` first")
        facts["training_flops"] = 6.0 * params * facts["training_tokens"]
        estimate = (f"training_flops estimated as 6 x {params} active parameters x "
                    f"{facts['training_tokens']:.4g} tokens")
    source_text = (source or "").strip() or None
    return {"facts": facts, "source": source_text, "estimate": estimate}


_FILE_KEYS = ("training_flops", "training_tokens", "benchmarks", "capabilities", "source", "by")


def load_declaration_file(path: str | Path) -> dict[str, Any]:
    """A facts TOML file: training_flops, training_tokens, [benchmarks] name = score,
    capabilities = [...], source, by. Unknown keys are refused."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise InputFileError(path, f"cannot read the facts file: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InputFileError(path, f"is larger than {MAX_CONFIG_BYTES} bytes; not a facts file")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputFileError(path, f"is not valid TOML: {exc}") from None
    for key in doc:
        if key not in _FILE_KEYS:
            raise InputFileError(path, f"key {key!r} is not a facts key (allowed: {', '.join(_FILE_KEYS)})")
    benchmarks = doc.get("benchmarks", {})
    capabilities = doc.get("capabilities", [])
    if not isinstance(benchmarks, dict) or not isinstance(capabilities, list):
        raise InputFileError(path, "benchmarks must be a table (mmlu = 0.862) and capabilities a list of names")
    for key in ("source", "by"):
        if key in doc and not isinstance(doc[key], str):
            raise InputFileError(path, f"{key} must be a string")
    return doc


# -- the facts in force ----------------------------------------------------------------------------


def facts_in_force(entries: Iterable[tuple[int, str, str, dict[str, Any]]]) -> dict[str, Fact]:
    """The latest value of each fact over a model's signed entries, in log order.

    `entries` are (log index, kind, signing key id, predicate) of the model's `model` entry and
    its `model-facts` entries. Facts a later entry does not mention stay as they were.
    """
    out: dict[str, Fact] = {}
    for idx, kind, key_id, pred in sorted(entries, key=lambda e: e[0]):
        if kind == "model":
            measured, at, by, note, how = pred.get("facts"), pred.get("registered_at"), None, None, "measured"
        else:
            measured, at, by, note, how = pred.get("facts"), pred.get("at"), pred.get("by"), pred.get("source"), \
                pred.get("how", "declared")
        if not isinstance(measured, dict):
            continue
        estimate = pred.get("estimate") if kind != "model" else None
        for name, value in measured.items():
            if name.endswith("_method"):  # how a measured fact was measured: the note of that fact
                continue
            source = "estimated" if (estimate and name == "training_flops") else how
            text = estimate if source == "estimated" else measured.get(f"{name}_method", note)
            out[name] = Fact(name, value, source, idx, key_id, str(at), by, text)
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def signed_statement(registry: Registry, idx: int, trust: Trust | None = None) -> dict[str, Any]:
    """The statement of entry `idx`, after checking its signature against the log's key chain
    (RegistryError naming the entry when it does not verify)."""
    from cryptography.exceptions import InvalidSignature

    from weightmark.registry.envelope import verify
    from weightmark.registry.log import LogVerificationError, trust_from_entries

    if trust is None:
        trust = trust_from_entries(registry.key_chain_entries())
    entry = registry.entry(idx)
    try:
        verify(entry.payload, entry.signature, trust.key_for(entry.key_id, entry.idx).public_key)
        statement = entry.statement
        if statement["predicate"]["log_index"] != idx:
            raise LogVerificationError(f"entry {idx}: the statement names log index "
                                       f"{statement['predicate']['log_index']}")
    except (InvalidSignature, LogVerificationError, KeyError, TypeError, ValueError):
        raise RegistryError(f"entry {idx}: its signed statement does not verify; "
                            "run `weightmark registry verify`") from None
    return statement


def verified_facts(registry: Registry, model: Model) -> dict[str, Fact]:
    """The facts in force for `model`, read from its signed entries, each signature checked
    against the log's key chain (RegistryError naming the entry when one does not verify)."""
    from weightmark.registry.log import statement_kind, trust_from_entries

    trust = trust_from_entries(registry.key_chain_entries())
    found = []
    for entry in registry.model_fact_entries(model):
        statement = signed_statement(registry, entry.idx, trust)
        kind = statement_kind(statement)
        pred = statement["predicate"]
        if kind not in ("model", "model-facts") or pred.get("model_id") != model.model_id:
            raise RegistryError(f"entry {entry.idx}: is not a signed fact entry of model {model.name!r}; "
                                "run `weightmark registry verify`")
        found.append((entry.idx, kind, entry.key_id, pred))
    return facts_in_force(found)


def recorded_control_classes(statement: Mapping[str, Any]) -> list[str]:
    """The control classes an issued copy's signed policy record names (none before classes)."""
    record = statement.get("predicate", {}).get("policy") or {}
    classes = (record.get("control") or {}).get("classes")
    return [c for c in classes if isinstance(c, str)] if isinstance(classes, list) else []


def check_fact_index(registry: Registry, entries: Iterable[LogEntry]) -> None:
    """The model-facts index must list exactly the log's `model-facts` entries (a deleted row would
    hide a declaration from later decisions); LogVerificationError naming the first difference."""
    from weightmark.registry.log import LogVerificationError, statement_kind

    signed = {}
    for entry in entries:
        if b"model-facts" not in entry.payload:  # cheap pre-filter, as for key rotations
            continue
        statement = entry.statement
        if statement_kind(statement) == "model-facts":
            signed[entry.idx] = statement["predicate"].get("model_id")
    indexed = dict(registry.model_fact_index())
    for idx in sorted(set(signed) | set(indexed)):
        if signed.get(idx) != indexed.get(idx):
            what = "is missing from" if idx not in indexed else "is not a model-facts entry of" \
                if idx not in signed else "names another model in"
            raise LogVerificationError(f"entry {idx}: {what} the model-facts index")
