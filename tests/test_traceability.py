"""On the real MiniLM weights (F32, BF16, F16): stamped copies are traced through attacks, and
nobody is accused of what they did not receive; under the v1 uniform code and the v2 Tardos code."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_stamped_lab
from weightmark import attacks
from weightmark.canonical import to_float32
from weightmark.formats.safetensors import Checkpoint
from weightmark.kernels import score_codewords
from weightmark.scheme import log10_hoeffding, packed_codeword, parse_scheme
from weightmark.tardos import never_issued_check

NON_BLIND_LIMIT = -12.0  # family-wise p <= 1e-12
BLIND_LIMIT = -9.0


def attacked(stamped, which: int, attack: str, tmp_path: Path) -> Path:
    src = stamped.copies[which]
    dst = tmp_path / f"{attack}-{which}"
    if attack == "none":
        return src
    if attack == "f16":
        return attacks.cast(src, dst, "F16")
    if attack in ("Q8_0", "Q4_0"):
        return attacks.requantize(src, dst, attack)
    if attack == "noise":
        # Gaussian noise as large as Q4_0's own error on this model.
        return attacks.add_noise(src, dst, attacks.quantization_error(stamped.base, "Q4_0"), seed=which)
    raise AssertionError(attack)


@pytest.mark.parametrize("attack", ["none", "f16", "Q8_0", "Q4_0", "noise"])
def test_copies_traced_non_blind(stamped, attack: str, tmp_path: Path) -> None:
    for which, lid in enumerate(stamped.ids):
        report = stamped.lab.scan(attacked(stamped, which, attack, tmp_path))
        assert report.mode == "non-blind"
        accused = [c.licensee_id for c in report.accused]
        best = report.candidates[0]
        print(f"{stamped.dtype} {attack} copy {which}: score {best.score:.1f}, "
              f"log10 fw p {best.log10_family_wise_p:.1f}, runner-up {report.candidates[1].score:.2f}")
        assert accused == [lid], f"{attack}: accused {accused}, expected only {lid}"
        assert report.accused[0].log10_family_wise_p <= NON_BLIND_LIMIT


def test_copies_traced_blind(stamped) -> None:
    for which, lid in enumerate(stamped.ids):
        report = stamped.lab.scan(stamped.copies[which], blind=True)
        assert report.mode == "blind"
        print(f"{stamped.dtype} blind copy {which}: score {report.candidates[0].score:.1f}")
        assert [c.licensee_id for c in report.accused] == [lid]
        assert report.accused[0].log10_family_wise_p <= BLIND_LIMIT


def test_innocent_models_accuse_nobody(stamped, tmp_path: Path) -> None:
    base_q4 = attacks.requantize(stamped.base, tmp_path / "base-q4", "Q4_0")
    rng = np.random.default_rng(7)
    # Same names and shapes, other weights: every matrix replaced by noise of the same row RMS.
    unrelated = attacks.map_floats(
        stamped.base, tmp_path / "unrelated",
        lambda name, w: rng.standard_normal(w.shape).astype(np.float32) * np.sqrt(np.mean(w.reshape(w.shape[0], -1) ** 2, axis=1)).reshape((-1,) + (1,) * (w.ndim - 1)),
    )
    for suspect, blind in [(stamped.base, False), (stamped.base, True), (base_q4, False), (base_q4, True),
                           (unrelated, False), (unrelated, True)]:
        report = stamped.lab.scan(suspect, model_name="minilm", blind=blind)
        assert report.accused == [], f"{suspect} (blind={blind}) accused {report.accused}"
        assert all(c.log10_family_wise_p > -3 for c in report.candidates)


def test_calibration_of_never_issued_codewords(stamped, tmp_path: Path) -> None:
    """10,000 codewords never issued, scored against real scans: P(p < x) stays under x."""
    key = stamped.lab.keys.model_key(stamped.lab.registry.model("minilm").model_id)
    packed = np.stack([packed_codeword(key, 1_000_000 + i, 4096) for i in range(10_000)])
    q4 = attacks.requantize(stamped.copies[0], tmp_path / "q4", "Q4_0")
    scans = [stamped.lab.scan(stamped.copies[1]), stamped.lab.scan(q4), stamped.lab.scan(stamped.copies[2], blind=True),
             stamped.lab.scan(stamped.base, model_name="minilm", blind=True)]
    for report in scans:
        z = report.z
        scores = score_codewords(packed, z) / np.linalg.norm(z)
        log_p = np.array([log10_hoeffding(s) for s in scores])
        for x in (1e-1, 1e-2, 1e-3):
            frac = float(np.mean(log_p < math.log10(x)))
            print(f"{stamped.dtype} {report.mode}: P(p < {x:g}) = {frac:.5f}")
            assert frac <= x
        assert abs(float(np.mean(scores))) < 0.05 and 0.9 < float(np.std(scores)) < 1.1


def test_stamped_copy_stays_close_and_changes(stamped) -> None:
    """Relative error per tensor (reported), and for grid dtypes: the copy really differs."""
    errors, changed, total = {}, 0, 0
    with Checkpoint.open(stamped.base) as base, Checkpoint.open(stamped.copies[0]) as copy:
        for name, (_, info) in base.tensors.items():
            a, b = base.raw(name), copy.raw(name)
            if info.dtype in ("F32", "F16", "BF16") and len(info.shape) >= 2 and a.size >= 4096:
                wa, wb = to_float32(info.dtype, a), to_float32(info.dtype, b)
                errors[name] = attacks.relative_error(wa, wb)
                changed += int(np.count_nonzero(a != b))
                total += a.size
            else:
                assert np.array_equal(a, b), f"{name} is not a carrier and must be untouched"
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    print(f"{stamped.dtype}: relative error median {np.median(list(errors.values())):.5f}, worst {worst}; "
          f"changed elements {changed}/{total} = {changed / total:.3f}")
    assert max(errors.values()) < 0.01
    assert changed / total > 0.3


# -- the v2 Tardos code (the default: sized for 8 colluders among 10^6 licensees) ---------------


@pytest.fixture(scope="module")
def stamped_v2(tmp_path_factory: pytest.TempPathFactory, minilm_variants: dict[str, Path]):
    return make_stamped_lab(tmp_path_factory.mktemp("lab-v2"), minilm_variants["F32"], "F32")


@pytest.mark.parametrize("attack", ["none", "Q4_0"])
def test_v2_copies_traced_non_blind(stamped_v2, attack: str, tmp_path: Path) -> None:
    for which, lid in enumerate(stamped_v2.ids):
        report = stamped_v2.lab.scan(attacked(stamped_v2, which, attack, tmp_path), assume_licensees=10**6)
        assert report.scheme.startswith("tardos-v2;")
        best = report.candidates[0]
        print(f"v2 {attack} copy {which}: score {best.score:.1f}, log10 fw p {best.log10_family_wise_p:.1f}, "
              f"runner-up {report.candidates[1].score:.2f}")
        assert [c.licensee_id for c in report.accused] == [lid]
        assert report.accused[0].log10_family_wise_p <= NON_BLIND_LIMIT


def test_v2_blind_ranks_the_true_licensee_first_and_accuses_no_innocent(stamped_v2) -> None:
    """Blind, the Tardos score keeps about 2/pi of v1's: on a model as small as MiniLM it ranks the
    right licensee first but may stay above the accusation threshold; it never names another."""
    for which, lid in enumerate(stamped_v2.ids):
        report = stamped_v2.lab.scan(stamped_v2.copies[which], blind=True)
        best = report.candidates[0]
        print(f"v2 blind copy {which}: score {best.score:.1f}, log10 fw p {best.log10_family_wise_p:.1f}")
        assert best.licensee_id == lid and best.log10_family_wise_p < -3
        assert all(c.licensee_id == lid for c in report.accused)


def test_v2_never_issued_codewords_respect_the_bound(stamped_v2, tmp_path: Path) -> None:
    """20,000 never-issued Tardos codewords per scan: the empirical tail of their p-values stays
    under the analytic bound and none comes near an accusation."""
    model = stamped_v2.lab.registry.model("minilm")
    key = stamped_v2.lab.keys.model_key(model.model_id)
    q4 = attacks.requantize(stamped_v2.copies[0], tmp_path / "q4", "Q4_0")
    scans = [stamped_v2.lab.scan(stamped_v2.copies[1]), stamped_v2.lab.scan(q4),
             stamped_v2.lab.scan(stamped_v2.copies[2], blind=True),
             stamped_v2.lab.scan(stamped_v2.base, model_name="minilm", blind=True)]
    for report in scans:
        params = parse_scheme(report.scheme)
        check = never_issued_check(report.z, params.biases(key), key, count=20_000)
        print(f"v2 {report.mode}: tail {check.empirical} vs {check.bound}, min fw log10 p "
              f"{check.min_log10_family_wise_p:.2f}")
        assert check.consistent
        assert check.min_log10_family_wise_p > -3
