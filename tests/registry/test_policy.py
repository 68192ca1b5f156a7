"""Jurisdiction policy files: strict parsing, decisions per tier kind, and versioned installs."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightmark.errors import InputFileError, RegistryError, UsageError
from weightmark.registry.policy import (
    ALLOW_VALUES,
    Decision,
    Policy,
    PolicyFileError,
    Tier,
    current,
    install,
)

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
version = 3
date = 2026-11-01
default = "quantized-only"

[[tier]]
name = "tier-1"
allow = "full-precision"
countries = ["GB", "DE", "FR", "JP", "US"]

[[tier]]
name = "quant"
allow = "quantized-only"
countries = ["BR", "IN"]

[[tier]]
name = "restricted"
allow = "denied"
countries = ["KP", "IR"]
"""

FULL = "full-precision:BF16"
QUANT = "quantized:gguf:Q4_K_M"


def policy_text(version: int = 3, default: str = "quantized-only", date: str = "2026-11-01") -> str:
    head = f'version = {version}\ndate = {date}\ndefault = "{default}"\n'
    return head + GOOD.split("\n\n", 1)[1]


@pytest.fixture
def policy() -> Policy:
    return Policy.parse(GOOD.encode())


# --- parsing -------------------------------------------------------------------------------


def test_valid_policy_parses(policy: Policy) -> None:
    assert policy.version == 3
    assert policy.date == dt.date(2026, 11, 1)
    assert policy.default == "quantized-only"
    assert [t.name for t in policy.tiers] == ["tier-1", "quant", "restricted"]
    assert policy.tiers[0] == Tier(
        "tier-1", "full-precision", frozenset({"GB", "DE", "FR", "JP", "US"})
    )
    assert policy.sha256 == hashlib.sha256(GOOD.encode()).hexdigest()


def test_date_may_be_a_string() -> None:
    policy = Policy.parse(policy_text(date='"2026-11-01"').encode())
    assert policy.date == dt.date(2026, 11, 1)


def test_no_tiers_means_everything_gets_the_default() -> None:
    policy = Policy.parse(b'version = 1\ndate = 2026-01-01\ndefault = "denied"\n')
    assert policy.tiers == ()
    assert policy.decide("GB", QUANT).allowed is False


def test_example_policy_file_parses() -> None:
    policy = Policy.load(REPO / "examples" / "policy.toml")
    assert policy.version >= 1
    assert set(ALLOW_VALUES) >= {t.allow for t in policy.tiers}
    assert "Jurisdiction policy" in policy.describe()


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(PolicyFileError) as info:
        Policy.load(missing)
    assert str(missing) in str(info.value)


