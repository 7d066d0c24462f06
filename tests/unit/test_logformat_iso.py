"""The log's time text for whole arrays: iso_us gives what iso gives for each time."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest

from keel.logformat import NAT, datetimes_us, iso, iso_us

EPOCH = datetime(1970, 1, 1)


@pytest.mark.parametrize("n", [0, 1, 16, 17, 5000])
def test_iso_us_is_iso_of_each_time(n: int) -> None:
    rng = np.random.default_rng(n)
    lo, hi = (datetime(1, 1, 1) - EPOCH) // timedelta(microseconds=1), (datetime(9999, 12, 31) - EPOCH) // timedelta(
        microseconds=1)
    us = np.concatenate([rng.integers(lo, hi, n // 2), rng.integers(-10**15, 10**16, n - n // 2)])
    if n:
        us[: min(n, 6)] = [NAT, 0, -1, lo, hi, 951_782_400_000_000][: min(n, 6)]  # NaT, 1970, 1969, 0001, 29 Feb 2000
    expected = [None if v == NAT else iso(EPOCH + timedelta(microseconds=v)) for v in us.tolist()]
    assert iso_us(us) == expected


def test_datetimes_us_is_the_time_iso_writes() -> None:
    from datetime import UTC, timezone

    import pandas as pd

    values = [datetime(2018, 4, 1, 7, 0, 0, 5), None, datetime(2018, 4, 1, 9, tzinfo=timezone(timedelta(hours=2))),
              pd.Timestamp("2018-04-01T07:00:00.123456789"), datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)]
    us = datetimes_us(values)
    assert iso_us(us) == [iso(v) for v in values]
    assert us[1] == NAT and us[2] == us[0] - 5 and us[4] == -1
