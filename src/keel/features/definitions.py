"""Feature definitions: the ``[features]`` section resolved into one flat, ordered list, one entry per column.

Every stage that computes features (offline tables, the online store, Spark backfills) starts from the
same list, so a feature has exactly one definition. Example::

    spec = load_spec("examples/card-fraud/keel.toml")
    defs = resolve_definitions(spec.features, spec.data)
    feature_names(defs)[:3]   # ['tx_amount', 'tx_during_weekend', 'tx_during_night']
    validate_schema(defs, {"tx_datetime": "timestamp", ...}, timestamp="tx_datetime", label="tx_fraud")

Window semantics (shared by every path): a window feature at an event with time ``t`` aggregates the events
of the same entity whose time lies in ``(t - delay - window, t - delay]``. With ``delay == 0`` the window ends
at the event itself: events at the same timestamp count only when they come earlier in event order (input
order, i.e. arrival order), and the event itself counts when ``include_current``. Label-based aggregates read
labels, so their ``delay`` must be at least ``data.label_delay`` (a label younger than that is not known yet).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Literal

from keel.durations import format_duration
from keel.errors import FeatureError
from keel.spec import Data, Features

LABEL_AGGREGATES = frozenset({"label_count", "label_rate"})
VALUE_AGGREGATES = frozenset({"sum", "mean", "min", "max", "std"})


@dataclass(frozen=True)
class RawDefinition:
    """A source column used as a feature as it is."""

    name: str
    column: str


@dataclass(frozen=True)
class RowDefinition:
    """A transform of one column of the same row (``is_weekend``, ``is_night``, ``hour``, ``log1p`` ...)."""

    name: str
    kind: str
    column: str
    night_end_hour: int = 6


@dataclass(frozen=True)
class WindowDefinition:
    """One aggregate over one window of one entity's past events: ``(t - delay - window, t - delay]``."""

    name: str
    entity: str
    aggregate: str
    column: str | None
    window: timedelta
    delay: timedelta = timedelta(0)
    include_current: bool = True

    @property
    def reads_label(self) -> bool:
        return self.aggregate in LABEL_AGGREGATES

    @property
    def horizon(self) -> timedelta:
        """How far back from an event this feature can look."""
        return self.delay + self.window


@dataclass(frozen=True)
class RatioDefinition:
    """``numerator / denominator`` of two other features (or source columns); NaN when the denominator is 0."""

    name: str
    numerator: str
    denominator: str


Definition = RawDefinition | RowDefinition | WindowDefinition | RatioDefinition
_ORDER = {RawDefinition: 0, RowDefinition: 1, WindowDefinition: 2, RatioDefinition: 3}

# Which source types each row transform accepts.
_ROW_TYPES: dict[str, set[str]] = {
    "column": {"int", "float", "bool"},
    "log1p": {"int", "float"},
    "is_weekend": {"timestamp"},
    "is_night": {"timestamp"},
    "hour": {"timestamp"},
    "weekday": {"timestamp"},
}


def _window_text(window: timedelta) -> str:
    return format_duration(window)


def _days_text(window: timedelta) -> str:
    days = window.total_seconds() / 86400
    return str(int(days)) if days == int(days) else f"{days:g}"


def resolve_definitions(features: Features, data: Data | None = None) -> list[Definition]:
    """Flatten a ``[features]`` section into one definition per output column (raw, row, windows, ratios).

    ``data`` (the ``[data]`` section) supplies the label and its delay for the leakage check: a label-based
    aggregate whose ``delay`` is shorter than ``data.label_delay`` would read labels nobody knows yet at
    scoring time, so it is refused with a :class:`FeatureError`.
    """
    defs: list[Definition] = [RawDefinition(name=c, column=c) for c in features.raw]
    defs += [
        RowDefinition(name=r.name, kind=r.kind, column=r.column, night_end_hour=r.night_end_hour)
        for r in features.row
    ]
    for index, block in enumerate(features.windows):
        for window in block.windows:
            for aggregate in block.aggregates:
                try:
                    name = block.name.format(
                        entity=block.entity,
                        aggregate=aggregate,
                        window=_window_text(window),
                        days=_days_text(window),
                    )
                except (KeyError, IndexError, ValueError) as exc:
                    raise FeatureError(
                        f"The name template {block.name!r} of features.windows[{index}] is invalid ({exc}).",
                        hint="Use only {entity}, {aggregate}, {window} and {days}.",
                    ) from None
                column = block.column if aggregate in VALUE_AGGREGATES else None
                defs.append(
                    WindowDefinition(
                        name=name,
                        entity=block.entity,
                        aggregate=aggregate,
                        column=column,
                        window=window,
                        delay=block.delay,
                        include_current=block.include_current,
                    )
                )
    defs += [
        RatioDefinition(name=r.name, numerator=r.numerator, denominator=r.denominator)
        for r in features.ratios
    ]
    _check_names(defs)
    if data is not None:
        check_leakage(defs, label=data.label, label_delay=data.label_delay, timestamp=data.timestamp)
    return defs


