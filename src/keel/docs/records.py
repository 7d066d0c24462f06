"""What the docs are written from: the registry's versions, their runs (metrics, params, tags), the training
report each run logged (``reports/report/metrics.json`` and ``report.html``), the alias history, and the
monitoring report if one was written. Nothing here computes a metric; it reads what was recorded.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from keel.registry import AliasEvent, ModelVersionInfo, Registry, RunDetails
from keel.spec import Spec

REPORT_PREFIX = "reports/report"
# Where `keel monitor` may leave its report, most specific first (the monitor module owns the exact name).
MONITOR_CANDIDATES = ("monitor/monitor.html", "monitor/report.html", "monitor/index.html")

# The registry writes metric keys with this substitution (see keel.registry); baseline names go through it.
_KEY_OK = re.compile(r"[^\w.\-/ :]")


def mlflow_key(name: str) -> str:
    """A name as the registry stores it in a metric key (``rule: amount > 220`` -> ``rule: amount _ 220``)."""
    return _KEY_OK.sub("_", str(name))[:250]


@dataclass(frozen=True)
class VersionRecord:
    """One registered version with its run and the training report the run logged (None when absent)."""

    info: ModelVersionInfo
    run: RunDetails
    report: dict[str, Any] | None = None
    report_html: bytes | None = None

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def metrics(self) -> dict[str, float]:
        return self.run.metrics

    @property
    def params(self) -> dict[str, str]:
        return self.run.params

    def metric(self, key: str) -> float | None:
        """A recorded metric by its MLflow key, or None when the run did not record it."""
        value = self.run.metrics.get(key)
        return None if value is None or not math.isfinite(value) else float(value)

    def models(self) -> dict[str, dict[str, float]]:
        """Recorded metrics by model: ``{"test": {...}, "baseline.prior": {...}, "candidate.x": {...}}``."""
        return split_metrics(self.run.metrics)

    def baseline_names(self) -> dict[str, str]:
        """``{mlflow name: display name}`` of the baselines the run recorded."""
        shown = {}
        if self.report:
            for row in self.report.get("comparison") or []:
                if row.get("role") == "baseline":
                    shown[mlflow_key(row["model"])] = str(row["model"])
        return {name.removeprefix("baseline."): shown.get(name.removeprefix("baseline."),
                                                          name.removeprefix("baseline."))
                for name in self.models() if name.startswith("baseline.")}

    def report_value(self, *path: str) -> Any:
        node: Any = self.report or {}
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return node


@dataclass(frozen=True)
class ProjectRecords:
    """Everything recorded about a project that the docs cite."""

    versions: list[VersionRecord] = field(default_factory=list)
    history: list[AliasEvent] = field(default_factory=list)
    monitor_report: Path | None = None
    tracking_uri: str = ""

    def alias(self, name: str) -> VersionRecord | None:
        return next((v for v in self.versions if name in v.info.aliases), None)

    @property
    def champion(self) -> VersionRecord | None:
        return self.alias("champion")

    @property
    def reference(self) -> VersionRecord | None:
        """The version the design doc and stories speak about: the champion, else the newest version."""
        return self.champion or (self.versions[-1] if self.versions else None)


def split_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Group flat run metrics by model; metric names are learned from the chosen model's ``test.*`` keys."""
    known = sorted({k.removeprefix("test.") for k in metrics if k.startswith("test.")}, key=len, reverse=True)
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("test."):
            out.setdefault("test", {})[key.removeprefix("test.")] = value
            continue
        for role in ("baseline.", "candidate."):
            if key.startswith(role):
                rest = key.removeprefix(role)
                metric = next((m for m in known if rest.endswith("." + m)), None)
                if metric is not None:
                    out.setdefault(role + rest[: -len(metric) - 1], {})[metric] = value
    return out


def find_monitor_report(spec: Spec) -> Path | None:
    """The monitoring report `keel monitor` wrote under the state folder, or None (not run yet)."""
    for relative in MONITOR_CANDIDATES:
        path = spec.state_dir / relative
        if path.is_file():
            return path
    folder = spec.state_dir / "monitor"
    found = sorted(folder.glob("**/*.html"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def store_exists(registry: Registry) -> bool:
    """False when the default local SQLite store was never created (nothing trained): no need to start MLflow."""
    if urlparse(registry.tracking_uri).scheme != "sqlite":
        return True
    return Path(registry.tracking_uri.removeprefix("sqlite:///")).exists()


def _download(registry: Registry, run: RunDetails, artifact: str, folder: Path) -> Path | None:
    local = urlparse(run.artifact_uri)
    if local.scheme in ("", "file"):
        path = Path(unquote(local.path)) / artifact
        return path if path.is_file() else None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # library code does not draw on stderr
    import mlflow.artifacts

    run_id = run.summary.run_id
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(folder),
                                                        tracking_uri=registry.tracking_uri))
    except Exception:  # an older run without a report: the docs say "not recorded"
        return None


def collect_records(spec: Spec, registry: Registry | None = None) -> ProjectRecords:
    """Read every version, its run and logged training report, and the alias history."""
    import json

    registry = registry or Registry.from_spec(spec)
    monitor = find_monitor_report(spec)
    if not store_exists(registry):
        return ProjectRecords(monitor_report=monitor, tracking_uri=registry.tracking_uri)
    versions = []
    with tempfile.TemporaryDirectory(prefix="keel-docs-") as tmp:
        for info in registry.list_versions():
            run = registry.run(info.run_id)
            folder = Path(tmp) / f"v{info.version}"
            folder.mkdir()
            metrics_path = _download(registry, run, f"{REPORT_PREFIX}/metrics.json", folder)
            html_path = _download(registry, run, f"{REPORT_PREFIX}/report.html", folder)
            report = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path else None
            page = html_path.read_bytes() if html_path else None
            versions.append(VersionRecord(info=info, run=run, report=report, report_html=page))
    history = registry.history() if versions else []
    return ProjectRecords(versions=versions, history=history, monitor_report=monitor,
                          tracking_uri=registry.tracking_uri)


__all__ = ["MONITOR_CANDIDATES", "ProjectRecords", "VersionRecord", "collect_records", "find_monitor_report",
           "mlflow_key", "split_metrics", "store_exists"]
