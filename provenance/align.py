"""Bring a suspect's carriers back to the reference's frame before extraction.

Function-preserving edits (FFN and head permutations, row and norm rescaling, a rotation of a
llama model's residual stream) and renamed, re-ordered or transposed tensors move every element
away from the index that carries its chip and code position, so extraction reads noise. `align`
estimates those edits from the suspect and the reference alone and `Alignment.tensor` undoes
them, one carrier at a time:

1. names: each registered carrier is looked up under its own name (or a format's candidate
   names); one that is missing is searched for among the unclaimed suspect tensors of the same
   or transposed shape by content (sampled rows compared with the reference);
2. detection: a carrier whose values are close to the reference's at the same place (relative
   difference of sampled rows below `CLOSE`, which covers quantization and fine-tuning) is
   taken as it is; when every carrier is close, nothing else runs and nothing is reported;
3. residual rotation (llama): orthogonal Procrustes on the token embedding, Q from the SVD of
   E_ref^T E_sus;
4. per layer: FFN units and attention heads (GQA: key/value heads with their query groups, then
   query heads within a group) matched by row correlation with the reference, using an exact
   greedy mutual-best matching (exact whenever every true pair is its row's and column's best);
5. row and column gains by alternating least squares, kept only where they reduce the
   difference to the reference;
6. a carrier still far from the reference after all this (e.g. two tensors whose names were
   swapped) is searched for by content once more, then reported as unexplained.

Statistics: the alignment is a function of the suspect and the reference only; it never reads
a codeword, a key or a chip. An innocent licensee's codeword is independent of the suspect, so
it stays independent of the aligned suspect too, and the Hoeffding p-values of the scan remain
valid. (The least-squares scales and the rotation are fitted to the reference: they absorb a
share of the watermark of order 1/sqrt(row length), which only costs the guilty score a little.)

Memory: the estimates are vectors and one hidden x hidden rotation; tensors are read a layer
group at a time while estimating and one at a time by `Alignment.tensor`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from weightmark.attacks.functional import Architecture, tensor_role
from weightmark.canonical import to_float32
from weightmark.errors import UsageError
from weightmark.moe import expert_layers
from weightmark.scheme import canonical_2d

__all__ = [
    "CLOSE",
    "Alignment",
    "OpenModel",
    "align",
    "infer_architecture",
    "match_rows",
    "match_rows_blocked",
    "relative_difference",
]

CLOSE = 0.5  # relative difference below which a tensor is taken as the reference's, unmoved
SAMPLE_ROWS = 32  # rows compared when telling tensors apart by content
MATCH_COLUMNS = 64  # input columns used to correlate rows when matching units (plenty: an
# unrelated row's cosine on 64 columns is about N(0, 1/64), a matching row's close to 1, and
# the FFN score sums two matrices)
DENSE_MATCH_UNITS = 4096  # above this many units, rows are matched block by block (bounded memory)
MATCH_BLOCK = 1024  # suspect rows scored at once by the blocked matcher
MATCH_TOP = 8  # best candidates kept per row and per column by the blocked matcher
SCALE_GAIN = 0.9  # least-squares scales are kept only if they cut the difference by 10%
PROCRUSTES_ROWS = 64  # embedding rows per hidden channel used to fit the rotation (at most)
_EPS = 1e-30


class _Meta(Protocol):
    shape: tuple[int, ...]


class OpenModel(Protocol):
    """What `align` reads: tensor shapes by name and canonical float32 [out, in] values."""

    def tensors(self) -> Mapping[str, _Meta]: ...

    def load(self, name: str) -> np.ndarray: ...


@dataclass
class _Plan:
    """How to turn one suspect tensor into the reference's frame, in this order:
    transpose, rotations, permutations, then multiplication by the gains."""

    source: str
    transposed: bool = False
    row_rotation: np.ndarray | None = None  # aligned = row_rotation @ w
    col_rotation: np.ndarray | None = None  # aligned = w @ col_rotation
    row_order: np.ndarray | None = None  # aligned = w[row_order]
    col_order: np.ndarray | None = None  # aligned = w[:, col_order]
    row_gain: np.ndarray | None = None  # aligned = w * row_gain[:, None]
    col_gain: np.ndarray | None = None  # aligned = w * col_gain[None, :]

    @property
    def identity(self) -> bool:
        return not self.transposed and all(
            x is None
            for x in (
                self.row_rotation,
                self.col_rotation,
                self.row_order,
                self.col_order,
                self.row_gain,
                self.col_gain,
            )
        )

    def moved(self, w: np.ndarray, scales: bool = True) -> np.ndarray:
        """Apply the plan to the suspect's [out, in] values (float32 result)."""
        if self.transposed:
            w = w.T
        if self.col_rotation is not None:
            w = w @ self.col_rotation
        if self.row_rotation is not None:
            w = self.row_rotation @ w
        if self.row_order is not None:
            w = w[self.row_order]
        if self.col_order is not None:
            w = w[:, self.col_order]
        if scales and self.row_gain is not None:
            w = w * self.row_gain[:, None].astype(np.float32)
        if scales and self.col_gain is not None:
            w = w * self.col_gain[None, :].astype(np.float32)
        return np.ascontiguousarray(w, dtype=np.float32)


