"""Tracking and model registry on MLflow, with Keel's lifecycle rules on top.

Every ``keel train`` is one MLflow run (:meth:`Registry.log_run`); its :class:`~keel.artifact.DecisionModel`
is registered as a model version named after the project (:meth:`Registry.register`) and moved between the
aliases ``challenger`` and ``champion`` by :meth:`Registry.promote` and :meth:`Registry.rollback`. Serve and
score load through :meth:`Registry.load` (integrity verified) and poll :meth:`Registry.resolve`.

Where things live (defaults; ``tracking_uri`` argument > ``MLFLOW_TRACKING_URI`` > ``project.tracking_uri`` >
default)::

    <state_dir>/mlflow.db            MLflow tracking + registry store (SQLite)
    <state_dir>/mlartifacts/         run artifacts (the model folder is ``model/`` of its run)
    <state_dir>/registry.sqlite      alias audit log (SQLite, WAL): every alias change, who, why, when
    <state_dir>/registry.lock        exclusive lock (fcntl.flock) around every alias change

**Never half-changed.** An alias change runs under the exclusive lock in three steps: (1) append the event
to the audit log with status ``pending`` and commit; (2) set the alias in MLflow -- one single write, the
only step that changes what serve and score load; (3) mark the event ``applied``. A process killed after (1)
leaves the alias as it was (old) and a pending event; killed after (2) it leaves the new alias and a pending
event. Every later critical section (and :meth:`history`) first *reconciles*: a pending event becomes
``applied`` when MLflow's alias equals its ``to_version`` and ``aborted`` otherwise; an alias changed outside
Keel (e.g. in the MLflow UI) is recorded as an ``external`` event. So the alias is always either old or new,
and the log always ends up agreeing with it.

Example::

    registry = Registry(spec)
    info = registry.log_run(spec=spec, model=model, metrics={"average_precision": 0.71}, params={...},
                            data_source="data/tx.parquet", data_fingerprint="ab12...", windows={...})
    version = registry.register(info.run_id)              # alias 'challenger'
    registry.promote(version.version, actor="ana", reason="beats champion on last 7 days")
    model, meta = registry.load("champion")
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from keel.artifact import DecisionModel, verify_manifest
from keel.errors import IntegrityError, RegistryError, SpecError
from keel.io import atomic_dir
from keel.spec import Spec, parse_spec

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"
LOWER_IS_BETTER = frozenset({"expected_cost", "log_loss", "brier"})
PACKAGES = ("keel", "numpy", "pandas", "scikit-learn", "lightgbm", "mlflow", "duckdb", "skops")

_MAX_PARAM_VALUE = 6000
_BATCH = 100
_KEY_OK = re.compile(r"[^\w.\-/ :]")
_LOCAL_SCHEMES = {"", "file", "sqlite"}


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class RunInfo:
    """What :meth:`Registry.log_run` recorded."""

    run_id: str
    experiment_id: str
    artifact_uri: str
    spec_hash: str
    headline_metric: str
    headline_value: float | None


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version, as ``keel models list`` shows it."""

    name: str
    version: int
    aliases: list[str]
    run_id: str
    created: datetime
    headline_metric: str
    headline_value: float | None
    data_source: str
    data_fingerprint: str
    source: str


@dataclass(frozen=True)
class AliasEvent:
    """One alias change in the audit log. ``time`` is UTC; ``to_version`` None means the alias was removed."""

    id: int
    time: datetime
    model: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor: str
    reason: str
    action: str  # register | promote | rollback | external
    forced: bool
    status: str  # applied | pending | aborted
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSummary:
    """One line of ``keel runs list``."""

    run_id: str
    name: str
    status: str
    start_time: datetime | None
    end_time: datetime | None
    headline_metric: str
    headline_value: float | None
    spec_hash: str
    data_fingerprint: str
    git_commit: str


@dataclass(frozen=True)
class RunDetails:
    """Everything ``keel runs show RUN`` prints."""

    summary: RunSummary
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifacts: list[str]
    artifact_uri: str


@dataclass(frozen=True)
class RecordedInputs:
    """What a run was trained from, for ``keel reproduce``: rebuild the spec, re-train, compare ``metrics``."""

    run_id: str
    spec_content: dict[str, Any]
    spec_hash: str
    spec_root: str
    data_source: str
    data_fingerprint: str
    windows: dict[str, list[str]]
    params: dict[str, Any]
    metrics: dict[str, float]

    def spec(self, root: str | Path | None = None) -> Spec:
        """The recorded spec as a :class:`Spec` (relative paths resolve against ``root`` or the recorded root)."""
        return parse_spec(self.spec_content, root=Path(root or self.spec_root), source=f"run {self.run_id}")


