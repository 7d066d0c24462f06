"""Warm the online store from the source: the events and labels a live service needs on its first request.

Only events inside the largest window + delay before ``until`` matter; labels count from the time they were known
(event time + ``data.label_delay``), so a label that would arrive after ``until`` is left for ``/v1/labels``.
Re-running is safe: the store ignores events it already holds and labels are upserts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from keel.data.sources import Source, quote_identifier, source_from_spec
from keel.errors import FeatureError
from keel.features.definitions import resolve_definitions, window_definitions
from keel.features.online import OnlineStore
from keel.spec import Spec


@dataclass(frozen=True)
class WarmResult:
    events: int
    labels: int
    since: datetime | None
    until: datetime | None


def warm_online_store(spec: Spec, store: OnlineStore, *, source: Source | None = None,
                      until: datetime | None = None, batch_rows: int = 200_000) -> WarmResult:
    """Load the source's events in ``(until - horizon, until]`` and their labels known by ``until`` into ``store``.

    ``until`` defaults to the source's last event time.
    """
    data = spec.data
    windows = window_definitions(resolve_definitions(spec.features, data))
    if not windows:
        return WarmResult(0, 0, None, None)
    if not data.timestamp:
        raise FeatureError("Window features need data.timestamp to warm the online store.")
    src = source or source_from_spec(spec)
    ts = quote_identifier(data.timestamp)
    if until is None:
        last = src.sql(f"SELECT max(CAST({ts} AS TIMESTAMP)) AS t FROM source")["t"].iloc[0]
        if pd.isna(last):
            return WarmResult(0, 0, None, None)
        until = pd.Timestamp(last).to_pydatetime()
    horizon = max(d.horizon for d in windows)
    since = until - horizon
    where = f"CAST({ts} AS TIMESTAMP) > '{since}' AND CAST({ts} AS TIMESTAMP) <= '{until}'"
    events = labels = 0
    label_col = data.label if data.label in src.schema() else None
    for batch in src.batches(where=where, order_by=[data.timestamp], batch_rows=batch_rows):
        frame = batch.to_pandas()
        records = frame.to_dict("records")
        with store.transaction():
            events += store.update_many(records)
            if label_col and data.id_column:
                known = pd.to_datetime(frame[data.timestamp]) + data.label_delay
                for rec, at in zip(records, known, strict=True):
                    if at <= until and pd.notna(rec[label_col]):
                        store.add_label(rec[data.id_column], float(rec[label_col] == data.positive_label), at=at)
                        labels += 1
    return WarmResult(events=events, labels=labels, since=since, until=until)


__all__ = ["WarmResult", "warm_online_store"]
