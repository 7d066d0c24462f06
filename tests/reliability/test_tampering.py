"""Tampering and trust: changed artifacts, planted pickles, admin keys, paths that lead outside, oversized bodies.

"Refused" means: the untrusted thing is never executed or loaded; the service keeps answering (with the
fallback rule when it has no trustworthy model) and ``/ready`` says why; the CLI exits 2 with a message.
Already covered elsewhere (not repeated): byte flips, truncation, extra files and swapped manifests at the
artifact level (tests/unit/test_artifact.py), untrusted skops types (same file), oversized bodies
(tests/service/test_api.py::test_oversized_body_by_content_length_is_413 and ::..._streamed_body_...),
the admin key (tests/service/test_api.py::test_admin_reload_needs_the_key).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import Project, to_event
from keel.artifact import MANIFEST, sha256_file
from keel.cli import app as cli
from keel.serve import PathProvider, create_app

MARKER_ENV = "KEEL_TEST_PICKLE_MARKER"


class _Payload:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "unpickled!"))


def _rewrite_manifest(folder: Path) -> None:
    """What an attacker with write access does: recompute every hash so the manifest matches again."""
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}))


@pytest.fixture
def proj(project: Project, tmp_path: Path) -> Project:
    return project.copy_to(tmp_path / "p")


def _serve(proj: Project, model: Path | str) -> TestClient:
    return TestClient(create_app(proj.spec, PathProvider(model)))


def _assert_refused(client: TestClient, proj: Project, reason: str) -> None:
    ready = client.get("/ready")
    assert ready.status_code == 503 and reason in " ".join(ready.json()["reasons"]), ready.json()
    answer = client.post("/v1/predict", json=to_event(proj.transactions.iloc[-1])).json()
    assert answer["fallback"] is True and answer["model_version"] is None
    assert answer["fallback_reason"] == "model_unavailable"


def test_modified_model_bytes_are_refused_by_the_service(proj: Project) -> None:
    model_txt = proj.model / "model.txt"
    data = bytearray(model_txt.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, same size: only the hash can tell
    model_txt.write_bytes(bytes(data))
    with _serve(proj, proj.model) as client:
        _assert_refused(client, proj, "SHA-256")


def test_manifest_swapped_from_another_artifact_is_refused(proj: Project, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(proj.model, other)
    pipeline = json.loads((other / "pipeline.json").read_text())
    pipeline["threshold"] = 0.0001  # a version that flags everything
    (other / "pipeline.json").write_text(json.dumps(pipeline))
    _rewrite_manifest(other)
    shutil.copy(other / MANIFEST, proj.model / MANIFEST)  # the original files with the other manifest
    with _serve(proj, proj.model) as client:
        _assert_refused(client, proj, "manifest")


def test_pickle_planted_in_the_model_folder_is_refused_unexecuted(proj: Project, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (proj.model / "model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with _serve(proj, proj.model) as client:
        _assert_refused(client, proj, "does not list: model.pkl")
    assert not marker.exists()


def test_pickle_with_a_consistent_manifest_is_still_never_unpickled(proj: Project, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (proj.model / "model.txt").unlink()
    (proj.model / "model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    pipeline = json.loads((proj.model / "pipeline.json").read_text())
    pipeline["estimator_file"] = "model.pkl"
    (proj.model / "pipeline.json").write_text(json.dumps(pipeline))
    _rewrite_manifest(proj.model)  # every hash matches: only the loader's refusal of pickles stands in the way
    with _serve(proj, proj.model) as client:
        _assert_refused(client, proj, "Unknown estimator file model.pkl")
    assert not marker.exists()


def test_pickle_planted_as_the_online_store_is_not_executed(proj: Project, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    store = proj.spec.store_path(proj.spec.features.store)
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_bytes(pickle.dumps(_Payload(marker)))
    with _serve(proj, proj.model) as client:
        ready = client.get("/ready").json()
        assert "online store unavailable" in " ".join(ready["reasons"])
        answer = client.post("/v1/predict", json=to_event(proj.transactions.iloc[-1])).json()
        assert answer["fallback"] is True and answer["fallback_reason"] == "features_unavailable"
    assert not marker.exists()


def test_estimator_file_pointing_outside_the_artifact_is_refused(proj: Project, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    shutil.copy(proj.model / "model.txt", outside)
    pipeline = json.loads((proj.model / "pipeline.json").read_text())
    pipeline["estimator_file"] = "../outside.txt"
    (proj.model / "pipeline.json").write_text(json.dumps(pipeline))
    _rewrite_manifest(proj.model)
    with _serve(proj, proj.model) as client:
        _assert_refused(client, proj, "names an estimator file '../outside.txt' its manifest lacks")


def test_manifest_listing_a_path_outside_the_artifact_is_refused(proj: Project) -> None:
    manifest = json.loads((proj.model / MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (proj.model / MANIFEST).write_text(json.dumps(manifest))
    with _serve(proj, proj.model) as client:
        _assert_refused(client, proj, "'../../etc/passwd'")


@pytest.mark.parametrize("model", ["../../etc", "/etc", "/nonexistent/model"])
def test_model_path_outside_any_artifact_is_refused_by_the_service(proj: Project, model: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(proj.root)
    with _serve(proj, model) as client:
        _assert_refused(client, proj, f"PathProvider('{model}') points at no model version")


def test_keel_serve_with_a_model_path_outside_any_artifact_exits_2(proj: Project,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    served: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: served.append(a))
    monkeypatch.chdir(proj.root)
    result = CliRunner().invoke(cli, ["serve", "-s", str(proj.spec_path), "--model", "../../etc"])
    assert not served, "uvicorn was started"
    assert result.exit_code == 2 and "../../etc" in result.output


@pytest.mark.parametrize(("source", "message"), [
    ("/etc/passwd", "Cannot tell the format"),
    ("../../../../../../etc", "is a folder"),
    ("/etc/shadow.csv", "does not exist"),
    ("x.csv'); COPY (SELECT 1) TO '/tmp/keel-injected.csv'; --", "does not exist"),
])
def test_data_source_outside_the_project_that_is_no_table_is_refused(proj: Project, source: str,
                                                                     message: str) -> None:
    text = proj.spec_path.read_text().replace('source = "data/transactions.parquet"', f'source = "{source}"')
    proj.spec_path.write_text(text)
    result = CliRunner().invoke(cli, ["validate", "-s", str(proj.spec_path)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not Path("/tmp/keel-injected.csv").exists()


@pytest.mark.parametrize(("key", "status"), [(None, 401), ("wrong", 401), ("reliability-key-but-longer", 401),
                                             ("", 401), ("reliability-key", 200)])
def test_admin_reload_needs_exactly_the_key(proj: Project, monkeypatch: pytest.MonkeyPatch, key: str | None,
                                            status: int) -> None:
    monkeypatch.setenv("KEEL_API_KEY", "reliability-key")
    with _serve(proj, proj.model) as client:
        headers = {} if key is None else {"X-API-Key": key}
        r = client.post("/admin/reload", headers=headers)
        assert r.status_code == status and r.json()
        if status == 401:
            assert r.json()["detail"] == "Missing or wrong X-API-Key header."


def test_admin_is_disabled_without_a_server_key(proj: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    with _serve(proj, proj.model) as client:
        r = client.post("/admin/reload", headers={"X-API-Key": ""})
        assert r.status_code == 503 and "KEEL_API_KEY" in r.json()["detail"]


def test_a_tampered_new_version_is_refused_on_reload_and_the_old_one_keeps_serving(
        proj: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_API_KEY", "reliability-key")
    with _serve(proj, proj.model) as client:
        version = client.get("/ready").json()["model_version"]
        pipeline = json.loads((proj.model / "pipeline.json").read_text())
        pipeline["threshold"] = 0.0
        (proj.model / "pipeline.json").write_text(json.dumps(pipeline))  # manifest now disagrees
        r = client.post("/admin/reload", params={"force": True}, headers={"X-API-Key": "reliability-key"})
        assert r.status_code == 503 and f"still serving {version}" in r.json()["detail"]
        answer = client.post("/v1/predict", json=to_event(proj.transactions.iloc[-1])).json()
        assert answer["model_version"] == version and answer["fallback"] is False


def test_oversized_batch_and_long_strings_are_refused(proj: Project) -> None:
    spec = proj.spec
    event = to_event(proj.transactions.iloc[-1])
    with _serve(proj, proj.model) as client:
        big = "x" * (spec.serving.max_body_bytes + 1)
        r = client.post("/v1/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
        batch = {"events": [event] * (spec.serving.max_batch + 1)}
        r = client.post("/v1/predict/batch", json=batch)
        assert r.status_code in (413, 422) and r.json()["detail"]
        r = client.post("/v1/predict", json={**event, "customer_id": "c" * 10_000})
        assert r.status_code == 422 and "customer_id" in r.json()["detail"]
