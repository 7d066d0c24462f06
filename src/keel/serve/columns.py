"""Column-wise validation of a ``POST /v1/predict/batch`` body: the fast path for well-formed batches.

A batch of 1,000 events validated by the pydantic models costs a Python object per event and per field, and the
answer then walks them again. Here the body is parsed once (orjson) and each field is checked as a column, by the
same rules the request models apply (:class:`keel.serve.schemas.FieldRule`): exact key set, strict types, bounds,
finite numbers, event times in canonical ISO-8601 form between 1970 and now + ``data.max_future_skew``.

This path only ever *accepts*. Anything it does not recognise — an error, a null, a time with an offset, a number
too large for 64 bits — returns ``None`` and the request goes through the pydantic models, which either accept it
(as rows) or raise the 422 naming the field. So a body gets the same answer, the same error and the same logged
values whichever path takes it; ``tests/service/test_columns.py`` checks that on random bodies.

The result follows the column batch convention shared by the online store and the prediction log: the timestamp
field as ``datetime64[ns]`` (naive UTC), float fields as ``float64`` arrays, every other field as the list of
validated values.
"""

from __future__ import annotations

import itertools
import operator
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from keel.features.online import row_view
from keel.serve.schemas import CLOCK_SECONDS, MAX_TEXT, FieldRule, RequestModels

_SEPARATORS = {4: ord("-"), 7: ord("-"), 10: ord("T"), 13: ord(":"), 16: ord(":"), 19: ord(".")}
_DIGITS = [i for i in range(26) if i not in _SEPARATORS]
_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def canonical_us(text: bytes, n: int) -> np.ndarray | None:
    """Microseconds since the epoch of ``n`` times given as ``n`` canonical ISO-8601 texts of 26 ASCII characters
    laid end to end (``YYYY-MM-DDTHH:MM:SS.ffffff``, what ``numpy.datetime_as_string(..., unit="us")`` writes), or
    None when one is not exactly that (a wrong separator or length, a non-digit, month 13, 30 February, hour 24,
    second 60): the texts numpy would read and write back unchanged, read column-wise without a Python object
    per event (numpy's own parse of 1,000 texts and the check that it writes them back cost ~3 us per event)."""
    if len(text) != 26 * n or n == 0:
        return None
    a = np.frombuffer(text, dtype=np.uint8).reshape(n, 26)
    for at, sep in _SEPARATORS.items():
        if not (a[:, at] == sep).all():
            return None
    d = a[:, _DIGITS].astype(np.int64) - 48
    if ((d < 0) | (d > 9)).any():
        return None
    year = d[:, 0] * 1000 + d[:, 1] * 100 + d[:, 2] * 10 + d[:, 3]
    month, day = d[:, 4] * 10 + d[:, 5], d[:, 6] * 10 + d[:, 7]
    hour, minute, second = d[:, 8] * 10 + d[:, 9], d[:, 10] * 10 + d[:, 11], d[:, 12] * 10 + d[:, 13]
    fraction = d[:, 14:20] @ np.array([100_000, 10_000, 1_000, 100, 10, 1], dtype=np.int64)
    if ((month < 1) | (month > 12) | (day < 1) | (hour > 23) | (minute > 59) | (second > 59)).any():
        return None
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    if (day > _DAYS_IN_MONTH[month] + (leap & (month == 2))).any():
        return None
    # Days from the civil date (the proleptic Gregorian calendar, as numpy counts): years start in March, so
    # that the leap day ends a year, and 400-year eras repeat exactly.
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + np.where(month > 2, -3, 9)) + 2) // 5 + day - 1
    days = era * 146_097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719_468
    return ((days * 24 + hour) * 60 + minute) * 60_000_000 + second * 1_000_000 + fraction


