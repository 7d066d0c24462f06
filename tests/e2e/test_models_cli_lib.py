"""Lifecycle rules end to end at library level: real processes racing for the lock, and processes killed in the
middle of an alias change. The CLI commands (`keel models ...`) are thin wrappers over these calls.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from keel.artifact import DecisionModel
from keel.errors import RegistryError
from keel.registry import CHAMPION, Registry
from keel.spec import Spec, load_spec

SPEC = """
[project]
name = "lifecycle"
owner = "ops"

[decision]
question = "Review?"
positive_class = "fraud"
headline_metric = "average_precision"

[data]
source = "tx.parquet"
label = "y"
timestamp = "t"
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> tuple[Spec, np.ndarray]:
    """One project with versions 1..3 (AP 0.5, 0.6, 0.7); each test works on a copy of its state folder."""
    import mlflow

    root = tmp_path_factory.mktemp("lifecycle")
    (root / "keel.toml").write_text(SPEC)
    spec = load_spec(root / "keel.toml")
    cached = pytestconfig.cache.mkdir(f"keel-mlflow-template-{mlflow.__version__}") / "mlflow.db"
    spec.state_dir.mkdir(parents=True)
    if cached.exists():  # built by the unit tests; saves the schema migrations
        shutil.copy(cached, spec.state_dir / "mlflow.db")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=300) > 0.8).astype(int)
    registry = Registry(spec)
    for rounds, value in ((3, 0.5), (6, 0.6), (9, 0.7)):
        booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 5, "seed": 1},
                            lgb.Dataset(x, y), rounds)
        model = DecisionModel(kind="lightgbm", feature_names=["a", "b", "c"], estimator=booster)
        info = registry.log_run(spec=spec, model=model, metrics={"average_precision": value}, params={"rounds": rounds},
                                data_source="tx.parquet", data_fingerprint=f"fp{rounds}",
                                windows={"test": ("2024-02-01", "2024-02-08")})
        registry.register(info.run_id)
    return spec, x


@pytest.fixture
def spec(project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Spec:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base, _ = project
    root = tmp_path / "p"
    shutil.copytree(base.root, root)
    # Artifact URIs are absolute: keep them pointing at the module's store, which these tests only read.
    return load_spec(root / "keel.toml")


def _isolated_registry(spec: Spec) -> Registry:
    registry = Registry(spec)
    assert registry.tracking_uri.startswith(f"sqlite:///{spec.state_dir.resolve()}")
    return registry


def test_promote_and_rollback_change_what_is_loaded(project, spec: Spec) -> None:
    _, x = project
    registry = _isolated_registry(spec)
    registry.promote(1, actor="ana", reason="first")
    first_scores = registry.load()[0].scores(x)
    registry.promote(3, actor="ana", reason="better")
    model, info = registry.load(CHAMPION)
    assert info.version == 3 and not np.array_equal(model.scores(x), first_scores)
    with pytest.raises(RegistryError, match=r"Version 2 does not beat the champion \(version 3\)"):
        registry.promote(2, actor="bob", reason="older")
    registry.rollback(actor="oncall", reason="incident")
    model, info = registry.load()
    assert info.version == 1
    np.testing.assert_array_equal(model.scores(x), first_scores)
    events = registry.history(alias=CHAMPION)
    assert [(e.action, e.to_version) for e in events] == [("promote", 1), ("promote", 3), ("rollback", 1)]
    assert registry.champion_at(events[1].time) == 3


_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from keel.registry import Registry
    from keel.spec import load_spec
    from keel.errors import RegistryError

    spec_path, mode, version, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    registry = Registry(load_spec(spec_path))
    client = registry._client
    real = client.set_registered_model_alias

    def hang_before(*args, **kwargs):
        marker.write_text("inside")
        time.sleep(600)

    def hang_after(*args, **kwargs):
        real(*args, **kwargs)
        marker.write_text("inside")
        time.sleep(600)

    if mode == "before":
        client.set_registered_model_alias = hang_before
    elif mode == "after":
        client.set_registered_model_alias = hang_after
    else:
        while not marker.exists():  # start line: both racers promote as soon as the file appears
            time.sleep(0.005)
    try:
        registry.promote(version, actor=f"proc{version}", reason=mode)
        print("promoted")
    except RegistryError:
        print("refused")
    """
)


def _worker(spec: Spec, mode: str, version: int, marker: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(spec.root / "keel.toml"), mode, str(version),
                             str(marker)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(marker: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker never reached the alias write")
        time.sleep(0.02)


@pytest.mark.parametrize(("mode", "expected_champion", "expected_status"), [("before", 1, "aborted"),
                                                                            ("after", 3, "applied")])
def test_process_killed_mid_promote_leaves_old_or_new_alias_and_a_reconciled_log(
    spec: Spec, tmp_path: Path, mode: str, expected_champion: int, expected_status: str
) -> None:
    registry = _isolated_registry(spec)
    registry.promote(1, actor="ana", reason="first")
    marker = tmp_path / "marker"
    proc = _worker(spec, mode, 3, marker)
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)  # holds the lock and has written the intent; dies without cleanup
    proc.wait()

    fresh = Registry(spec)
    assert fresh.resolve(CHAMPION) == expected_champion
    log = fresh.history(alias=CHAMPION, include_unapplied=True)  # takes the lock: the kernel freed it
    assert [(e.to_version, e.status) for e in log] == [(1, "applied"), (3, expected_status)]
    assert fresh.champion_at(log[-1].time) == expected_champion
    # The registry is usable right away and the next change starts from the real alias.
    event = fresh.promote(2, actor="ana", reason="next") if expected_champion == 1 else fresh.rollback(
        actor="oncall", reason="undo")
    assert event.from_version == expected_champion


def test_two_processes_promoting_at_once_serialize(spec: Spec, tmp_path: Path) -> None:
    registry = _isolated_registry(spec)
    registry.promote(1, actor="ana", reason="first")
    marker = tmp_path / "go"
    racers = [_worker(spec, "race", version, marker) for version in (2, 3)]
    time.sleep(0.1)  # let both start importing; correctness does not depend on this
    marker.write_text("go")
    outputs = {version: proc.communicate(timeout=180)[0].strip() for version, proc in zip((2, 3), racers, strict=True)}
    assert all(proc.returncode == 0 for proc in racers), [p.stderr.read() if p.stderr else "" for p in racers]
    assert outputs[3] == "promoted" and registry.resolve(CHAMPION) == 3
    chain = registry.history(alias=CHAMPION)
    assert [e.from_version for e in chain[1:]] == [e.to_version for e in chain[:-1]]
    assert len(chain) == 1 + sum(o == "promoted" for o in outputs.values())