# --------------------------------------------------------------------------------------------- helpers
def resolve_tracking_uri(explicit: str | None, spec_uri: str | None, state_dir: str | Path) -> str:
    """The tracking URI to use: ``explicit`` > env ``MLFLOW_TRACKING_URI`` > the spec's > SQLite in state_dir."""
    for candidate in (explicit, os.environ.get("MLFLOW_TRACKING_URI"), spec_uri):
        if candidate:
            return candidate
    return f"sqlite:///{(Path(state_dir).resolve() / 'mlflow.db').as_posix()}"


def is_better(candidate: float | None, champion: float | None, metric: str, margin: float = 0.0) -> bool:
    """True when ``candidate`` beats ``champion`` on ``metric`` by more than ``margin`` (NaN/None never wins)."""
    if candidate is None or champion is None or math.isnan(candidate) or math.isnan(champion):
        return False
    if metric in LOWER_IS_BETTER:
        return candidate < champion - margin
    return candidate > champion + margin


def default_actor() -> str:
    """Who is acting: env ``KEEL_ACTOR``, else the login name."""
    actor = os.environ.get("KEEL_ACTOR")
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def headline_value(metrics: Mapping[str, float], metric: str) -> float | None:
    """The model's own headline value: key ``metric``, else ``test.<metric>`` (baselines live under other keys)."""
    for key in (metric, f"test.{metric}"):
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    return None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _key(name: str) -> str:
    return _KEY_OK.sub("_", str(name))[:250]


def _git_state(folder: Path) -> tuple[str, str]:
    """(commit, dirty) of the working tree holding ``folder``; ("unknown", "unknown") without git."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown", "unknown"
    # Untracked files (data, .keel/) are not code changes; modified tracked files are.
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, "unknown" if status is None else ("true" if status else "false")


def _package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _ms_to_datetime(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC) if ms else None


def _local_path(uri: str) -> Path | None:
    """The local folder of a ``file:`` URI or plain path; None for remote artifact stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _import_mlflow() -> Any:
    # MLflow 3 starts a telemetry client at import; Keel sends nothing off the machine unless the user opts in
    # (MLFLOW_DISABLE_TELEMETRY=false).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import mlflow

    return mlflow


# --------------------------------------------------------------------------------------------- registry
_EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS alias_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    model TEXT NOT NULL,
    alias TEXT NOT NULL,
    from_version INTEGER,
    to_version INTEGER,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    action TEXT NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS alias_events_model ON alias_events (model, alias, status, id);
