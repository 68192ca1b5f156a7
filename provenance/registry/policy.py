"""The lab's jurisdiction policy: a dated, versioned TOML file saying which variants each country may receive.

Besides its tiers (which apply to every model), a policy may define control classes: named
threshold rules on a model's facts (`params > 1e11`, `training_flops > 1e25`, any-of / all-of,
nested), each with its own tiers. A model that trips a class gets, per country, the most
restrictive of the policy's tiers and every tripped class's tiers; a model that trips none gets
the policy's tiers alone. A rule that needs a fact the model does not have follows the policy's
stated `missing` choice: "tripped" (treat the class as tripped) or "refuse" (no copy until the
fact is declared). A file without classes means what it always meant.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightmark.bounded import read_bounded
from weightmark.errors import InputFileError, RegistryError, UsageError
from weightmark.facts import NUMERIC_FACTS
from weightmark.fsutil import write_bytes_atomic
from weightmark.registry.store import country_name, validate_jurisdiction

if TYPE_CHECKING:
    from weightmark.facts import Fact
    from weightmark.registry.store import Registry

__all__ = [
    "ALLOW_VALUES",
    "HISTORY_DIR",
    "POLICY_FILE",
    "VARIANT_CLASSES",
    "Classification",
    "ClassResult",
    "ControlClass",
    "Decision",
    "Rule",
    "Policy",
    "PolicyFileError",
    "Tier",
    "check",
    "current",
    "install",
]

ALLOW_VALUES = ("full-precision", "quantized-only", "denied")
VARIANT_CLASSES = ("full-precision", "quantized")
POLICY_FILE = "policy.toml"
HISTORY_DIR = "policies"
MAX_POLICY_BYTES = 1 << 20

_TOP_KEYS = ("version", "date", "default", "tier", "missing", "class")
_REQUIRED_TOP_KEYS = ("version", "date", "default")
_TIER_KEYS = ("name", "allow", "countries")
_TIER_NAME = re.compile(r"[a-z0-9-]+")
_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class PolicyFileError(InputFileError):
    """A policy file is missing, not TOML, or breaks one of the policy's rules."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(path, " ".join(problem.split()))


@dataclass(frozen=True)
class Tier:
    name: str
    allow: str
    countries: frozenset[str]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "allow": self.allow, "countries": sorted(self.countries)}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    tier: str | None
    allow: str
    rule: str
    # With control classes: the class whose tiers decided (None: the policy's own tiers), the
    # model's classification, and why no copy may be issued at all (undeclared facts).
    control_class: str | None = None
    classification: Classification | None = None
    refusal: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"allowed": self.allowed, "tier": self.tier, "allow": self.allow, "rule": self.rule}
        if self.classification is not None:
            out["control_class"] = self.control_class
            out["control"] = self.classification.to_json()
        return out


# -- control classes: threshold rules on model facts --------------------------------------------

MISSING_CHOICES = ("tripped", "refuse")
_CLASS_KEYS = ("name", "description", "rule", "missing", "default", "tier")
_REQUIRED_CLASS_KEYS = ("name", "rule", "default")
_OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}
_TERM = re.compile(r"\s*(?P<fact>[a-z0-9][a-z0-9:._-]*)\s*(?P<op>>=|<=|>|<)\s*(?P<bound>\S+)\s*")
_CAPABILITY_TERM = re.compile(r"\s*capability:(?P<cap>[a-z0-9][a-z0-9-]*)\s*")
# Benchmarks a rule may name directly; any other benchmark is written benchmark:NAME, so that a
# misspelt fact cannot become a benchmark nobody declares.
KNOWN_BENCHMARKS = ("mmlu", "mmlu-pro", "gpqa", "gpqa-diamond", "humaneval", "math", "gsm8k",
                    "swe-bench-verified", "hle", "arc-agi")


