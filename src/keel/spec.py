"""The typed model of ``keel.toml``: one spec, loaded and validated once at the edge.

Every stage receives a :class:`Spec` (or the section it needs); nothing below the CLI and the API
lifespan reads the file again. Relative paths in the spec are resolved against the spec's folder.

Example::

    spec = load_spec("examples/card-fraud/keel.toml")
    spec.data.label_delay        # timedelta(days=7)
    spec.decision.costs.false_negative  # 'tx_amount' (a per-row cost expression)
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from keel import expressions
from keel.durations import format_duration, parse_duration
from keel.errors import SpecError

Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]


def _check_expression(value: object) -> object:
    if isinstance(value, str):
        try:
            expressions.parse(value)
        except expressions.ExpressionError as exc:
            raise ValueError(str(exc)) from exc
    return value


# A cost is a number or an expression of columns evaluated per row (e.g. "tx_amount", "2.0 + 0.01 * tx_amount").
Cost = Annotated[float | str, BeforeValidator(_check_expression)]
Expression = Annotated[str, BeforeValidator(_check_expression)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Project(_Section):
    name: str = Field(min_length=1, description="Short name of the system, used in runs and model names.")
    owner: str | None = Field(None, description="Who owns the system after launch (person or team).")
    description: str = ""
    goals: list[str] = Field(default_factory=list, description="What success means, in words.")
    non_goals: list[str] = Field(default_factory=list)
    assumptions: list[str] = Field(default_factory=list)
    constraints: list[str] = Field(default_factory=list)
    deployment: Literal["online", "batch", "hybrid"] = "online"
    deployment_reason: str = ""
    state_dir: str = Field(".keel", description="Where runs, registry, stores and logs live.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite under state_dir.")


class Costs(_Section):
    false_positive: Cost = Field(0.0, description="Cost of acting on a negative (e.g. a needless review).")
    false_negative: Cost = Field(0.0, description="Cost of missing a positive (e.g. the fraud amount).")
    true_positive: Cost = Field(0.0, description="Cost of acting on a positive (e.g. the review itself).")
    true_negative: Cost = 0.0

    @field_validator("*")
    @classmethod
    def _non_negative(cls, value: float | str) -> float | str:
        if isinstance(value, float) and value < 0:
            raise ValueError(f"must be a non-negative number or a column expression. Got {value} instead")
        return value


class Capacity(_Section):
    max_positives: int = Field(gt=0, description="At most this many positive decisions ...")
    per: Duration = Field(timedelta(days=1), description="... per this period (e.g. 100 reviews a day).")


class PrecisionAtK(_Section):
    entity: str | None = Field(None, description="Rank entities (e.g. cards) not rows; None ranks rows.")
    k: int = Field(100, gt=0)
    per: Duration = timedelta(days=1)


class Decision(_Section):
    question: str = Field(min_length=1, description="The decision the prediction supports, in words.")
    positive_class: str = Field(min_length=1, description="What a positive label means.")
    positive_action: str = "review"
    negative_action: str = "approve"
    actor: str = Field("", description="Who acts on the prediction.")
    costs: Costs = Costs()
    capacity: Capacity | None = None
    precision_at_k: PrecisionAtK | None = None
    headline_metric: Literal[
        "average_precision", "card_precision_at_k", "roc_auc", "expected_cost", "log_loss", "brier"
    ] = "average_precision"

    @model_validator(mode="after")
    def _headline_needs_k(self) -> Decision:
        if self.headline_metric == "card_precision_at_k" and self.precision_at_k is None:
            raise ValueError(
                "headline_metric 'card_precision_at_k' needs a [decision.precision_at_k] section (entity, k)"
            )
        return self


class ColumnRange(_Section):
    min: float | None = None
    max: float | None = None


class Data(_Section):
    source: str = Field(min_length=1, description="CSV or Parquet file or glob, or a .duckdb file.")
    format: Literal["auto", "csv", "parquet", "duckdb"] = "auto"
    table: str | None = Field(None, description="Table name when source is a DuckDB database.")
    id_column: str | None = Field(None, description="Unique row/event id.")
    entity_keys: list[str] = Field(default_factory=list, description="Entity columns (e.g. customer_id).")
    timestamp: str | None = Field(None, description="Event time column; None means no time order.")
    label: str = Field(min_length=1)
    positive_label: int | float | str | bool = 1
    label_delay: Duration = Field(timedelta(0), description="How long after the event its label is known.")
    exclude: list[str] = Field(
        default_factory=list, description="Columns never used as model inputs (ids, post-outcome fields)."
    )
    categorical: list[str] = Field(default_factory=list)
    schema_: dict[str, str] = Field(
        default_factory=dict, alias="schema", description="Expected column types: int, float, string, bool, timestamp."
    )
    ranges: dict[str, ColumnRange] = Field(default_factory=dict)
    nullable: list[str] = Field(default_factory=list, description="Columns allowed to hold nulls.")
    max_future_skew: Duration = Field(
        timedelta(minutes=5), description="Timestamps later than now + this are rejected."
    )

    @field_validator("schema_")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        allowed = {"int", "float", "string", "bool", "timestamp"}
        for column, kind in value.items():
            if kind not in allowed:
                raise ValueError(f"type of column {column!r} must be one of {sorted(allowed)}. Got {kind!r}")
        return value


RowKind = Literal["column", "is_weekend", "is_night", "hour", "weekday", "log1p"]
Aggregate = Literal["count", "sum", "mean", "min", "max", "std", "label_count", "label_rate"]


class RowFeature(_Section):
    name: str
    kind: RowKind
    column: str
    night_end_hour: int = Field(6, ge=0, le=23, description="is_night: hour <= this.")


class WindowFeature(_Section):
    entity: str = Field(description="Entity column the window groups by (e.g. customer_id).")
    aggregates: list[Aggregate] = Field(min_length=1)
    column: str | None = Field(None, description="Value column for sum/mean/min/max/std.")
    windows: list[Duration] = Field(min_length=1)
    delay: Duration = Field(
        timedelta(0),
        description="Window ends this long before the event (labels arrive late): (t-delay-w, t-delay].",
    )
    include_current: bool = True
    name: str = Field(
        "{entity}_{aggregate}_{window}",
        description="Name template with {entity}, {aggregate}, {window} (e.g. 7d) and {days}.",
    )

    @model_validator(mode="after")
    def _value_column(self) -> WindowFeature:
        needs = {"sum", "mean", "min", "max", "std"} & set(self.aggregates)
        if needs and not self.column:
            raise ValueError(f"aggregates {sorted(needs)} need 'column' (the value to aggregate)")
        if any(w <= timedelta(0) for w in self.windows):
            raise ValueError("every window must be longer than 0")
        return self


class RatioFeature(_Section):
    name: str
    numerator: str
    denominator: str


class Features(_Section):
    raw: list[str] = Field(default_factory=list, description="Source columns used as model inputs as they are.")
    row: list[RowFeature] = Field(default_factory=list)
    windows: list[WindowFeature] = Field(default_factory=list)
    ratios: list[RatioFeature] = Field(default_factory=list)
    request_time_only: list[str] = Field(
        default_factory=list, description="Features computable from the request alone (no store)."
    )
    store: str = Field("online.sqlite", description="Online store path (relative to state_dir).")
    freshness: Duration | None = Field(None, description="Entity state older than this is stale.")
    stale_action: Literal["flag", "fallback"] = "flag"


class Split(_Section):
    strategy: Literal["time", "random"] = "time"
    protocol: Literal["single", "prequential"] = "single"
    train: Duration | None = Field(None, description="Training window length; None = all history before.")
    validation: Duration = Field(timedelta(days=7))
    test: Duration = Field(timedelta(days=7))
    gap: Duration | None = Field(None, description="Gap between windows; default: the label delay.")
    test_end: datetime | None = Field(None, description="End of the test window; default: last event time.")
    test_start: datetime | None = Field(None, description="Start of the test window (overrides test_end).")
    folds: int = Field(4, ge=1, description="Prequential: number of folds.")
    fold_step: Duration = Field(timedelta(days=7), description="Prequential: shift between folds.")
    exclude_known_positives: bool = Field(
        False, description="Drop test rows of entities already known positive (e.g. compromised cards)."
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Random split only.")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="Random split only.")


Candidate = Literal["lightgbm", "hist_gradient_boosting", "logistic_regression", "random_forest"]


class Models(_Section):
    candidates: list[Candidate] = Field(default_factory=lambda: ["lightgbm", "hist_gradient_boosting"])
    rule: Expression | None = Field(None, description="A rule baseline, e.g. 'tx_amount > 220'.")
    seed: int = 42
    search_trials: int = Field(6, ge=1, description="Hyper-parameter candidates per model family.")
    search_budget_seconds: float = Field(60.0, gt=0)
    calibration: list[Literal["none", "sigmoid", "isotonic"]] = Field(
        default_factory=lambda: ["none", "sigmoid", "isotonic"]
    )
    class_weight: Literal["balanced", "sqrt", "none", "auto"] = Field(
        "balanced", description="Weight of positives: n_neg/n_pos, its square root, 1, or 'auto' (searched)."
    )
    ensemble: Literal["none", "mean"] = Field(
        "none",
        description="'mean': the mean of the uncalibrated probabilities of every candidate family's best model is"
        " one more candidate, calibrated, thresholded and chosen on validation like the others.",
    )
    abstain_band: tuple[float, float] | None = Field(None, description="Scores in [low, high) abstain.")
    allow_leakage: bool = False
    leakage_auc: float = Field(0.98, gt=0.5, le=1.0, description="One feature alone above this AUC is leakage.")
    bootstrap: int = Field(200, ge=0, description="Bootstrap resamples for intervals.")
    threads: int = Field(
        1, ge=0, description="Model threads; 0 = all cores (OpenMP spin-waits badly on a busy machine)."
    )

    @field_validator("abstain_band")
    @classmethod
    def _band(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not (0 <= value[0] < value[1] <= 1):
            raise ValueError(f"must be [low, high] with 0 <= low < high <= 1. Got {list(value)}")
        return value


class Serving(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    alias: str = "champion"
    timeout_ms: float = Field(50.0, gt=0, description="Model budget per request; past it the fallback answers.")
    max_batch: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(5_000_000, ge=1024)
    reload_interval_seconds: float = Field(10.0, ge=0, description="Poll the registry alias; 0 = never.")
    fallback_rule: Expression | None = Field(None, description="Default: models.rule.")
    prediction_log: str = Field("predictions.sqlite", description="Relative to state_dir.")
    log_flush_rows: int = Field(256, ge=1)
    log_flush_ms: float = Field(200.0, gt=0)
    log_writer: Literal["process", "thread"] = Field(
        "process", description="Where the prediction log's rows are built and written: a process of its own (off the "
        "serving process's GIL) or a thread of the serving process (where starting a process is not allowed).")
    log_batch_segments: bool = Field(
        True, description="Store the answers of a /v1/predict/batch request only as a columnar segment of the "
        "prediction log (no row per event in its predictions table; every reader rebuilds the rows): ~5 instead of "
        "~23 us of writer CPU per event and a log ~5x smaller. Off: rows as well, as logs written before it.")
    keep_alive_seconds: int = Field(
        75, ge=1, description="How long an idle client connection stays open. Keep it longer than the idle timeout "
        "of any proxy or load balancer in front: when the server closes first, a request sent on the closing "
        "connection is reset.")


class Trigger(_Section):
    name: str
    metric: Literal[
        "psi", "ks", "js", "chi2", "missing_rate", "average_precision_drop", "fallback_rate",
        "error_rate", "latency_p99_ms", "alerts_per_day", "skew_rate",
    ]
    feature: str | None = Field(None, description="For drift metrics: a feature, 'score' or '*' (any).")
    above: float
    windows: int = Field(1, ge=1, description="Fires when true for this many consecutive windows.")
    level: Literal["warn", "act"] = "act"


class Monitoring(_Section):
    window: Duration = timedelta(days=1)
    bins: int = Field(10, ge=2)
    psi_warn: float = 0.1
    psi_act: float = 0.2
    triggers: list[Trigger] = Field(default_factory=list)
    retrain_window: Duration = Field(timedelta(days=28), description="Training data for a challenger.")
    promote_margin: float = Field(0.0, ge=0, description="Challenger must win by this on the headline metric.")
    skew_sample: int = Field(1000, ge=0)


class Spec(_Section):
    """A validated keel.toml. ``root`` is the folder relative paths resolve against."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    project: Project
    decision: Decision
    data: Data
    features: Features = Features()
    split: Split = Split()
    models: Models = Models()
    serving: Serving = Serving()
    monitoring: Monitoring = Monitoring()
    root: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        data = self.data
        if data.label in data.entity_keys or data.label == data.timestamp or data.label == data.id_column:
            raise ValueError(f"data.label {data.label!r} is also used as an id, entity key or timestamp")
        if self.split.strategy == "time" and data.timestamp is None:
            raise ValueError(
                "split.strategy is 'time' but data.timestamp is not set; name the event time column"
                " or set split.strategy = 'random'"
            )
        if self.split.protocol == "prequential" and self.split.strategy != "time":
            raise ValueError("split.protocol 'prequential' needs split.strategy = 'time'")
        leaky = {data.label} & set(self.features.raw)
        if leaky:
            raise ValueError(f"features.raw lists the label {sorted(leaky)}; a model may not read its label")
        return self

    # --- derived values -------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.resolve(self.project.state_dir)

    @property
    def gap(self) -> timedelta:
        return self.split.gap if self.split.gap is not None else self.data.label_delay

    @property
    def fallback_rule(self) -> str | None:
        return self.serving.fallback_rule or self.models.rule

    def resolve(self, path: str | Path) -> Path:
        """Resolve a path from the spec against the spec's folder (absolute paths stay as they are)."""
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (self.root / p)

    def store_path(self, relative: str) -> Path:
        """A path under the state dir (stores, logs)."""
        p = Path(relative)
        return p if p.is_absolute() else self.state_dir / p

    def content(self) -> dict[str, Any]:
        """The spec as plain data (what is hashed and logged)."""
        return self.model_dump(mode="json", by_alias=True, exclude={"root"})

    def spec_hash(self) -> str:
        """SHA-256 of the canonical JSON of the spec; paths as written, so it is stable across machines."""
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in ("function-after", "function-before") or str(item).startswith(("function-", "constrained-")):
            continue
        else:
            parts.append(str(item))
    return ".".join(p for p in parts if not p.startswith(("float", "str", "int", "tuple", "list")) or "." in p) or "(root)"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The setting names allowed where an unknown key was found (for a did-you-mean hint)."""
    model: Any = Spec
    for item in loc[:-1]:
        field = model.model_fields.get(item) if isinstance(item, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items() if name != "root"]


def _message(error: dict[str, Any]) -> str:
    kind = error.get("type", "")
    loc = tuple(error.get("loc", ()))
    where = _location(loc)
    got = error.get("input")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
        hint = f"Did you mean '{close[0]}'?" if close else "Remove it or check its spelling."
        return f"The key '{where}' in keel.toml is not a known setting. {hint}"
    if kind == "missing":
        return f"The key '{where}' in keel.toml is required but missing. Add it."
    msg = str(error.get("msg", "is invalid")).removeprefix("Value error, ").rstrip(".")
    text = msg if msg.startswith(("must", "is ")) else "is invalid: " + msg[0].lower() + msg[1:]
    if "Got " not in msg:
        text += f". Got {got!r} instead"
    return f"The '{where}' value in keel.toml {text}."


def parse_spec(content: dict[str, Any], root: Path | str = ".", source: str = "keel.toml") -> Spec:
    """Validate a parsed TOML mapping; raise one :class:`SpecError` listing every problem found."""
    try:
        return Spec.model_validate({**content, "root": Path(root)})
    except ValidationError as exc:
        lines = [_message(e) for e in exc.errors(include_url=False)]
        lines = list(dict.fromkeys(lines))
        head = f"{source} has {len(lines)} problem{'s' if len(lines) > 1 else ''}:"
        raise SpecError(head + "\n  - " + "\n  - ".join(lines), hint=None) from None


def load_spec(path: str | Path = "keel.toml") -> Spec:
    """Read and validate keel.toml; every failure is a :class:`SpecError` that names the file and key."""
    p = Path(path)
    if p.is_dir():
        p = p / "keel.toml"
    if not p.exists():
        raise SpecError(
            f"No spec found at {p}.",
            hint="Run `keel init TABLE` to write one from your data, or pass --spec PATH.",
        )
    try:
        content = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{p} is not valid TOML: {exc}.", hint="Fix the syntax at that line.") from None
    except UnicodeDecodeError:
        raise SpecError(f"{p} is not UTF-8 text.", hint="Save it as UTF-8.") from None
    return parse_spec(content, root=p.resolve().parent, source=str(p))


__all__ = [
    "Capacity",
    "Costs",
    "Data",
    "Decision",
    "Duration",
    "Features",
    "Models",
    "Monitoring",
    "Project",
    "RatioFeature",
    "RowFeature",
    "Serving",
    "Spec",
    "Split",
    "Trigger",
    "WindowFeature",
    "load_spec",
    "parse_spec",
]