"""


class Registry:
    """MLflow tracking and model registry for one project, with champion/challenger rules and an audit log.

    Build it from a spec (``Registry(spec)``) or from a state folder (``Registry(".keel", model_name="fraud")``).
    One ``MlflowClient`` per object; nothing global is set. Safe to use from several threads and processes:
    alias changes serialize on a file lock in ``state_dir``.
    """

    def __init__(
        self,
        spec_or_state_dir: Spec | str | Path,
        *,
        model_name: str | None = None,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        headline_metric: str | None = None,
        promote_margin: float | None = None,
    ) -> None:
        if isinstance(spec_or_state_dir, Spec):
            spec = spec_or_state_dir
            self.state_dir = spec.state_dir
            self.model_name = model_name or spec.project.name
            spec_uri = spec.project.tracking_uri
            self.headline_metric = headline_metric or spec.decision.headline_metric
            self.promote_margin = spec.monitoring.promote_margin if promote_margin is None else promote_margin
        else:
            if not model_name:
                raise RegistryError(
                    "A Registry built from a state folder needs model_name (the project name).",
                    hint="Pass model_name=... or build it from the spec: Registry(spec).",
                )
            self.state_dir = Path(spec_or_state_dir)
            self.model_name = model_name
            spec_uri = None
            self.headline_metric = headline_metric or "average_precision"
            self.promote_margin = promote_margin or 0.0
        self.state_dir = self.state_dir.resolve()
        self.tracking_uri = resolve_tracking_uri(tracking_uri, spec_uri, self.state_dir)
        self.registry_uri = registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or self.tracking_uri
        self.artifact_root = (self.state_dir / "mlartifacts").resolve()
        self._events_path = self.state_dir / "registry.sqlite"
        self._lock_path = self.state_dir / "registry.lock"
        self._client_obj: MlflowClient | None = None

    @classmethod
    def from_spec(cls, spec: Spec, *, tracking_uri: str | None = None) -> Registry:
        return cls(spec, tracking_uri=tracking_uri)

    def __repr__(self) -> str:
        return f"Registry(model_name={self.model_name!r}, tracking_uri={self.tracking_uri!r})"

    # ------------------------------------------------------------------ plumbing
    @property
    def _client(self) -> MlflowClient:
        if self._client_obj is None:
            mlflow = _import_mlflow()
            if urlparse(self.tracking_uri).scheme == "sqlite":
                self.state_dir.mkdir(parents=True, exist_ok=True)
            self._client_obj = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client_obj

    def _is_local_store(self) -> bool:
        return urlparse(self.tracking_uri).scheme in _LOCAL_SCHEMES

    @contextlib.contextmanager
    def _mlflow_errors(self, doing: str) -> Iterator[None]:
        _import_mlflow()
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            raise RegistryError(
                f"MLflow refused to {doing} for {self.model_name} at {self.tracking_uri}: {exc.message}",
                hint="Check the tracking URI (explicit argument, MLFLOW_TRACKING_URI, project.tracking_uri).",
            ) from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock over alias changes (threads and processes); reconciles the log on entry."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock locks belong to the open file description, so each call's own open() also serializes
            # threads of one process.
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._reconcile()
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _events(self) -> sqlite3.Connection:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._events_path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_EVENTS_SCHEMA)
        return conn

    def _experiment_id(self, create: bool) -> str | None:
        _import_mlflow()
        from mlflow.exceptions import MlflowException

        with self._mlflow_errors("open the experiment"):
            experiment = self._client.get_experiment_by_name(self.model_name)
            if experiment is not None:
                return str(experiment.experiment_id)
            if not create:
                return None
            location = self.artifact_root.as_uri() if self._is_local_store() else None
            try:
                return str(self._client.create_experiment(self.model_name, artifact_location=location))
            except MlflowException:
                # Another process created it between our read and write.
                experiment = self._client.get_experiment_by_name(self.model_name)
                if experiment is None:
                    raise
                return str(experiment.experiment_id)

    def _aliases(self) -> dict[str, int]:
        _import_mlflow()
        from mlflow.exceptions import MlflowException

        try:
            model = self._client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: int(version) for alias, version in (model.aliases or {}).items()}

    def _versions(self) -> list[Any]:
        with self._mlflow_errors("list model versions"):
            found = self._client.search_model_versions(f"name = '{self.model_name}'")
        return sorted(found, key=lambda mv: int(mv.version))

    def _describe_existing(self) -> str:
        versions = [int(mv.version) for mv in self._versions()]
        if not versions:
            return f"No model is registered under {self.model_name!r} yet."
        aliases = ", ".join(f"{a} → {v}" for a, v in sorted(self._aliases().items())) or "none"
        return f"Versions of {self.model_name!r}: {', '.join(map(str, versions))} (aliases: {aliases})."

    def _get_version(self, version: int) -> Any:
        _import_mlflow()
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_model_version(self.model_name, str(version))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RegistryError(
                    f"The registry has no version {version} of {self.model_name!r}. {self._describe_existing()}",
                    hint="Run `keel models list` to see what exists.",
                ) from None
            raise

    def _run_metrics(self, run_id: str) -> dict[str, float]:
        with self._mlflow_errors(f"read run {run_id}"):
            return dict(self._client.get_run(run_id).data.metrics)

    def _version_info(self, mv: Any, aliases: dict[str, int], run: Any | None = None) -> ModelVersionInfo:
        tags = dict(mv.tags or {})
        if run is None and mv.run_id:
            try:
                run = self._client.get_run(mv.run_id)
            except Exception:
                run = None
        metrics = dict(run.data.metrics) if run is not None else {}
        version = int(mv.version)
        return ModelVersionInfo(
            name=self.model_name,
            version=version,
            aliases=sorted(a for a, v in aliases.items() if v == version),
            run_id=mv.run_id or "",
            created=_ms_to_datetime(mv.creation_timestamp) or datetime.fromtimestamp(0, tz=UTC),
            headline_metric=self.headline_metric,
            headline_value=headline_value(metrics, self.headline_metric),
            data_source=tags.get("keel.data_source", ""),
            data_fingerprint=tags.get("keel.data_fingerprint", ""),
            source=mv.source,
        )

    # ------------------------------------------------------------------ tracking
    def log_run(
        self,
        *,
        spec: Spec,
        model: DecisionModel,
        metrics: Mapping[str, Any],
        params: Mapping[str, Any],
        data_source: str,
        data_fingerprint: str,
        windows: Mapping[str, tuple[Any, Any]],
        artifacts: Mapping[str, str | Path] | None = None,
        tags: Mapping[str, Any] | None = None,
        run_name: str | None = None,
    ) -> RunInfo:
        """Record one training run: spec, code, data, windows, params, metrics, environment and the model.

        ``metrics``: the model's own test metrics under bare names (``average_precision``; ``test.<name>`` is
        also understood for the headline), anything else namespaced, e.g. ``baseline.rule.average_precision``
        or ``validation.log_loss``; nested dicts are flattened with dots. ``windows``: ``{"train": (start, end),
        "validation": ..., "test": ...}``. ``artifacts``: ``{"report.html": Path(...), "plots/pr.png": ...}``
        stored under ``reports/<key>``. The model folder is stored under ``model/``.
        """
        _import_mlflow()
        from mlflow.entities import Metric, Param

        flat_metrics = {
            _key(k): float(v) for k, v in _flatten(metrics).items() if isinstance(v, int | float) and v is not None
        }
        flat_params = {_key(k): v for k, v in _flatten(params).items()}
        window_rows = {name: [str(bounds[0]), str(bounds[1])] for name, bounds in windows.items()}
        metric_name = spec.decision.headline_metric
        headline = headline_value(flat_metrics, metric_name)
        commit, dirty = _git_state(spec.root)
        packages = _package_versions()
        spec_hash = spec.spec_hash()
        run_tags: dict[str, str] = {
            "keel.project": spec.project.name,
            "keel.owner": spec.project.owner or "unknown",
            "keel.deployment": spec.project.deployment,
            "keel.deployment_reason": spec.project.deployment_reason,
            "keel.spec_hash": spec_hash,
            "keel.data_source": data_source,
            "keel.data_fingerprint": data_fingerprint,
            "keel.git_commit": commit,
            "keel.git_dirty": dirty,
            "keel.headline_metric": metric_name,
            "keel.model_kind": model.kind,
            "mlflow.user": default_actor(),
        }
        if headline is not None:
            run_tags["keel.headline_value"] = repr(headline)
        if commit != "unknown":
            run_tags["mlflow.source.git.commit"] = commit
        run_tags.update({f"keel.version.{name}": version for name, version in packages.items()})
        run_tags.update({_key(k): str(v) for k, v in (tags or {}).items()})
        all_params = {k: str(v)[:_MAX_PARAM_VALUE] for k, v in flat_params.items()}
        for name, (start, end) in window_rows.items():
            all_params[_key(f"window.{name}.start")] = start
            all_params[_key(f"window.{name}.end")] = end
        all_params["data.source"] = data_source[:_MAX_PARAM_VALUE]
        all_params["data.fingerprint"] = data_fingerprint
        all_params["spec.hash"] = spec_hash

        experiment_id = self._experiment_id(create=True)
        assert experiment_id is not None
        name = run_name or f"{spec.project.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        with self._mlflow_errors("start a run"):
            run = self._client.create_run(experiment_id, run_name=name, tags=run_tags)
        run_id = run.info.run_id
        try:
            now = int(datetime.now(UTC).timestamp() * 1000)
            metric_rows = [Metric(k, v, now, 0) for k, v in sorted(flat_metrics.items())]
            param_rows = [Param(k, v) for k, v in sorted(all_params.items())]
            with self._mlflow_errors(f"log metrics and parameters of run {run_id}"):
                for i in range(0, len(metric_rows), _BATCH * 10):
                    self._client.log_batch(run_id, metrics=metric_rows[i : i + _BATCH * 10])
                for i in range(0, len(param_rows), _BATCH):
                    self._client.log_batch(run_id, params=param_rows[i : i + _BATCH])
            inputs = {
                "run_id": run_id,
                "spec": spec.content(),
                "spec_hash": spec_hash,
                "spec_root": str(spec.root.resolve()),
                "data_source": data_source,
                "data_fingerprint": data_fingerprint,
                "windows": window_rows,
                "params": flat_params,
                "git": {"commit": commit, "dirty": dirty},
                "packages": packages,
            }
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".run-", dir=self.state_dir) as tmp_name:
                tmp = Path(tmp_name)
                model.save(tmp / MODEL_ARTIFACT)
                (tmp / "spec").mkdir()
                (tmp / "spec" / "spec.json").write_text(json.dumps(spec.content(), indent=2, sort_keys=True))
                (tmp / "spec" / "features.json").write_text(
                    json.dumps(
                        {"definitions": spec.features.model_dump(mode="json"), "model_features": model.feature_names},
                        indent=2,
                    )
                )
                toml_text = _matching_toml(spec)
                if toml_text is not None:
                    (tmp / "spec" / "keel.toml").write_text(toml_text)
                (tmp / "keel").mkdir()
                (tmp / "keel" / "inputs.json").write_text(json.dumps(inputs, indent=2, default=_json_default))
                (tmp / "keel" / "environment.json").write_text(json.dumps(packages, indent=2))
                if artifacts:
                    reports = tmp / "reports"
                    for key, source in artifacts.items():
                        source = Path(source)
                        target = reports / key
                        if ".." in Path(key).parts or Path(key).is_absolute():
                            raise RegistryError(f"Artifact name {key!r} must be a relative path inside the run.")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        if source.is_dir():
                            shutil.copytree(source, target)
                        elif source.is_file():
                            shutil.copy2(source, target)
                        else:
                            raise RegistryError(f"The artifact {key!r} to log does not exist at {source}.")
                with self._mlflow_errors(f"store the artifacts of run {run_id}"):
                    for sub in sorted(p.name for p in tmp.iterdir()):
                        self._client.log_artifacts(run_id, str(tmp / sub), sub)
            local = _local_path(f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}")
            if local is not None:
                verify_manifest(local)  # the stored copy, not the temp one
            self._client.set_terminated(run_id, "FINISHED")
        except BaseException:
            with contextlib.suppress(Exception):
                self._client.set_terminated(run_id, "FAILED")
            raise
        return RunInfo(run_id, experiment_id, run.info.artifact_uri, spec_hash, metric_name, headline)

    def runs(self, limit: int = 50) -> list[RunSummary]:
        """The latest runs of this project, newest first (``keel runs list``)."""
        experiment_id = self._experiment_id(create=False)
        if experiment_id is None:
            return []
        with self._mlflow_errors("list runs"):
            found = self._client.search_runs([experiment_id], order_by=["attributes.start_time DESC"],
                                             max_results=limit)
        return [self._summary(run) for run in found]

    def run(self, run_id: str) -> RunDetails:
        """One run in full (``keel runs show RUN``); :class:`RegistryError` when it does not exist."""
        run = self._get_run(run_id)
        artifacts: list[str] = []
        with self._mlflow_errors(f"list the artifacts of run {run_id}"):
            for entry in self._client.list_artifacts(run_id):
                if entry.is_dir:
                    artifacts.extend(sub.path for sub in self._client.list_artifacts(run_id, entry.path))
                else:
                    artifacts.append(entry.path)
        return RunDetails(
            summary=self._summary(run),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.user"},
            artifacts=sorted(artifacts),
            artifact_uri=run.info.artifact_uri,
        )

    def recorded_inputs(self, run_id: str) -> RecordedInputs:
        """The spec, data reference, windows, params and metrics a run recorded (for ``keel reproduce``)."""
        run = self._get_run(run_id)
        with tempfile.TemporaryDirectory() as tmp, self._mlflow_errors(f"read the inputs of run {run_id}"):
            path = Path(self._client.download_artifacts(run_id, "keel/inputs.json", tmp))
            inputs = json.loads(path.read_text())
        return RecordedInputs(
            run_id=run_id,
            spec_content=inputs["spec"],
            spec_hash=inputs["spec_hash"],
            spec_root=inputs["spec_root"],
            data_source=inputs["data_source"],
            data_fingerprint=inputs["data_fingerprint"],
            windows=inputs["windows"],
            params=inputs["params"],
            metrics=dict(run.data.metrics),
        )

    def _get_run(self, run_id: str) -> Any:
        _import_mlflow()
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RegistryError(
                    f"No run {run_id!r} in the tracking store {self.tracking_uri}.",
                    hint="Run `keel runs list` to see the recorded runs.",
                ) from None
            raise

    def _summary(self, run: Any) -> RunSummary:
        tags = run.data.tags
        return RunSummary(
            run_id=run.info.run_id,
            name=run.info.run_name or "",
            status=run.info.status,
            start_time=_ms_to_datetime(run.info.start_time),
            end_time=_ms_to_datetime(run.info.end_time),
            headline_metric=self.headline_metric,
            headline_value=headline_value(run.data.metrics, self.headline_metric),
            spec_hash=tags.get("keel.spec_hash", ""),
            data_fingerprint=tags.get("keel.data_fingerprint", ""),
            git_commit=tags.get("keel.git_commit", "unknown"),
        )

    def ui_command(self, port: int = 5000, host: str = "127.0.0.1") -> list[str]:
        """argv that starts the MLflow UI on this store (``keel ui``)."""
        argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.tracking_uri]
        if self._is_local_store():
            argv += ["--default-artifact-root", self.artifact_root.as_uri()]
        return [*argv, "--host", host, "--port", str(port)]

    # ------------------------------------------------------------------ registry
    def register(
        self,
        run_id: str,
        *,
        alias: str | None = CHALLENGER,
        actor: str | None = None,
        reason: str = "registered after training",
    ) -> ModelVersionInfo:
        """Register the run's ``model/`` folder as a new version of the project's model and set ``alias``."""
        _import_mlflow()
        from mlflow.exceptions import MlflowException

        run = self._get_run(run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
        local = _local_path(source)
        if local is not None:
            verify_manifest(local)  # never register an artifact that is already broken
        tags = {
            key: run.data.tags[key]
            for key in ("keel.data_source", "keel.data_fingerprint", "keel.spec_hash", "keel.model_kind")
            if key in run.data.tags
        }
        with self._locked():
            with self._mlflow_errors("search model versions"):
                existing = self._client.search_model_versions(f"name = '{self.model_name}' and run_id = '{run_id}'")
            if existing:
                raise RegistryError(
                    f"Run {run_id} is already registered as version {existing[0].version} of {self.model_name!r}.",
                    hint="Promote that version, or train again for a new one.",
                )
            with self._mlflow_errors("register the model"):
                try:
                    self._client.create_registered_model(self.model_name)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                mv = self._client.create_model_version(self.model_name, source=source, run_id=run_id, tags=tags)
            version = int(mv.version)
            if alias:
                self._set_alias(alias, version, actor=actor or default_actor(), reason=reason, action="register",
                                current=self._aliases().get(alias))
            return self._version_info(mv, self._aliases(), run)

    def list_versions(self) -> list[ModelVersionInfo]:
        """Every version, oldest first, with aliases, headline metric and data reference (``keel models list``)."""
        versions = self._versions()
        if not versions:
            return []
        with self._mlflow_errors("read aliases"):
            aliases = self._aliases()
        return [self._version_info(mv, aliases) for mv in versions]

    def resolve(self, alias: str = CHAMPION) -> int | None:
        """The version an alias points at, or None; one cheap query (serve polls it to hot-swap)."""
        _import_mlflow()
        from mlflow.exceptions import MlflowException

        try:
            return int(self._client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise RegistryError(f"Cannot resolve alias {alias!r} of {self.model_name!r}: {exc.message}") from exc

    def version(self, alias_or_version: str | int = CHAMPION) -> ModelVersionInfo:
        """Metadata of a version given its number or an alias; :class:`RegistryError` naming what exists."""
        version = self._lookup(alias_or_version)
        return self._version_info(self._get_version(version), self._aliases())

    def _lookup(self, alias_or_version: str | int) -> int:
        if isinstance(alias_or_version, int) or str(alias_or_version).isdigit():
            return int(alias_or_version)
        version = self.resolve(str(alias_or_version))
        if version is None:
            raise RegistryError(
                f"No version of {self.model_name!r} has the alias {alias_or_version!r}. {self._describe_existing()}",
                hint="Train and register a model (`keel train`), then `keel models promote VERSION`.",
            )
        return version

    def load(self, alias_or_version: str | int = CHAMPION, *, threads: int = 0) -> tuple[DecisionModel, ModelVersionInfo]:
        """Load a version (number or alias) from the store with its integrity verified.

        :class:`RegistryError` when it does not exist (naming what does); :class:`IntegrityError` when the stored
        files do not match their manifest. Only the version's own run artifacts are read: a version whose
        source points anywhere else is refused.
        """
        info = self.version(alias_or_version)
        run = self._get_run(info.run_id)
        expected = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
        if info.source.rstrip("/") != expected:
            raise IntegrityError(
                f"Version {info.version} of {self.model_name!r} points at {info.source}, outside its run's"
                f" artifacts ({expected}); Keel loads models only from its own store.",
                hint="Register the model with `keel train` (Registry.register) instead of by hand.",
            )
        local = _local_path(expected)
        if local is None:
            local = self._download(info)
        return DecisionModel.load(local, threads=threads), info

    def _download(self, info: ModelVersionInfo) -> Path:
        cache = self.state_dir / "model-cache" / self.model_name / f"v{info.version}"
        if not (cache / MODEL_ARTIFACT).is_dir():
            with atomic_dir(cache) as tmp, self._mlflow_errors(f"download version {info.version}"):
                self._client.download_artifacts(info.run_id, MODEL_ARTIFACT, str(tmp))
        return cache / MODEL_ARTIFACT

    # ------------------------------------------------------------------ lifecycle
    def promote(self, version: int | str, *, actor: str, reason: str, force: bool = False) -> AliasEvent:
        """Make ``version`` the champion if it beats the current one on the headline metric (or ``force``).

        Refusals raise :class:`RegistryError` with both numbers. The old champion is remembered for
        :meth:`rollback`. Returns the recorded event.
        """
        version = int(version)
        if force and not reason.strip():
            raise RegistryError("A forced promotion needs a reason; it goes into the audit log.",
                                hint="Pass --reason '...'.")
        with self._locked():
            candidate = self._get_version(version)
            current = self._aliases().get(CHAMPION)
            if current == version:
                raise RegistryError(f"Version {version} of {self.model_name!r} is already the champion.")
            metric = self.headline_metric
            new_value = headline_value(self._run_metrics(candidate.run_id), metric) if candidate.run_id else None
            detail: dict[str, Any] = {"metric": metric, "candidate_value": new_value, "margin": self.promote_margin}
            if current is not None:
                champion = self._get_version(current)
                old_value = headline_value(self._run_metrics(champion.run_id), metric) if champion.run_id else None
                beats = is_better(new_value, old_value, metric, self.promote_margin)
                detail.update(champion_value=old_value, beats=beats)
                if not beats and not force:
                    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
                    margin = f" by more than {self.promote_margin}" if self.promote_margin else ""
                    raise RegistryError(
                        f"Version {version} does not beat the champion (version {current}) on {metric}"
                        f" ({direction} is better{margin}): {_fmt(new_value)} vs {_fmt(old_value)}.",
                        hint="Keep the champion, or promote anyway with force (`--force --reason '...'`).",
                    )
            return self._set_alias(CHAMPION, version, actor=actor, reason=reason, action="promote",
                                   forced=force, detail=detail, current=current)

    def rollback(self, *, actor: str, reason: str) -> AliasEvent:
        """Set the champion back to the previous champion, in one step; repeated calls walk further back."""
        with self._locked():
            current = self._aliases().get(CHAMPION)
            previous = _previous_champion(self._read_events(alias=CHAMPION), current)
            if previous is None:
                raise RegistryError(
                    f"There is no previous champion of {self.model_name!r} to roll back to"
                    f" (champion: {current if current is not None else 'none'}).",
                    hint="See `keel models history`; promote a version explicitly instead.",
                )
            self._get_version(previous)  # deleted since? say so rather than point the alias at nothing
            return self._set_alias(CHAMPION, previous, actor=actor, reason=reason, action="rollback",
                                   detail={"rolled_back_from": current}, current=current)

    def history(self, *, alias: str | None = None, include_unapplied: bool = False) -> list[AliasEvent]:
        """Alias changes, oldest first (``keel models history``); reconciles the log with MLflow first."""
        with self._locked():
            events = self._read_events(alias=alias, applied_only=not include_unapplied)
        return events

    def champion_at(self, when: datetime) -> int | None:
        """The champion version at time ``when`` (naive datetimes are taken as UTC), or None."""
        moment = when if when.tzinfo else when.replace(tzinfo=UTC)
        champion: int | None = None
        for event in self.history(alias=CHAMPION):
            if event.time > moment:
                break
            champion = event.to_version
        return champion

    # ------------------------------------------------------------------ the critical section
    def _set_alias(
        self,
        alias: str,
        version: int,
        *,
        actor: str,
        reason: str,
        action: str,
        current: int | None,
        forced: bool = False,
        detail: dict[str, Any] | None = None,
    ) -> AliasEvent:
        """Log intent, move the alias (the one write that matters), mark applied. Caller holds the lock.

        ``current`` is the alias's version as the caller read it inside this same critical section.
        """
        now = datetime.now(UTC)
        row = (now.isoformat(), self.model_name, alias, current, version, actor, reason, action, int(forced),
               "pending", json.dumps(detail or {}, default=_json_default))
        conn = self._events()
        try:
            cursor = conn.execute(
                "INSERT INTO alias_events (time, model, alias, from_version, to_version, actor, reason, action,"
                " forced, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            event_id = int(cursor.lastrowid or 0)
            with self._mlflow_errors(f"set alias {alias!r} to version {version}"):
                self._client.set_registered_model_alias(self.model_name, alias, str(version))
            conn.execute("UPDATE alias_events SET status = 'applied' WHERE id = ?", (event_id,))
        except Exception:
            # The alias write may or may not have landed (e.g. a timeout after commit): ask MLflow.
            with contextlib.suppress(Exception):
                self._reconcile()
            raise
        finally:
            conn.close()
        return AliasEvent(event_id, now, self.model_name, alias, current, version, actor, reason, action,
                          forced, "applied", detail or {})

    def _reconcile(self) -> None:
        """Make the log agree with MLflow's aliases: settle pending events, record outside changes."""
        conn = self._events()
        try:
            actual = self._aliases()
            pending = conn.execute(
                "SELECT id, alias, to_version FROM alias_events WHERE model = ? AND status = 'pending' ORDER BY id",
                (self.model_name,),
            ).fetchall()
            for event_id, alias, to_version in pending:
                status = "applied" if actual.get(alias) == to_version else "aborted"
                conn.execute("UPDATE alias_events SET status = ? WHERE id = ?", (status, event_id))
            last = dict(
                conn.execute(
                    "SELECT alias, to_version FROM alias_events WHERE id IN (SELECT MAX(id) FROM alias_events"
                    " WHERE model = ? AND status = 'applied' GROUP BY alias)",
                    (self.model_name,),
                ).fetchall()
            )
            for alias in sorted(set(actual) | set(last)):
                if actual.get(alias) != last.get(alias):
                    conn.execute(
                        "INSERT INTO alias_events (time, model, alias, from_version, to_version, actor, reason,"
                        " action, forced, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?, 'external', 0, 'applied',"
                        " '{}')",
                        (datetime.now(UTC).isoformat(), self.model_name, alias, last.get(alias), actual.get(alias),
                         "unknown", "alias changed outside Keel; time is when Keel noticed"),
                    )
        finally:
            conn.close()

    def _read_events(self, *, alias: str | None = None, applied_only: bool = True) -> list[AliasEvent]:
        query = "SELECT * FROM alias_events WHERE model = ?"
        args: list[Any] = [self.model_name]
        if alias is not None:
            query += " AND alias = ?"
            args.append(alias)
        if applied_only:
            query += " AND status = 'applied'"
        conn = self._events()
        try:
            rows = conn.execute(query + " ORDER BY id", args).fetchall()
        finally:
            conn.close()
        return [
            AliasEvent(
                id=r[0], time=datetime.fromisoformat(r[1]), model=r[2], alias=r[3], from_version=r[4],
                to_version=r[5], actor=r[6], reason=r[7], action=r[8], forced=bool(r[9]), status=r[10],
                detail=json.loads(r[11] or "{}"),
            )
            for r in rows
        ]