def _check_names(defs: Sequence[Definition]) -> None:
    seen: dict[str, Definition] = {}
    for d in defs:
        if d.name in seen:
            raise FeatureError(
                f"Two features are named {d.name!r} ({type(seen[d.name]).__name__} and {type(d).__name__}).",
                hint="Give every feature a unique name (window name templates need {window} or {days} "
                "when a block has several windows, and {aggregate} when it has several aggregates).",
            )
        seen[d.name] = d


def check_leakage(
    defs: Sequence[Definition], *, label: str | None, label_delay: timedelta, timestamp: str | None = None
) -> None:
    """Refuse features that would read a label (or the label column) before it is known."""
    for d in defs:
        if isinstance(d, WindowDefinition):
            reads_label = d.reads_label or (label is not None and d.column == label)
            if reads_label and d.delay < label_delay:
                raise FeatureError(
                    f"Feature {d.name!r} aggregates labels with delay {format_duration(d.delay)}, shorter than "
                    f"data.label_delay {format_duration(label_delay)}: it would read labels that are not known "
                    "yet at scoring time (leakage).",
                    hint=f'Set delay = "{format_duration(label_delay)}" (or more) on that features.windows block.',
                )
            if reads_label and d.delay == timedelta(0) and d.include_current:
                raise FeatureError(
                    f"Feature {d.name!r} aggregates labels with delay 0 and include_current = true: it would read "
                    "the label of the event being scored (leakage).",
                    hint="Set include_current = false or a delay of at least data.label_delay.",
                )
            if timestamp is not None and d.entity == timestamp:
                raise FeatureError(f"Feature {d.name!r} groups by the timestamp column {timestamp!r}.")
        elif isinstance(d, RawDefinition | RowDefinition) and label is not None and d.column == label:
            raise FeatureError(
                f"Feature {d.name!r} reads the label column {label!r} of its own row (leakage).",
                hint="Remove it; use a window aggregate with a delay of at least data.label_delay instead.",
            )


def feature_names(defs: Sequence[Definition]) -> list[str]:
    """Output column names, in the order raw, row, windows, ratios (the model's input order)."""
    return [d.name for d in sorted(defs, key=lambda d: _ORDER[type(d)])]


def window_definitions(defs: Sequence[Definition]) -> list[WindowDefinition]:
    return [d for d in defs if isinstance(d, WindowDefinition)]


def entities(defs: Sequence[Definition]) -> list[str]:
    """Entity columns the windows group by, in first-use order."""
    return list(dict.fromkeys(d.entity for d in window_definitions(defs)))


def required_columns(
    defs: Sequence[Definition], *, timestamp: str | None, label: str | None = None
) -> list[str]:
    """Source columns the definitions read (timestamp, entities, values, and the label when one is aggregated)."""
    cols: list[str] = []
    windows = window_definitions(defs)
    if windows and timestamp:
        cols.append(timestamp)
    names = {d.name for d in defs}
    for d in defs:
        if isinstance(d, RawDefinition | RowDefinition):
            cols.append(d.column)
        elif isinstance(d, WindowDefinition):
            cols.append(d.entity)
            if d.column:
                cols.append(d.column)
            if d.reads_label and label:
                cols.append(label)
        else:
            cols += [c for c in (d.numerator, d.denominator) if c not in names]
    return list(dict.fromkeys(cols))


def definitions_hash(defs: Sequence[Definition]) -> str:
    """A stable SHA-256 of the definitions (order-insensitive within a kind, durations in seconds)."""
    payload = []
    for d in defs:
        item = {"type": type(d).__name__, **asdict(d)}
        for key in ("window", "delay"):
            if isinstance(item.get(key), timedelta):
                item[key] = item[key].total_seconds()
        payload.append(item)
    rank = {cls.__name__: value for cls, value in _ORDER.items()}
    payload.sort(key=lambda x: (rank[x["type"]], x["name"]))
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_NUMERIC = {"int", "float", "bool"}
SchemaKind = Literal["int", "float", "string", "bool", "timestamp"]