@dataclass
class Alignment:
    """The suspect seen in the reference's frame. `report` lists what was undone."""

    suspect: OpenModel
    plans: dict[str, _Plan | None]  # registered name -> plan, None when not found
    report: list[str] = field(default_factory=list)

    def tensor(self, name: str) -> np.ndarray | None:
        """The suspect's carrier `name` as float32 [out, in] in the reference's frame, or None."""
        plan = self.plans.get(name)
        if plan is None:
            return None
        return plan.moved(_as_2d(self.suspect.load(plan.source)))

    def source(self, name: str) -> str | None:
        """The suspect's own name for carrier `name` (None if it was not found)."""
        plan = self.plans.get(name)
        return plan.source if plan else None

    @property
    def changed(self) -> bool:
        """Whether anything but reading carriers under their own names is needed."""
        return any(
            plan is None or not plan.identity or plan.source != name
            for name, plan in self.plans.items()
        )

    def is_identity(self, name: str) -> bool:
        """Whether carrier `name` is read as it is, under the same name."""
        plan = self.plans.get(name)
        return plan is not None and plan.identity and plan.source == name


def _as_2d(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    return w.reshape(canonical_2d(tuple(w.shape))) if w.ndim != 2 else w


def _rows(model: OpenModel, name: str, rows: np.ndarray) -> np.ndarray:
    """Some rows of a tensor's [out, in] view; a float safetensors file is read in place, only
    those rows (other formats dequantize the tensor)."""
    checkpoint = getattr(model, "checkpoint", None)
    if checkpoint is not None:
        try:
            dtype = checkpoint.info(name).dtype
            raw = checkpoint.raw(name)
            raw = raw.reshape(canonical_2d(tuple(raw.shape)))
            picked = np.array(to_float32(dtype, raw[rows]), dtype=np.float32)
            # Readahead faults in far more than the sampled rows: give the pages back, or
            # sampling every carrier of suspect and reference keeps both models resident.
            checkpoint.release(name)
            return picked
        except (KeyError, ValueError):
            pass
    picked = _as_2d(model.load(name))[rows]
    _release(model, name)
    return picked


def _release(model: OpenModel, name: str) -> None:
    """Give back the mapped pages of a tensor just read (safetensors and GGUF readers can):
    otherwise every tensor re-alignment looks at stays resident, the whole file by the end."""
    owner = getattr(model, "checkpoint", None) or model
    release = getattr(owner, "release", None)
    if release is not None:
        try:
            release(name)
        except (KeyError, ValueError):
            pass


def _column_norms(model: OpenModel, name: str) -> np.ndarray:
    """Per input column, the norm over a tensor's rows (float64)."""
    w = _as_2d(model.load(name))
    norms = np.sqrt(np.einsum("ij,ij->j", w, w, dtype=np.float64))
    _release(model, name)
    return norms


def _centred_unit(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), _EPS)


def relative_difference(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref|| / ||ref|| (float32 differences, float64 sums)."""
    r = np.asarray(ref, dtype=np.float32)
    d = np.subtract(a, r, dtype=np.float32)
    num = float(np.sum(np.square(d), dtype=np.float64))  # pairwise summation: accurate enough
    return math.sqrt(num / max(float(np.sum(np.square(r), dtype=np.float64)), _EPS))


def _sample_index(n: int, k: int = SAMPLE_ROWS) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).astype(np.intp))


def match_rows(score: np.ndarray) -> np.ndarray:
    """A one-to-one assignment maximising `score` [n_suspect, n_reference] greedily.

    Returns `order` with order[j] = the suspect row matched to reference row j. Each round
    takes every pair that is the best of both its row and its column among the rows still
    free (the global best always is), so a clear match (every true pair best in its row and
    column) is found exactly in one round.
    """
    score = np.asarray(score, dtype=np.float64)
    # Non-finite scores (NaN or inf weights in a hostile file) never win a match.
    score = np.where(np.isfinite(score), score, -np.inf)
    n_sus, n_ref = score.shape
    if n_sus != n_ref:
        raise ValueError(f"score matrix must be square, got {score.shape}")
    order = np.full(n_ref, -1, dtype=np.intp)
    free_s, free_r = np.arange(n_sus), np.arange(n_ref)
    while free_s.size:
        sub = score if free_s.size == n_sus else score[np.ix_(free_s, free_r)]
        best_r = sub.argmax(axis=1)
        # A row's best column is mutual when no other row scores higher in that column
        # (column maxima by a row-wise reduction: argmax along axis 0 is slow in numpy).
        column_max = sub.max(axis=0)
        rows = np.flatnonzero(sub[np.arange(free_s.size), best_r] >= column_max[best_r])
        _, first = np.unique(best_r[rows], return_index=True)  # ties: one row per column
        rows = rows[first]
        if rows.size == 0:  # cannot happen with finite scores; never loop on odd input
            order[free_r] = free_s
            break
        order[free_r[best_r[rows]]] = free_s[rows]
        keep_s = np.ones(free_s.size, dtype=bool)
        keep_s[rows] = False
        keep_r = np.ones(free_r.size, dtype=bool)
        keep_r[best_r[rows]] = False
        free_s, free_r = free_s[keep_s], free_r[keep_r]
    return order


def _top(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the indices and values of the k largest entries, best first (ties: lower index)."""
    k = min(k, values.shape[1])
    idx = np.argpartition(-values, k - 1, axis=1)[:, :k] if k < values.shape[1] else \
        np.broadcast_to(np.arange(values.shape[1]), values.shape).copy()
    vals = np.take_along_axis(values, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=1)
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)


