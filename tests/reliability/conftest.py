"""Fixtures for the reliability suite: a small simulated project with a tiny trained model, and a real server.

``project`` (session): ``simulate(300 customers, 600 terminals, 60 days)`` as Parquet, the flagship keel.toml
copied beside it (state in ``.keel/`` under the folder), and a LightGBM DecisionModel trained by
``keel.train.train`` (one trial, no bootstrap) saved to ``model/``. Served with ``--model`` (no MLflow).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from keel.data.simulate import simulate
from keel.spec import Spec, load_spec

REPO = Path(__file__).resolve().parents[2]
FLAGSHIP = REPO / "examples" / "card-fraud" / "keel.toml"


@dataclass(frozen=True)
class Project:
    root: Path
    spec_path: Path
    model: Path
    data: Path
    transactions: pd.DataFrame

    @property
    def spec(self) -> Spec:
        return load_spec(self.spec_path)

    @property
    def state(self) -> Path:
        return self.root / ".keel"

    def copy_to(self, folder: Path) -> Project:
        """A fresh copy (own state dir) of the project: spec, data and model."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.spec_path, folder / "keel.toml")
        (folder / "data").mkdir(exist_ok=True)
        shutil.copy(self.data, folder / "data" / self.data.name)
        shutil.copytree(self.model, folder / "model")
        return Project(folder, folder / "keel.toml", folder / "model", folder / "data" / self.data.name,
                       self.transactions)


def to_event(row: Any) -> dict[str, Any]:
    """A transaction row as the JSON body /v1/predict expects."""
    r = dict(row)
    return {"transaction_id": int(r["transaction_id"]), "tx_datetime": pd.Timestamp(r["tx_datetime"]).isoformat(),
            "customer_id": int(r["customer_id"]), "terminal_id": int(r["terminal_id"]),
            "tx_amount": float(r["tx_amount"])}


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    from keel.train import train

    root = tmp_path_factory.mktemp("reliability-project")
    tx = simulate(n_customers=300, n_terminals=600, n_days=60, seed=11).transactions
    (root / "data").mkdir()
    data = root / "data" / "transactions.parquet"
    tx.to_parquet(data, index=False)
    shutil.copy(FLAGSHIP, root / "keel.toml")
    spec = load_spec(root / "keel.toml")
    fast = spec.model_copy(update={"models": spec.models.model_copy(
        update={"candidates": ["lightgbm"], "search_trials": 1, "bootstrap": 0})})
    outcome = train(fast)
    model = outcome.model.save(root / "model")
    return Project(root, root / "keel.toml", model, data, tx)


def children(pid: int) -> list[int]:
    """The processes ``pid`` started and that still run (the prediction log's writer), by their parent id."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    """Wait until every process of ``pids`` has exited (an orphaned log writer finishing its writes)."""
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} still run {timeout} s on"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m keel.serve`` on 127.0.0.1 as a child process; ``kill9`` / ``stop`` end it."""

    def __init__(self, project: Project, *, env: dict[str, str] | None = None, model: Path | None = None) -> None:
        self.project = project
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stderr_path = project.root / f"server-{self.port}.log"
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()/kill9()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keel.serve", "--spec", str(project.spec_path), "--model",
             str(model or project.model), "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=self._err, cwd=project.root,
            env={**os.environ, "KEEL_API_KEY": "reliability-key", **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("server did not come up")
            time.sleep(0.1)

    def log(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._err.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return int(self.proc.returncode)


@pytest.fixture
def server_factory() -> Iterator[Any]:
    started: list[Server] = []

    def start(project: Project, **kwargs: Any) -> Server:
        server = Server(project, **kwargs)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.kill9()
