"""Hot model switch: promote and roll back under traffic with zero failed requests."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import make_spec
from keel.artifact import DecisionModel
from keel.serve import PathProvider, create_app


class Traffic:
    """Requests from background threads until stopped; records every status and version."""

    def __init__(self, client: TestClient, events: list[dict[str, Any]], threads: int = 3) -> None:
        self.client, self.events = client, events
        self.results: list[tuple[int, str | None, bool]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            event = self.events[i % len(self.events)]
            try:
                r = self.client.post("/v1/predict", json={**event, "transaction_id": 10_000_000 + i})
                body = r.json()
                self.results.append((r.status_code, body.get("model_version"), bool(body.get("fallback"))))
            except Exception:  # a transport failure counts as a failed request
                self.results.append((-1, None, True))
            i += len(self._threads)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + 30
        while len(self.results) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


@pytest.fixture
def live(tmp_path: Path, model_dirs: dict[str, Path]) -> Path:
    return DecisionModel.load(model_dirs["a"]).save(tmp_path / "live")


def publish(source: Path, live: Path) -> str | None:
    DecisionModel.load(source).save(live)  # atomic folder replace, as the registry cache does
    return PathProvider(live).resolve()


def test_admin_promote_and_rollback_under_traffic_fail_nothing(tmp_path: Path, live: Path,
                                                               model_dirs: dict[str, Path], events: Any,
                                                               api_key: str) -> None:
    version_a = PathProvider(live).resolve()
    with TestClient(create_app(make_spec(tmp_path), PathProvider(live))) as c, Traffic(c, events(0, 50)) as traffic:
        traffic.wait_for(30)
        version_b = publish(model_dirs["b"], live)
        r = c.post("/admin/reload", headers={"X-API-Key": api_key})
        assert r.status_code == 200 and r.json() == {"previous": version_a, "version": version_b, "changed": True}
        mark = len(traffic.results)
        traffic.wait_for(mark + 30)
        assert publish(model_dirs["a"], live) == version_a  # rollback
        assert c.post("/admin/reload", headers={"X-API-Key": api_key}).json()["version"] == version_a
        traffic.wait_for(len(traffic.results) + 30)
    statuses = {s for s, _, _ in traffic.results}
    assert statuses == {200}, f"failed requests during swaps: {statuses}"
    assert not any(f for _, _, f in traffic.results)
    versions = [v for _, v, _ in traffic.results]
    assert version_a in versions and version_b in versions
    assert version_b in versions[mark:mark + 5] or versions[mark:].count(version_b) > 0


def test_poller_follows_the_source_without_restart(tmp_path: Path, live: Path, model_dirs: dict[str, Path],
                                                   events: Any) -> None:
    spec = make_spec(tmp_path, serving={"reload_interval_seconds": 0.05})
    with TestClient(create_app(spec, PathProvider(live))) as c, Traffic(c, events(0, 50), threads=2) as traffic:
        traffic.wait_for(20)
        version_b = publish(model_dirs["b"], live)
        deadline = time.monotonic() + 20
        while c.get("/v1/model").json()["version"] != version_b and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/v1/model").json()["version"] == version_b
        traffic.wait_for(len(traffic.results) + 20)
        assert 'keel_model_reloads_total{outcome="swapped"} 2.0' in c.get("/metrics").text
    assert {s for s, _, _ in traffic.results} == {200}
    assert traffic.results[-1][1] == version_b


def test_a_broken_new_version_is_refused_and_the_old_one_keeps_serving(
        tmp_path: Path, live: Path, events: Any, api_key: str) -> None:
    version_a = PathProvider(live).resolve()
    with TestClient(create_app(make_spec(tmp_path), PathProvider(live))) as c:
        (live / "model.txt").write_text((live / "model.txt").read_text()[:-50])  # truncated in place
        (live / "manifest.json").write_text((live / "manifest.json").read_text() + " ")  # and a new label
        r = c.post("/admin/reload", headers={"X-API-Key": api_key})
        assert r.status_code == 503 and f"still serving {version_a}" in r.json()["detail"]
        body = c.post("/v1/predict", json=events(0, 1)[0]).json()
        assert body["model_version"] == version_a and body["fallback"] is False
        assert c.get("/ready").status_code == 200
