"""Request and response models. The request is the *raw event* the spec describes, generated from the spec.

Fields of the event: ``data.id_column``, ``data.timestamp``, the entity keys, and every source column the
features read (for card fraud: ``transaction_id``, ``tx_datetime``, ``customer_id``, ``terminal_id``,
``tx_amount``). Types come from ``[data.schema]`` (strict: a string is not a number), bounds from
``[data.ranges]``, NaN/inf are refused, unknown fields are refused, and an event time later than now +
``data.max_future_skew`` is refused. Example::

    models = build_request_models(spec)
    models.event.model_validate({"transaction_id": 1, "tx_datetime": "2018-05-01T10:00:00",
                                 "customer_id": 7, "terminal_id": 3, "tx_amount": 57.2})
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    create_model,
)

from keel.features.definitions import required_columns, resolve_definitions

_FORBID = ConfigDict(extra="forbid")


def _timestamp_text(value: Any) -> Any:
    # Numbers are refused: 1714550400 could be seconds or milliseconds, and a wrong guess is silent.
    if isinstance(value, bool | int | float):
        raise ValueError("must be an ISO-8601 date-time string, e.g. '2018-05-01T10:00:00Z'")
    return value


EARLIEST = datetime(1970, 1, 1)


# How long one reading of the clock serves the future-time check: a batch of 1,000 events reads it once, not
# 1,000 times; the limit is at most this much earlier than exact (stricter, never looser).
CLOCK_SECONDS = 0.05
# The longest text an id, key or string field may hold.
MAX_TEXT = 256


def _future_check(skew: timedelta, column: str) -> Any:
    cached: list[Any] = [-1.0, EARLIEST]  # (monotonic time it expires, limit)

    def check(value: datetime) -> datetime:
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        if value < EARLIEST:
            # Times before the epoch are typos (0001-01-01) and would overflow the stores' nanosecond clocks.
            raise ValueError(f"{column} {value.isoformat()} is before 1970-01-01; check the value")
        tick = time.monotonic()
        if tick >= cached[0]:
            cached[0], cached[1] = tick + CLOCK_SECONDS, datetime.now(UTC).replace(tzinfo=None) + skew
        limit = cached[1]
        if value > limit:
            raise ValueError(
                f"{column} {value.isoformat()} is later than now + data.max_future_skew ({skew}); check the clock"
                " or the time zone (naive times are UTC)"
            )
        return value

    return check


_RULE_KINDS = frozenset({"int", "bool", "string", "float"})


def _field_type(kind: str | None, column: str, bounds: Any, *, is_time: bool, skew: timedelta) -> Any:
    low = bounds.min if bounds is not None else None
    high = bounds.max if bounds is not None else None
    if is_time or kind == "timestamp":
        return Annotated[datetime, BeforeValidator(_timestamp_text), AfterValidator(_future_check(skew, column))]
    if kind == "int":
        return Annotated[StrictInt, Field(ge=low, le=high)]
    if kind == "bool":
        return StrictBool
    if kind == "string":
        return Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT)]
    if kind == "float":
        return Annotated[float, Field(strict=True, allow_inf_nan=False, ge=low, le=high)]
    # Undeclared type: an id or entity may be a number or text; anything else is a finite number.
    return Annotated[StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT)], Field()]


@dataclass(frozen=True)
class FieldRule:
    """What the request models accept in one event field, for validators that check a whole column at once
    (:mod:`keel.serve.columns`): ``kind`` is ``time``, ``int``, ``bool``, ``string``, ``float`` or ``key`` (an
    undeclared id or entity: an int or a string)."""

    name: str
    kind: str
    low: float | None
    high: float | None


@dataclass(frozen=True)
class RequestModels:
    """The spec's request models: one event, a batch of events, and late labels."""

    event: type[BaseModel]
    batch: type[BaseModel]
    labels: type[BaseModel]
    fields: tuple[str, ...]
    id_column: str | None
    timestamp: str | None
    rules: tuple[FieldRule, ...] = ()
    max_batch: int = 0
    max_future_skew: timedelta = timedelta(0)
    columns: Any = None  # keel.serve.columns.BatchColumns: the batch body's column-wise fast path


def event_fields(spec: Any) -> list[str]:
    """The raw fields an event must carry: id, time, entity keys, then the columns the features read."""
    data = spec.data
    defs = resolve_definitions(spec.features, data)
    cols = [data.id_column, data.timestamp, *data.entity_keys, *required_columns(defs, timestamp=data.timestamp)]
    return [c for c in dict.fromkeys(c for c in cols if c) if c != data.label]