BAD = [
    ("version = 0", "version", 'version = 0\ndate = 2026-11-01\ndefault = "denied"\n'),
    ("version negative", "version", 'version = -2\ndate = 2026-11-01\ndefault = "denied"\n'),
    ("version string", "version", 'version = "3"\ndate = 2026-11-01\ndefault = "denied"\n'),
    ("version float", "version", 'version = 3.0\ndate = 2026-11-01\ndefault = "denied"\n'),
    ("version bool", "version", 'version = true\ndate = 2026-11-01\ndefault = "denied"\n'),
    ("version missing", "version", 'date = 2026-11-01\ndefault = "denied"\n'),
    ("date impossible", "date", 'version = 1\ndate = "2026-02-30"\ndefault = "denied"\n'),
    ("date bad text", "date", 'version = 1\ndate = "1 Nov 2026"\ndefault = "denied"\n'),
    ("date compact", "date", 'version = 1\ndate = "20261101"\ndefault = "denied"\n'),
    ("date datetime", "date", 'version = 1\ndate = 2026-11-01T10:00:00Z\ndefault = "denied"\n'),
    ("date number", "date", 'version = 1\ndate = 20261101\ndefault = "denied"\n'),
    ("unknown top key", "'defualt'", 'version = 1\ndate = 2026-11-01\ndefualt = "denied"\n'),
    ("bad default", "default", 'version = 1\ndate = 2026-11-01\ndefault = "allow"\n'),
    (
        "unknown tier key",
        "'alow'",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n'
        '[[tier]]\nname = "a"\nalow = "denied"\nallow = "denied"\ncountries = ["GB"]\n',
    ),
    (
        "tier key missing",
        "'countries'",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a"\nallow = "denied"\n',
    ),
    (
        "duplicate tier name",
        "'a'",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n'
        '[[tier]]\nname = "a"\nallow = "denied"\ncountries = ["GB"]\n'
        '[[tier]]\nname = "a"\nallow = "denied"\ncountries = ["DE"]\n',
    ),
    (
        "country in two tiers",
        "GB",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n'
        '[[tier]]\nname = "a"\nallow = "full-precision"\ncountries = ["GB"]\n'
        '[[tier]]\nname = "b"\nallow = "denied"\ncountries = ["DE", "GB"]\n',
    ),
    (
        "country twice in a tier",
        "GB",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n'
        '[[tier]]\nname = "a"\nallow = "denied"\ncountries = ["GB", "GB"]\n',
    ),
    (
        "UK",
        "'UK'",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a"\nallow = "denied"\ncountries = ["UK"]\n',
    ),
    (
        "gb",
        "'gb'",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a"\nallow = "denied"\ncountries = ["gb"]\n',
    ),
    (
        "ZZ",
        "'ZZ'",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a"\nallow = "denied"\ncountries = ["ZZ"]\n',
    ),
    (
        "GBR",
        "'GBR'",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a"\nallow = "denied"\ncountries = ["GBR"]\n',
    ),
    (
        "country not a string",
        "countries[0]",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a"\nallow = "denied"\ncountries = [44]\n',
    ),
    (
        "countries not a list",
        "countries",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a"\nallow = "denied"\ncountries = "GB"\n',
    ),
    (
        "bad allow",
        "'quantised-only'",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a"\nallow = "quantised-only"\ncountries = ["GB"]\n',
    ),
    (
        "tier name upper",
        "name",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "Tier1"\nallow = "denied"\ncountries = ["GB"]\n',
    ),
    (
        "tier name empty",
        "name",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = ""\nallow = "denied"\ncountries = ["GB"]\n',
    ),
    (
        "tier name newline",
        "name",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a\\n"\nallow = "denied"\ncountries = ["GB"]\n',
    ),
    (
        "tier not array",
        "tier",
        'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[tier]\nname = "a"\nallow = "denied"\ncountries = ["GB"]\n',
    ),
    ("not toml", "TOML", "version = = 3\n[[[\n"),
]


@pytest.mark.parametrize(("case", "needle", "text"), BAD, ids=[b[0] for b in BAD])
def test_invalid_policy_is_refused(case: str, needle: str, text: str) -> None:
    with pytest.raises(PolicyFileError) as info:
        Policy.parse(text.encode(), source="lab/policy-v9.toml")
    message = str(info.value)
    assert message.startswith("lab/policy-v9.toml: ")
    assert "\n" not in message
    assert needle in message
    assert isinstance(info.value, InputFileError)
    assert info.value.exit_code == 3


def test_binary_bytes_are_refused() -> None:
    with pytest.raises(PolicyFileError, match=r"^p\.toml: .*not UTF-8"):
        Policy.parse(b"\x00\xff\xfe binary junk \x89PNG", source="p.toml")


def test_uk_error_hints_at_gb() -> None:
    text = 'version = 1\ndate = 2026-11-01\ndefault = "denied"\n[[tier]]\nname = "a"\nallow = "denied"\ncountries = ["UK"]\n'
    with pytest.raises(PolicyFileError, match="GB") as info:
        Policy.parse(text.encode())
    assert "tier 'a'" in str(info.value)


