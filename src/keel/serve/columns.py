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
        text = [v if len(v) == 26 else v + ".000000" if len(v) == 19 else "" for v in values]
        try:
            parsed = np.array(text, dtype="datetime64[us]")
        except ValueError:
            return None
        if not np.array_equal(np.datetime_as_string(parsed, unit="us"), np.array(text)):
            return None
        if parsed.min() < np.datetime64(0, "us") or parsed.max() > self._now_limit():
            return None
        return parsed.astype("datetime64[ns]")

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
