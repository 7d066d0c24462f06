"""Reference profiles: what a model's inputs and scores looked like when it was trained, computed once.

A :class:`Profile` holds, per feature, quantile bin edges with the reference counts in each bin (PSI, chi²,
Jensen–Shannon), a finer quantile sketch of the reference CDF (Kolmogorov–Smirnov), the missing rate and the
min/max (out-of-range rate), or category frequencies for categorical features; and the same for the score.

Where it comes from: feature distributions from the model's **training** window; the score distribution from its
**test** window (held-out rows: in-sample scores of a fitted model are more extreme than anything serving will
produce, so they would make every day look drifted). Stored as JSON at
``state_dir/profiles/<model>-v<version>.json``, written atomically, and never recomputed:
:func:`ensure_profile` returns the stored one when it exists. ``keel retrain`` writes the challenger's profile
at registration (it has the training frame in hand); other versions get theirs lazily on their first monitor.

Example::

    prof = build_profile({"tx_amount": amounts}, scores, bins=10)
    prof.features["tx_amount"].edges        # interior quantile edges (bins - 1 at most)
    save_profile(prof, ".keel/profiles/card-fraud-v3.json"); load_profile(...)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel.errors import MonitorError
from keel.io import atomic_write_text

PROFILE_FORMAT = 1
SKETCH_POINTS = 1000  # KS is evaluated at this many reference quantiles: error <= the largest step (~1/1000)
MAX_CATEGORIES = 200  # rarer categories are pooled into OTHER
OTHER = "__other__"
SCORE = "score"


@dataclass
class FeatureProfile:
    """The reference distribution of one numeric or categorical column.

    Numeric: ``edges`` are the interior cut points; bin ``i`` holds ``edges[i-1] < x <= edges[i]`` (the first bin
    everything ``<= edges[0]``, the last everything above ``edges[-1]``), ``counts`` has ``len(edges) + 1`` values.
    ``sketch`` are the reference quantiles where KS is evaluated, ``sketch_cdf`` the reference share ``<=`` each.
    Categorical: ``categories`` maps value -> count (values beyond the top ones pooled into ``OTHER``).
    """

    name: str
    kind: str  # "numeric" | "categorical"
    n: int
    missing: int
    edges: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sketch: list[float] = field(default_factory=list)
    sketch_cdf: list[float] = field(default_factory=list)
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    categories: dict[str, int] = field(default_factory=dict)

    @property
    def present(self) -> int:
        return self.n - self.missing

    @property
    def missing_rate(self) -> float:
        return self.missing / self.n if self.n else 0.0

    def bin_labels(self) -> list[str]:
        """Category names, or the numeric bins as readable intervals."""
        if self.kind == "categorical":
            return list(self.categories)
        e = [f"{v:.4g}" for v in self.edges]
        if not e:
            return ["all"]
        return [f"<= {e[0]}", *[f"({a}, {b}]" for a, b in itertools.pairwise(e)], f"> {e[-1]}"]


@dataclass
class Profile:
    """Reference distributions of a model version: ``features`` by name, and ``score``."""

    model: str
    version: int | None
    features: dict[str, FeatureProfile]
    score: FeatureProfile | None
    bins: int
    created: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    reference_metrics: dict[str, float] = field(default_factory=dict)
    format: int = PROFILE_FORMAT

    def columns(self) -> dict[str, FeatureProfile]:
        """Every profiled column including the score (as ``"score"``)."""
        out = dict(self.features)
        if self.score is not None:
            out[SCORE] = self.score
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        if data.get("format") != PROFILE_FORMAT:
            raise MonitorError(
                f"The reference profile has format {data.get('format')!r}; this Keel reads format {PROFILE_FORMAT}.",
                hint="Delete the profile file; it is recomputed from the model's training data on the next monitor.",
            )
        feats = {k: FeatureProfile(**v) for k, v in data["features"].items()}
        score = FeatureProfile(**data["score"]) if data.get("score") else None
        return cls(model=data["model"], version=data.get("version"), features=feats, score=score,
                   bins=int(data["bins"]), created=data.get("created", ""), source=dict(data.get("source", {})),
                   reference_metrics=dict(data.get("reference_metrics", {})), format=data["format"])


# --- pure construction -------------------------------------------------------------------------------------
def numeric_profile(name: str, values: Any, bins: int = 10, sketch_points: int = SKETCH_POINTS,
                    edges: Any | None = None) -> FeatureProfile:
    """Quantile bins and a KS sketch of one numeric column (NaN/None count as missing).

    ``edges`` fixes the interior bin edges instead of the reference quantiles (to compare with another tool's
    binning). A column with at most ``sketch_points`` distinct values keeps them all in the sketch, so its KS
    statistic is exact.
    """
    x = pd.to_numeric(pd.Series(np.asarray(values).ravel()), errors="coerce").to_numpy(dtype=np.float64)
    finite = x[np.isfinite(x)]
    n, missing = len(x), int(len(x) - len(finite))
    if len(finite) == 0:
        return FeatureProfile(name=name, kind="numeric", n=n, missing=missing, counts=[0])
    finite = np.sort(finite)
    lo, hi = float(finite[0]), float(finite[-1])
    if edges is None:
        inner = (np.quantile(finite, np.arange(1, bins) / bins, method="inverted_cdf") if bins > 1
                 else np.array([]))
        # Edges at or above the max would leave the top reference bin empty; values above the max are out of
        # range and reported apart.
        edges = np.unique(inner)
        edges = edges[edges < hi]
    else:
        edges = np.unique(np.asarray(edges, dtype=np.float64))
    counts = bin_counts(finite, edges)
    distinct = np.unique(finite)
    # Sketch points are reference values (inverted-CDF quantiles), a superset of the quantile bin edges, so a
    # window's bin counts follow from its sketch counts (one search per value, not two).
    qs = distinct if len(distinct) <= sketch_points else np.unique(
        np.quantile(finite, np.arange(1, sketch_points + 1) / sketch_points, method="inverted_cdf"))
    cdf = np.searchsorted(finite, qs, side="right") / len(finite)
    return FeatureProfile(name=name, kind="numeric", n=n, missing=missing, edges=edges.tolist(),
                          counts=counts.tolist(), sketch=qs.tolist(), sketch_cdf=cdf.tolist(), min=lo, max=hi,
                          mean=float(finite.mean()))


def categorical_profile(name: str, values: Any, max_categories: int = MAX_CATEGORIES) -> FeatureProfile:
    """Category frequencies of one column (missing values counted apart)."""
    s = pd.Series(np.asarray(values, dtype=object).ravel())
    missing = int(s.isna().sum())
    vc = s.dropna().astype(str).value_counts()
    cats = {str(k): int(v) for k, v in vc.iloc[:max_categories].items()}
    if len(vc) > max_categories:
        cats[OTHER] = int(vc.iloc[max_categories:].sum())
    return FeatureProfile(name=name, kind="categorical", n=len(s), missing=missing, categories=cats,
                          counts=list(cats.values()))


def bin_counts(values: np.ndarray, edges: Any) -> np.ndarray:
    """Counts of finite ``values`` in the bins ``(-inf, e0], (e0, e1], ..., (e_last, inf)``."""
    e = np.asarray(edges, dtype=np.float64)
    return np.bincount(np.searchsorted(e, values, side="left"), minlength=len(e) + 1)


def build_profile(features: Mapping[str, Any] | pd.DataFrame, scores: Any | None, *, bins: int = 10,
                  categorical: list[str] | tuple[str, ...] = (), model: str = "", version: int | None = None,
                  source: Mapping[str, Any] | None = None,
                  reference_metrics: Mapping[str, float] | None = None) -> Profile:
    """A :class:`Profile` from reference feature columns and (optionally) reference scores. Pure."""
    names = list(features.columns) if isinstance(features, pd.DataFrame) else list(features)
    if not names and scores is None:
        raise MonitorError("A reference profile needs at least one feature column or the scores.")
    feats: dict[str, FeatureProfile] = {}
    for name in names:
        col = features[name]
        is_cat = name in categorical or not (
            pd.api.types.is_numeric_dtype(np.asarray(col).dtype) or pd.api.types.is_bool_dtype(np.asarray(col).dtype))
        feats[name] = categorical_profile(name, col) if is_cat else numeric_profile(name, np.asarray(col, float), bins)
    score = numeric_profile(SCORE, scores, bins) if scores is not None else None
    return Profile(model=model, version=version, features=feats, score=score, bins=bins,
                   created=datetime.now(UTC).isoformat(timespec="seconds"), source=dict(source or {}),
                   reference_metrics={k: float(v) for k, v in (reference_metrics or {}).items()})


# --- storage ------------------------------------------------------------------------------------------------
def profile_path(state_dir: str | Path, model: str, version: int) -> Path:
    return Path(state_dir) / "profiles" / f"{model}-v{version}.json"


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write the profile as JSON atomically (a reader sees the old file or the whole new one)."""
    return atomic_write_text(path, json.dumps(profile.to_dict(), indent=1, sort_keys=True, allow_nan=False))


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MonitorError(f"No reference profile at {p}.", hint="Run `keel monitor`; it computes it once.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MonitorError(f"The reference profile {p} is not valid JSON ({exc}).",
                           hint="Delete it; it is recomputed from the model's training data.") from None
    return Profile.from_dict(data)