def test_oversized_file_is_refused() -> None:
    with pytest.raises(PolicyFileError, match="larger than"):
        Policy.parse(b"#" * (2 << 20))


# --- decisions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("country", "variant", "allowed", "tier", "allow"),
    [
        ("GB", FULL, True, "tier-1", "full-precision"),
        ("GB", QUANT, True, "tier-1", "full-precision"),
        ("BR", FULL, False, "quant", "quantized-only"),
        ("BR", QUANT, True, "quant", "quantized-only"),
        ("KP", FULL, False, "restricted", "denied"),
        ("KP", QUANT, False, "restricted", "denied"),
        ("AR", FULL, False, None, "quantized-only"),
        ("AR", QUANT, True, None, "quantized-only"),
    ],
)
def test_decide(
    policy: Policy, country: str, variant: str, allowed: bool, tier: str | None, allow: str
) -> None:
    decision = policy.decide(country, variant)
    assert decision == Decision(allowed, tier, allow, decision.rule)
    assert decision.rule.startswith("policy v3 (2026-11-01): ")
    assert country in decision.rule
    assert decision.to_json() == {
        "allowed": allowed,
        "tier": tier,
        "allow": allow,
        "rule": decision.rule,
    }


def test_decide_rule_text(policy: Policy) -> None:
    assert policy.decide("KP", QUANT).rule == "policy v3 (2026-11-01): tier 'restricted' denies KP"
    assert "default" in policy.decide("AR", QUANT).rule


@pytest.mark.parametrize("default", ALLOW_VALUES)
def test_default_applies_to_unlisted_countries(default: str) -> None:
    policy = Policy.parse(policy_text(default=default).encode())
    full, quant = policy.decide("CL", FULL), policy.decide("CL", QUANT)
    assert full.tier is None and full.allow == default
    assert full.allowed is (default == "full-precision")
    assert quant.allowed is (default != "denied")


def test_bare_variant_classes(policy: Policy) -> None:
    assert policy.decide("BR", "quantized").allowed is True
    assert policy.decide("BR", "full-precision").allowed is False


@pytest.mark.parametrize("variant", ["", "bf16", "quantizedx:gguf", "Quantized:gguf", "full:BF16"])
def test_decide_rejects_unknown_variant_class(policy: Policy, variant: str) -> None:
    with pytest.raises(UsageError, match="variant"):
        policy.decide("GB", variant)


@pytest.mark.parametrize("country", ["UK", "gb", "ZZ", "GBR", ""])
def test_decide_rejects_bad_country(policy: Policy, country: str) -> None:
    with pytest.raises(UsageError):
        policy.decide(country, QUANT)


COUNTRIES = ["GB", "DE", "BR", "IN", "KP", "IR", "AR", "CL", "FR", "NG"]


@given(
    default=st.sampled_from(ALLOW_VALUES),
    allows=st.lists(st.sampled_from(ALLOW_VALUES), min_size=3, max_size=3),
    placement=st.lists(
        st.integers(min_value=-1, max_value=2), min_size=len(COUNTRIES), max_size=len(COUNTRIES)
    ),
    country=st.sampled_from(COUNTRIES),
    quantized=st.booleans(),
)
def test_decide_matches_the_rule_table(
    default: str, allows: list[str], placement: list[int], country: str, quantized: bool
) -> None:
    lines = [f'version = 1\ndate = 2026-01-01\ndefault = "{default}"']
    for index, allow in enumerate(allows):
        members = [c for c, where in zip(COUNTRIES, placement, strict=True) if where == index]
        listed = ", ".join(f'"{c}"' for c in members)
        lines.append(f'[[tier]]\nname = "t{index}"\nallow = "{allow}"\ncountries = [{listed}]')
    policy = Policy.parse("\n".join(lines).encode())
    where = placement[COUNTRIES.index(country)]
    expected_allow = default if where < 0 else allows[where]
    decision = policy.decide(country, QUANT if quantized else FULL)
    assert decision.allow == expected_allow
    assert decision.tier == (None if where < 0 else f"t{where}")
    assert decision.allowed is (
        expected_allow == "full-precision" or (expected_allow == "quantized-only" and quantized)
    )