@dataclass(frozen=True)
class Rule:
    """A threshold (`fact op bound`), a capability test, or any-of / all-of over sub-rules."""

    kind: str  # "threshold", "capability", "any-of", "all-of"
    text: str
    fact: str | None = None
    op: str | None = None
    bound: float | None = None
    parts: tuple[Rule, ...] = ()

    def evaluate(self, facts: dict[str, Fact], trace: list[dict[str, Any]]) -> bool | None:
        """True (tripped), False (clear) or None (a fact it needs is missing); each threshold
        or capability test it looked at is appended to `trace` with the fact it used."""
        if self.kind in ("any-of", "all-of"):
            results = [p.evaluate(facts, trace) for p in self.parts]  # every part, for the record
            decisive = self.kind == "any-of"
            if decisive in results:
                return decisive
            return None if None in results else not decisive
        name = "capabilities" if self.kind == "capability" else str(self.fact)
        fact = facts.get(name)
        value = None if fact is None else fact.value
        if self.kind == "capability":
            result = None if not isinstance(value, list) else self.text.split(":", 1)[1] in value
        elif isinstance(value, bool) or not isinstance(value, int | float):
            result = None
        else:
            result = _OPS[str(self.op)](value, self.bound)
        trace.append({"rule": self.text, "fact": name,
                      "result": {True: "tripped", False: "clear", None: "missing"}[result],
                      **({"value": None, "source": None} if fact is None else fact.to_json())})
        return result

    def to_json(self) -> Any:
        if self.kind in ("any-of", "all-of"):
            return {self.kind: [p.to_json() for p in self.parts]}
        return self.text


def _parse_rule(source: str, where: str, value: object, depth: int = 0) -> Rule:
    if depth > 16:
        raise PolicyFileError(source, f"{where}: rules nest deeper than 16 levels")
    if isinstance(value, str):
        if (cap := _CAPABILITY_TERM.fullmatch(value)) is not None:
            return Rule("capability", f"capability:{cap['cap']}")
        term = _TERM.fullmatch(value)
        if term is None:
            raise PolicyFileError(source, f"{where}: rule {value!r} is not `FACT OP NUMBER` (e.g. \"params > 1e11\", "
                                          "\"gpqa-diamond > 0.5\") or `capability:NAME`")
        fact = term["fact"]
        if fact.startswith("benchmark:"):
            fact = fact.split(":", 1)[1]
        elif fact not in NUMERIC_FACTS and fact not in KNOWN_BENCHMARKS:
            raise PolicyFileError(source, f"{where}: rule {value!r}: {fact!r} is not a fact (facts: "
                                          f"{', '.join(NUMERIC_FACTS)}; benchmarks: {', '.join(KNOWN_BENCHMARKS)}; "
                                          "other benchmarks as benchmark:NAME)")
        try:
            bound = float(term["bound"])
        except ValueError:
            bound = float("nan")
        if not bound == bound or bound in (float("inf"), float("-inf")):
            raise PolicyFileError(source, f"{where}: rule {value!r}: {term['bound']!r} is not a finite number")
        return Rule("threshold", f"{fact} {term['op']} {term['bound']}", fact, term["op"], bound)
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in ("any-of", "all-of"):
            raise PolicyFileError(source, f"{where}: a combined rule is a table with exactly one key, any-of or "
                                          f"all-of (got {', '.join(map(repr, value)) or 'none'})")
        kind, parts = next(iter(value.items()))
        if not isinstance(parts, list) or not parts:
            raise PolicyFileError(source, f"{where}: {kind} must be a non-empty list of rules")
        sub = tuple(_parse_rule(source, f"{where}: {kind}[{i}]", p, depth + 1) for i, p in enumerate(parts))
        return Rule(kind, f"{kind}({', '.join(p.text for p in sub)})", parts=sub)
    raise PolicyFileError(source, f"{where}: a rule is a string (\"params > 1e11\") or a table "
                                  "({ any-of = [...] } / { all-of = [...] })")


@dataclass(frozen=True)
class ControlClass:
    name: str
    description: str | None
    rule: Rule
    missing: str
    default: str
    tiers: tuple[Tier, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "rule": self.rule.to_json(),
                "missing": self.missing, "default": self.default, "tiers": [t.to_json() for t in self.tiers]}


