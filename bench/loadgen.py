"""A bounded load generator for Keel's service, loopback only: open loop at a fixed rate, stops by itself.

Every run is limited by a request count *and* a duration; it refuses any host but 127.0.0.1 / ::1 / localhost,
so it cannot be pointed at someone else's service. Latency is measured from each request's *scheduled* time
(not from when it was actually sent), so a server that falls behind shows it in p99 instead of hiding it
(no coordinated omission).

Library use (the reliability suite and the serving bench)::

    from loadgen import LoadResult, fixed_rate, loopback_url, timed_events
    events = timed_events(frame, fields, count=3000)          # fresh ids, times ending now
    result = fixed_rate("http://127.0.0.1:8000", events, rate=100, seconds=10)
    result.p99_ms, result.failed, result.answered

Command line (a server already running on loopback)::

    python bench/loadgen.py --url http://127.0.0.1:8000 --data data/transactions.parquet --rate 100 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MAX_REQUESTS = 1_000_000  # hard ceiling whatever the caller asks
MAX_SECONDS = 3600.0


def loopback_url(url: str) -> str:
    """Return ``url`` unchanged when it points at this machine's loopback; raise ``ValueError`` otherwise."""
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"The load generator only targets loopback (127.0.0.1, ::1, localhost). Got {host!r}.")
    return url.rstrip("/")


@dataclass
class LoadResult:
    """What one bounded run measured. Latencies in milliseconds from each request's scheduled time."""

    target_rate: float
    seconds: float
    sent: int = 0
    answered: int = 0          # an HTTP response came back (any status)
    ok: int = 0                # 200
    failed: int = 0            # transport errors, timeouts and non-200 answers
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    achieved_rate: float = 0.0
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[k])


async def _run(url: str, path: str, bodies: Sequence[dict[str, Any]], rate: float, seconds: float,
               max_requests: int, concurrency: int, timeout: float,
               on_tick: Callable[[float, LoadResult], None] | None) -> LoadResult:
    import httpx

    count = min(max_requests, len(bodies), math.ceil(rate * seconds), MAX_REQUESTS)
    result = LoadResult(target_rate=rate, seconds=seconds)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    deadline = started + min(seconds, MAX_SECONDS) + timeout  # the run stops by itself, whatever happens
    next_index = 0
    last_tick = started

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            nonlocal next_index, last_tick
            while True:
                i = next_index
                if i >= count:
                    return
                next_index += 1
                scheduled = started + i / rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.perf_counter() > deadline:
                    return
                result.sent += 1
                try:
                    response = await client.post(path, json=bodies[i])
                except httpx.HTTPError as exc:
                    result.failed += 1
                    name = type(exc).__name__
                    result.errors[name] = result.errors.get(name, 0) + 1
                else:
                    result.answered += 1
                    result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1
                    if response.status_code == 200:
                        result.ok += 1
                    else:
                        result.failed += 1
                latencies.append((time.perf_counter() - scheduled) * 1000.0)
                now = time.perf_counter()
                if on_tick is not None and now - last_tick >= 1.0:
                    last_tick = now
                    on_tick(now - started, result)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    latencies.sort()
    result.p50_ms = _percentile(latencies, 0.50)
    result.p99_ms = _percentile(latencies, 0.99)
    result.max_ms = latencies[-1] if latencies else math.nan
    result.achieved_rate = result.answered / result.elapsed_s if result.elapsed_s else 0.0
    return result


def fixed_rate(url: str, bodies: Sequence[dict[str, Any]], *, rate: float, seconds: float,
               path: str = "/v1/predict", max_requests: int = MAX_REQUESTS, concurrency: int = 64,
               timeout: float = 10.0, on_tick: Callable[[float, LoadResult], None] | None = None) -> LoadResult:
    """POST ``bodies[i]`` at ``rate`` requests/s for at most ``seconds`` and ``max_requests`` (and ``len(bodies)``).

    ``concurrency`` caps requests in flight; when the server is slower than ``rate`` the schedule slips and the
    slip shows in the latencies. ``on_tick(elapsed_s, partial_result)`` is called about once a second.
    """
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"rate and seconds must be positive. Got rate={rate}, seconds={seconds}.")
    return asyncio.run(_run(loopback_url(url), path, bodies, rate, seconds, max_requests, concurrency, timeout,
                            on_tick))


def find_sustainable_rate(url: str, make_bodies: Callable[[int], Sequence[dict[str, Any]]], *,
                          rates: Sequence[float], seconds: float, p99_budget_ms: float,
                          path: str = "/v1/predict") -> tuple[float | None, list[LoadResult]]:
    """Step through increasing ``rates`` until p99 exceeds the budget, a request fails or the rate is not reached.

    Returns the highest rate that held (None when even the first did not) and every step's result.
    ``make_bodies(n)`` gives ``n`` fresh request bodies for one step.
    """
    results: list[LoadResult] = []
    sustainable: float | None = None
    for rate in rates:
        r = fixed_rate(url, make_bodies(math.ceil(rate * seconds)), rate=rate, seconds=seconds, path=path)
        results.append(r)
        held = r.failed == 0 and r.p99_ms <= p99_budget_ms and r.achieved_rate >= 0.9 * rate
        if not held:
            break
        sustainable = rate
    return sustainable, results


def timed_events(frame: Any, fields: Sequence[str], *, count: int, id_column: str = "transaction_id",
                 timestamp: str = "tx_datetime", first_id: int = 10**9, end: datetime | None = None,
                 span: timedelta = timedelta(hours=1)) -> list[dict[str, Any]]:
    """``count`` request bodies from the rows of ``frame`` (cycled), with fresh ids and times spread over the
    ``span`` ending at ``end`` (default: now, UTC), in time order — live-looking traffic the schema accepts."""
    rows = frame[list(fields)].to_dict("records")
    end = end or datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1)
    start = end - span
    step = span / max(1, count)
    out = []
    for i in range(count):
        r = dict(rows[i % len(rows)])
        body = {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
        body[id_column] = first_id + i
        body[timestamp] = (start + step * i).isoformat()
        out.append(body)
    return out


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    parser = argparse.ArgumentParser(prog="python bench/loadgen.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Service base URL (loopback only).")
    parser.add_argument("--data", required=True, help="Parquet file of events (the spec's data.source).")
    parser.add_argument("--rate", type=float, default=50.0, help="Requests per second.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Duration limit.")
    parser.add_argument("--max-requests", type=int, default=100_000, help="Request count limit.")
    parser.add_argument("--fields", default="transaction_id,tx_datetime,customer_id,terminal_id,tx_amount",
                        help="Comma-separated event fields to send.")
    args = parser.parse_args(argv)
    loopback_url(args.url)
    count = min(args.max_requests, math.ceil(args.rate * args.seconds))
    events = timed_events(pd.read_parquet(args.data), args.fields.split(","), count=count)
    result = fixed_rate(args.url, events, rate=args.rate, seconds=args.seconds, max_requests=args.max_requests)
    sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