# --- look-ups and output -------------------------------------------------------------------


def test_tier_of_and_countries_in(policy: Policy) -> None:
    assert policy.tier_of("KP").name == "restricted"
    assert policy.tier_of("AR") is None
    assert policy.countries_in("restricted") == frozenset({"KP", "IR"})
    assert policy.countries_in("tier-1") == frozenset({"GB", "DE", "FR", "JP", "US"})
    with pytest.raises(UsageError, match="'nope'"):
        policy.countries_in("nope")


def test_to_json_and_describe(policy: Policy) -> None:
    data = policy.to_json()
    assert (
        data["version"] == 3
        and data["date"] == "2026-11-01"
        and data["default"] == "quantized-only"
    )
    assert data["tiers"][2] == {"name": "restricted", "allow": "denied", "countries": ["IR", "KP"]}
    assert data["sha256"] == policy.sha256
    text = policy.describe()
    assert "v3" in text and "2026-11-01" in text and "restricted" in text and "KP" in text
    assert len(text.splitlines()) > 3


# --- install -------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_current_is_none_without_a_policy(tmp_path: Path) -> None:
    assert current(tmp_path) is None


def test_install_first_policy(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    src = _write(tmp_path / "p3.toml", policy_text(3))
    installed = install(home, src)
    assert installed.version == 3
    assert (home / "policy.toml").read_bytes() == src.read_bytes()
    assert (home / "policy.toml").stat().st_mode & 0o777 == 0o644
    assert current(home) == installed
    assert not (home / "policies").exists() or not any((home / "policies").iterdir())


def test_install_refuses_older_or_equal_version_and_keeps_history(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    install(home, _write(tmp_path / "p3.toml", policy_text(3)))
    for version in (3, 2):
        src = _write(tmp_path / f"again{version}.toml", policy_text(version, default="denied"))
        with pytest.raises(PolicyFileError) as info:
            install(home, src)
        message = str(info.value)
        assert str(src) in message and f"version {version}" in message and "v3" in message
        assert current(home).version == 3 and current(home).default == "quantized-only"

    install(home, _write(tmp_path / "p4.toml", policy_text(4, default="denied")))
    install(home, _write(tmp_path / "p7.toml", policy_text(7)))
    assert current(home).version == 7
    assert (home / "policies" / "v3.toml").read_text() == policy_text(3)
    assert (home / "policies" / "v4.toml").read_text() == policy_text(4, default="denied")
    assert sorted(os.listdir(home / "policies")) == ["v3.toml", "v4.toml"]


def test_install_never_overwrites_history(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "policies").mkdir(parents=True)
    install(home, _write(tmp_path / "p3.toml", policy_text(3)))
    squatter = _write(home / "policies" / "v3.toml", "something else\n")
    with pytest.raises(PolicyFileError, match="never overwritten"):
        install(home, _write(tmp_path / "p4.toml", policy_text(4)))
    assert squatter.read_text() == "something else\n"
    assert current(home).version == 3


def test_install_refuses_invalid_file_and_keeps_current(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    install(home, _write(tmp_path / "p3.toml", policy_text(3)))
    bad = _write(tmp_path / "bad.toml", policy_text(4).replace('"GB"', '"UK"'))
    with pytest.raises(PolicyFileError, match="bad.toml"):
        install(home, bad)
    assert current(home).version == 3
    assert not (home / "policies").exists()


def test_install_needs_a_home(tmp_path: Path) -> None:
    with pytest.raises(RegistryError):
        install(tmp_path / "missing", _write(tmp_path / "p.toml", policy_text(1)))
