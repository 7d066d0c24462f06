"""Out-of-core window features: time-ordered chunks, each computed with just the history its windows reach.

A window feature at an event with time ``t`` reads same-entity events in ``(t - horizon, t]``, where
``horizon`` is the longest ``window + delay``. So when rows arrive in event-time order, chunk after chunk, a
chunk's features need only the chunk itself and the *carry*: the earlier rows newer than the previous chunk's
last time minus the horizon. Every row a later window can reach is in it, ties at the chunk border included
(all rows at the border time are carried), so any chunk size gives exactly the one-chunk features wherever
the computation is exact (counts, labels and sums/means of decimal values; see
:mod:`keel.features.offline`). Memory is bounded by ``chunk_rows`` plus the rows of one horizon.

This module holds the chunk-and-carry loop shared by ``keel features build`` and batch scoring, and a time-ordered
streaming reader on :class:`keel.data.sources.Source`.

Example::

    batches = time_ordered_batches(src, ["id", "ts", "card", "amount"], timestamp="ts", batch_rows=100_000)
    compute = lambda f, first: compute_features(f, defs, ..., first_row=first)
    for rows, features in chunked_features(rechunk(batches, 100_000), compute, timestamp="ts", horizon_ns=horizon,
                                           skips_history=True):
        ...  # rows: the chunk as read (Arrow table); features: a pandas frame of the same rows, same order
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa

from keel.data.sources import Source, quote_identifier
from keel.errors import DataError, FeatureError

DEFAULT_CHUNK_ROWS = 1_000_000
"""Rows per chunk unless told otherwise (about 1 GB of working memory for a dozen window features)."""

Chunk = TypeVar("Chunk", pa.Table, pd.DataFrame)


def carry_rows(frame: pd.DataFrame, timestamp: str, horizon_ns: int) -> pd.DataFrame | None:
    """The rows of a time-ordered ``frame`` a later event's window can still reach: time > last time - horizon.

    None when nothing is carried (no window features, or an empty frame).
    """
    if horizon_ns <= 0 or frame.empty:
        return None
    t = pd.to_datetime(frame[timestamp])
    keep = (t > t.max() - pd.Timedelta(horizon_ns, unit="ns")).to_numpy()
    return frame.loc[keep].reset_index(drop=True)


def chunked_features(
    chunks: Iterable[Chunk],
    compute: Callable[..., pd.DataFrame],
    *,
    timestamp: str,
    horizon_ns: int,
    history: pd.DataFrame | None = None,
    skips_history: bool = False,
) -> Iterator[tuple[Chunk, pd.DataFrame]]:
    """Yield ``(chunk, features)`` per chunk: ``compute`` run over carry + chunk, cut to the chunk's rows.

    Parameters:
        chunks: rows in event-time order (ties in the order the one-shot computation would see them), as Arrow
            tables or pandas frames; pulled lazily, one at a time.
        compute: frame in, frame out with the same rows in the same order (e.g. :func:`compute_features`).
            With ``skips_history``, ``compute(frame, first_row)`` returns the features of
            ``frame.iloc[first_row:]`` only (the carried rows are read by the windows but not recomputed; e.g.
            ``compute_features(..., first_row=first_row)``).
        timestamp: the event time column.
        horizon_ns: the longest ``window + delay`` of the definitions in ns (0: no window features, no carry).
        history: older rows to warm the first chunk's windows (read, never yielded); all earlier than the
            first chunk's rows.

    The yielded ``chunk`` is the object that was read (so its exact column types can be written out); the
    features frame has a fresh ``RangeIndex``.
    """
    carry = history if history is not None and not history.empty else None
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        new = chunk.to_pandas() if isinstance(chunk, pa.Table) else chunk
        frame = new if carry is None else pd.concat([carry, new], ignore_index=True)
        first = len(frame) - len(new)
        features: Any = compute(frame, first) if skips_history else compute(frame)
        expected = len(new) if skips_history else len(frame)
        if len(features) != expected:
            raise FeatureError(
                f"The feature computation returned {len(features)} rows for a chunk of {expected}; "
                "it must return one row per input row."
            )
        features = (features if skips_history else features.iloc[first:]).reset_index(drop=True)
        carry = carry_rows(frame, timestamp, horizon_ns)
        yield chunk, features


def rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Re-block a batch stream into tables of exactly ``rows`` rows (the last one shorter)."""
    if rows < 1:
        raise FeatureError(f"chunk_rows must be a positive number of rows. Got {rows} instead.")
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while len(batch):
            take = min(rows - count, len(batch))
            held.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == rows:
                yield pa.Table.from_batches(held)
                held, count = [], 0
    if count:
        yield pa.Table.from_batches(held)


def time_ordered_sql(columns: Sequence[str], *, timestamp: str | None, where: str | None = None) -> str:
    """``SELECT columns FROM source [WHERE ...] ORDER BY timestamp, file order`` for a :meth:`Source.connect`.

    Ties are kept in file order (DuckDB's sort is not stable, so the position is made explicit with a streaming
    ``row_number() OVER ()``): the order :func:`keel.features.offline.compute_features` gives same-time events.
    """
    cols = ", ".join(quote_identifier(c) for c in columns)
    inner = "SELECT *, row_number() OVER () AS __keel_position FROM source"
    if where:
        inner += f" WHERE {where}"
    order = f"{quote_identifier(timestamp)}, __keel_position" if timestamp else "__keel_position"
    return f"SELECT {cols} FROM ({inner}) ORDER BY {order}"


def time_ordered_batches(
    source: Source,
    columns: Sequence[str],
    *,
    timestamp: str | None,
    batch_rows: int,
    where: str | None = None,
    spill: str | Path | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream ``columns`` of ``source`` in event-time order as Arrow batches of at most ``batch_rows`` rows.

    The sort runs in DuckDB and spills to ``spill`` (a folder) when the table is larger than memory.
    """
    import duckdb

    con = source.connect()
    try:
        if spill is not None:
            con.execute(f"SET temp_directory = '{str(spill).replace(chr(39), chr(39) * 2)}'")
        sql = time_ordered_sql(columns, timestamp=timestamp, where=where)
        yield from con.sql(sql).to_arrow_reader(batch_rows)
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"Reading {source.describe()} in time order failed: {first}.") from exc
    finally:
        con.close()


def read_time_ordered(
    source: Source, columns: Sequence[str], *, timestamp: str | None, where: str | None = None
) -> pd.DataFrame:
    """All matching rows of ``source`` in event-time order (ties in file order), as one pandas frame.

    For bounded reads only (e.g. the history one horizon before the first new row).
    """
    import duckdb

    with source.connect() as con:
        try:
            return con.sql(time_ordered_sql(columns, timestamp=timestamp, where=where)).to_arrow_table().to_pandas()
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"Reading {source.describe()} in time order failed: {first}.") from exc


def empty_schema(source: Source, columns: Sequence[str]) -> pa.Schema:
    """The Arrow schema :func:`time_ordered_batches` gives ``columns`` (for writing an empty output)."""
    with source.connect() as con:
        return con.sql(time_ordered_sql(columns, timestamp=None, where="false")).to_arrow_table().schema


__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "carry_rows",
    "chunked_features",
    "empty_schema",
    "read_time_ordered",
    "rechunk",
    "time_ordered_batches",
    "time_ordered_sql",
]
