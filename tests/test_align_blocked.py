"""Row matching without the units x units score matrix: the blocked matcher gives exactly the
dense matcher's assignment, on clear matches, on noise, with ties and with non-finite scores, and
re-alignment of a permuted FFN gives the same plan either way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_align import carriers_of
from weightmark import align as align_module
from weightmark.align import align, match_rows, match_rows_blocked
from weightmark.attacks import add_noise, permute_ffn
from weightmark.formats import open_suspect


def _blocked(score: np.ndarray, block: int, k: int) -> np.ndarray:
    return match_rows_blocked(lambda rows, cols: score[np.ix_(rows, cols)], score.shape[0], block, k)


def _unit(w: np.ndarray) -> np.ndarray:
    return w / np.linalg.norm(w, axis=1, keepdims=True)


CASES = {
    "clear": lambda rng: (lambda ref, perm: np.abs(_unit(ref[perm] + 0.3 * rng.standard_normal(ref.shape))
                                                   @ _unit(ref).T))(rng.standard_normal((300, 40)),
                                                                    rng.permutation(300)),
    "noise": lambda rng: rng.random((257, 257)),
    "ties": lambda rng: rng.integers(0, 4, (200, 200)).astype(np.float64),
    "non-finite": lambda rng: np.where(rng.random((150, 150)) < 0.1, np.nan,
                                       np.where(rng.random((150, 150)) < 0.05, np.inf, rng.random((150, 150)))),
    "all-equal": lambda rng: np.ones((64, 64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("block", "k"), [(7, 1), (64, 4), (1000, 8)])
def test_blocked_matcher_equals_the_dense_one(case: str, block: int, k: int) -> None:
    score = CASES[case](np.random.default_rng(len(case) * 31 + k))
    dense = match_rows(score)
    blocked = _blocked(score, block, k)
    assert sorted(blocked.tolist()) == list(range(score.shape[0]))
    assert np.array_equal(blocked, dense)


def test_blocked_matcher_undoes_a_permutation() -> None:
    rng = np.random.default_rng(1)
    perm = rng.permutation(500)
    ref = rng.standard_normal((500, 64))
    score = np.abs(_unit(ref[perm]) @ _unit(ref).T)
    assert np.array_equal(perm[_blocked(score, 50, 4)], np.arange(500))


def test_ffn_alignment_is_the_same_dense_or_blocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_align import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", seed=3)
    config = json.loads((base / "config.json").read_text())
    leak = add_noise(permute_ffn(base, tmp_path / "perm", 21), tmp_path / "leak", 0.05, seed=9)
    ref = open_suspect(base)
    carriers = carriers_of(ref)
    dense = align(open_suspect(leak), ref, carriers, config)
    monkeypatch.setattr(align_module, "DENSE_MATCH_UNITS", 8)
    monkeypatch.setattr(align_module, "MATCH_BLOCK", 19)
    blocked = align(open_suspect(leak), ref, carriers, config)
    assert any("rows permuted" in line for line in dense.report)
    assert blocked.report == dense.report
    for name, plan in dense.plans.items():
        other = blocked.plans[name]
        for attr in ("row_order", "col_order"):
            a, b = getattr(plan, attr), getattr(other, attr)
            assert (a is None and b is None) or np.array_equal(a, b), (name, attr)