@dataclass(frozen=True)
class ClassResult:
    """One class judged against a model's facts: tripped, clear, or missing (with the policy's choice)."""

    name: str
    status: str  # "tripped", "clear" or "missing"
    missing: str  # the class's choice for missing facts: "tripped" or "refuse"
    missing_facts: tuple[str, ...]
    trace: tuple[dict[str, Any], ...]

    @property
    def tripped(self) -> bool:
        return self.status == "tripped" or (self.status == "missing" and self.missing == "tripped")

    @property
    def refused(self) -> bool:
        return self.status == "missing" and self.missing == "refuse"

    def to_json(self) -> dict[str, Any]:
        return {"class": self.name, "status": self.status, "tripped": self.tripped, "missing_choice": self.missing,
                "missing_facts": list(self.missing_facts), "rules": list(self.trace)}


@dataclass(frozen=True)
class Classification:
    label: str  # the policy that classified
    results: tuple[ClassResult, ...]

    @property
    def tripped(self) -> list[str]:
        return [r.name for r in self.results if r.tripped]

    @property
    def refused(self) -> list[ClassResult]:
        return [r for r in self.results if r.refused]

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.label, "classes": self.tripped, "refused_for_missing_facts":
                [r.name for r in self.refused], "results": [r.to_json() for r in self.results]}


_STRICTNESS = {"full-precision": 0, "quantized-only": 1, "denied": 2}


def _variant_class(variant: str) -> str:
    if not isinstance(variant, str):
        raise UsageError(f"variant {variant!r} is not a string")
    klass = variant.split(":", 1)[0]
    if klass not in VARIANT_CLASSES:
        raise UsageError(
            f"variant {variant!r} must start with one of {', '.join(VARIANT_CLASSES)} "
            "(e.g. full-precision:BF16, quantized:gguf:Q4_K_M)"
        )
    return klass


def _keys_text(keys: tuple[str, ...]) -> str:
    return ", ".join(sorted(keys))


def _check_keys(
    source: str,
    where: str,
    table: dict[str, Any],
    allowed: tuple[str, ...],
    required: tuple[str, ...],
) -> None:
    for key in table:
        if key not in allowed:
            raise PolicyFileError(
                source,
                f"{where}key {key!r} is not a policy key (allowed: {_keys_text(allowed)}); "
                "unknown keys are refused so that a typo cannot weaken the policy",
            )
    for key in required:
        if key not in table:
            raise PolicyFileError(
                source, f"{where}key {key!r} is missing (required: {_keys_text(required)})"
            )


def _parse_allow(source: str, key: str, value: object) -> str:
    if not isinstance(value, str) or value not in ALLOW_VALUES:
        raise PolicyFileError(source, f"{key}: {value!r} is not one of {', '.join(ALLOW_VALUES)}")
    return value


