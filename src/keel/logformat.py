"""The prediction log's binary feature column: the contract between the service (writer) and monitoring (reader).

Besides the ``features`` JSON text (kept, for people and old readers), each prediction row may carry its feature
values as one blob, ``features_f64``: little-endian float64, one per feature, in the order of a named *feature
set*; ``feature_set`` is the id of that set in the table ``feature_sets(id, names)`` (``names`` is the JSON list
of feature names). Monitoring then reads a batch of rows with one query and one ``np.frombuffer``, no text to
parse. Rows without a blob (old logs, string-valued features) are read from the JSON text as before.

Writer side (what :mod:`keel.serve.predlog` calls; a top-level module so neither side imports the other)::

    ensure_feature_columns(db)                      # once per connection: migrates an existing log, idempotent
    fs = feature_set_id(db, names)                  # once per distinct list of names (cache it)
    blob = feature_blob(names, record["features"])  # per row; None when a value is not a number
    row = (..., blob, fs if blob is not None else None)
"""

from __future__ import annotations

import json
import sqlite3
import struct
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from keel.errors import MonitorError


def iso(value: datetime | pd.Timestamp | str | None) -> str | None:
    """The log's time text: UTC ISO-8601 without offset, microseconds (naive times are taken as UTC).

    The writer stores every time this way and readers bound their queries with it (text order is time order).
    """
    if value is None:
        return None
    # Plain datetimes (what the request models produce) without pandas: the same text at a tenth of the cost.
    if type(value) is datetime:
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        if value.year >= 1000:
            return value.isoformat(timespec="microseconds")
    ts = pd.Timestamp(value)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%f")


FEATURE_COLUMNS = ("features_f64", "feature_set")
FEATURE_DDL = (
    "alter table predictions add column features_f64 blob",
    "alter table predictions add column feature_set integer",
)
FEATURE_SETS_DDL = "create table if not exists feature_sets (id integer primary key, names text unique)"
NAN = float("nan")


@lru_cache(maxsize=64)
def _packer(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}d")


def feature_blob(names: Sequence[str], values: Mapping[str, Any] | None) -> bytes | None:
    """The values of ``names`` (in that order) as little-endian float64 bytes, ``8 * len(names)`` long.

    A missing or ``None`` value is stored as NaN; booleans as 0/1. Readers take any non-finite value as missing
    (as the JSON text, which stores NaN and infinities as null). Returns None when ``values`` is None or any
    value is not a real number (a string, a list...): such rows keep only their JSON text. Example::

        feature_blob(["tx_amount", "is_night"], {"tx_amount": 76.5, "is_night": True})  # 16 bytes
    """
    if values is None:
        return None
    out = []
    get = values.get
    try:
        for name in names:
            v = get(name)
            if v is None:
                out.append(NAN)
            elif type(v) is float:
                out.append(v)
            elif isinstance(v, bool | int | float | np.integer | np.floating | np.bool_):
                out.append(float(v))
            else:
                return None
    except OverflowError:  # an int beyond float64
        return None
    return _packer(len(out)).pack(*out)


def names_text(names: Sequence[str]) -> str:
    """How a feature set's names are stored (and compared): compact JSON."""
    return json.dumps(list(names), separators=(",", ":"))


def has_feature_columns(conn: sqlite3.Connection) -> bool:
    """Whether the log's ``predictions`` table has the binary feature columns (read-only connections too)."""
    cols = {r[1] for r in conn.execute("pragma table_info(predictions)")}
    return set(FEATURE_COLUMNS) <= cols


def ensure_feature_columns(conn: sqlite3.Connection) -> None:
    """Add ``features_f64``/``feature_set`` and ``feature_sets`` to a log that lacks them. Idempotent; old rows keep
    NULL there (read from their JSON). Call after the ``predictions`` table exists."""
    try:
        cols = {r[1] for r in conn.execute("pragma table_info(predictions)")}
        if not cols:
            raise MonitorError("The prediction log has no predictions table to add feature columns to.",
                               hint="Create the log's schema first (keel.serve.predlog.connect).")
        for column, ddl in zip(FEATURE_COLUMNS, FEATURE_DDL, strict=True):
            if column not in cols:
                try:
                    conn.execute(ddl)
                except sqlite3.OperationalError as exc:  # another process added it in between
                    if "duplicate column" not in str(exc):
                        raise
        conn.execute(FEATURE_SETS_DDL)
    except sqlite3.Error as exc:
        raise MonitorError(f"Cannot add the binary feature columns to the prediction log: {exc}.") from exc


def feature_set_id(conn: sqlite3.Connection, names: Sequence[str]) -> int:
    """The id of this ordered list of feature names in ``feature_sets``, inserted when new (stable across calls)."""
    text = names_text(names)
    try:
        conn.execute("insert or ignore into feature_sets (names) values (?)", (text,))
        (fid,) = conn.execute("select id from feature_sets where names = ?", (text,)).fetchone()
    except sqlite3.Error as exc:
        raise MonitorError(f"Cannot record the feature set {text[:80]} in the prediction log: {exc}.",
                           hint="Call ensure_feature_columns(conn) first.") from exc
    return int(fid)


def read_feature_sets(conn: sqlite3.Connection) -> dict[int, list[str]]:
    """Every feature set of the log: ``{id: names}`` (empty for a log without the table)."""
    try:
        rows = conn.execute("select id, names from feature_sets").fetchall()
    except sqlite3.OperationalError:
        return {}
    return {int(i): list(json.loads(t)) for i, t in rows}


__all__ = [
    "FEATURE_COLUMNS",
    "FEATURE_DDL",
    "FEATURE_SETS_DDL",
    "ensure_feature_columns",
    "feature_blob",
    "feature_set_id",
    "has_feature_columns",
    "iso",
    "read_feature_sets",
]