def _previous_champion(events: list[AliasEvent], current: int | None) -> int | None:
    """The champion before ``current``, from the champion events: promotions push, rollbacks pop."""
    stack: list[int] = []
    for event in events:
        if event.action == "rollback":
            while stack and stack[-1] != event.to_version:
                stack.pop()
            if not stack and event.to_version is not None:
                stack.append(event.to_version)
            continue
        if not stack and event.from_version is not None:
            stack.append(event.from_version)
        if event.to_version is None:
            stack = []
        else:
            stack.append(event.to_version)
    if len(stack) >= 2 and stack[-1] == current:
        return stack[-2]
    return None


def _fmt(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.6g}"


def _matching_toml(spec: Spec) -> str | None:
    """The keel.toml beside the spec when it is the very spec being logged (same hash); else None."""
    path = spec.root / "keel.toml"
    try:
        text = path.read_text(encoding="utf-8")
        if parse_spec(tomllib.loads(text), root=spec.root).spec_hash() == spec.spec_hash():
            return text
    except (OSError, tomllib.TOMLDecodeError, SpecError, UnicodeDecodeError):
        return None
    return None


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "LOWER_IS_BETTER",
    "AliasEvent",
    "ModelVersionInfo",
    "RecordedInputs",
    "Registry",
    "RunDetails",
    "RunInfo",
    "RunSummary",
    "default_actor",
    "headline_value",
    "is_better",
    "resolve_tracking_uri",
]
