"""A bounded load generator for Keel's service, loopback only, that is not itself the bottleneck.

Raw asyncio streams speaking HTTP/1.1 keep-alive, with every request encoded *before* the clock starts (no HTTP
client library in the hot loop; uvloop when installed). Two modes:

* **open loop** (:func:`fixed_rate`): request ``i`` is due at ``start + i / rate``; latency is measured from that
  *scheduled* time, not from when it was actually sent, so a server that falls behind shows it in p99 instead of
  hiding it (no coordinated omission);
* **closed loop** (:func:`closed_loop`): ``connections`` connections each send their next request as soon as the
  previous answer arrives (sustained throughput).

Every run is limited by a request count *and* a duration; it refuses any host but 127.0.0.1 / ::1 / localhost,
so it cannot be pointed at someone else's service. ``run_in_process`` runs either mode in a child process, so the
caller's own work (and GIL) does not slow the generator down.

Library use (the reliability suite and the serving bench)::

    from loadgen import LoadResult, closed_loop, fixed_rate, loopback_url, timed_events
    events = timed_events(frame, fields, count=3000)          # fresh ids, times ending now
    result = fixed_rate("http://127.0.0.1:8000", events, rate=100, seconds=10)
    result.p99_ms, result.failed, result.answered
    result = closed_loop("http://127.0.0.1:8000", events, connections=16, seconds=10)

Command line (a server already running on loopback)::

    python bench/loadgen.py --url http://127.0.0.1:8000 --data data/transactions.parquet --rate 100 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
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


def encode_requests(url: str, path: str, bodies: Sequence[Any]) -> list[bytes]:
    """Each body (a dict, or bytes already JSON) as one complete HTTP/1.1 keep-alive POST to ``url + path``."""
    netloc = urlsplit(loopback_url(url)).netloc
    try:
        import orjson

        dumps: Callable[[Any], bytes] = orjson.dumps
    except ImportError:  # pragma: no cover - orjson is a Keel dependency
        def dumps(v: Any) -> bytes:
            return json.dumps(v, separators=(",", ":")).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: {netloc}\r\ncontent-type: application/json\r\ncontent-length: "
    out = []
    for body in bodies:
        data = body if isinstance(body, bytes) else dumps(body)
        out.append(f"{head}{len(data)}\r\n\r\n".encode() + data)
    return out


class _Connection:
    """One keep-alive HTTP/1.1 connection: write a pre-encoded request, read one response, return its status."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def usable(self) -> bool:
        return self.reader is not None and not self.reader.at_eof()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, data: bytes, timeout: float) -> int:
        loop = asyncio.get_running_loop()
        if not self.usable():  # first use, or the server closed it while idle (keep-alive timeout)
            self.close()
            self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        # A timer that closes the socket is much cheaper than wrapping every read in wait_for (one task each).
        timer = loop.call_later(timeout, writer.transport.abort)
        try:
            writer.write(data)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                await reader.readexactly(int(lower[i + 17: lower.index(b"\r\n", i + 2)]))
            elif b"\r\ntransfer-encoding: chunked" in lower:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            else:
                await reader.read()
                self.close()
            if b"\r\nconnection: close" in lower:
                self.close()
            return status
        except BaseException:
            self.close()
            raise
        finally:
            timer.cancel()


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(loopback_url(url))
    return parts.hostname or "127.0.0.1", parts.port or 80


class _Recorder:
    """Counts and latencies shared by both modes."""

    def __init__(self, result: LoadResult, on_tick: Callable[[float, LoadResult], None] | None,
                 started: float) -> None:
        self.result = result
        self.latencies: list[float] = []
        self.on_tick = on_tick
        self.started = started
        self.last_tick = started

    def record(self, status: int | None, error: BaseException | None, since: float) -> None:
        r = self.result
        now = time.perf_counter()
        if error is not None:
            r.failed += 1
            name = "Timeout" if isinstance(error, asyncio.CancelledError | TimeoutError) else type(error).__name__
            r.errors[name] = r.errors.get(name, 0) + 1
        else:
            assert status is not None
            r.answered += 1
            r.statuses[status] = r.statuses.get(status, 0) + 1
            if status == 200:
                r.ok += 1
            else:
                r.failed += 1
        self.latencies.append((now - since) * 1000.0)
        if self.on_tick is not None and now - self.last_tick >= 1.0:
            self.last_tick = now
            self.on_tick(now - self.started, r)

    def finish(self) -> LoadResult:
        r = self.result
        r.elapsed_s = time.perf_counter() - self.started
        lat = sorted(self.latencies)
        r.p50_ms = _percentile(lat, 0.50)
        r.p99_ms = _percentile(lat, 0.99)
        r.max_ms = lat[-1] if lat else math.nan
        r.achieved_rate = r.answered / r.elapsed_s if r.elapsed_s else 0.0
        return r


_FAILURES = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
             IndexError)


