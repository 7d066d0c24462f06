"""Monitoring and retraining: drift against a stored reference profile, performance once labels arrive,
training–serving skew, service health, triggers with exit levels, a self-contained report, and retraining.

Example::

    from keel.monitor import run_monitor, retrain
    result = run_monitor(spec, out_dir="monitor/")     # result.level: ok | warn | act; result.exit_code 0/1/2
    plan = retrain(spec, dry_run=True)                  # windows and rows, nothing trained
"""

from keel.monitor.drift import (
    ColumnDrift,
    DriftAccumulator,
    WindowDrift,
    chi2_test,
    drift_table,
    iter_log,
    js_distance,
    ks_pvalue,
    psi,
)
from keel.monitor.performance import (
    OperationalAccumulator,
    WindowOperations,
    WindowPerformance,
    estimate_performance,
    performance_windows,
    window_performance,
)
from keel.monitor.profile import (
    FeatureProfile,
    Profile,
    build_profile,
    ensure_profile,
    load_profile,
    numeric_profile,
    profile_path,
    save_profile,
)
from keel.monitor.report import dashboard_html, render_html
from keel.monitor.retrain import RetrainResult, retrain
from keel.monitor.skew import SkewReport, check_skew, compare_features
from keel.monitor.triggers import Firing, MonitorResult, evaluate_triggers, run_monitor

__all__ = [
    "ColumnDrift",
    "DriftAccumulator",
    "FeatureProfile",
    "Firing",
    "MonitorResult",
    "OperationalAccumulator",
    "Profile",
    "RetrainResult",
    "SkewReport",
    "WindowDrift",
    "WindowOperations",
    "WindowPerformance",
    "build_profile",
    "check_skew",
    "chi2_test",
    "compare_features",
    "dashboard_html",
    "drift_table",
    "ensure_profile",
    "estimate_performance",
    "evaluate_triggers",
    "iter_log",
    "js_distance",
    "ks_pvalue",
    "load_profile",
    "numeric_profile",
    "performance_windows",
    "profile_path",
    "psi",
    "render_html",
    "retrain",
    "run_monitor",
    "save_profile",
    "window_performance",
]
