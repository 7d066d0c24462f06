"""The column-wise batch validator accepts only what the request models accept, with the same values.

It is a fast path: whenever it returns columns, pydantic must accept the same body and its ``model_dump`` must equal
the columns' row view; whenever it declines, the request models decide (and name the field in a 422). Well-formed
batches (the common case) must take the fast path, or it buys nothing.
"""

from __future__ import annotations

import math
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import make_spec
from keel.serve.columns import BatchColumns, row_view
from keel.serve.schemas import build_request_models


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root: Path = tmp_path_factory.mktemp("columns")
    return build_request_models(make_spec(root, serving={"max_batch": 50}, data={"nullable": ["tx_amount"]}))


def _event(i: int, when: datetime, amount: Any = 12.5) -> dict[str, Any]:
    return {"transaction_id": i, "tx_datetime": when.isoformat(), "customer_id": i % 7, "terminal_id": 3 + i,
            "tx_amount": amount}


def _same(models: Any, body: bytes) -> tuple[int, dict[str, Any]] | None:
    """Parse both ways and check the fast path never disagrees with the models."""
    parsed = BatchColumns(models).parse(body)
    try:
        expected = models.batch.model_validate_json(body).model_dump()["events"]
    except ValidationError:
        assert parsed is None, "the fast path accepted a body the request models refuse"
        return None
    if parsed is not None:
        n, cols = parsed
        rows = row_view(n, cols, models.timestamp)
        assert rows == expected
        for a, b in zip(rows, expected, strict=True):  # same types too: 5 and 5.0 compare equal
            assert [type(v) for v in a.values()] == [type(v) for v in b.values()]
    return parsed


def test_well_formed_batch_takes_the_fast_path(models: Any) -> None:
    base = datetime(2018, 5, 1, 10, 0, 0)
    events = [_event(i, base + timedelta(seconds=i, microseconds=7 * i % 3)) for i in range(20)]
    events[3]["tx_amount"] = 5  # an int in a float field is a float
    events[4]["customer_id"] = 2**40
    parsed = _same(models, orjson.dumps({"events": events}))
    assert parsed is not None
    n, cols = parsed
    assert n == 20
    assert cols["tx_datetime"].dtype == np.dtype("datetime64[ns]")
    assert cols["tx_amount"].dtype == np.float64 and cols["tx_amount"][3] == 5.0
    assert cols["customer_id"][4] == 2**40
    assert cols["tx_datetime"][6] == np.datetime64("2018-05-01T10:00:06", "ns")  # 42 % 3 == 0: no fraction
    assert cols["tx_datetime"][5] == np.datetime64("2018-05-01T10:00:05.000002", "ns")


def test_utc_suffix_and_microseconds(models: Any) -> None:
    events = [{**_event(i, datetime(2018, 5, 1)), "tx_datetime": f"2018-05-01T10:00:0{i}.00012{i}Z"}
              for i in range(5)]
    parsed = _same(models, orjson.dumps({"events": events}))
    assert parsed is not None
    assert parsed[1]["tx_datetime"][2] == np.datetime64("2018-05-01T10:00:02.000122", "ns")


@pytest.mark.parametrize("change", [
    {"tx_amount": -1.0},                    # below data.ranges
    {"tx_amount": True},                    # bool is not a number
    {"tx_amount": "3.5"},                   # strict: text is not a number
    {"tx_amount": None},                    # nullable: the models take it (rows path)
    {"transaction_id": 1.5},
    {"transaction_id": True},
    {"customer_id": ""},                    # empty key
    {"customer_id": "x" * 257},             # too long
    {"tx_datetime": 1714550400},            # numbers are refused for times
    {"tx_datetime": "2018-05-01T10:00"},    # not canonical: the models decide
    {"tx_datetime": "2018-05-01T10:00:00+02:00"},
    {"tx_datetime": "2018-02-30T10:00:00"},
    {"tx_datetime": "1969-12-31T23:59:59"},
    {"tx_datetime": "2999-01-01T00:00:00"},  # far in the future
    {"tx_datetime": "2018-05-01 10:00:00"},
    {"extra": 1},
])
def test_anything_unusual_goes_to_the_models(models: Any, change: dict[str, Any]) -> None:
    events = [_event(i, datetime(2018, 5, 1, 10)) for i in range(4)]
    events[2].update(change)
    assert BatchColumns(models).parse(orjson.dumps({"events": events})) is None
    _same(models, orjson.dumps({"events": events}))


@pytest.mark.parametrize("body", [
    b"", b"[]", b"{}", b'{"events": []}', b'{"events": {}}', b'{"events": [1]}', b'{"events": [], "x": 1}',
    b"{\"events\": [" + b",".join([b"{}"] * 51) + b"]}", b'{"events": [{"transaction_id": 1}]}',
])
def test_malformed_bodies_are_declined(models: Any, body: bytes) -> None:
    assert BatchColumns(models).parse(body) is None


