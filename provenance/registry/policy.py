"""The lab's jurisdiction policy: a dated, versioned TOML file saying which variants each country may receive."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightmark.bounded import read_bounded
from weightmark.errors import InputFileError, RegistryError, UsageError
from weightmark.fsutil import write_bytes_atomic
from weightmark.registry.store import country_name, validate_jurisdiction

__all__ = [
    "ALLOW_VALUES",
    "HISTORY_DIR",
    "POLICY_FILE",
    "VARIANT_CLASSES",
    "Decision",
    "Policy",
    "PolicyFileError",
    "Tier",
    "current",
    "install",
]

ALLOW_VALUES = ("full-precision", "quantized-only", "denied")
VARIANT_CLASSES = ("full-precision", "quantized")
POLICY_FILE = "policy.toml"
HISTORY_DIR = "policies"
MAX_POLICY_BYTES = 1 << 20

_TOP_KEYS = ("version", "date", "default", "tier")
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

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "tier": self.tier, "allow": self.allow, "rule": self.rule}


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
        return cls(
            version=version,
            date=date,
            default=default,
            tiers=tuple(tiers),
            sha256=hashlib.sha256(data).hexdigest(),
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

    def decide(self, country: str, variant: str) -> Decision:
        """Whether `variant` ('full-precision:BF16', 'quantized:gguf:Q4_K_M', ...) may go to `country`."""
        klass = _variant_class(variant)
        tier = self.tier_of(country)
        allow = tier.allow if tier is not None else self.default
        who = (
            f"tier {tier.name!r}" if tier is not None else f"the default (no tier lists {country})"
        )
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
