"""Honest evaluation: time splits, metrics, calibration, thresholds, slices, leakage checks, baselines.

Every function here is pure (arrays or frames and typed parameters in, dataclasses or frames out),
deterministic for a seed, and raises :class:`keel.errors.TrainingError` (or ``LeakageError``) on input
that cannot give an honest number. Modules:

- :mod:`.split` — ``time_split``, ``prequential_split``, ``random_split``, ``split_from_spec``
- :mod:`.metrics` — ``roc_auc``, ``average_precision``, ``brier``, ``log_loss``, ``expected_calibration_error``,
  ``confusion``, ``row_costs``, ``expected_cost``, ``card_precision_at_k``, ``bootstrap``, ``summary``
- :mod:`.calibration` — ``choose_calibration``, ``fit_calibrator``, ``Calibrator``
- :mod:`.threshold` — ``choose_threshold``, ``capacity_threshold``, ``decide``
- :mod:`.slices` — ``slice_metrics``, ``worst_slices``, ``costliest_errors``
- :mod:`.leakage` — ``check_leakage``, ``raise_on_severe``, ``Finding``
- :mod:`.baselines` — ``PriorBaseline``, ``RuleBaseline``, ``SingleFeatureRule``, ``LogisticBaseline``
"""

from keel.evaluate.baselines import (
    LogisticBaseline,
    PriorBaseline,
    RuleBaseline,
    SingleFeatureRule,
    baseline_from_dict,
    fit_baselines,
)
from keel.evaluate.calibration import CalibrationChoice, Calibrator, choose_calibration, fit_calibrator
from keel.evaluate.leakage import Finding, check_leakage, raise_on_severe, single_feature_auc
from keel.evaluate.metrics import (
    METRICS,
    Confusion,
    Interval,
    PrecisionAtK,
    RowCosts,
    average_precision,
    bootstrap,
    brier,
    card_precision_at_k,
    confusion,
    expected_calibration_error,
    expected_cost,
    log_loss,
    make_row_costs,
    period_index,
    precision_recall_f1,
    reliability,
    roc_auc,
    row_costs,
    summary,
)
from keel.evaluate.slices import costliest_errors, slice_metrics, worst_slices
from keel.evaluate.split import (
    RANDOM_SPLIT_WARNING,
    Fold,
    PrequentialSplit,
    TimeSplit,
    Window,
    known_positive_mask,
    prequential_split,
    random_split,
    split_from_spec,
    time_split,
)
from keel.evaluate.threshold import (
    ABSTAIN,
    ThresholdChoice,
    abstain_summary,
    capacity_threshold,
    choose_threshold,
    decide,
)

__all__ = [
    "ABSTAIN",
    "METRICS",
    "RANDOM_SPLIT_WARNING",
    "CalibrationChoice",
    "Calibrator",
    "Confusion",
    "Finding",
    "Fold",
    "Interval",
    "LogisticBaseline",
    "PrecisionAtK",
    "PrequentialSplit",
    "PriorBaseline",
    "RowCosts",
    "RuleBaseline",
    "SingleFeatureRule",
    "ThresholdChoice",
    "TimeSplit",
    "Window",
    "abstain_summary",
    "average_precision",
    "baseline_from_dict",
    "bootstrap",
    "brier",
    "capacity_threshold",
    "card_precision_at_k",
    "check_leakage",
    "choose_calibration",
    "choose_threshold",
    "confusion",
    "costliest_errors",
    "decide",
    "expected_calibration_error",
    "expected_cost",
    "fit_baselines",
    "fit_calibrator",
    "known_positive_mask",
    "log_loss",
    "make_row_costs",
    "period_index",
    "precision_recall_f1",
    "prequential_split",
    "raise_on_severe",
    "random_split",
    "reliability",
    "roc_auc",
    "row_costs",
    "single_feature_auc",
    "slice_metrics",
    "split_from_spec",
    "summary",
    "time_split",
    "worst_slices",
]
