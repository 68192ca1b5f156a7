"""The figures of a case report, drawn with matplotlib as self-contained, deterministic SVG.

Text is drawn as paths (`svg.fonttype = "path"`) so a viewer needs no font, ids come from a
fixed salt and the date is left out, so the same bundle always gives the same bytes. Figures are
built on `matplotlib.figure.Figure` with the Agg backend: no display, no global pyplot state.
Innocent licensees appear only as numbers (scores), never by name or id.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

_STYLE = {
    "svg.fonttype": "path",
    "svg.hashsalt": "weightmark-case-report",
    "font.family": "DejaVu Sans",
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.labelsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "text.parse_math": False,  # a carrier name with '$' is text, not mathematics
    "text.usetex": False,
    "path.simplify": True,
}
INNOCENT = "#8a94a6"
ACCUSED = "#b3261e"
CURVE = "#1f4e79"
MAX_QQ_POINTS = 1500
MAX_NAMED_CARRIERS = 48


@dataclass(frozen=True)
class Mark:
    """An accused copy on a figure: a short label (A1, A2...) keyed to the report's table."""

    label: str
    score: float
    log10_p: float


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _svg(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": "weightmark"})
    return buffer.getvalue()


def _style() -> Any:
    import matplotlib

    return matplotlib.rc_context(_STYLE)


def scores_figure(innocent_scores: Sequence[float], marks: Sequence[Mark],
                  bound_curve: Sequence[Sequence[float]], log10_codeword_threshold: float | None) -> bytes:
    """Top: every innocent codeword's score (a histogram, or a strip when few) with the accused
    marked. Bottom: the innocents' bound (score -> log10 p) with the accusation line."""
    with _style():
        fig = _figure(6.6, 4.6)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.25])
        innocents = np.asarray(innocent_scores, dtype=np.float64)
        curve = np.asarray(bound_curve, dtype=np.float64).reshape(-1, 2) if len(bound_curve) else np.empty((0, 2))
        xs = [*innocents.tolist(), *(m.score for m in marks), *curve[:, 0].tolist()]
        lo, hi = (min(xs), max(xs)) if xs else (-1.0, 1.0)
        pad = 0.04 * (hi - lo or 1.0)
        if innocents.size >= 30:
            top.hist(innocents, bins=min(60, max(10, int(math.sqrt(innocents.size)))), color=INNOCENT,
                     label=f"innocent codewords ({innocents.size:,})")
            top.set_ylabel("number of codewords")
        else:
            top.plot(innocents, np.zeros_like(innocents), "|", markersize=22, color=INNOCENT, markeredgewidth=2,
                     label=f"innocent codewords ({innocents.size:,})")
            top.set_yticks([])
        for k, m in enumerate(marks):
            top.axvline(m.score, color=ACCUSED, linewidth=1.6)
            top.annotate(m.label, (m.score, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10 - 10 * (k % 4)),
                         textcoords="offset points", color=ACCUSED, fontweight="bold")
        top.set_title("Score of every issued codeword (innocents as counts; accused in red)", loc="left")
        if innocents.size or marks:
            top.legend(loc="upper center", frameon=False, fontsize=8)
        if curve.size:
            bottom.plot(curve[:, 0], curve[:, 1], color=CURVE, linewidth=1.6,
                        label="bound on an innocent's p-value at this score")
        for k, m in enumerate(marks):
            bottom.plot([m.score], [m.log10_p], "o", color=ACCUSED, markersize=5)
            bottom.annotate(m.label, (m.score, m.log10_p), xytext=(-22, 2 + 9 * (k % 4)), textcoords="offset points",
                            color=ACCUSED, fontweight="bold")
        if log10_codeword_threshold is not None:
            bottom.axhline(log10_codeword_threshold, color="#444444", linestyle="--", linewidth=1,
                           label="accusation line (family-wise p = threshold)")
        bottom.set_xlabel("score S")
        bottom.set_ylabel("log10 p (bound)")
        bottom.set_title("The innocents' bound: how unlikely a score is for a licensee who did not leak", loc="left")
        bottom.legend(loc="lower left", frameon=False, fontsize=8)
        bottom.set_xlim(lo - pad, hi + pad)
        return _svg(fig)