async def _open_loop(url: str, requests: Sequence[bytes], rate: float, seconds: float, concurrency: int,
                     timeout: float, on_tick: Callable[[float, LoadResult], None] | None) -> LoadResult:
    import threading

    host, port = _target(url)
    loop = asyncio.get_running_loop()
    count = len(requests)
    result = LoadResult(target_rate=rate, seconds=seconds)
    idle: list[_Connection] = []  # LIFO: at low rates the same few connections stay warm
    for _ in range(min(concurrency, 8)):  # connect before the clock starts
        conn = _Connection(host, port)
        try:
            conn.reader, conn.writer = await asyncio.open_connection(host, port)
            idle.append(conn)
        except OSError:
            break
    backlog: collections.deque[tuple[int, float]] = collections.deque()
    tasks: set[asyncio.Task[None]] = set()  # strong references until each request is done
    state = {"in_flight": 0, "dispatched": 0}
    all_sent = asyncio.Event()
    done = asyncio.Event()
    started = time.perf_counter() + 0.01
    rec = _Recorder(result, on_tick, started)
    stop_at = started + min(seconds, MAX_SECONDS)

    async def one(i: int, scheduled: float) -> None:
        conn = idle.pop() if idle else _Connection(host, port)
        status: int | None = None
        error: BaseException | None = None
        try:
            status = await conn.request(requests[i], timeout)
        except _FAILURES as exc:
            error = exc
        rec.record(status, error, scheduled)
        idle.append(conn)
        if backlog:
            launch(*backlog.popleft())
        else:
            state["in_flight"] -= 1
            if all_sent.is_set() and state["in_flight"] == 0:
                done.set()

    def start(i: int, scheduled: float) -> None:
        result.sent += 1
        if state["in_flight"] >= concurrency:
            backlog.append((i, scheduled))  # still timed from its schedule: the wait counts as latency
        else:
            state["in_flight"] += 1
            launch(i, scheduled)

    def launch(i: int, scheduled: float) -> None:
        task = loop.create_task(one(i, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def finished_sending() -> None:
        all_sent.set()
        if state["in_flight"] == 0 and not backlog:
            done.set()

    def dispatcher() -> None:
        # A thread with time.sleep (microsecond precision) rather than asyncio timers (millisecond
        # granularity), so requests leave on time and a 1 ms timer tick does not show up as latency.
        for i in range(count):
            scheduled = started + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if time.perf_counter() > stop_at:
                break
            loop.call_soon_threadsafe(start, i, scheduled)
        loop.call_soon_threadsafe(finished_sending)

    thread = threading.Thread(target=dispatcher, name="loadgen-dispatch", daemon=True)
    thread.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), min(seconds, MAX_SECONDS) + timeout + 5.0)
    thread.join(1.0)
    for conn in idle:
        conn.close()
    return rec.finish()


async def _closed_loop(url: str, requests: Sequence[bytes], connections: int, seconds: float,
                       timeout: float) -> LoadResult:
    host, port = _target(url)
    count = len(requests)
    result = LoadResult(target_rate=math.nan, seconds=seconds)
    conns = [_Connection(host, port) for _ in range(connections)]
    for conn in conns:
        conn.reader, conn.writer = await asyncio.open_connection(host, port)
    started = time.perf_counter()
    rec = _Recorder(result, None, started)
    stop_at = started + min(seconds, MAX_SECONDS)
    state = {"next": 0}

    async def worker(conn: _Connection) -> None:
        while True:
            i = state["next"]
            if i >= count or time.perf_counter() >= stop_at:
                return
            state["next"] = i + 1
            result.sent += 1
            t0 = time.perf_counter()
            status: int | None = None
            error: BaseException | None = None
            try:
                status = await conn.request(requests[i], timeout)
            except _FAILURES as exc:
                error = exc
            rec.record(status, error, t0)

    await asyncio.gather(*(worker(c) for c in conns))
    for conn in conns:
        conn.close()
    return rec.finish()


def _run_loop(coro: Any) -> LoadResult:
    """Run one load with the objects the process already holds (the prepared bodies, the bench's setup) frozen
    out of the garbage collector: a full collection over them took 0.2-0.3 s, and every send due meanwhile would
    count it as the server's latency. The load's own objects are still collected (a soak may run for minutes)."""
    gc.collect()
    gc.freeze()
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is optional
            return asyncio.run(coro)  # type: ignore[no-any-return]
        return uvloop.run(coro)  # type: ignore[no-any-return]
    finally:
        gc.unfreeze()


def fixed_rate(url: str, bodies: Sequence[Any], *, rate: float, seconds: float,
               path: str = "/v1/predict", max_requests: int = MAX_REQUESTS, concurrency: int = 64,
               timeout: float = 10.0, on_tick: Callable[[float, LoadResult], None] | None = None) -> LoadResult:
    """Open loop: POST ``bodies[i]`` at ``rate`` requests/s for at most ``seconds`` and ``max_requests`` (and
    ``len(bodies)``); ``bodies`` are dicts or JSON bytes. Latencies are from each request's scheduled time.

    ``concurrency`` caps requests in flight (further due requests wait, and the wait counts as latency).
    ``on_tick(elapsed_s, partial_result)`` is called about once a second.
    """
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"rate and seconds must be positive. Got rate={rate}, seconds={seconds}.")
    count = min(max_requests, len(bodies), math.ceil(rate * seconds), MAX_REQUESTS)
    requests = encode_requests(url, path, bodies[:count])
    return _run_loop(_open_loop(url, requests, rate, seconds, concurrency, timeout, on_tick))


def closed_loop(url: str, bodies: Sequence[Any], *, connections: int, seconds: float,
                path: str = "/v1/predict", max_requests: int = MAX_REQUESTS, timeout: float = 30.0) -> LoadResult:
    """Closed loop: ``connections`` keep-alive connections, each sending its next body as soon as the previous
    answer arrives, for at most ``seconds`` and ``max_requests`` (and ``len(bodies)``). Latency from each send."""
    if connections < 1 or seconds <= 0:
        raise ValueError(f"connections and seconds must be positive. Got {connections}, {seconds}.")
    count = min(max_requests, len(bodies), MAX_REQUESTS)
    requests = encode_requests(url, path, bodies[:count])
    return _run_loop(_closed_loop(url, requests, connections, seconds, timeout))


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
