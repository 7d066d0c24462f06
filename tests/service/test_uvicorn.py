"""A real uvicorn process on loopback: started, asked /health and /v1/predict, stopped cleanly (log flushed)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import FLAGSHIP
from keel.serve import read_predictions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(FLAGSHIP, tmp_path / "keel.toml")  # state_dir .keel resolves under tmp_path
    return tmp_path


def test_uvicorn_process_answers_and_flushes_its_log_on_sigterm(project: Path, model_dirs: dict[str, Path],
                                                                 event: dict[str, Any]) -> None:
    port = free_port()
    env = {**os.environ, "KEEL_API_KEY": "uvicorn-test-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel.serve", "--spec", str(project / "keel.toml"), "--model", str(model_dirs["a"]),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=project,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        assert httpx.get(f"{base}/ready").json()["status"] == "ready"
        r = httpx.post(f"{base}/v1/predict", json=event, headers={"X-Request-ID": "live-1"})
        assert r.status_code == 200 and r.json()["request_id"] == "live-1" and r.json()["fallback"] is False
        assert httpx.post(f"{base}/v1/predict", json={**event, "tx_amount": -1}).status_code == 422
        assert httpx.post(f"{base}/admin/reload", headers={"X-API-Key": "uvicorn-test-key"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    logs = err.decode()
    # uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM is a clean exit too.
    assert proc.returncode in (0, -signal.SIGTERM), logs
    assert "Application shutdown complete" in logs
    assert '"request_id":"live-1"' in logs and "uvicorn-test-key" not in logs
    logged = read_predictions(project / ".keel" / "predictions.sqlite")
    assert logged["request_id"].tolist() == ["live-1"]


@pytest.mark.parametrize(("configured", "expected"), [(None, 75), (120, 120)])
def test_keel_serve_keeps_idle_connections_open_past_a_proxys_idle_timeout(
        project: Path, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        configured: int | None, expected: int) -> None:
    """uvicorn's 5 s default closes connections a client or proxy is about to reuse (resets under load)."""
    import uvicorn

    from keel.serve import app as serve_app
    from keel.spec import load_spec

    if configured is not None:
        text = (project / "keel.toml").read_text().replace("[serving]", f"[serving]\nkeep_alive_seconds = {configured}")
        (project / "keel.toml").write_text(text)
    servers: list[Any] = []

    def started(server: Any, sockets: Any = None) -> None:
        servers.append(server)
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", started)
    monkeypatch.setattr(serve_app, "configure_logging", lambda level: None)  # leave this process's loggers alone
    serve_app.run(load_spec(project / "keel.toml"), model_path=model_dirs["a"], log_level="warning")
    assert [s.config.timeout_keep_alive for s in servers] == [expected]
    # the service reads uvicorn's requests taken in and not answered (its backlog: when to group commits)
    service = servers[0].config.app.state.service
    servers[0].server_state.tasks.update({"a", "b"})
    assert service.backlog() == 2