def z_figure(z: Sequence[float]) -> bytes:
    """The z statistics against N(0,1): histogram with the density, and a normal QQ plot."""
    values = np.asarray(z, dtype=np.float64)
    values = values[np.isfinite(values)]
    with _style():
        fig = _figure(6.6, 2.9)
        hist, qq = fig.subplots(1, 2, width_ratios=[1.35, 1])
        hist.hist(values, bins=60, density=True, color=INNOCENT, label=f"z ({values.size:,} code positions)")
        reach = max(4.0, float(np.max(np.abs(values))) if values.size else 4.0)
        grid = np.linspace(-reach, reach, 400)
        hist.plot(grid, np.exp(-grid * grid / 2) / math.sqrt(2 * math.pi), color=CURVE, linewidth=1.5,
                  label="N(0,1): no watermark of this key")
        hist.set_xlabel("z")
        hist.set_ylabel("density")
        hist.set_title("z statistics per code position", loc="left")
        hist.legend(loc="upper left", frameon=True, framealpha=0.9, edgecolor="none", fontsize=7.5)
        ordered = np.sort(values)
        n = ordered.size
        if n:
            normal = NormalDist()
            picks = np.unique(np.concatenate([np.linspace(0, n - 1, min(n, MAX_QQ_POINTS)).round().astype(int),
                                              np.arange(min(n, 10)), np.arange(max(0, n - 10), n)]))
            theory = np.array([normal.inv_cdf((i + 0.5) / n) for i in picks])
            qq.plot(theory, ordered[picks], ".", markersize=2.5, color=CURVE)
            edge = float(max(np.max(np.abs(theory)), np.max(np.abs(ordered))))
            qq.plot([-edge, edge], [-edge, edge], color="#444444", linewidth=1, linestyle="--")
        qq.set_xlabel("N(0,1) quantile")
        qq.set_ylabel("observed z")
        qq.set_title("Normal QQ plot", loc="left")
        return _svg(fig)


def carrier_figure(names: Sequence[str], scores: Sequence[Sequence[float]], labels: Sequence[str]) -> bytes:
    """Per carrier tensor, each accused codeword's score in that tensor alone (about N(0,1) where
    the tensor carries no mark of it): grouped bars, or steps when there are many carriers."""
    values = np.asarray(scores, dtype=np.float64).reshape(len(names), len(labels))
    named = len(names) <= MAX_NAMED_CARRIERS
    colours = [ACCUSED, CURVE, "#c77c02", "#2e7d32", "#6a1b9a", "#00838f"]
    with _style():
        if named:
            fig = _figure(6.6, min(7.5, max(2.4, 1.0 + 0.115 * len(names) * max(1, min(len(labels), 3)) ** 0.5)))
            ax = fig.subplots()
            rows = np.arange(len(names))
            width = 0.8 / max(1, len(labels))
            for k, label in enumerate(labels):
                ax.barh(rows - 0.4 + width * (k + 0.5), values[:, k], height=width,
                        color=colours[k % len(colours)], label=label)
            ax.set_yticks(rows, [_short(n) for n in names], fontsize=6.5)
            ax.invert_yaxis()
            ax.set_xlabel("the codeword's score in this tensor alone")
            ax.axvspan(-2, 2, color="#eeeeee", zorder=0, label="chance range (|score| < 2)")
            ax.grid(axis="y", visible=False)
        else:
            fig = _figure(6.6, 3.0)
            ax = fig.subplots()
            index = np.arange(len(names))
            for k, label in enumerate(labels):
                ax.plot(index, values[:, k], drawstyle="steps-mid", color=colours[k % len(colours)], label=label)
            ax.set_xlabel("carrier tensor (in the model's order)")
            ax.set_ylabel("score in this tensor alone")
            ax.axhspan(-2, 2, color="#eeeeee", zorder=0, label="chance range (|score| < 2)")
        if named:
            ax.axvline(0, color="#444444", linewidth=0.8)
        ax.set_title("Where the signal sits: score per carrier tensor", loc="left")
        ax.legend(loc="lower right", frameon=False, fontsize=7.5)
        return _svg(fig)


def _short(name: str, limit: int = 48) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3):]
