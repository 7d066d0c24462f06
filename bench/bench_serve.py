"""Bench: ``/v1/predict`` (online features + prediction log on) against the framework and compute floors.

Run: ``python bench/bench_serve.py`` (about a minute). Side by side, same model, one run, loopback only:

* **keel** ``/v1/predict`` in a real uvicorn process (``python -m keel.serve``), online store warmed with 20 days
  of history, prediction log on;
* **echo**: a minimal FastAPI endpoint that returns the JSON it got (the framework floor), also under uvicorn;
* **in-process**: ``DecisionModel.scores`` on one row, LightGBM pinned to 1 thread (the compute floor);
* **batch**: ``/v1/predict/batch`` with 1,000 events per request (events/s).

Load: a bounded asyncio generator in this process (httpx, keep-alive): a fixed 200 req/s for latency, then a
closed loop of 16 concurrent connections for sustained throughput. The generator shares the 2 cores with the
server, so throughput figures are a lower bound. Writes the ``## Serving`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

RESULTS = HERE / "RESULTS.md"
START, END = "<!-- serve:start -->", "<!-- serve:end -->"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_app() -> Any:
    # Request is imported at module level: FastAPI resolves (string) annotations in the module's globals.
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        return await request.json()

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    return app


def _start(cmd: list[str], port: int, cwd: Path) -> subprocess.Popen[bytes]:
    import httpx

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server died")
    raise RuntimeError("server did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _fixed_rate(url: str, bodies: list[dict[str, Any]], rate: float, seconds: float) -> dict[str, float]:
    """Open loop: one request every 1/rate s (at most 64 in flight); latency from scheduled send to answer."""
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            nonlocal errors
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(url, json=bodies[i % len(bodies)])
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "rps": len(lat) / elapsed,
            "errors": errors, "n": len(lat)}


async def _closed_loop(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float,
                       events_per_request: int = 1) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(url, json=bodies[i % len(bodies)])
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "rps": len(lat) / elapsed, "eps": len(lat) * events_per_request / elapsed, "errors": errors,
            "n": len(lat)}


def _events(frame: Any) -> list[dict[str, Any]]:
    return [{"transaction_id": int(r.transaction_id), "tx_datetime": r.tx_datetime.isoformat(),
             "customer_id": int(r.customer_id), "terminal_id": int(r.terminal_id), "tx_amount": float(r.tx_amount)}
            for r in frame.itertuples()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="Duration of each load phase.")
    parser.add_argument("--echo-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        import uvicorn

        uvicorn.run(echo_app(), host="127.0.0.1", port=args.echo_server, log_level="warning", access_log=False)
        return

    import httpx
    import lightgbm as lgb

    from keel.artifact import DecisionModel
    from keel.data.simulate import simulate
    from keel.features.definitions import resolve_definitions
    from keel.features.offline import compute_features
    from keel.spec import load_spec

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="keel-bench-serve-"))
    try:
        shutil.copy(ROOT / "examples" / "card-fraud" / "keel.toml", work / "keel.toml")
        spec = load_spec(work / "keel.toml")
        tx = simulate(n_customers=2000, n_terminals=4000, n_days=40, seed=5).transactions
        defs = resolve_definitions(spec.features, spec.data)
        table = compute_features(tx, defs, timestamp="tx_datetime", label="tx_fraud", id_column="transaction_id")
        names = list(table.columns[4:])
        train = tx["tx_datetime"] < tx["tx_datetime"].min() + dt.timedelta(days=20)
        booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 31, "num_threads": 1},
                            lgb.Dataset(table.loc[train, names].to_numpy(), tx.loc[train, "tx_fraud"].to_numpy()),
                            num_boost_round=100)
        model = DecisionModel(kind="lightgbm", feature_names=names, estimator=booster, threshold=0.5, threads=1)
        model.save(work / "model")
        history, live = tx[train], tx[~train]
        live_events = _events(live)

        # Compute floor: bare in-process single-row predict, 1 thread.
        model = DecisionModel.load(work / "model", threads=1)
        rows = table.loc[~train, names].to_numpy()[:2000]
        times = []
        for row in rows:
            t0 = time.perf_counter()
            model.scores(row.reshape(1, -1))
            times.append(time.perf_counter() - t0)
        lat = np.array(times) * 1000
        bare = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "rps": 1000 / lat.mean()}

        port_k, port_e = _free_port(), _free_port()
        keel = _start([sys.executable, "-m", "keel.serve", "--spec", str(work / "keel.toml"), "--model",
                       str(work / "model"), "--port", str(port_k), "--log-level", "warning"], port_k, work)
        echo = _start([sys.executable, str(Path(__file__).resolve()), "--echo-server", str(port_e)], port_e, work)
        results: dict[str, dict[str, float]] = {}
        try:
            base = f"http://127.0.0.1:{port_k}"
            hist = _events(history)
            with httpx.Client(timeout=120) as c:  # warm the online store with 20 days of history
                for i in range(0, len(hist), 5000):
                    c.post(f"{base}/v1/predict/batch", json={"events": hist[i:i + 5000]}).raise_for_status()
            n = len(live_events)
            phase = [live_events[: n // 3], live_events[n // 3: 2 * n // 3], live_events[2 * n // 3:]]
            results["keel @200"] = asyncio.run(_fixed_rate(f"{base}/v1/predict", phase[0], 200, args.seconds))
            results["echo @200"] = asyncio.run(_fixed_rate(f"http://127.0.0.1:{port_e}/echo", phase[0], 200,
                                                           args.seconds))
            results["keel max"] = asyncio.run(_closed_loop(f"{base}/v1/predict", phase[1], 16, args.seconds))
            results["echo max"] = asyncio.run(_closed_loop(f"http://127.0.0.1:{port_e}/echo", phase[1], 16,
                                                           args.seconds))
            batches = [{"events": phase[2][i:i + 1000]} for i in range(0, len(phase[2]) - 999, 1000)]
            results["batch"] = asyncio.run(_closed_loop(f"{base}/v1/predict/batch", batches, 2,
                                                        min(args.seconds, 10), 1000))
        finally:
            _stop(keel)
            _stop(echo)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def row(name: str, r: dict[str, float], rate: str) -> str:
        return f"| {name} | {rate} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:,.0f} | {int(r.get('errors', 0))} |"

    lines = [
        "## Serving",
        "",
        f"Run {dt.date.today()} on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" load average before the run {load_before:.1f}."
        " Reproduce with `python bench/bench_serve.py`. LightGBM 100 trees x 31 leaves on the 15 flagship features,"
        " 1 thread; one uvicorn worker; online store warmed with 20 days of a 2,000-customer simulation; prediction"
        " log on. The load generator (httpx, asyncio) runs on the same 2 cores, so req/s are lower bounds.",
        "",
        "| target | load | p50 ms | p99 ms | req/s | errors |",
        "|---|---|---:|---:|---:|---:|",
        row("keel `/v1/predict`", results["keel @200"], "200 req/s fixed"),
        row("echo FastAPI (framework floor)", results["echo @200"], "200 req/s fixed"),
        row("keel `/v1/predict`", results["keel max"], "16 connections"),
        row("echo FastAPI (framework floor)", results["echo max"], "16 connections"),
        f"| bare `DecisionModel.scores`, one row (compute floor) | in-process loop | {bare['p50']:.3f} |"
        f" {bare['p99']:.3f} | {bare['rps']:,.0f} | 0 |",
        f"| keel `/v1/predict/batch`, 1,000 events | 2 connections | {results['batch']['p50']:.1f} |"
        f" {results['batch']['p99']:.1f} | {results['batch']['eps']:,.0f} events/s | {int(results['batch']['errors'])} |",
        "",
        "Goals (issue 5, 2 cores): p50 <= 2 ms and p99 <= 10 ms at 200 req/s; >= 1,500 req/s with p99 <= 25 ms;"
        " batch >= 50,000 events/s. `mlflow models serve` is not in this run (see the report).",
    ]
    section = "\n".join(lines)
    print(section)
    text = RESULTS.read_text() if RESULTS.exists() else "# Bench results\n"
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
