"""The pruning, merging and collusion attacks do exactly what they say, on small synthetic checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from weightmark.attacks import combine
from weightmark.attacks.combine import COLLUSIONS, collude, merge
from weightmark.attacks.prune import magnitude_prune, semi_structured
from weightmark.canonical import from_float32, to_float32
from weightmark.errors import UsageError
from weightmark.formats.safetensors import Checkpoint, save_file

# name, dtype, shape: an F32 matrix, a rank-3 BF16 tensor ([16, 32] canonically), an F16
# matrix whose input dimension (6) is not a multiple of 4, a norm and an integer buffer.
SPECS = [
    ("layer.0.proj.weight", "F32", (64, 32)),
    ("layer.0.conv.weight", "BF16", (16, 8, 4)),
    ("layer.0.norm.weight", "F32", (32,)),
    ("layer.1.odd.weight", "F16", (8, 6)),
    ("position_ids", "I64", (5,)),
]
CONFIG = {"architectures": ["Toy"], "hidden_size": 32}


def write_copy(folder: Path, seed: int, base_seed: int = 0) -> Path:
    """A base drawn from base_seed plus this copy's own perturbation (distinct in every dtype)."""
    base_rng, rng = np.random.default_rng(base_seed), np.random.default_rng(seed + 1000)
    items = []
    for name, dtype, shape in SPECS:
        if dtype == "I64":
            items.append((name, dtype, np.arange(5, dtype=np.int64)))
            continue
        values = base_rng.standard_normal(shape).astype(np.float32)
        if len(shape) >= 2:
            values += 0.1 * rng.standard_normal(shape).astype(np.float32)
        items.append((name, dtype, from_float32(dtype, values)))
    folder.mkdir(parents=True)
    save_file(folder / "model.safetensors", items, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def read(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dtype, float32 values or the raw integers), in file order."""
    with Checkpoint.open(path) as ckpt:
        out = {}
        for name, (_, info) in ckpt.tensors.items():
            raw = np.array(ckpt.raw(name))
            out[name] = (info.dtype, to_float32(info.dtype, raw).copy() if info.dtype != "I64" else raw)
        return out


def assert_same_layout(src: Path, dst: Path) -> None:
    with Checkpoint.open(src) as a, Checkpoint.open(dst) as b:
        assert list(a.tensors) == list(b.tensors)
        for name in a.tensors:
            assert (a.info(name).dtype, a.info(name).shape) == (b.info(name).dtype, b.info(name).shape), name
        assert b.shards[0].metadata == {"format": "pt"}
    assert json.loads((dst / "config.json").read_text()) == CONFIG


@pytest.fixture
def copies(tmp_path: Path) -> list[Path]:
    return [write_copy(tmp_path / f"copy-{i}", seed=i) for i in range(4)]


def matrices(tensors: dict[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: values for name, (dtype, values) in tensors.items() if dtype != "I64" and values.ndim >= 2}


# -- pruning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
def test_magnitude_prune_zeroes_the_smallest_fraction_of_each_matrix(copies: list[Path], tmp_path: Path,
                                                                     fraction: float) -> None:
    out = magnitude_prune(copies[0], tmp_path / "pruned", fraction)
    assert_same_layout(copies[0], out)
    before, after = read(copies[0]), read(out)
    for name, w in matrices(before).items():
        p = after[name][1]
        zero = p == 0
        assert zero.sum() == round(fraction * w.size), name
        assert np.abs(w[zero]).max() <= np.abs(w[~zero]).min(), f"{name}: a larger weight was pruned"
        np.testing.assert_array_equal(p[~zero], w[~zero])
    for name in ("layer.0.norm.weight", "position_ids"):
        np.testing.assert_array_equal(after[name][1], before[name][1])


def test_semi_structured_keeps_exactly_the_two_largest_of_every_four_inputs(copies: list[Path],
                                                                            tmp_path: Path) -> None:
    out = semi_structured(copies[1], tmp_path / "sparse")
    assert_same_layout(copies[1], out)
    before, after = read(copies[1]), read(out)
    for name in ("layer.0.proj.weight", "layer.0.conv.weight"):
        w = before[name][1].reshape(before[name][1].shape[0], -1)
        p = after[name][1].reshape(w.shape)
        groups_w = w.reshape(w.shape[0], -1, 4)
        groups_p = p.reshape(groups_w.shape)
        assert ((groups_p != 0).sum(axis=2) == 2).all(), f"{name}: not 2:4"
        kept = np.sort(np.abs(groups_p), axis=2)[:, :, 2:]
        np.testing.assert_array_equal(kept, np.sort(np.abs(groups_w), axis=2)[:, :, 2:])
        np.testing.assert_array_equal(groups_p[groups_p != 0], groups_w[groups_p != 0])
    # an input dimension of 6 cannot be 2:4 sparse: left as it was, like the rank-1 norm
    for name in ("layer.1.odd.weight", "layer.0.norm.weight"):
        np.testing.assert_array_equal(after[name][1], before[name][1])


def test_semi_structured_other_patterns_and_bad_arguments(copies: list[Path], tmp_path: Path) -> None:
    out = semi_structured(copies[0], tmp_path / "1of4", n=1, m=4)
    p = read(out)["layer.0.proj.weight"][1].reshape(64, -1, 4)
    assert ((p != 0).sum(axis=2) == 1).all()
    with pytest.raises(UsageError):
        semi_structured(copies[0], tmp_path / "bad", n=5, m=4)
    with pytest.raises(UsageError):
        magnitude_prune(copies[0], tmp_path / "bad", 1.5)


# -- merging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.5, 0.25])
def test_merge_is_the_weighted_average(copies: list[Path], tmp_path: Path, weight: float) -> None:
    out = merge(copies[0], copies[1], tmp_path / "merged", weight)
    assert_same_layout(copies[0], out)
    a, b, m = read(copies[0]), read(copies[1]), read(out)
    for name, (dtype, values) in m.items():
        if dtype == "I64":
            np.testing.assert_array_equal(values, a[name][1])
            continue
        a64, b64 = a[name][1].astype(np.float64), b[name][1].astype(np.float64)
        expected = (weight * a64 + (1 - weight) * b64).astype(np.float32)
        # the merged tensor is stored in the first copy's dtype, rounded to nearest
        np.testing.assert_array_equal(values, to_float32(dtype, from_float32(dtype, expected)), name)
    assert not np.array_equal(m["layer.0.proj.weight"][1], a["layer.0.proj.weight"][1])


# -- collusion ----------------------------------------------------------------------------------


NUMPY_RULES = {
    "average": lambda s: s.astype(np.float64).mean(axis=0).astype(np.float32),
    "median": lambda s: np.median(s, axis=0),
    "min": lambda s: s.min(axis=0),
    "max": lambda s: s.max(axis=0),
}


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("how", sorted(NUMPY_RULES))
def test_element_wise_collusion_equals_numpy(copies: list[Path], tmp_path: Path, how: str, k: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(combine, "BLOCK_ELEMENTS", 100)  # several row blocks per tensor
    out = collude(copies[:k], tmp_path / "colluded", how, seed=3)
    assert_same_layout(copies[0], out)
    sources = [read(c) for c in copies[:k]]
    for name, (dtype, values) in read(out).items():
        if dtype == "I64":
            np.testing.assert_array_equal(values, sources[0][name][1])
            continue
        expected = NUMPY_RULES[how](np.stack([s[name][1] for s in sources]))
        np.testing.assert_array_equal(values, to_float32(dtype, from_float32(dtype, expected)), name)


def test_minmax_takes_min_or_max_by_a_random_mask(copies: list[Path], tmp_path: Path) -> None:
    out = read(collude(copies, tmp_path / "minmax", "minmax", seed=1))
    sources = [read(c) for c in copies]
    for name, w in matrices(out).items():
        stack = np.stack([s[name][1] for s in sources])
        is_min, is_max = w == stack.min(axis=0), w == stack.max(axis=0)
        assert (is_min | is_max).all(), name
        assert 0.3 < is_max.mean() < 0.7 and 0.3 < is_min.mean() < 0.7, name


def test_random_pick_takes_each_weight_from_some_copy(copies: list[Path], tmp_path: Path) -> None:
    out = read(collude(copies, tmp_path / "pick", "random-pick", seed=2))
    sources = [read(c) for c in copies]
    for name, w in matrices(out).items():
        stack = np.stack([s[name][1] for s in sources])
        from_copy = stack == w[None]
        assert from_copy.any(axis=0).all(), name
        assert (from_copy.mean(axis=(1, 2) if w.ndim == 2 else (1, 2, 3)) > 0.15).all(), name


def test_interleave_row_takes_whole_rows(copies: list[Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(combine, "BLOCK_ELEMENTS", 100)
    out = read(collude(copies, tmp_path / "rows", "interleave-row", seed=4))
    sources = [read(c) for c in copies]
    for name, w in matrices(out).items():
        rows = w.reshape(w.shape[0], -1)
        stack = np.stack([s[name][1].reshape(rows.shape) for s in sources])
        whole = (stack == rows[None]).all(axis=2)  # [k, rows]: row r equals copy i's row r
        assert (whole.sum(axis=0) == 1).all(), f"{name}: a row is not one copy's row"
        assert whole.any(axis=1).sum() >= 2, f"{name}: only one copy was used"


def test_interleave_tensor_takes_whole_tensors(tmp_path: Path) -> None:
    many = [write_copy(tmp_path / f"c{i}", seed=i) for i in range(3)]
    sources = [read(c) for c in many]
    used = set()
    for seed in range(4):
        out = read(collude(many, tmp_path / f"tensors-{seed}", "interleave-tensor", seed=seed))
        for name, w in matrices(out).items():
            origin = [i for i, s in enumerate(sources) if np.array_equal(s[name][1], w)]
            assert len(origin) == 1, f"{name}: not one copy's whole tensor"
            used.add(origin[0])
    assert used == {0, 1, 2}, "the choice of copy must vary with the tensor and the seed"


@pytest.mark.parametrize("how", COLLUSIONS)
def test_collusion_is_deterministic_and_seeded(copies: list[Path], tmp_path: Path, how: str) -> None:
    a = collude(copies[:3], tmp_path / "a", how, seed=5)
    b = collude(copies[:3], tmp_path / "b", how, seed=5)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert_same_layout(copies[0], a)


def test_collusion_refuses_what_does_not_add_up(copies: list[Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown collusion"):
        collude(copies, tmp_path / "x", "mean-ish")
    with pytest.raises(UsageError, match="at least 2"):
        collude(copies[:1], tmp_path / "x", "average")
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file(odd / "model.safetensors", [("layer.0.proj.weight", "F32", np.zeros((32, 64), np.float32))])
    with pytest.raises(UsageError, match="layer.0.proj.weight|no tensor"):
        collude([copies[0], odd], tmp_path / "x", "average")
    assert not (tmp_path / "x").exists()