def match_rows_blocked(score_block, n: int, block: int = MATCH_BLOCK, k: int = MATCH_TOP) -> np.ndarray:
    """`match_rows` without the n x n score matrix: the same greedy mutual-best rounds, run on
    the k best candidates of every row and column, scored `block` rows at a time.

    `score_block(rows, cols)` gives the float scores of suspect rows x reference rows. A row or
    column whose kept candidates are all taken, or whose k-th candidate ties its best free one,
    is re-scored against everything still free, so the result is the dense one. Memory is
    O(block * n + n * k) instead of O(n^2).
    """
    def finite(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.where(np.isfinite(x), x, -np.inf)

    row_idx = np.empty((n, min(k, n)), dtype=np.intp)
    row_val = np.empty((n, min(k, n)))
    col_idx = np.empty((n, 0), dtype=np.intp)
    col_val = np.empty((n, 0))
    everything = np.arange(n)
    for start in range(0, n, block):
        rows = everything[start:start + block]
        sc = finite(score_block(rows, everything))
        row_idx[rows], row_val[rows] = _top(sc, k)
        # Merge this block's best rows per column into the running per-column lists.
        ci, cv = _top(sc.T, k)
        col_idx, col_val = _top_merge(col_idx, col_val, rows[ci], cv, k)
    order = np.full(n, -1, dtype=np.intp)
    free_s = np.ones(n, dtype=bool)
    free_r = np.ones(n, dtype=bool)

    def best_free(idx: np.ndarray, val: np.ndarray, free: np.ndarray, who: np.ndarray, transpose: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
        """For each of `who`, its best free partner and that score (re-scored when unsure)."""
        ok = free[idx[who]]
        has = ok.any(axis=1)
        first = ok.argmax(axis=1)
        pick = idx[who, first]
        best = val[who, first]
        # Unsure: no free candidate kept, or the best free one ties the last kept (more may tie
        # beyond the list).
        unsure = ~has | ((best == val[who, -1]) & (idx.shape[1] < n))
        for j in np.flatnonzero(unsure):
            partners = np.flatnonzero(free)
            one = np.array([who[j]])
            sc = finite(score_block(partners, one).T if transpose else score_block(one, partners))[0]
            m = int(sc.argmax())
            pick[j], best[j] = partners[m], sc[m]
        return pick, best

    while free_s.any():
        rows = np.flatnonzero(free_s)
        best_r, best_v = best_free(row_idx, row_val, free_r, rows, False)
        cols = np.unique(best_r)
        _, col_best = best_free(col_idx, col_val, free_s, cols, True)
        column_max = dict(zip(cols.tolist(), col_best.tolist(), strict=True))
        mutual = np.array([v >= column_max[c] for c, v in zip(best_r.tolist(), best_v.tolist(), strict=True)],
                          dtype=bool)
        hits = np.flatnonzero(mutual)
        _, first = np.unique(best_r[hits], return_index=True)  # ties: one row per column
        hits = hits[first]
        if hits.size == 0:  # cannot happen with finite scores; never loop on odd input
            order[np.flatnonzero(free_r)] = rows
            break
        order[best_r[hits]] = rows[hits]
        free_s[rows[hits]] = False
        free_r[best_r[hits]] = False
    return order


def _top_merge(idx: np.ndarray, val: np.ndarray, new_idx: np.ndarray, new_val: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of two candidate lists (best first, ties: lower index)."""
    both_idx = np.concatenate([idx, new_idx], axis=1)
    both_val = np.concatenate([val, new_val], axis=1)
    top_idx, top_val = _top(both_val, k)
    return np.take_along_axis(both_idx, top_idx, axis=1), top_val


def _unit_rows(w: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit length (on a subset of columns), float32."""
    if columns is not None:
        w = w[:, columns]
    w = np.asarray(w, dtype=np.float32)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.maximum(norms, 1e-20)


def _match_columns(n: int) -> np.ndarray | None:
    return None if n <= MATCH_COLUMNS else _sample_index(n, MATCH_COLUMNS)


def _column_ratio(sus: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-column norm ratio, which row permutations leave alone: a first guess at column scales."""
    s = np.linalg.norm(sus.astype(np.float64), axis=0)
    r = np.linalg.norm(ref.astype(np.float64), axis=0)
    ratio = s / np.maximum(r, _EPS)
    ratio[(r <= _EPS) | (s <= _EPS)] = 1.0
    return ratio


def _least_squares_gains(
    sus: np.ndarray, ref: np.ndarray, rounds: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """u, v minimising ||diag(u) sus diag(v) - ref|| (alternating least squares), median(v) = 1.

    Fitted in the reference's frame: a row or column that re-quantization has drowned in
    noise gets a gain that shrinks it, where dividing by a scale fitted in the suspect's frame
    would blow the noise up.
    """
    s, r = np.asarray(sus, dtype=np.float32), np.asarray(ref, dtype=np.float32)
    p, s2 = s * r, s * s
    u = np.ones(s.shape[0], dtype=np.float64)
    v = np.ones(s.shape[1], dtype=np.float64)
    for _ in range(rounds):
        # einsum, not BLAS: matrix-vector products are memory-bound, and threaded BLAS on a
        # busy machine spends far longer waiting than computing.
        v32 = v.astype(np.float32)
        den = np.einsum("ij,j->i", s2, v32 * v32)
        u = np.where(den > _EPS, np.einsum("ij,j->i", p, v32) / np.maximum(den, _EPS), 0.0)
        u32 = u.astype(np.float32)
        den = np.einsum("i,ij->j", u32 * u32, s2)
        v_new = np.where(den > _EPS, np.einsum("i,ij->j", u32, p) / np.maximum(den, _EPS), 0.0)
        mid = float(np.median(np.abs(v_new))) or 1.0
        u, v_new = u.astype(np.float64) * mid, v_new.astype(np.float64) / mid
        step = float(np.max(np.abs(v_new - v) / np.maximum(np.abs(v_new), 1e-12)))
        v = v_new
        if step < 1e-4:
            break
    return u, v


def _described_scale(gain: np.ndarray, what: str) -> str | None:
    off = np.abs(np.log(np.maximum(np.abs(gain), _EPS))) > 0.05
    if not off.any():
        return None
    return f"{what} rescaled ({int(off.sum())} of {gain.size} by more than 5%)"


def infer_architecture(
    names: Mapping[str, _Meta], config: Mapping[str, Any] | None = None
) -> Architecture | None:
    """The architecture from the base's config.json, else guessed from tensor names and shapes.

    Without a config the head size is guessed (64 or 128, whichever divides the projections);
    models with other head sizes need their config for head alignment.
    """
    if config:
        try:
            return Architecture.from_config(dict(config))
        except (UsageError, ValueError, TypeError, ZeroDivisionError):  # unusable: as if absent
            pass
    q = next(
        (
            m.shape
            for n, m in names.items()
            if n.endswith(("self_attn.q_proj.weight", "attention.self.query.weight"))
        ),
        None,
    )
    if q is None:
        return None
    llama = any("self_attn.q_proj" in n for n in names)
    k = next(
        (
            m.shape
            for n, m in names.items()
            if n.endswith(("self_attn.k_proj.weight", "attention.self.key.weight"))
        ),
        q,
    )
    head_dim = next(
        (hd for hd in (64, 128, 32, 96, 80, 16) if q[0] % hd == 0 and k[0] % hd == 0), q[0]
    )
    layers = 1 + max((tensor_role(n) or (0,))[0] for n in names)
    tied = not any(n.endswith("lm_head.weight") for n in names)
    return Architecture(
        "llama" if llama else "bert",
        q[1],
        q[0] // head_dim,
        k[0] // head_dim,
        head_dim,
        layers,
        tied,
    )


# Projections of an expert by their role in a SwiGLU FFN.
_EXPERT_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_NOT_WEIGHTS = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})


class _Aligner:
    """Estimates the plans; holds only small vectors and the rotation between steps."""

    def __init__(
        self,
        suspect: OpenModel,
        reference: OpenModel,
        carriers: Mapping[str, tuple[int, ...]],
        config: Mapping[str, Any] | None,
    ) -> None:
        self.suspect, self.reference = suspect, reference
        self.carriers = {name: tuple(shape) for name, shape in carriers.items()}
        # Integer or boolean tensors stored plainly (a hostile or odd file) carry no weights.
        self.sus_metas = {name: meta for name, meta in suspect.tensors().items()
                          if getattr(meta, "source_dtype", "") not in _NOT_WEIGHTS}
        self.ref_metas = dict(reference.tensors())
        self.arch = infer_architecture(self.ref_metas, config)
        self.report: list[str] = []
        self.plans: dict[str, _Plan | None] = {}
        self.far: set[str] = set()  # carriers whose same-name tensor differs from the reference
        self.unresolved: dict[str, float] = {}  # carriers still far after alignment -> difference
        self.fitted: set[str] = set()  # carriers whose gains have been fitted
        self.rows_rescaled: list[str] = []
        self.cols_rescaled: list[str] = []
        self.expert_groups = expert_layers([*self.carriers, *self.ref_metas])

    # -- reading ---------------------------------------------------------------------------

    def _aliases(self) -> dict[str, str]:
        aliases = {name: name for name in self.ref_metas if name in self.sus_metas}
        candidates = getattr(self.suspect, "name_candidates", None) or {}
        for own, options in candidates.items():
            if own not in self.sus_metas:
                continue
            for option in options:
                if option in self.ref_metas and option not in aliases:
                    aliases[option] = own
        return aliases

    def ref(self, name: str) -> np.ndarray:
        values = _as_2d(self.reference.load(name))
        _release(self.reference, name)
        return values

    def sus(self, name: str, scales: bool = False) -> np.ndarray | None:
        """The suspect's tensor for reference name `name` with the plan so far (no scales)."""
        plan = self.plans.get(name)
        if plan is None:
            return None
        values = _as_2d(self.suspect.load(plan.source))
        _release(self.suspect, plan.source)
        return plan.moved(values, scales=scales)

    # -- 1 and 2: names and detection -----------------------------------------------------------

    def resolve_names(self) -> None:
        aliases = self._aliases()
        shapes = {name: canonical_2d(shape) for name, shape in self.carriers.items()}
        pending: list[str] = []
        for name in self.carriers:
            own = aliases.get(name)
            if own is None:
                pending.append(name)
                continue
            have = canonical_2d(tuple(self.sus_metas[own].shape))
            if have == shapes[name]:
                self.plans[name] = _Plan(own)
            elif have == shapes[name][::-1]:
                self.plans[name] = _Plan(own, transposed=True)
            else:
                pending.append(name)
                continue
            if name in self.ref_metas:
                sample = _sample_index(shapes[name][0])
                plan = self.plans[name]
                if plan.transposed:
                    sus_rows = self.sus(name)[sample]
                else:
                    sus_rows = _rows(self.suspect, own, sample)
                if relative_difference(sus_rows, _rows(self.reference, name, sample)) >= CLOSE:
                    self.far.add(name)
        # Structural tensors that are not carriers (norms, small k/v projections): by name only.
        for name in self.ref_metas:
            if name not in self.plans and name not in self.carriers and name in aliases:
                own = aliases[name]
                if tuple(self.sus_metas[own].shape) == tuple(self.ref_metas[name].shape):
                    self.plans[name] = _Plan(own)
        if pending:
            self._search_by_content(pending)

    def _search_by_content(self, pending: list[str]) -> None:
        """Find carriers among the suspect tensors that no settled carrier claims, by content."""
        shapes = {name: canonical_2d(self.carriers[name]) for name in pending}
        claimed = {plan.source for name, plan in self.plans.items() if plan and name not in pending}
        pool = {
            own: canonical_2d(tuple(m.shape))
            for own, m in self.sus_metas.items()
            if own not in claimed and len(m.shape) >= 2
        }
        samples: dict[tuple[str, bool, int], np.ndarray] = {}
        loaded: dict[str, np.ndarray] = {}

        def sample(own: str, transposed: bool, rows: int) -> np.ndarray:
            key = (own, transposed, rows)
            if key not in samples:
                if own not in loaded:
                    loaded.clear()  # one suspect tensor in memory at a time
                    loaded[own] = _as_2d(self.suspect.load(own))
                    _release(self.suspect, own)
                w = loaded[own]
                idx = _sample_index(rows)
                samples[key] = np.ascontiguousarray(w[:, idx].T if transposed else w[idx])
            return samples[key]

        for name in pending:
            if name not in self.ref_metas:
                continue
            shape = shapes[name]
            idx = _sample_index(shape[0])
            target = self.ref(name)[idx]
            best: tuple[float, str, bool] | None = None
            for own, have in pool.items():
                for transposed in (False, True):
                    if (have[::-1] if transposed else have) != shape:
                        continue
                    diff = relative_difference(sample(own, transposed, shape[0]), target)
                    if best is None or diff < best[0]:
                        best = (diff, own, transposed)
            if best is not None and best[0] < CLOSE:
                _, own, transposed = best
                self.plans[name] = _Plan(own, transposed)
                pool.pop(own)
                how = ", transposed" if transposed else ""
                if own != name or transposed:
                    self.report.append(f"tensor {name} found under name {own}{how}")
            elif name not in self.plans:
                self.plans[name] = None
                self.report.append(f"tensor {name} not found in the suspect")

    # -- 3: residual rotation ---------------------------------------------------------------

    def undo_rotation(self) -> None:
        if self.arch is None or self.arch.kind != "llama":
            return
        embed = next((n for n in self.ref_metas if n.endswith("embed_tokens.weight")), None)
        if embed is None or self.plans.get(embed) is None or embed not in self.far:
            return
        e_ref, e_sus = self.ref(embed), self.sus(embed)
        rows = e_ref.shape[0]
        keep = _sample_index(rows, PROCRUSTES_ROWS * e_ref.shape[1])
        m = e_ref[keep].astype(np.float64).T @ e_sus[keep].astype(np.float64)
        u, _, vt = np.linalg.svd(m)
        q = u @ vt  # e_ref @ q ~ e_sus
        before = relative_difference(e_sus, e_ref)
        after = relative_difference((e_sus.astype(np.float64) @ q.T).astype(np.float32), e_ref)
        if after >= min(CLOSE, 0.9 * before):
            return
        qt = np.ascontiguousarray(q.T, dtype=np.float32)
        q32 = np.ascontiguousarray(q, dtype=np.float32)
        for name, plan in self.plans.items():
            if plan is None:
                continue
            role = tensor_role(name)
            part = role[1] if role else None
            if role and role[2] != "weight":
                continue
            if part in ("q", "k", "v", "gate", "up") or name.endswith(
                ("lm_head.weight", "embed_tokens.weight")
            ):
                plan.col_rotation = qt
            elif part in ("o", "down"):
                plan.row_rotation = q32
        self.report.append(
            f"residual stream rotated: undone by Procrustes on {embed} "
            f"(residual {100 * after:.1f}%, was {100 * before:.1f}%)"
        )

    # -- 4: per-layer permutations ------------------------------------------------------------

    def _group(self, layer: int, parts: tuple[str, ...]) -> dict[str, str]:
        found = {}
        for name, plan in self.plans.items():
            role = tensor_role(name)
            if (
                plan is not None
                and role
                and role[0] == layer
                and role[1] in parts
                and role[2] == "weight"
            ):
                found[role[1]] = name
        return found

    def _input_corrected(self, sus: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Divide out per-column scales (norm rescaling, folded norms) before matching rows."""
        ratio = _column_ratio(sus, ref)
        return sus / ratio[None, :].astype(np.float32), ref

    def _unit_pairs(
        self, pairs: list[tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for sus, ref in pairs:
            sus, ref = self._input_corrected(sus, ref)
            cols = _match_columns(ref.shape[1])
            out.append((_unit_rows(sus, cols), _unit_rows(ref, cols)))
        return out

    def _needs_matching(self, group: dict[str, str]) -> bool:
        return any(name in self.far for name in group.values())

    def undo_ffn(self, layer: int) -> None:
        group = self._group(layer, ("gate", "up", "down"))
        if not self._needs_matching(group):
            return
        label = "mlp" if self.arch is None or self.arch.kind == "llama" else "ffn"
        self._undo_units(group, f"{label} of layer {layer}")

    def _undo_units(self, group: dict[str, str], label: str) -> None:
        """Match one FFN's hidden units (gate/up rows, down columns) to the reference's."""
        # Units as rows: gate/up rows, down columns (transposed views, no copy).
        loaded = {part: (self.sus(name), self.ref(name)) for part, name in group.items()}
        pairs = [(s.T, r.T) if part == "down" else (s, r) for part, (s, r) in loaded.items()]
        units = pairs[0][1].shape[0]
        if any(s.shape != r.shape or r.shape[0] != units for s, r in pairs):
            return
        if "gate" in loaded and "up" in loaded:
            pairs = [loaded["gate"], loaded["up"]]  # enough to tell units apart; down is not needed
        order = self._match_units(pairs, units)
        moved = int(np.count_nonzero(order != np.arange(units)))
        if moved:
            self.report.append(f"{label}: rows permuted ({moved} of {units} moved)")
        for part, name in group.items():
            sus, ref = loaded[part]
            if moved and part == "down":
                self.plans[name].col_order = order
                sus = sus[:, order]
            elif moved:
                self.plans[name].row_order = order
                sus = sus[order]
            self.fit_gains(name, sus, ref)

    def _match_units(self, pairs: list[tuple[np.ndarray, np.ndarray]], units: int) -> np.ndarray:
        """The suspect unit matched to each reference unit: dense scores up to
        DENSE_MATCH_UNITS units, block by block beyond (same answer, bounded memory)."""
        if units <= DENSE_MATCH_UNITS:
            return match_rows(self._unit_score(pairs, units))
        unit_pairs = self._unit_pairs(pairs)

        def score_block(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            out = np.zeros((rows.size, cols.size), dtype=np.float32)
            for s, r in unit_pairs:
                out += np.abs(s[rows] @ r[cols].T)
            return out

        return match_rows_blocked(score_block, units)

    def _unit_score(self, pairs: list[tuple[np.ndarray, np.ndarray]], units: int) -> np.ndarray:
        """score[i, j] = sum over the pairs of |cos(suspect row i, reference row j)|."""
        score = np.zeros((units, units), dtype=np.float32)
        product = np.empty_like(score)  # reused: fresh large arrays cost a page fault per page
        for s, r in self._unit_pairs(pairs):
            np.matmul(s, r.T, out=product)
            np.abs(product, out=product)
            score += product
        return score

    def _head_score(
        self, pairs: list[tuple[np.ndarray, np.ndarray]], heads: int, head_dim: int
    ) -> np.ndarray:
        """score[a, b] = sum over rows r within a head of
        |cos(suspect head a row r, reference head b row r)|."""
        score = np.zeros((heads, heads), dtype=np.float64)
        for s, r in self._unit_pairs(pairs):
            s3 = s.reshape(heads, head_dim, -1)
            r3 = r.reshape(heads, head_dim, -1)
            for d in range(head_dim):
                score += np.abs(s3[:, d] @ r3[:, d].T)
        return score

    def undo_heads(self, layer: int) -> None:
        arch = self.arch
        if arch is None:
            return
        group = self._group(layer, ("q", "k", "v", "o"))
        if not self._needs_matching(group):
            return
        hd, g = arch.head_dim, arch.group
        loaded = {part: (self.sus(name), self.ref(name)) for part, name in group.items()}
        if "o" in loaded:
            s, r = loaded["o"]
            loaded["o"] = (s.T, r.T)
        kv_parts = [
            loaded[p] for p in (("k", "v") if g > 1 else ("q", "k", "v", "o")) if p in loaded
        ]
        sizes = {
            "q": arch.heads * hd,
            "o": arch.heads * hd,
            "k": arch.kv_heads * hd,
            "v": arch.kv_heads * hd,
        }
        if not kv_parts or any(
            s.shape != r.shape or r.shape[0] != sizes[p] for p, (s, r) in loaded.items()
        ):
            return
        kv_order = match_rows(self._head_score(kv_parts, arch.kv_heads, hd))
        q_order = np.repeat(kv_order * g, g) + np.tile(np.arange(g), arch.kv_heads)
        q_parts = [loaded[p] for p in ("q", "o") if p in loaded]
        if g > 1 and q_parts:
            for b in range(arch.kv_heads):
                a = kv_order[b]
                s_rows = slice(a * g * hd, (a + 1) * g * hd)
                r_rows = slice(b * g * hd, (b + 1) * g * hd)
                within = match_rows(
                    self._head_score([(s[s_rows], r[r_rows]) for s, r in q_parts], g, hd)
                )
                q_order[b * g : (b + 1) * g] = a * g + within
        q_rows = (q_order[:, None] * hd + np.arange(hd)).ravel()
        kv_rows = (kv_order[:, None] * hd + np.arange(hd)).ravel()
        moved_heads = int(np.count_nonzero(q_order != np.arange(arch.heads)))
        if moved_heads:
            self.report.append(
                f"attention of layer {layer}: heads permuted ({moved_heads} of {arch.heads} moved)"
            )
        for part, name in group.items():
            sus, ref = loaded[part]
            if part == "o":
                sus, ref = sus.T, ref.T  # back to [out, in]
            if moved_heads and part == "o":
                self.plans[name].col_order = q_rows
                sus = sus[:, q_rows]
            elif moved_heads:
                rows = q_rows if part == "q" else kv_rows
                self.plans[name].row_order = rows
                sus = sus[rows]
            self.fit_gains(name, sus, ref)

    def undo_experts(self, layer: int) -> None:
        """MoE: match the suspect's experts to the reference's by sampled rows of one projection,
        then read each reference expert from its suspect counterpart and reorder the router's
        rows the same way (experts move with their router rows: function-preserving)."""
        group = self.expert_groups.get(layer)
        if group is None or not any(n in self.far for n in group.names()):
            return
        count, part = group.count, group.parts[0]
        names = [group.experts[e][part] for e in range(count)]
        plans = [self.plans.get(n) for n in names]
        if any(p is None or p.transposed or n not in self.ref_metas for p, n in zip(plans, names, strict=True)):
            return
        rows, cols = canonical_2d(self.carriers[names[0]]) if names[0] in self.carriers else \
            canonical_2d(tuple(self.ref_metas[names[0]].shape))
        sample, columns = _sample_index(rows), _match_columns(cols)
        sus = np.stack([_unit_rows(_rows(self.suspect, p.source, sample), columns) for p in plans])
        ref = np.stack([_unit_rows(_rows(self.reference, n, sample), columns) for n in names])
        # score[i, j]: how well suspect expert i's rows match reference expert j's, row by row,
        # plus (as many rows' worth) the correlation of their column norms, which a permutation
        # of the expert's own units leaves alone (so such an expert still finds its partner)
        score = np.abs(np.einsum("irc,jrc->ijr", sus, ref)).sum(axis=2)
        sus_cols = _centred_unit(np.stack([_column_norms(self.suspect, p.source) for p in plans]))
        ref_cols = _centred_unit(np.stack([_column_norms(self.reference, n) for n in names]))
        score += sample.size * np.abs(sus_cols @ ref_cols.T)
        order = match_rows(score)
        moved = int(np.count_nonzero(order != np.arange(count)))
        if not moved:
            return
        sources = {e: {p: plan.source for p, n in group.experts[e].items() if (plan := self.plans.get(n))}
                   for e in range(count)}
        for j in range(count):
            for p, name in group.experts[j].items():
                if self.plans.get(name) is not None and p in sources[int(order[j])]:
                    self.plans[name] = _Plan(sources[int(order[j])][p])
        router = self.plans.get(group.router) if group.router else None
        if router is not None and not router.transposed and router.row_order is None \
                and canonical_2d(tuple(self.ref_metas[group.router].shape))[0] == count:
            router.row_order = order
        self.report.append(f"experts of layer {layer}: permuted ({moved} of {count} moved)")

    def undo_expert_units(self, layer: int) -> None:
        """Each expert is an FFN: an expert still far from its reference counterpart (after the
        experts were matched) has its hidden units matched like a dense FFN's."""
        group = self.expert_groups.get(layer)
        if group is None or not any(n in self.far for n in group.names()):
            return
        for e in range(group.count):
            # fused slices (gate_up_proj [hidden, 2 * inter]) hold units as columns: not matched here
            parts = {_EXPERT_ROLE[p]: n for p, n in group.experts[e].items() if n in self.carriers and p in _EXPERT_ROLE}
            key = parts.get("gate") or parts.get("up")
            plan = self.plans.get(key) if key else None
            if plan is None or plan.transposed or len(parts) != 3 or key not in self.ref_metas:
                continue
            sample = _sample_index(canonical_2d(self.carriers[key])[0])
            if relative_difference(_rows(self.suspect, plan.source, sample), _rows(self.reference, key, sample)) < CLOSE:
                continue
            self._undo_units(parts, f"expert {e} of layer {layer}")

    # -- 5: scales -------------------------------------------------------------------------------

    def fit_gains(self, name: str, sus: np.ndarray, ref: np.ndarray) -> None:
        """Least-squares row and column gains for one carrier, given its suspect values with the
        plan so far applied; kept only if they bring it markedly closer to the reference."""
        self.fitted.add(name)
        if name not in self.carriers or sus.shape != ref.shape:
            return
        before = relative_difference(sus, ref)
        after = before
        if before > 1e-6:
            u, v = _least_squares_gains(sus, ref)
            after = relative_difference(
                sus * u[:, None].astype(np.float32) * v[None, :].astype(np.float32), ref
            )
            if after < SCALE_GAIN * before:
                plan = self.plans[name]
                plan.row_gain, plan.col_gain = u, v
                if _described_scale(u, "rows"):
                    self.rows_rescaled.append(name)
                if _described_scale(v, "columns"):
                    self.cols_rescaled.append(name)
            else:
                after = before
        if after >= CLOSE:
            self.unresolved[name] = after

    def undo_scales(self) -> None:
        """Gains for the carriers outside the layer groups (embeddings, lm_head, pooler...)."""
        for name in self.carriers:
            plan = self.plans.get(name)
            if plan is None or name in self.fitted or name not in self.ref_metas:
                continue
            if plan.identity and name not in self.far:
                continue
            self.fit_gains(name, self.sus(name), self.ref(name))
        if self.rows_rescaled:
            self.report.append(
                f"rows rescaled in {len(self.rows_rescaled)} tensors (least squares), "
                f"e.g. {self.rows_rescaled[0]}"
            )
        if self.cols_rescaled:
            self.report.append(
                f"columns rescaled in {len(self.cols_rescaled)} tensors (least squares), "
                f"e.g. {self.cols_rescaled[0]}"
            )

    # -- driver ------------------------------------------------------------------------------

    def run(self) -> Alignment:
        self.resolve_names()
        if self.far:
            self.undo_rotation()
            layers = sorted({role[0] for n in self.plans if (role := tensor_role(n))} | set(self.expert_groups))
            for layer in layers:
                self.undo_experts(layer)
                self.undo_expert_units(layer)
                self.undo_ffn(layer)
                self.undo_heads(layer)
            self.undo_scales()
        if self.unresolved:
            # Swapped names: look for what is still unexplained among the unexplained tensors.
            self._search_by_content(sorted(self.unresolved))
            for name, diff in self.unresolved.items():
                plan = self.plans.get(name)
                if plan is not None and not plan.identity:
                    self.report.append(
                        f"tensor {name}: still {100 * diff:.0f}% away from the reference "
                        "after alignment"
                    )
        plans = {name: self.plans.get(name) for name in self.carriers}
        return Alignment(self.suspect, plans, self.report)


def align(
    suspect: OpenModel,
    reference: OpenModel,
    carriers: Mapping[str, tuple[int, ...]],
    config: Mapping[str, Any] | None = None,
) -> Alignment:
    """Estimate how the suspect's carriers moved relative to the reference; see the module doc.

    `suspect` and `reference` are opened models (`.tensors()` with shapes, `.load(name)` giving
    canonical float32 [out, in]; a suspect may list `.name_candidates`). `carriers` maps each
    registered carrier name to its shape. `config` is the base's config.json, if at hand (head
    counts); otherwise the layout is inferred from names and shapes.
    """
    # A hostile suspect may hold NaN, inf or zero rows: they must not stop or spam the scan.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _Aligner(suspect, reference, carriers, config).run()