def test_missing_key_is_declined(models: Any) -> None:
    event = _event(1, datetime(2018, 5, 1))
    del event["terminal_id"]
    assert BatchColumns(models).parse(orjson.dumps({"events": [event]})) is None


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.sampled_from(["2018-05-01T10:00:00", "2018-05-01T10:00:00Z", "2018-05-01T10:00:00.5",
                                          "2018-05-01T10:00:00.000001", "2100-01-01T00:00:00", "0001-01-01T00:00:00"]),
)
_times = st.one_of(
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2040, 1, 1)).map(lambda d: d.isoformat()),
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2040, 1, 1)).map(
        lambda d: d.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")),
    _values,
)
_event_strategy = st.fixed_dictionaries({
    "transaction_id": st.one_of(st.integers(-(2**64), 2**64), _values),
    "tx_datetime": _times,
    "customer_id": st.one_of(st.integers(0, 10), st.text(min_size=0, max_size=3), _values),
    "terminal_id": st.integers(0, 10),
    "tx_amount": st.one_of(st.floats(min_value=-1, max_value=1e300), st.integers(-5, 2**64), _values),
}, optional={"other": st.integers()})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_event_strategy, min_size=1, max_size=6))
def test_never_disagrees_with_the_request_models(models: Any, events: list[dict[str, Any]]) -> None:
    try:
        body = orjson.dumps({"events": events})
    except orjson.JSONEncodeError:  # integers beyond 64 bits: the models parse those, orjson does not
        body = orjson.dumps({"events": [{k: (str(v) if isinstance(v, int) and abs(v) >= 2**63 else v)
                                         for k, v in e.items()} for e in events]})
    _same(models, body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10**9), st.datetimes(min_value=datetime(1970, 1, 1),
                                                                max_value=datetime(2026, 1, 1)),
                          st.floats(min_value=0, max_value=1e12)), min_size=1, max_size=30))
def test_valid_batches_are_taken_with_exact_values(models: Any, rows: list[tuple[int, datetime, float]]) -> None:
    events = [_event(i, when, amount) for i, when, amount in rows]
    parsed = _same(models, orjson.dumps({"events": events}))
    assert parsed is not None
    amounts = parsed[1]["tx_amount"]
    assert all(math.isfinite(a) for a in amounts)


def _numpy_us(texts: list[str]) -> np.ndarray | None:
    """What numpy reads of canonical texts, and None unless it writes every one back unchanged (the rule the
    column-wise reader must follow exactly)."""
    try:
        with warnings.catch_warnings():  # (a text with "Z" reads, with a warning; it never writes back the same)
            warnings.simplefilter("ignore", UserWarning)
            parsed = np.array(texts, dtype="datetime64[us]")
    except ValueError:
        return None
    if not np.array_equal(np.datetime_as_string(parsed, unit="us"), np.array(texts)):
        return None
    return parsed.astype(np.int64)


_TIMES = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999))


@st.composite
def _time_texts(draw: Any) -> str:
    """Canonical texts, and canonical texts with one character changed (a digit, a separator, anything)."""
    text = draw(_TIMES).strftime("%Y-%m-%dT%H:%M:%S.%f")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text) - 1))
        swap = draw(st.one_of(st.sampled_from("0123456789-T:. Z/+x"), st.characters(max_codepoint=0x1000)))
        text = text[:at] + swap + text[at + 1:]
    return text


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(_time_texts(), min_size=1, max_size=8))
def test_canonical_times_read_column_wise_as_numpy_reads_them(texts: list[str]) -> None:
    from keel.serve.columns import canonical_us

    want = _numpy_us(texts)
    try:
        raw = "".join(texts).encode("ascii")
    except UnicodeEncodeError:
        raw = None
    got = None if raw is None else canonical_us(raw, len(texts))
    assert (got is None) == (want is None), texts
    if want is not None:
        assert got is not None and got.tolist() == want.tolist()


@pytest.mark.parametrize("text", ["2016-02-29T12:00:00.000000", "2000-02-29T00:00:00.000001",
                                  "1970-01-01T00:00:00.000000", "2400-02-29T23:59:59.999999"])
def test_leap_days_read_column_wise(text: str) -> None:
    from keel.serve.columns import canonical_us

    got = canonical_us(text.encode(), 1)
    assert got is not None and got.tolist() == _numpy_us([text]).tolist()  # type: ignore[union-attr]


@pytest.mark.parametrize("text", ["2017-02-29T12:00:00.000000", "1900-02-29T00:00:00.000000",
                                  "2018-04-31T00:00:00.000000", "2018-04-01T24:00:00.000000",
                                  "2018-04-01T00:00:60.000000", "2018-13-01T00:00:00.000000",
                                  "2018-00-01T00:00:00.000000", "2018-04-00T00:00:00.000000"])
def test_impossible_dates_are_declined(text: str) -> None:
    from keel.serve.columns import canonical_us

    assert _numpy_us([text]) is None and canonical_us(text.encode(), 1) is None
