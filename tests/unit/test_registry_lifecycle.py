"""Registry lifecycle: promote rules, rollback, audit history, concurrency and interrupted alias changes."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_registry_support import (
    make_spec,
    version_with,
)

from keel.errors import RegistryError
from keel.registry import CHAMPION, AliasEvent, Registry, _previous_champion, is_better
from keel.spec import Spec


# ------------------------------------------------------------------------------------------ lifecycle
def test_promote_refuses_a_worse_model_and_force_is_recorded(registry: Registry, spec: Spec, booster) -> None:
    v1 = version_with(registry, spec, booster, 0.6)
    v2 = version_with(registry, spec, booster, 0.5)
    registry.promote(v1, actor="ana", reason="first")
    with pytest.raises(RegistryError, match=r"Version 2 does not beat the champion \(version 1\) on "
                                            r"average_precision \(higher is better\): 0\.5 vs 0\.6"):
        registry.promote(v2, actor="bob", reason="try")
    assert registry.resolve(CHAMPION) == 1
    assert [e.to_version for e in registry.history(alias=CHAMPION)] == [1]  # a refusal changes nothing

    event = registry.promote(v2, actor="bob", reason="incident 42: v1 mis-scores new merchants", force=True)
    assert registry.resolve(CHAMPION) == 2
    last = registry.history(alias=CHAMPION)[-1]
    assert last == event
    assert (last.forced, last.actor, last.from_version, last.to_version) == (True, "bob", 1, 2)
    assert last.detail["beats"] is False and last.detail["champion_value"] == pytest.approx(0.6)


def test_forced_promotion_needs_a_reason(registry: Registry, spec: Spec, booster) -> None:
    version = version_with(registry, spec, booster, 0.5)
    with pytest.raises(RegistryError, match="A forced promotion needs a reason"):
        registry.promote(version, actor="ana", reason=" ", force=True)


def test_promote_knows_lower_is_better_for_costs(tmp_path: Path, mlflow_template: Path, booster) -> None:
    spec = make_spec(tmp_path / "p", mlflow_template, metric="expected_cost")
    registry = Registry(spec)
    registry.promote(version_with(registry, spec, booster, 100.0), actor="a", reason="first")
    with pytest.raises(RegistryError, match=r"on expected_cost \(lower is better\): 120 vs 100"):
        registry.promote(version_with(registry, spec, booster, 120.0), actor="a", reason="costs more")
    registry.promote(version_with(registry, spec, booster, 80.0), actor="a", reason="costs less")
    assert registry.resolve(CHAMPION) == 3


def test_promote_margin_from_the_spec(tmp_path: Path, mlflow_template: Path, booster) -> None:
    spec = make_spec(tmp_path / "p", mlflow_template, margin=0.05)
    registry = Registry(spec)
    registry.promote(version_with(registry, spec, booster, 0.60), actor="a", reason="first")
    with pytest.raises(RegistryError, match=r"by more than 0\.05"):
        registry.promote(version_with(registry, spec, booster, 0.62), actor="a", reason="barely better")
    registry.promote(version_with(registry, spec, booster, 0.66), actor="a", reason="clearly better")
    assert registry.resolve(CHAMPION) == 3


def test_rollback_walks_back_through_previous_champions(registry: Registry, spec: Spec, booster) -> None:
    for value in (0.5, 0.6, 0.7):
        registry.promote(version_with(registry, spec, booster, value), actor="ana", reason="better")
    assert registry.resolve(CHAMPION) == 3
    event = registry.rollback(actor="oncall", reason="alert storm")
    assert (event.action, event.from_version, event.to_version) == ("rollback", 3, 2)
    assert registry.resolve(CHAMPION) == 2
    registry.rollback(actor="oncall", reason="still bad")
    assert registry.resolve(CHAMPION) == 1
    with pytest.raises(RegistryError, match=r"no previous champion of 'fraud' to roll back to \(champion: 1\)"):
        registry.rollback(actor="oncall", reason="again")
    # Serve and score load what the alias says.
    assert registry.load()[1].version == 1


def test_history_answers_which_version_was_champion_at_a_time(registry: Registry, spec: Spec, booster) -> None:
    v1 = version_with(registry, spec, booster, 0.5)
    v2 = version_with(registry, spec, booster, 0.6)
    registry.promote(v1, actor="ana", reason="first")
    registry.promote(v2, actor="ana", reason="better")
    registry.rollback(actor="oncall", reason="incident")
    events = registry.history(alias=CHAMPION)
    assert [(e.action, e.from_version, e.to_version) for e in events] == [
        ("promote", None, 1), ("promote", 1, 2), ("rollback", 2, 1)
    ]
    assert all(e.time.tzinfo is UTC for e in events)
    assert registry.champion_at(events[0].time - timedelta(seconds=1)) is None
    assert registry.champion_at(events[0].time) == 1
    assert registry.champion_at(events[1].time + (events[2].time - events[1].time) / 2) == 2
    assert registry.champion_at(datetime.now(UTC) + timedelta(days=1)) == 1
    naive_now = datetime.now(UTC).replace(tzinfo=None)
    assert registry.champion_at(naive_now) == 1  # naive = UTC
    # The challenger alias set at registration is in the log too.
    assert [(e.alias, e.to_version) for e in registry.history(alias="challenger")] == [("challenger", 1), ("challenger", 2)]


def test_concurrent_promotes_serialize(registry: Registry, spec: Spec, booster) -> None:
    values = [0.50, 0.55, 0.60, 0.65]
    versions = [version_with(registry, spec, booster, v) for v in values]
    registry.promote(versions[0], actor="seed", reason="first")
    barrier = threading.Barrier(len(versions) - 1)
    outcomes: dict[int, str] = {}

    def promote(version: int) -> None:
        own = Registry(spec)  # each thread its own client and lock file handle, like separate processes
        barrier.wait()
        try:
            own.promote(version, actor=f"t{version}", reason="race")
            outcomes[version] = "promoted"
        except RegistryError:
            outcomes[version] = "refused"

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes[4] == "promoted" and registry.resolve(CHAMPION) == 4
    chain = registry.history(alias=CHAMPION)
    # No lost update: each change starts from the champion the previous one left, and each one improved.
    for before, after in itertools.pairwise(chain):
        assert after.from_version == before.to_version
        assert values[after.to_version - 1] > values[after.from_version - 1]
    assert len(chain) - 1 == sum(o == "promoted" for o in outcomes.values())


def test_interrupted_promote_leaves_old_alias_and_reconciles(
    registry: Registry, spec: Spec, booster, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = version_with(registry, spec, booster, 0.5)
    v2 = version_with(registry, spec, booster, 0.6)
    registry.promote(v1, actor="ana", reason="first")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # like SIGINT / a kill right before the alias write

    monkeypatch.setattr(registry._client, "set_registered_model_alias", killed)
    with pytest.raises(KeyboardInterrupt):
        registry.promote(v2, actor="ana", reason="interrupted")
    fresh = Registry(spec)
    assert fresh.resolve(CHAMPION) == 1
    assert [e.to_version for e in fresh.history(alias=CHAMPION)] == [1]
    statuses = [(e.to_version, e.status) for e in fresh.history(alias=CHAMPION, include_unapplied=True)]
    assert statuses == [(1, "applied"), (2, "aborted")]
    assert fresh.promote(v2, actor="ana", reason="retry").to_version == 2


def test_promote_killed_after_the_alias_write_is_recorded_as_applied(
    registry: Registry, spec: Spec, booster, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = version_with(registry, spec, booster, 0.5)
    v2 = version_with(registry, spec, booster, 0.6)
    registry.promote(v1, actor="ana", reason="first")
    real = registry._client.set_registered_model_alias

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(registry._client, "set_registered_model_alias", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        registry.promote(v2, actor="ana", reason="dies after write")
    fresh = Registry(spec)
    assert fresh.resolve(CHAMPION) == 2
    last = fresh.history(alias=CHAMPION)[-1]
    assert (last.from_version, last.to_version, last.actor, last.status) == (1, 2, "ana", "applied")
    assert fresh.rollback(actor="oncall", reason="undo").to_version == 1


def test_alias_changed_outside_keel_is_logged_as_external(registry: Registry, spec: Spec, booster) -> None:
    from mlflow import MlflowClient

    v1 = version_with(registry, spec, booster, 0.5)
    v2 = version_with(registry, spec, booster, 0.4)
    registry.promote(v1, actor="ana", reason="first")
    MlflowClient(tracking_uri=registry.tracking_uri).set_registered_model_alias("fraud", CHAMPION, str(v2))
    last = registry.history(alias=CHAMPION)[-1]
    assert (last.action, last.from_version, last.to_version, last.actor) == ("external", 1, 2, "unknown")
    assert registry.champion_at(datetime.now(UTC)) == 2


# ------------------------------------------------------------------------------------------ pure rules
@pytest.mark.parametrize(
    ("candidate", "champion", "metric", "margin", "expected"),
    [
        (0.6, 0.5, "average_precision", 0.0, True),
        (0.5, 0.5, "average_precision", 0.0, False),
        (0.55, 0.5, "roc_auc", 0.1, False),
        (0.4, 0.5, "log_loss", 0.0, True),
        (0.6, 0.5, "brier", 0.0, False),
        (None, 0.5, "average_precision", 0.0, False),
        (float("nan"), 0.5, "average_precision", 0.0, False),
    ],
)
def test_is_better(candidate, champion, metric, margin, expected) -> None:
    assert is_better(candidate, champion, metric, margin) is expected


def _event(i: int, action: str, old: int | None, new: int | None) -> AliasEvent:
    return AliasEvent(i, datetime(2024, 1, i, tzinfo=UTC), "m", CHAMPION, old, new, "a", "r", action, False,
                      "applied")


def test_previous_champion_stack() -> None:
    events = [_event(1, "promote", None, 1), _event(2, "promote", 1, 2), _event(3, "promote", 2, 3)]
    assert _previous_champion(events, 3) == 2
    events.append(_event(4, "rollback", 3, 2))
    assert _previous_champion(events, 2) == 1
    events.append(_event(5, "rollback", 2, 1))
    assert _previous_champion(events, 1) is None
    # The first event's from_version counts when history starts mid-way (e.g. after an external change).
    assert _previous_champion([_event(1, "external", 4, 5)], 5) == 4
    # The log does not describe the live alias: refuse rather than guess.
    assert _previous_champion([_event(1, "promote", 1, 2)], 7) is None