def schema_kind(dtype: str) -> str:
    """Map a DuckDB / pandas / Arrow type name to Keel's kinds: int, float, bool, timestamp, string."""
    t = str(dtype).lower()
    if t.startswith(("timestamp", "datetime64", "date")):
        return "timestamp"
    if t in ("bool", "boolean"):
        return "bool"
    if any(
        t.startswith(p)
        for p in (
            "int",
            "uint",
            "bigint",
            "smallint",
            "tinyint",
            "hugeint",
            "ubigint",
            "usmallint",
            "utinyint",
            "uinteger",
            "integer",
        )
    ):
        return "int"
    if any(t.startswith(p) for p in ("float", "double", "real", "decimal", "numeric")):
        return "float"
    return "string"


def validate_schema(
    defs: Sequence[Definition],
    schema: Mapping[str, str],
    *,
    timestamp: str | None,
    label: str | None = None,
    expected: Mapping[str, str] | None = None,
    source: str = "the source",
) -> None:
    """Check that ``schema`` (column -> type name) has every column the definitions need, with a usable type.

    ``expected`` is the spec's ``[data.schema]``: a column whose type changed from what it promised is named as
    retyped. Raises :class:`FeatureError` naming the column and the feature that needs it, before anything is
    computed or written.
    """
    kinds = {c: schema_kind(t) for c, t in schema.items()}
    names = {d.name for d in defs}
    lower = {c.lower(): c for c in kinds}

    def need(column: str, who: str, allowed: set[str] | None) -> None:
        if column not in kinds:
            near = lower.get(column.lower())
            promised = (
                f" (keel.toml data.schema promises it as {expected[column]})"
                if expected and column in expected
                else ""
            )
            guess = f" A column {near!r} exists; was it renamed?" if near else ""
            raise FeatureError(
                f"Column {column!r} needed by {who} is missing from {source}{promised}.{guess}",
                hint="Restore the column upstream or update the feature definition in keel.toml.",
            )
        kind = kinds[column]
        promised = schema_kind(expected[column]) if expected and column in expected else kind
        # int <-> float is not a retype worth stopping for: both aggregate the same way.
        if promised != kind and not (promised in _NUMERIC and kind in _NUMERIC):
            raise FeatureError(
                f"Column {column!r} needed by {who} changed type in {source}: keel.toml data.schema says "
                f"{promised}, the source has {schema[column]} ({kind}).",
                hint="Fix the upstream type or update data.schema and the feature definition.",
            )
        if allowed is not None and kind not in allowed:
            raise FeatureError(
                f"Column {column!r} needed by {who} has type {schema[column]} ({kind}) in {source}; "
                f"it must be one of {sorted(allowed)}.",
                hint="Cast it upstream or point the feature at another column.",
            )

    windows = window_definitions(defs)
    if windows:
        if not timestamp:
            raise FeatureError(
                f"Window feature {windows[0].name!r} needs an event time, but data.timestamp is not set.",
                hint="Name the event time column in [data] timestamp.",
            )
        need(timestamp, f"window feature {windows[0].name!r} (the event time)", {"timestamp"})
    for d in defs:
        who = f"feature {d.name!r}"
        if isinstance(d, RawDefinition):
            need(d.column, who, _NUMERIC)
        elif isinstance(d, RowDefinition):
            need(d.column, who, _ROW_TYPES.get(d.kind))
        elif isinstance(d, WindowDefinition):
            need(d.entity, f"{who} (its entity)", None)
            if d.column:
                need(d.column, who, _NUMERIC)
            if d.reads_label:
                if not label:
                    raise FeatureError(f"Feature {d.name!r} aggregates labels but data.label is not set.")
                need(label, f"{who} (the label)", _NUMERIC)
        else:
            for ref in (d.numerator, d.denominator):
                if ref not in names:
                    if ref not in kinds:
                        raise FeatureError(
                            f"Ratio feature {d.name!r} references {ref!r}, which is neither a feature nor a column "
                            f"of {source}.",
                            hint=f"Use one of the feature names: {sorted(names)}.",
                        )
                    need(ref, who, _NUMERIC)


__all__ = [
    "LABEL_AGGREGATES",
    "VALUE_AGGREGATES",
    "Definition",
    "RatioDefinition",
    "RawDefinition",
    "RowDefinition",
    "WindowDefinition",
    "check_leakage",
    "definitions_hash",
    "entities",
    "feature_names",
    "required_columns",
    "resolve_definitions",
    "schema_kind",
    "validate_schema",
    "window_definitions",
]
