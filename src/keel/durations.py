"""Durations written as ``7d``, ``12h``, ``30m``, ``45s``, ``2w`` (or ``0``) in keel.toml."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([wdhms])\s*$")


def parse_duration(value: object) -> timedelta:
    """Parse a duration; raise ``ValueError`` naming the accepted forms when it is not one."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return timedelta(0)
    if isinstance(value, str):
        match = _PATTERN.match(value.lower())
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
        if value.strip() == "0":
            return timedelta(0)
    raise ValueError(
        f"must be a duration such as '7d', '12h', '30m', '45s' or '2w'. Got {value!r} instead."
    )


def format_duration(value: timedelta) -> str:
    """Shortest exact spelling: 7 days -> '7d', 90 minutes -> '90m'."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0d"
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
