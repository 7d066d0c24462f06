"""The decision model artifact: model + calibrator + threshold + feature list + lineage, in one folder.

What ``keel train`` produces, the registry stores, and ``keel serve`` / ``keel score`` load. The threshold and
calibration belong to the artifact, not to the caller: everyone calls :meth:`DecisionModel.decide`.

Nothing is unpickled. LightGBM models are stored as LightGBM's text format, scikit-learn estimators with skops
(loaded only when every type in the file is on an allow-list of scikit-learn/numpy types), baselines and
calibrators as JSON. A ``manifest.json`` lists the SHA-256 and size of every file; loading verifies it and refuses a
tampered, truncated, swapped or extended artifact with :class:`~keel.errors.IntegrityError`.

Layout::

    model/
      manifest.json     {"files": {"pipeline.json": {"sha256": ..., "bytes": ...}, ...}, "format": 1}
      pipeline.json     kind, features, threshold, abstain band, actions, calibrator, metadata
      model.txt | model.skops | model.json
      member-0.txt, member-1.skops, ...   (kind "ensemble": one file per member, each in its own format)

An ensemble (``kind = "ensemble"``) scores the mean of its members' uncalibrated probabilities, each first brought
back to the unweighted scale (see :func:`unweighted`), then calibrates that mean; ``pipeline.json`` lists the
members (kind, file and the weight of a positive row each was fitted with) in order, and each file is in the
manifest.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel.errors import IntegrityError
from keel.io import atomic_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PIPELINE = "pipeline.json"

# skops loads only these types; anything else in a .skops file is refused as untrusted.
_SKOPS_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "builtins.", "scipy.sparse.", "collections.")
_COMPILE_LOCK = threading.Lock()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unweighted(p: np.ndarray, positive_weight: float) -> np.ndarray:
    """Probabilities of a model fitted with positive rows weighted ``positive_weight``, as if fitted unweighted.

    Weighting positives by ``w`` multiplies the odds a model learns by ``w``, so ``p / (p + w (1 - p))`` divides
    them back. Averaged raw, a member fitted with balanced weights (``w`` in the hundreds on fraud data) would
    outweigh the unweighted ones at the top of the ranking only because its probabilities are inflated.
    """
    if positive_weight == 1.0:
        return p
    return p / (p + positive_weight * (1.0 - p))


def unweighted_mean(probabilities: Sequence[np.ndarray], positive_weights: Sequence[float]) -> np.ndarray:
    """The mean of several models' probabilities, each first brought back to the unweighted scale."""
    total = np.zeros_like(np.asarray(probabilities[0], dtype=np.float64))
    for p, w in zip(probabilities, positive_weights, strict=True):
        total += unweighted(np.asarray(p, dtype=np.float64), w)
    return total / len(probabilities)


@dataclass
class Ensemble:
    """Members scored together: the mean of their uncalibrated positive-class probabilities, each on the
    unweighted scale (:func:`unweighted` with the member's ``positive_weights`` entry; 1.0: fitted unweighted).

    ``members`` are ``(kind, estimator)`` pairs as :class:`DecisionModel` holds them one at a time (a LightGBM
    ``Booster``, a scikit-learn classifier, a Keel baseline).
    """

    members: list[tuple[str, Any]]
    positive_weights: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("An ensemble needs at least one member.")
        nested = [k for k, _ in self.members if k == "ensemble"]
        if nested:
            raise ValueError("An ensemble member cannot itself be an ensemble.")
        if self.positive_weights is None:
            self.positive_weights = [1.0] * len(self.members)
        if len(self.positive_weights) != len(self.members) or not all(
                np.isfinite(w) and w > 0 for w in self.positive_weights):
            raise ValueError("An ensemble needs one finite, positive weight of a positive row per member.")

    def mean(self, member_probabilities: Sequence[np.ndarray]) -> np.ndarray:
        """The ensemble's raw score from its members' probabilities (in member order)."""
        assert self.positive_weights is not None
        return unweighted_mean(member_probabilities, self.positive_weights)

    @property
    def kinds(self) -> list[str]:
        return [k for k, _ in self.members]


