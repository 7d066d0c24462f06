"""Figures for the training report, drawn off-screen and returned as PNG bytes.

Every function takes arrays or frames and returns the bytes of one PNG; none reads files or the spec.
Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, so nothing touches
pyplot's global state or the user's display backend.

Example::

    png = roc_png({"lightgbm": (y_test, p_test), "prior": (y_test, prior_test)})
    Path("roc.png").write_bytes(png)
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]

_SIZE = (6.4, 4.2)
_DPI = 100


def _new(size: tuple[float, float] = _SIZE) -> tuple[Figure, Any]:
    fig = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    # No software tag: the bytes depend on the inputs only.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _ranked(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct score, highest first (ties grouped)."""
    order = np.argsort(-s, kind="stable")
    ys, ss = np.asarray(y)[order].astype(float), np.asarray(s)[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    return tp, fp, ss[last]


def roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) from (0, 0) to (1, 1)."""
    tp, fp, _ = _ranked(y, s)
    pos, neg = max(tp[-1], 1.0), max(fp[-1], 1.0)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def pr_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct score, from the highest score down (draw as steps 'pre')."""
    tp, fp, _ = _ranked(y, s)
    pos = max(tp[-1], 1.0)
    return np.r_[0.0, tp / pos], np.r_[1.0, tp / (tp + fp)]


def roc_png(curves: Curves, title: str = "ROC curve (test)") -> bytes:
    """ROC curves of several models on the same rows, with the chance diagonal."""
    fig, ax = _new()
    for name, (y, s) in curves.items():
        fpr, tpr = roc_points(y, s)
        ax.plot(fpr, tpr, label=name, lw=2 if name == next(iter(curves)) else 1)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate (recall)", title=title, xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def pr_png(curves: Curves, prevalence: float, title: str = "Precision-recall curve (test)") -> bytes:
    """Precision-recall curves with the prevalence line (what a random ranking achieves)."""
    fig, ax = _new()
    for name, (y, s) in curves.items():
        recall, precision = pr_points(y, s)
        ax.step(recall, precision, where="pre", label=name, lw=2 if name == next(iter(curves)) else 1)
    ax.axhline(prevalence, ls=":", color="grey", lw=1, label=f"prevalence {prevalence:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


def reliability_png(tables: Mapping[str, pd.DataFrame], title: str = "Reliability diagram (test)") -> bytes:
    """Observed positive rate against mean predicted probability per bin, one line per table.

    Each table has the columns of :func:`keel.evaluate.metrics.reliability` (``predicted``, ``observed``,
    ``count``). Both axes are logarithmic when every point is positive, because on an imbalanced problem
    almost every row sits near zero.
    """
    fig, ax = _new()
    lows = []
    for name, table in tables.items():
        ax.plot(table["predicted"], table["observed"], marker="o", ms=4, label=name)
        lows += [table["predicted"].min(), table["observed"].min()]
    finite = [v for v in lows if np.isfinite(v)]
    low = min([v for v in finite if v > 0], default=1e-3)
    if finite and min(finite) > 0:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.plot([low, 1], [low, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate", title=title)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def cost_curve_png(curves: Mapping[str, pd.DataFrame], threshold: float, *, capacity_threshold: float | None = None,
                   title: str = "Expected cost per event by threshold") -> bytes:
    """Expected cost per event against the threshold (columns ``threshold``, ``expected_cost``).

    The chosen threshold is a vertical line; the capacity bound, when one applies, a dashed one.
    """
    fig, ax = _new()
    for name, curve in curves.items():
        c = curve[np.isfinite(curve["threshold"])].sort_values("threshold")
        ax.plot(c["threshold"], c["expected_cost"], label=name)
    ax.axvline(threshold, color="black", lw=1.5, label=f"chosen threshold {threshold:.4f}")
    if capacity_threshold is not None and np.isfinite(capacity_threshold):
        ax.axvline(capacity_threshold, color="tab:red", ls="--", lw=1,
                   label=f"capacity bound {capacity_threshold:.4f}")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set(xlabel="threshold (act when score >= threshold)", ylabel="expected cost per event", title=title,
           xlim=(0, 1))
    ax.legend(fontsize=8)
    return _png(fig)


def score_distribution_png(y: np.ndarray, s: np.ndarray, threshold: float,
                           labels: tuple[str, str] = ("negative", "positive"),
                           title: str = "Score distribution by class (test)") -> bytes:
    """Histograms of the score for each class (each normalised to its own total) and the threshold."""
    fig, ax = _new()
    y = np.asarray(y)
    s = np.asarray(s, dtype=float)
    edges = np.linspace(0.0, 1.0, 41) if s.min() >= 0 and s.max() <= 1 else np.histogram_bin_edges(s, 40)
    for cls, name in ((0, labels[0]), (1, labels[1])):
        part = s[y == cls]
        if len(part):
            weights = np.full(len(part), 1.0 / len(part))
            ax.hist(part, bins=edges, weights=weights, alpha=0.55, label=f"{name} ({len(part):,} rows)")
    ax.axvline(threshold, color="black", lw=1.5, label=f"threshold {threshold:.4f}")
    ax.set_yscale("log")
    ax.set(xlabel="calibrated score", ylabel="share of the class's rows", title=title)
    ax.legend(fontsize=8)
    return _png(fig)


__all__ = [
    "cost_curve_png",
    "pr_png",
    "pr_points",
    "reliability_png",
    "roc_png",
    "roc_points",
    "score_distribution_png",
]