# --- from a trained model -----------------------------------------------------------------------------------
def _window_mask(times: pd.Series, window: Mapping[str, Any] | None) -> np.ndarray:
    if not window or window.get("start") in (None, "None") or window.get("end") in (None, "None"):
        return np.zeros(len(times), dtype=bool)
    start, end = pd.Timestamp(window["start"]), pd.Timestamp(window["end"])
    t = pd.to_datetime(times)
    return np.asarray((t >= start) & (t < end))


def profile_from_frame(model: Any, frame: pd.DataFrame, *, timestamp: str | None, bins: int, name: str,
                       version: int | None, categorical: list[str] | tuple[str, ...] = ()) -> Profile:
    """Profile a :class:`~keel.artifact.DecisionModel` from its modelling frame (features computed).

    Features from the rows of the model's recorded training window, scores from its test window (falling back
    to all rows when the windows are not recorded, e.g. a random split).
    """
    windows = (model.metadata or {}).get("windows", {})
    if timestamp and timestamp in frame.columns:
        train = _window_mask(frame[timestamp], windows.get("train"))
        test = _window_mask(frame[timestamp], windows.get("test"))
    else:
        train = test = np.zeros(len(frame), dtype=bool)
    if not train.any():
        train = np.ones(len(frame), dtype=bool)
    if not test.any():
        test = train
    cols = [c for c in model.feature_names if c in frame.columns]
    missing = sorted(set(model.feature_names) - set(cols))
    if missing:
        raise MonitorError(f"The model reads features {missing} that the reference data does not have.",
                           hint="Profile the model with the spec it was trained with.")
    scores = model.scores(frame.loc[test, model.feature_names])
    cats = [*categorical, *model.categories]
    return build_profile(frame.loc[train, cols], scores, bins=bins, categorical=cats, model=name, version=version,
                         source={"train_window": windows.get("train"), "test_window": windows.get("test"),
                                 "train_rows": int(train.sum()), "score_rows": int(test.sum()),
                                 "data_fingerprint": (model.metadata or {}).get("data_fingerprint")},
                         reference_metrics=(model.metadata or {}).get("test_metrics", {}))


def ensure_profile(spec: Any, model: Any, version: int | None, *, frame: pd.DataFrame | None = None) -> Profile:
    """The stored profile of ``version``, or compute it once (from ``frame`` or the spec's data) and store it."""
    name = spec.project.name
    path = profile_path(spec.state_dir, name, version if version is not None else 0)
    if path.is_file():
        return load_profile(path)
    if frame is None:
        from keel.train import load_dataset

        frame = load_dataset(spec).frame
    prof = profile_from_frame(model, frame, timestamp=spec.data.timestamp, bins=spec.monitoring.bins, name=name,
                              version=version, categorical=spec.data.categorical)
    save_profile(prof, path)
    return prof


__all__ = [
    "OTHER",
    "SCORE",
    "FeatureProfile",
    "Profile",
    "bin_counts",
    "build_profile",
    "categorical_profile",
    "ensure_profile",
    "load_profile",
    "numeric_profile",
    "profile_from_frame",
    "profile_path",
    "save_profile",
]