class BatchColumns:
    """Validate batch bodies column-wise against one spec's request models (see the module docstring)."""

    def __init__(self, models: RequestModels) -> None:
        self.rules = models.rules
        self.keys = frozenset(r.name for r in self.rules)
        self.max_batch = models.max_batch
        self.skew = np.timedelta64(models.max_future_skew, "us")
        self._limit = (-1.0, np.datetime64(0, "us"))
        self._checks = [(rule, getattr(self, f"_{rule.kind}")) for rule in self.rules]
        self._getter = operator.itemgetter(*(rule.name for rule in self.rules))

    def _now_limit(self) -> np.datetime64:
        tick = time.monotonic()
        if tick >= self._limit[0]:
            now = np.datetime64(datetime.now(UTC).replace(tzinfo=None), "us")
            self._limit = (tick + CLOCK_SECONDS, now + self.skew)
        return self._limit[1]

    def parse(self, body: bytes) -> tuple[int, dict[str, Any]] | None:
        """``(n, columns)`` of a valid batch body, or ``None``: let the request models decide."""
        if not self.rules:
            return None
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if type(doc) is not dict or len(doc) != 1:
            return None
        events = doc.get("events")
        if type(events) is not list or not 1 <= len(events) <= self.max_batch:
            return None
        if set(map(type, events)) != _DICT:
            return None
        keys = self.keys
        if not all(map(keys.__eq__, map(frozenset, events))):
            return None
        cols: dict[str, Any] = {}
        columns = zip(*map(self._getter, events), strict=True) if len(self.rules) > 1 else (
            list(map(self._getter, events)),)
        for (rule, check), values in zip(self._checks, columns, strict=True):
            column = check(rule, list(values))
            if column is None:
                return None
            cols[rule.name] = column
        return len(events), cols

    def _time(self, rule: FieldRule, values: list[Any]) -> np.ndarray | None:
        if set(map(type, values)) != _STR:
            return None
        if values[0].endswith("Z"):  # UTC, as the models turn aware times into naive UTC
            if not all(map(str.endswith, values, itertools.repeat("Z"))):
                return None
            values = [v[:-1] for v in values]
        # Canonical text only, seconds or microseconds (isoformat() drops a zero fraction): what numpy reads
        # leniently (a missing second, hour 24, a space) goes to the models.
        try:
            text = "".join([v if len(v) == 26 else v + ".000000" if len(v) == 19 else "" for v in values]
                           ).encode("ascii")
        except UnicodeEncodeError:
            return None
        us = canonical_us(text, len(values))
        if us is None or us.min() < 0 or us.max() > self._now_limit().astype(np.int64):
            return None
        return (us * 1000).view("datetime64[ns]")

    @staticmethod
    def _float(rule: FieldRule, values: list[Any]) -> np.ndarray | None:
        if not set(map(type, values)) <= _NUMBER:
            return None
        try:
            column = np.array(values, dtype=np.float64)
        except OverflowError:
            return None
        if not np.isfinite(column).all() or not _within(column, rule):
            return None
        return column

    @staticmethod
    def _int(rule: FieldRule, values: list[Any]) -> list[Any] | None:
        if set(map(type, values)) != _INT:
            return None
        if (rule.low is not None and min(values) < rule.low) or (rule.high is not None and max(values) > rule.high):
            return None
        return values

    @staticmethod
    def _bool(rule: FieldRule, values: list[Any]) -> list[Any] | None:
        return values if set(map(type, values)) == _BOOL else None

    @staticmethod
    def _string(rule: FieldRule, values: list[Any]) -> list[Any] | None:
        if set(map(type, values)) != _STR or not _text_lengths_ok(values):
            return None
        return values

    @staticmethod
    def _key(rule: FieldRule, values: list[Any]) -> list[Any] | None:
        types = set(map(type, values))
        if not types <= _KEY or (str in types and not _text_lengths_ok([v for v in values if type(v) is str])):
            return None
        return values


_DICT, _STR, _INT, _BOOL = {dict}, {str}, {int}, {bool}
_NUMBER = {int, float}
_KEY = {int, str}


def _text_lengths_ok(values: list[str]) -> bool:
    lengths = set(map(len, values))
    return min(lengths) > 0 and max(lengths) <= MAX_TEXT


def _within(column: np.ndarray, rule: FieldRule) -> bool:
    return ((rule.low is None or bool((column >= rule.low).all()))
            and (rule.high is None or bool((column <= rule.high).all())))


__all__ = ["BatchColumns", "row_view"]
