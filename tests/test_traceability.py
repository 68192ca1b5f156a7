"""On the real MiniLM weights (F32, BF16, F16): stamped copies are traced through attacks, and
nobody is accused of what they did not receive."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from weightmark import attacks
from weightmark.canonical import to_float32
from weightmark.formats.safetensors import Checkpoint
from weightmark.kernels import score_codewords
from weightmark.scheme import log10_hoeffding, packed_codeword

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