def build_request_models(spec: Any) -> RequestModels:
    """Generate the pydantic (v2) request models for a spec (see the module docstring)."""
    data = spec.data
    fields: dict[str, Any] = {}
    rules: list[FieldRule] = []
    names = event_fields(spec)
    for column in names:
        kind = data.schema_.get(column)
        if kind is None and column not in (data.id_column, *data.entity_keys) and column != data.timestamp:
            kind = "float"
        bounds = data.ranges.get(column)
        is_time = column == data.timestamp
        annotation = _field_type(kind, column, bounds, is_time=is_time, skew=data.max_future_skew)
        role = ("event id" if column == data.id_column else "event time" if is_time
                else "entity key" if column in data.entity_keys else "feature input")
        nullable = column in data.nullable and column not in (data.id_column, data.timestamp, *data.entity_keys)
        if nullable:
            fields[column] = (annotation | None, Field(None, description=f"{role} (may be null)"))
        else:
            fields[column] = (annotation, Field(..., description=role))
        rule_kind = "time" if is_time or kind == "timestamp" else kind if kind in _RULE_KINDS else "key"
        rules.append(FieldRule(column, rule_kind, bounds.min if bounds is not None else None,
                               bounds.max if bounds is not None else None))
    event = create_model("PredictRequest", __config__=_FORBID, __doc__="One raw event, as the source table holds it.",
                         **fields)
    batch = create_model(
        "BatchPredictRequest", __config__=_FORBID, __doc__="Events scored in order (earlier ones count for later).",
        events=(list[event], Field(..., min_length=1, max_length=spec.serving.max_batch)),  # type: ignore[valid-type]
    )
    id_type: Any = (_field_type(data.schema_.get(data.id_column), data.id_column, None, is_time=False,
                                skew=data.max_future_skew) if data.id_column else StrictStr)
    label_bounds = data.ranges.get(data.label)
    label_type = Annotated[float, Field(strict=True, allow_inf_nan=False,
                                        ge=label_bounds.min if label_bounds else None,
                                        le=label_bounds.max if label_bounds else None)]
    at_type: Any = Annotated[datetime | None, BeforeValidator(_timestamp_text),
                             AfterValidator(lambda v: _future_check(data.max_future_skew, "at")(v) if v else v)]
    item = create_model(
        "LabelItem", __config__=_FORBID, __doc__="A label that became known after the event.",
        event_id=(id_type, Field(..., description=f"The {data.id_column or 'event id'} of the labelled event.")),
        label=(label_type, Field(..., description=f"The {data.label} value (positive: {data.positive_label!r}).")),
        at=(at_type, Field(None, description="When the label became known; default: now.")),
    )
    labels = create_model(
        "LabelRequest", __config__=_FORBID,
        labels=(list[item], Field(..., min_length=1, max_length=spec.serving.max_batch)),  # type: ignore[valid-type]
    )
    models = RequestModels(event=event, batch=batch, labels=labels, fields=tuple(names),
                           id_column=data.id_column, timestamp=data.timestamp, rules=tuple(rules),
                           max_batch=spec.serving.max_batch, max_future_skew=data.max_future_skew)
    from keel.serve.columns import BatchColumns  # it reads the rules above

    return dataclasses.replace(models, columns=BatchColumns(models))


# --- responses ----------------------------------------------------------------------------------------------
class PredictResponse(BaseModel):
    """The decision for one event."""

    request_id: str = Field(description="Request id (X-Request-ID); batch items add '.<index>'.")
    event_id: int | str | None = Field(None, description="The event's id, echoed.")
    score: float | None = Field(description="Calibrated probability of the positive class; null if no model answered.")
    decision: str = Field(description="The action, e.g. 'review' or 'approve'; 'abstain' only without a fallback rule.")
    model_version: str | None = Field(description="Model version that scored the event (null: none loaded).")
    fallback: bool = Field(description="True when the fallback rule answered instead of the model.")
    fallback_reason: str | None = Field(None, description="Why the fallback answered (model_error, abstain, ...).")
    stale: bool = Field(False, description="An entity's online state is older than features.freshness.")
    latency_ms: float


class BatchPredictResponse(BaseModel):
    request_id: str
    data: list[PredictResponse]
    count: int
    latency_ms: float


class LabelResponse(BaseModel):
    count: int = Field(description="Labels recorded.")
    known: int = Field(description="How many of them belong to events the online store holds.")


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str = Field(description="'ready' or 'degraded'.")
    reasons: list[str] = Field(default_factory=list)
    model_version: str | None = None


class ModelResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    version: str | None
    alias: str
    kind: str | None = None
    threshold: float | None = None
    abstain_band: list[float] | None = Field(None, min_length=2, max_length=2)
    positive_action: str | None = None
    negative_action: str | None = None
    feature_names: list[str] = Field(default_factory=list)
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)
    fallback_rule: str | None = None
    loaded_at: str | None = None


class ReloadResponse(BaseModel):
    previous: str | None
    version: str | None
    changed: bool


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    detail: str
    errors: list[FieldError] = Field(default_factory=list)


__all__ = [
    "BatchPredictResponse",
    "ErrorResponse",
    "FieldRule",
    "HealthResponse",
    "LabelResponse",
    "ModelResponse",
    "PredictResponse",
    "ReadyResponse",
    "ReloadResponse",
    "RequestModels",
    "build_request_models",
    "event_fields",
]
