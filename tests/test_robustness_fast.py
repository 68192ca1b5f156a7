"""A few rows of the robustness evaluation on the real MiniLM weights, fast enough for every run.

The full table (noise, pruning, merging, 2/4/8-copy collusion, function-preserving rewrites,
fine-tuning, on MiniLM and SmolLM2) is `benchmarks/eval_robustness.py` in `make eval`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import StampedLab, make_stamped_lab
from weightmark import attacks
from weightmark.attacks.combine import collude
from weightmark.attacks.prune import magnitude_prune, semi_structured
from weightmark.scan import ScanReport

ASSUMED = 10**6  # family-wise p-values as if the lab had a million licensees
LIMIT = math.log10(1e-9)
EXTRA_LICENSEES = [("Tasman AI Pty", "AU"), ("Maple Models Inc", "CA"), ("Lumen Lab BV", "NL")]


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> StampedLab:
    """Six stamped F32 MiniLM copies: enough for a collusion of four with innocents left over."""
    stamped = make_stamped_lab(tmp_path_factory.mktemp("robust"), minilm, "F32")
    for name, country in EXTRA_LICENSEES:
        lid = stamped.lab.add_licensee(name, country).id
        out = stamped.work / f"copy-{len(stamped.ids)}"
        stamped.lab.stamp("minilm", lid, out)
        stamped.ids.append(lid)
        stamped.copies.append(out)
    return stamped


def assert_traced(report: ScanReport, lab: StampedLab, colluders: list[int], label: str) -> None:
    """At least one colluder accused at family-wise p <= 1e-9, and no innocent accused at all."""
    true = {lab.ids[i] for i in colluders}
    accused = {c.licensee_id for c in report.accused}
    best_true = min(c.log10_family_wise_p for c in report.candidates if c.licensee_id in true)
    best_innocent = min(c.log10_family_wise_p for c in report.candidates if c.licensee_id not in true)
    print(f"{label}: best true log10 fw p {best_true:.1f}, best innocent {best_innocent:.1f}")
    assert report.family_size == ASSUMED
    assert accused & true, f"{label}: no colluder accused (best true log10 p {best_true:.1f})"
    assert accused <= true, f"{label}: an innocent licensee was accused"
    assert best_true <= LIMIT and best_innocent > LIMIT


def scan(lab: StampedLab, suspect: Path) -> ScanReport:
    return lab.lab.scan(suspect, model_name="minilm", assume_licensees=ASSUMED)


def test_two_four_sparsity(six: StampedLab, tmp_path: Path) -> None:
    assert_traced(scan(six, semi_structured(six.copies[0], tmp_path / "sparse")), six, [0], "2:4")


def test_half_of_the_weights_pruned_then_q4_0(six: StampedLab, tmp_path: Path) -> None:
    pruned = magnitude_prune(six.copies[1], tmp_path / "pruned", 0.5)
    leaked = attacks.requantize(pruned, tmp_path / "leak", "Q4_0")
    assert_traced(scan(six, leaked), six, [1], "50% pruned + Q4_0")


def test_average_of_two_copies_then_q4_0(six: StampedLab, tmp_path: Path) -> None:
    mixed = collude(six.copies[:2], tmp_path / "avg", "average")
    leaked = attacks.requantize(mixed, tmp_path / "leak", "Q4_0")
    assert_traced(scan(six, leaked), six, [0, 1], "average of 2 + Q4_0")


def test_minmax_of_four_copies_then_q4_0(six: StampedLab, tmp_path: Path) -> None:
    colluders = [2, 3, 4, 5]
    mixed = collude([six.copies[i] for i in colluders], tmp_path / "minmax", "minmax", seed=1)
    leaked = attacks.requantize(mixed, tmp_path / "leak", "Q4_0")
    assert_traced(scan(six, leaked), six, colluders, "minmax of 4 + Q4_0")