@dataclass
class DecisionModel:
    """A fitted, calibrated, thresholded model with the names of the features it reads, in order.

    ``estimator`` is a LightGBM ``Booster``, a scikit-learn classifier, a Keel baseline (anything with
    ``predict_proba`` and ``to_dict``), or for ``kind = "ensemble"`` an :class:`Ensemble` of those.
    ``calibrator`` has ``transform`` and ``to_dict`` (or is None).
    """

    kind: str
    feature_names: list[str]
    estimator: Any
    calibrator: Any = None
    threshold: float = 0.5
    abstain_band: tuple[float, float] | None = None
    positive_action: str = "review"
    negative_action: str = "approve"
    metadata: dict[str, Any] = field(default_factory=dict)
    threads: int = 0
    categories: dict[str, list[str]] = field(default_factory=dict)
    # The LightGBM trees compiled to native code (keel.compiled), built once on first use or at load; every
    # caller (batch and single row) then scores through it, or everyone through Booster.predict when it is None.
    # An ensemble keeps one entry per member (None for members that are not LightGBM or did not compile).
    _forest: Any = field(default=None, init=False, repr=False, compare=False)
    _forests: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)
    _forest_built: bool = field(default=False, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # Native code does not travel; rebuilt on use.
        state["_forest"], state["_forests"], state["_forest_built"] = None, [], False
        return state

    def members(self) -> list[tuple[str, Any]]:
        """``(kind, estimator)`` of every model whose probabilities are averaged (one unless an ensemble)."""
        if self.kind == "ensemble":
            return list(self.estimator.members)
        return [(self.kind, self.estimator)]

    def compiled(self) -> Any:
        """The compiled forest scoring this LightGBM model (bit-identical to ``Booster.predict``), or None.

        None for other kinds (an ensemble too: its LightGBM members are compiled each on their own, see
        :meth:`member_forests`), without llvmlite, with ``KEEL_COMPILED_TREES=0``, or for a model the compiler
        does not reproduce exactly; scoring then uses ``Booster.predict``.
        """
        self.member_forests()
        return self._forest

    def member_forests(self) -> list[Any]:
        """One compiled forest per member (None where a member is not LightGBM or does not compile)."""
        if not self._forest_built:
            with _COMPILE_LOCK:
                if not self._forest_built:
                    forests = []
                    for kind, est in self.members():
                        forest = None
                        if kind == "lightgbm":
                            from keel.compiled import compile_forest

                            booster = getattr(est, "booster_", est)
                            forest = compile_forest(booster.model_to_string(), booster)
                        forests.append(forest)
                    self._forests = forests
                    self._forest = forests[0] if self.kind == "lightgbm" else None
                    self._forest_built = True
        return self._forests

    # ------------------------------------------------------------------ scoring
    def _matrix(self, features: pd.DataFrame | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        if isinstance(features, pd.DataFrame):
            missing = [c for c in self.feature_names if c not in features.columns]
            if missing:
                from keel.errors import ScoringError

                raise ScoringError(
                    f"The model reads features {missing} that the input does not have.",
                    hint="Compute features with the same spec the model was trained with.",
                )
            if self.categories:
                features = features[self.feature_names].copy()
                for name, cats in self.categories.items():
                    features[name] = encode_categories(features[name], cats)
            return features[self.feature_names].to_numpy(dtype=np.float64, copy=False)
        matrix = np.asarray(features, dtype=np.float64)
        return matrix.reshape(1, -1) if matrix.ndim == 1 else matrix

    def raw_scores(self, features: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Uncalibrated positive-class scores (for an ensemble, the mean of its members' probabilities)."""
        x = self._matrix(features)
        members = self.members()
        forests = self.member_forests()
        if self.kind != "ensemble":
            return self._member_raw(members[0][0], members[0][1], forests[0], x)
        return self.estimator.mean([self._member_raw(kind, est, forest, x)
                                    for (kind, est), forest in zip(members, forests, strict=True)])

    def _member_raw(self, kind: str, est: Any, forest: Any, x: np.ndarray) -> np.ndarray:
        if kind == "lightgbm":
            if forest is not None and x.shape[1] == forest.n_features:
                return np.asarray(forest.predict(x, threads=self.threads), dtype=np.float64)
            kwargs = {"num_threads": self.threads} if self.threads else {}
            return np.asarray(est.predict(x, **kwargs), dtype=np.float64)
        if hasattr(est, "to_dict"):  # Keel baselines read named columns
            return np.asarray(est.predict_proba(pd.DataFrame(x, columns=self.feature_names))[:, 1], dtype=np.float64)
        return np.asarray(est.predict_proba(x)[:, 1], dtype=np.float64)

    def scores(self, features: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the positive class."""
        raw = self.raw_scores(features)
        return np.asarray(self.calibrator.transform(raw), dtype=np.float64) if self.calibrator else raw

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Actions for calibrated scores: positive action at or above the threshold, 'abstain' inside the band."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.size == 1:  # one event (the API's common case): no temporary arrays
            value = float(scores.reshape(-1)[0])
            action = self.positive_action if value >= self.threshold else self.negative_action
            if self.abstain_band is not None and self.abstain_band[0] <= value < self.abstain_band[1]:
                action = "abstain"
            single = np.empty(scores.shape, dtype=object)
            single.reshape(-1)[0] = action
            return single
        # A gather from a 2-element object array: 10x cheaper than np.where on strings then astype(object).
        choices = np.array([self.negative_action, self.positive_action], dtype=object)
        actions = choices[(scores >= self.threshold).astype(np.intp).reshape(-1)].reshape(scores.shape)
        if self.abstain_band is not None:
            low, high = self.abstain_band
            actions[(scores >= low) & (scores < high)] = "abstain"
        return actions

    # ------------------------------------------------------------------ persistence
    def _pipeline(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "feature_names": list(self.feature_names),
            "threshold": float(self.threshold),
            "abstain_band": list(self.abstain_band) if self.abstain_band else None,
            "positive_action": self.positive_action,
            "negative_action": self.negative_action,
            "calibrator": self.calibrator.to_dict() if self.calibrator is not None else None,
            "metadata": self.metadata,
            "categories": self.categories,
        }

    def save(self, path: str | Path) -> Path:
        """Write the artifact folder atomically (a reader sees the old folder or the whole new one)."""
        target = Path(path)
        with atomic_dir(target) as tmp:
            pipeline = self._pipeline()
            if self.kind == "ensemble":
                pipeline["members"] = [{"kind": kind, "file": _save_estimator(kind, est, tmp, f"member-{i}"),
                                        "positive_weight": float(w)}
                                       for i, ((kind, est), w) in enumerate(
                                           zip(self.members(), self.estimator.positive_weights, strict=True))]
                pipeline["estimator_file"] = None
            else:
                pipeline["estimator_file"] = _save_estimator(self.kind, self.estimator, tmp)
            (tmp / PIPELINE).write_text(json.dumps(pipeline, indent=2, sort_keys=True, default=_json_default))
            files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=2))
        return target

    @classmethod
    def load(cls, path: str | Path, threads: int = 0) -> DecisionModel:
        """Load and verify an artifact folder; :class:`IntegrityError` when anything does not match."""
        folder = Path(path)
        files = verify_manifest(folder)
        pipeline = json.loads((folder / PIPELINE).read_text())
        estimator: Any
        if pipeline["kind"] == "ensemble":
            listed = pipeline.get("members")
            if not isinstance(listed, list) or not listed:
                raise IntegrityError(f"The ensemble artifact at {folder} lists no members in {PIPELINE}.",
                                     hint="Re-train or restore the artifact from the registry.")
            members, weights = [], []
            for entry in listed:
                name = entry.get("file") if isinstance(entry, dict) else None
                if name not in files:
                    raise IntegrityError(
                        f"The ensemble artifact at {folder} names a member file {name!r} its manifest lacks.")
                members.append((str(entry.get("kind")), _load_estimator(str(entry.get("kind")), folder / name)))
                weight = entry.get("positive_weight", 1.0)  # artifacts before the field averaged raw probabilities
                if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
                    raise IntegrityError(f"The ensemble artifact at {folder} gives member {name!r} the weight "
                                         f"{weight!r}; a positive row's weight is a positive number.",
                                         hint="Re-train or restore the artifact from the registry.")
                weights.append(float(weight))
            unused = sorted(set(files) - {PIPELINE} - {e["file"] for e in listed})
            if unused:
                raise IntegrityError(f"The ensemble artifact at {folder} holds files no member uses: "
                                     f"{', '.join(unused)}.", hint="Re-train or restore the artifact.")
            estimator = Ensemble(members, weights)
        else:
            name = pipeline.get("estimator_file")
            if name not in files:
                raise IntegrityError(f"The artifact at {folder} names an estimator file {name!r} its manifest lacks.")
            estimator = _load_estimator(pipeline["kind"], folder / name)
        calibrator = None
        if pipeline.get("calibrator") is not None:
            from keel.evaluate.calibration import Calibrator

            calibrator = Calibrator.from_dict(pipeline["calibrator"])
        band = pipeline.get("abstain_band")
        model = cls(
            kind=pipeline["kind"],
            feature_names=list(pipeline["feature_names"]),
            estimator=estimator,
            calibrator=calibrator,
            threshold=float(pipeline["threshold"]),
            abstain_band=(float(band[0]), float(band[1])) if band else None,
            positive_action=pipeline["positive_action"],
            negative_action=pipeline["negative_action"],
            metadata=pipeline.get("metadata", {}),
            threads=threads,
            categories={k: list(v) for k, v in (pipeline.get("categories") or {}).items()},
        )
        model.compiled()  # compile now (or take the cached code) so the first request does not pay for it
        return model


def encode_categories(values: Any, categories: list[str]) -> np.ndarray:
    """Codes in training frequency order; unseen or missing values become NaN (trees route them apart)."""
    mapping = {c: float(i) for i, c in enumerate(categories)}
    return pd.Series(values).astype("string").map(mapping).astype("float64").to_numpy()


def verify_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Check every file against ``manifest.json``; refuse missing, changed, truncated or unlisted files."""
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise IntegrityError(f"No model artifact at {folder}.", hint="Check the path or the registry version.")
    if not manifest_path.exists():
        raise IntegrityError(
            f"The artifact at {folder} has no {MANIFEST}; it was not written by Keel or was tampered with.",
            hint="Re-train or restore the artifact from the registry.",
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"The manifest of the artifact at {folder} is unreadable: {exc}.") from exc
    present = {p.name for p in folder.iterdir() if p.name != MANIFEST}
    unlisted = sorted(present - set(files))
    if unlisted:
        raise IntegrityError(
            f"The artifact at {folder} holds files its manifest does not list: {', '.join(unlisted)}.",
            hint="Something was planted in the model folder; remove it or restore the artifact.",
        )
    for name, entry in files.items():
        path = folder / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise IntegrityError(f"The artifact at {folder} is missing {name!r} listed in its manifest.")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise IntegrityError(
                f"{name} in the artifact at {folder} has {size} bytes, its manifest says {entry.get('bytes')}"
                " (truncated or replaced).",
                hint="Restore the artifact from the registry or re-train.",
            )
        if sha256_file(path) != entry.get("sha256"):
            raise IntegrityError(
                f"{name} in the artifact at {folder} does not match its SHA-256 in the manifest (tampered).",
                hint="Restore the artifact from the registry or re-train.",
            )
    if PIPELINE not in files:
        raise IntegrityError(f"The artifact at {folder} has no {PIPELINE}.")
    return files


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _save_estimator(kind: str, estimator: Any, folder: Path, stem: str = "model") -> str:
    if kind == "lightgbm":
        booster = getattr(estimator, "booster_", estimator)
        (folder / f"{stem}.txt").write_text(booster.model_to_string())
        return f"{stem}.txt"
    if hasattr(estimator, "to_dict"):
        (folder / f"{stem}.json").write_text(
            json.dumps({"kind": kind, "estimator": estimator.to_dict()}, default=_json_default)
        )
        return f"{stem}.json"
    import skops.io as sio

    (folder / f"{stem}.skops").write_bytes(sio.dumps(estimator))
    return f"{stem}.skops"


def _load_estimator(kind: str, path: Path) -> Any:
    if path.suffix == ".txt":
        import lightgbm as lgb

        return lgb.Booster(model_str=path.read_text())
    if path.suffix == ".json":
        from keel.evaluate.baselines import baseline_from_dict

        return baseline_from_dict(json.loads(path.read_text())["estimator"])
    if path.suffix == ".skops":
        import skops.io as sio

        data = path.read_bytes()
        untrusted = sio.get_untrusted_types(data=data)
        refused = [t for t in untrusted if not t.startswith(_SKOPS_TRUSTED_PREFIXES)]
        if refused:
            raise IntegrityError(
                f"{path} contains types Keel does not trust: {', '.join(refused)}.",
                hint="Only scikit-learn estimators are loaded from .skops files.",
            )
        return sio.loads(data, trusted=untrusted)
    raise IntegrityError(f"Unknown estimator file {path.name} for model kind {kind!r}.")


__all__ = ["DecisionModel", "Ensemble", "sha256_file", "unweighted", "unweighted_mean", "verify_manifest"]