def _parse_version(source: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyFileError(
            source, f"version: {value!r} is not an integer (a positive integer, e.g. version = 3)"
        )
    if value < 1:
        raise PolicyFileError(source, f"version: {value} must be a positive integer (>= 1)")
    return value


def _parse_date(source: str, value: object) -> _dt.date:
    if isinstance(value, _dt.datetime) or isinstance(value, _dt.time):
        raise PolicyFileError(
            source, f"date: {value!r} must be a date (YYYY-MM-DD), not a time or date-time"
        )
    if isinstance(value, _dt.date):
        return value
    if isinstance(value, str):
        if _DATE_TEXT.fullmatch(value):
            try:
                return _dt.date.fromisoformat(value)
            except ValueError as exc:
                raise PolicyFileError(
                    source, f"date: {value!r} is not a valid calendar date ({exc})"
                ) from exc
        raise PolicyFileError(source, f"date: {value!r} is not a date in the form YYYY-MM-DD")
    raise PolicyFileError(source, f"date: {value!r} is not a date (write date = YYYY-MM-DD)")


def _parse_tier(source: str, index: int, table: object, owner: dict[str, str]) -> Tier:
    where = f"tier[{index}]"
    if not isinstance(table, dict):
        raise PolicyFileError(source, f"{where}: each tier must be a [[tier]] table")
    name = table.get("name")
    if isinstance(name, str) and name:
        where = f"tier {name!r}"
    _check_keys(source, f"{where}: ", table, _TIER_KEYS, _TIER_KEYS)
    if not isinstance(name, str) or not _TIER_NAME.fullmatch(name):
        raise PolicyFileError(
            source,
            f"{where}: name {name!r} must be non-empty lower-case letters, digits and '-' ([a-z0-9-]+)",
        )
    allow = _parse_allow(source, f"{where}: allow", table["allow"])
    countries = table["countries"]
    if not isinstance(countries, list):
        raise PolicyFileError(
            source,
            f'{where}: countries must be a list of ISO 3166-1 alpha-2 codes, e.g. ["GB", "DE"]',
        )
    seen: set[str] = set()
    for position, code in enumerate(countries):
        try:
            validate_jurisdiction(code)
        except UsageError as exc:
            raise PolicyFileError(source, f"{where}: countries[{position}]: {exc}") from exc
        if code in seen:
            raise PolicyFileError(source, f"{where}: countries lists {code} twice")
        if code in owner:
            raise PolicyFileError(
                source,
                f"{where}: country {code} is already in tier {owner[code]!r}; a country may be in at most one tier",
            )
        seen.add(code)
        owner[code] = name
    return Tier(name=name, allow=allow, countries=frozenset(seen))


def _parse_class(source: str, index: int, table: object, default_missing: str | None) -> ControlClass:
    where = f"class[{index}]"
    if not isinstance(table, dict):
        raise PolicyFileError(source, f"{where}: each class must be a [[class]] table")
    name = table.get("name")
    if isinstance(name, str) and name:
        where = f"class {name!r}"
    _check_keys(source, f"{where}: ", table, _CLASS_KEYS, _REQUIRED_CLASS_KEYS)
    if not isinstance(name, str) or not _TIER_NAME.fullmatch(name):
        raise PolicyFileError(source, f"{where}: name {name!r} must be lower-case letters, digits and '-'")
    description = table.get("description")
    if description is not None and not isinstance(description, str):
        raise PolicyFileError(source, f"{where}: description must be a string")
    missing = table.get("missing", default_missing)
    if missing is None:
        raise PolicyFileError(source, f"{where}: say what a missing fact means: missing = \"tripped\" or "
                                      "\"refuse\" (here or at the top of the file); it is never a silent pass")
    if missing not in MISSING_CHOICES:
        raise PolicyFileError(source, f"{where}: missing {missing!r} is not one of {', '.join(MISSING_CHOICES)}")
    rule = _parse_rule(source, f"{where}: rule", table["rule"])
    default = _parse_allow(source, f"{where}: default", table["default"])
    raw_tiers = table.get("tier", [])
    if not isinstance(raw_tiers, list):
        raise PolicyFileError(source, f"{where}: tiers must be written as [[class.tier]] tables")
    owner: dict[str, str] = {}
    tiers: list[Tier] = []
    for i, raw in enumerate(raw_tiers):
        tier = _parse_tier(source, i, raw, owner)
        if any(t.name == tier.name for t in tiers):
            raise PolicyFileError(source, f"{where}: tier name {tier.name!r} is used twice")
        tiers.append(tier)
    return ControlClass(name, description, rule, missing, default, tuple(tiers))


def _read_limited(path: Path) -> bytes:
    """A regular file of at most MAX_POLICY_BYTES (a FIFO or /dev/zero fails at once)."""
    try:
        return read_bounded(path, MAX_POLICY_BYTES, "policy file")
    except InputFileError as exc:
        raise PolicyFileError(path, exc.problem) from None


@dataclass(frozen=True)
class Policy:
    version: int
    date: _dt.date
    default: str
    tiers: tuple[Tier, ...]
    sha256: str
    classes: tuple[ControlClass, ...] = ()
    missing: str | None = None

    @classmethod
    def parse(cls, data: bytes, source: str = "policy.toml") -> Policy:
        """Parse and strictly validate policy bytes; `source` names the file in error messages."""
        source = str(source)
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyFileError(
                source, f"is larger than {MAX_POLICY_BYTES} bytes; not a policy file"
            )
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyFileError(
                source, f"is not UTF-8 text, so not a TOML policy (byte {exc.start})"
            ) from exc
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyFileError(source, f"is not valid TOML: {exc}") from exc
        _check_keys(source, "", doc, _TOP_KEYS, _REQUIRED_TOP_KEYS)
        version = _parse_version(source, doc["version"])
        date = _parse_date(source, doc["date"])
        default = _parse_allow(source, "default", doc["default"])
        raw_tiers = doc.get("tier", [])
        if not isinstance(raw_tiers, list):
            raise PolicyFileError(source, "tier: tiers must be written as [[tier]] tables")
        owner: dict[str, str] = {}
        tiers: list[Tier] = []
        names: set[str] = set()
        for index, table in enumerate(raw_tiers):
            tier = _parse_tier(source, index, table, owner)
            if tier.name in names:
                raise PolicyFileError(
                    source,
                    f"tier[{index}]: tier name {tier.name!r} is used twice; tier names must be unique",
                )
            names.add(tier.name)
            tiers.append(tier)
        missing = doc.get("missing")
        if missing is not None and missing not in MISSING_CHOICES:
            raise PolicyFileError(source, f"missing: {missing!r} is not one of {', '.join(MISSING_CHOICES)}")
        raw_classes = doc.get("class", [])
        if not isinstance(raw_classes, list):
            raise PolicyFileError(source, "class: control classes must be written as [[class]] tables")
        classes: list[ControlClass] = []
        for index, table in enumerate(raw_classes):
            klass = _parse_class(source, index, table, missing)
            if any(c.name == klass.name for c in classes):
                raise PolicyFileError(source, f"class[{index}]: class name {klass.name!r} is used twice")
            classes.append(klass)
        return cls(
            version=version,
            date=date,
            default=default,
            tiers=tuple(tiers),
            sha256=hashlib.sha256(data).hexdigest(),
            classes=tuple(classes),
            missing=missing,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and validate a policy file."""
        path = Path(path)
        return cls.parse(_read_limited(path), source=str(path))

    @property
    def label(self) -> str:
        """'policy v3 (2026-11-01)': how decisions cite this policy."""
        return f"policy v{self.version} ({self.date.isoformat()})"

    def tier_of(self, country: str) -> Tier | None:
        """The tier listing `country` (a valid alpha-2 code), or None when the default applies."""
        validate_jurisdiction(country)
        for tier in self.tiers:
            if country in tier.countries:
                return tier
        return None

    def classify(self, facts: dict[str, Fact]) -> Classification:
        """Judge every control class against a model's facts (name -> Fact)."""
        results = []
        for klass in self.classes:
            trace: list[dict[str, Any]] = []
            verdict = klass.rule.evaluate(facts, trace)
            status = {True: "tripped", False: "clear", None: "missing"}[verdict]
            missing = tuple(sorted({t["fact"] for t in trace if t["result"] == "missing"}))
            results.append(ClassResult(klass.name, status, klass.missing, missing, tuple(trace)))
        return Classification(self.label, tuple(results))

    def decide(self, country: str, variant: str, facts: dict[str, Fact] | None = None) -> Decision:
        """Whether `variant` ('full-precision:BF16', 'quantized:gguf:Q4_K_M', ...) may go to `country`.

        With control classes, `facts` are the model's facts in force: every tripped class's
        tiers apply on top of the policy's own, and the most restrictive decides (the policy's
        own tiers first on a tie). A class whose rule needs a missing fact and whose choice is
        "refuse" makes the decision a refusal (`refusal` says which facts to declare).
        """
        base = self._decide(country, variant, self.tiers, self.default, None)
        if not self.classes:
            return base
        if facts is None:
            raise UsageError(f"{self.label} has control classes; a decision needs the model's facts")
        classification = self.classify(facts)
        decisions = [base] + [
            self._decide(country, variant, k.tiers, k.default, k.name)
            for k in self.classes if k.name in classification.tripped]
        chosen = base
        for d in decisions[1:]:
            # The first refusal decides (the policy's own tiers first); among allowances, the strictest.
            if (chosen.allowed and not d.allowed) or (
                    chosen.allowed and d.allowed and _STRICTNESS[d.allow] > _STRICTNESS[chosen.allow]):
                chosen = d
        refusal = None
        if classification.refused:
            needs = sorted({f for r in classification.refused for f in r.missing_facts})
            names = ", ".join(r.name for r in classification.refused)
            refusal = (f"{self.label}: control class {names} needs {', '.join(needs)}, which the model does not "
                       f"have, and the policy says missing = \"refuse\"; declare it with `weightmark model declare` "
                       f"(or record measured facts with `weightmark model measure`)")
        classes = classification.tripped
        text = chosen.rule + (f" (control classes tripped: {', '.join(classes)})" if classes else
                              " (no control class tripped)")
        return Decision(allowed=chosen.allowed and refusal is None, tier=chosen.tier, allow=chosen.allow,
                        rule=text, control_class=chosen.control_class, classification=classification,
                        refusal=refusal)

    def _decide(self, country: str, variant: str, tiers: tuple[Tier, ...], default: str,
                class_name: str | None) -> Decision:
        klass = _variant_class(variant)
        validate_jurisdiction(country)
        tier = next((t for t in tiers if country in t.countries), None)
        allow = tier.allow if tier is not None else default
        who = (
            f"tier {tier.name!r}" if tier is not None else f"the default (no tier lists {country})"
        )
        if class_name is not None:
            who = f"control class {class_name!r}: {who}"
        if allow == "denied":
            allowed = False
            text = f"{who} denies {country}"
        elif allow == "full-precision":
            allowed = True
            text = f"{who} allows full-precision for {country}"
        elif klass == "quantized":
            allowed = True
            text = f"{who} allows quantized variants only for {country}; {variant} is quantized"
        else:
            allowed = False
            text = f"{who} allows quantized variants only for {country}; {variant} is not quantized"
        return Decision(
            allowed=allowed,
            tier=tier.name if tier is not None else None,
            allow=allow,
            rule=f"{self.label}: {text}",
            control_class=class_name,
        )

    def countries_in(self, tier_name: str) -> frozenset[str]:
        """The countries of one tier; UsageError for a tier this policy does not have."""
        for tier in self.tiers:
            if tier.name == tier_name:
                return tier.countries
        known = ", ".join(tier.name for tier in self.tiers) or "none"
        raise UsageError(f"{self.label} has no tier {tier_name!r} (tiers: {known})")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "date": self.date.isoformat(),
            "default": self.default,
            "tiers": [tier.to_json() for tier in self.tiers],
            "sha256": self.sha256,
            **({"missing": self.missing, "classes": [c.to_json() for c in self.classes]} if self.classes else {}),
        }

    def describe(self) -> str:
        """A human-readable summary for `weightmark policy show`."""
        lines = [
            f"Jurisdiction policy v{self.version}, dated {self.date.isoformat()}",
            f"sha256 {self.sha256}",
            f"default (countries in no tier): {self.default}",
        ]
        if not self.tiers:
            lines.append("no tiers: every country gets the default")
        for tier in self.tiers:
            count = len(tier.countries)
            lines.append(
                f"tier {tier.name!r}: {tier.allow}, {count} {'country' if count == 1 else 'countries'}"
            )
            lines.extend(f"  {code}  {country_name(code)}" for code in sorted(tier.countries))
        for klass in self.classes:
            lines.append(f"control class {klass.name!r}: {klass.rule.text}; missing facts: {klass.missing}; "
                         f"default {klass.default}")
            lines.extend(f"  tier {t.name!r}: {t.allow}: {' '.join(sorted(t.countries))}" for t in klass.tiers)
        return "\n".join(lines)


def current(home: Path) -> Policy | None:
    """The installed policy of a lab home, or None when no policy is installed."""
    path = Path(home) / POLICY_FILE
    if not os.path.lexists(path):
        return None
    return Policy.load(path)


def install(home: Path, source: Path) -> Policy:
    """Validate `source` and install it as the home's policy, keeping the previous one as history.

    The new version must be strictly greater than the installed one. The previous policy is
    archived first (policies/v<N>.toml, never overwritten), then policy.toml is replaced
    atomically, so a crash leaves either the old or the new policy installed.
    """
    home = Path(home)
    source = Path(source)
    if not home.is_dir():
        raise RegistryError(f"{home}: no lab home here; run `weightmark init` first")
    data = _read_limited(source)
    new = Policy.parse(data, source=str(source))
    target = home / POLICY_FILE
    old = current(home)
    if old is not None:
        if new.version <= old.version:
            same = " (the same file is already installed)" if new.sha256 == old.sha256 else ""
            raise PolicyFileError(
                source,
                f"version {new.version} is not newer than the installed {old.label} "
                f"at {target}{same}; a new policy must have version > {old.version}",
            )
        history = home / HISTORY_DIR
        history.mkdir(mode=0o755, exist_ok=True)
        archived = history / f"v{old.version}.toml"
        old_bytes = _read_limited(target)
        if hashlib.sha256(old_bytes).hexdigest() != old.sha256:
            raise PolicyFileError(target, "changed while it was being replaced; try again")
        if os.path.lexists(archived):
            if _read_limited(archived) != old_bytes:
                raise PolicyFileError(
                    archived,
                    f"already holds a different v{old.version} policy; "
                    "policy history is never overwritten, so resolve this by hand",
                )
        else:
            write_bytes_atomic(archived, old_bytes, mode=0o644)
    write_bytes_atomic(target, data, mode=0o644)
    return new


# -- what a new policy would change ------------------------------------------------------------

_PROBE_VARIANTS = ("full-precision:F32", "quantized:probe")


def _outcome(policy: Policy | None, country: str, facts: dict[str, Fact]) -> str:
    """What `country` may receive of a model: full-precision, quantized-only, denied, or refused
    (the policy needs facts the model lacks)."""
    if policy is None:
        return "full-precision"
    full, quantized = (policy.decide(country, v, facts if policy.classes else None) for v in _PROBE_VARIANTS)
    if full.refusal is not None:
        return "refused (undeclared facts)"
    return "full-precision" if full.allowed else "quantized-only" if quantized.allowed else "denied"


def check(registry: Registry, installed: Policy | None, new: Policy) -> dict[str, Any]:
    """Compare `new` with the installed policy for every registered model and every country, and
    list the copies already issued that `new` would deny. Reads only signed entries (verified)."""
    import pycountry

    from weightmark.facts import signed_statement, verified_facts
    from weightmark.registry.log import trust_from_entries

    countries = sorted(c.alpha_2 for c in pycountry.countries)
    models = []
    facts_of: dict[str, dict[str, Fact]] = {}
    names: dict[str, str] = {}
    for model in registry.models():
        facts = facts_of[model.model_id] = verified_facts(registry, model)
        names[model.model_id] = model.name
        changes: dict[tuple[str, str], list[str]] = {}
        for country in countries:
            before, after = _outcome(installed, country, facts), _outcome(new, country, facts)
            if before != after:
                changes.setdefault((before, after), []).append(country)
        classification = new.classify(facts) if new.classes else None
        models.append({
            "model": model.name,
            "classes_before": installed.classify(facts).tripped if installed and installed.classes else [],
            "classes_after": classification.tripped if classification else [],
            "refused_for_missing_facts": sorted({f for r in classification.refused for f in r.missing_facts})
            if classification else [],
            "classification": classification.to_json() if classification else None,
            "changes": [{"before": b, "after": a, "countries": cs} for (b, a), cs in sorted(changes.items())],
        })
    trust = trust_from_entries(registry.key_chain_entries())
    denied = []
    for copy, _ in registry.find_issued():
        pred = signed_statement(registry, copy.entry_idx, trust)["predicate"]
        decision = new.decide(pred["jurisdiction"], pred["variant"],
                              facts_of.get(pred["model_id"], {}) if new.classes else None)
        if not decision.allowed:
            denied.append({"entry_id": copy.entry_idx, "model": names.get(pred["model_id"], pred["model_id"]),
                           "licensee_id": pred["licensee_id"], "legal_name": pred["legal_name"],
                           "jurisdiction": pred["jurisdiction"], "variant": pred["variant"],
                           "issued_at": pred["issued_at"], "rule": decision.refusal or decision.rule})
    return {"policy": new.label, "sha256": new.sha256, "installed": installed.label if installed else None,
            "installable": installed is None or new.version > installed.version,
            "models": models, "issued_now_denied": denied}
