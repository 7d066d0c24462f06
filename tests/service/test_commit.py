"""An answered event is in the online store's file: an answer alone in flight writes it itself, answers under a
backlog share one commit on the loop's thread, answers in flight together (scoring in the pool) share a group
commit on the commit thread."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from conftest import make_spec
from keel.features.online import OnlineStore, stored_rows
from keel.serve import PathProvider
from keel.serve.schemas import build_request_models
from keel.serve.service import Service


def _on_disk(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {str(row[3]) for row in stored_rows(db)}


def test_answered_events_are_on_disk_alone_and_concurrent(tmp_path: Path, model_dirs: dict[str, Path],
                                                          events: Any) -> None:
    spec = make_spec(tmp_path)
    path = tmp_path / "online.sqlite"
    store = OnlineStore.from_spec(spec, path)
    model = build_request_models(spec).event
    batch = [model.model_validate(e).model_dump() for e in events(0, 9)]
    service = Service(spec, PathProvider(model_dirs["a"]), store=store, prediction_log=str(tmp_path / "log.sqlite"))
    seen: dict[str, Any] = {}

    async def go() -> None:
        await service.start()
        first = batch[0]
        await service.answer([first], "r0", endpoint="predict", started=0.0)
        seen["alone"] = _on_disk(path), service._group  # written by the request itself: no commit thread
        # Answers that wait (here: scoring in the worker pool) overlap, and the later ones share a group commit.
        service._pool_only.add(service.loaded.version)  # type: ignore[union-attr]
        answers = await asyncio.gather(*(service.answer([e], f"r{i}", endpoint="predict", started=0.0)
                                         for i, e in enumerate(batch[1:], 1)))
        seen["together"] = _on_disk(path), service._group, answers
        await service.stop()

    asyncio.run(go())
    store.close()
    ids = [str(e["transaction_id"]) for e in batch]
    on_disk, group = seen["alone"]
    assert on_disk == {ids[0]} and group is None
    on_disk, group, answers = seen["together"]
    assert on_disk == set(ids) and group is not None
    assert all(a[0]["fallback"] is False for a in answers)


def _backlogged(tmp_path: Path, model_dirs: dict[str, Path], events: Any, backlog: int, fail: bool = False
                ) -> tuple[Service, OnlineStore, list[dict[str, Any]], list[int]]:
    spec = make_spec(tmp_path)
    store = OnlineStore.from_spec(spec, tmp_path / "online.sqlite")
    model = build_request_models(spec).event
    batch = [model.model_validate(e).model_dump() for e in events(0, 6)]
    service = Service(spec, PathProvider(model_dirs["a"]), store=store, prediction_log=str(tmp_path / "log.sqlite"))
    service.backlog = lambda: backlog
    commits: list[int] = []
    write = store.commit_staged

    def counted(**kwargs: Any) -> int:
        commits.append(len(store._staged))
        if fail and len(commits) == 1:  # as a failed write does: memory dropped (reloaded from the file on next use)
            with store._lock:
                store._forget()
            raise sqlite3.OperationalError("disk I/O error")
        return write(**kwargs)

    store.commit_staged = counted  # type: ignore[method-assign]
    return service, store, batch, commits


def _answer_all(service: Service, batch: list[dict[str, Any]], path: Path) -> list[tuple[Any, set[str]]]:
    """Every event answered concurrently (as uvicorn runs the requests it took in); each answer with what the
    store's file held the moment it returned."""
    async def one(i: int, event: dict[str, Any]) -> tuple[Any, set[str]]:
        answer = await service.answer([event], f"r{i}", endpoint="predict", started=0.0)
        return answer, _on_disk(path)

    async def go() -> list[tuple[Any, set[str]]]:
        await service.start()
        try:
            return await asyncio.gather(*(one(i, e) for i, e in enumerate(batch)))
        finally:
            await service.stop()

    return asyncio.run(go())


def test_answers_under_a_backlog_share_one_commit_on_the_loop_and_return_once_on_disk(
        tmp_path: Path, model_dirs: dict[str, Path], events: Any) -> None:
    """The server holds other requests: the answers ready together stage their rows and share one transaction,
    written on the loop's thread (no commit thread) before any of them returns."""
    service, store, batch, commits = _backlogged(tmp_path, model_dirs, events, backlog=3)
    results = _answer_all(service, batch, tmp_path / "online.sqlite")
    store.close()
    ids = [str(e["transaction_id"]) for e in batch]
    assert commits[0] == 2 * len(batch)  # one commit took every answer's rows (a customer's and a terminal's)
    assert all(n == 0 for n in commits[1:])  # (the stop's final commit: nothing left)
    assert service._group is None
    for (answer, on_disk), event_id in zip(results, ids, strict=True):
        assert answer[0]["fallback"] is False and str(answer[0]["event_id"]) == event_id
        assert on_disk == set(ids)


def test_answers_without_a_backlog_each_commit_their_own_rows(tmp_path: Path, model_dirs: dict[str, Path],
                                                            events: Any) -> None:
    """Alone on the server (backlog 1: this request), an answer writes its rows itself, at once: one commit each,
    and each answer returns with its own event on disk."""
    service, store, batch, commits = _backlogged(tmp_path, model_dirs, events, backlog=1)
    results = _answer_all(service, batch, tmp_path / "online.sqlite")
    store.close()
    ids = [str(e["transaction_id"]) for e in batch]
    assert commits[: len(batch)] == [2] * len(batch)
    for (answer, on_disk), event_id in zip(results, ids, strict=True):
        assert answer[0]["fallback"] is False and event_id in on_disk


def test_a_failed_loop_commit_is_reported_by_every_answer_that_waited_for_it(
        tmp_path: Path, model_dirs: dict[str, Path], events: Any) -> None:
    """Every answer sharing the failed commit still answers (the model's decision: the features were computed),
    counts a store error and leaves the service degraded, naming the store."""
    service, store, batch, commits = _backlogged(tmp_path, model_dirs, events, backlog=3, fail=True)
    results = _answer_all(service, batch, tmp_path / "online.sqlite")
    store.close()
    assert commits[0] == 2 * len(batch)
    assert [answer[0]["fallback"] for answer, _ in results] == [False] * len(batch)
    assert service.metrics.store_errors.labels("update")._value.get() == len(batch)
    assert any("online store update failed: disk I/O error" in r for r in service.readiness())


def test_the_loop_commit_leaves_a_busy_commit_thread_alone_and_waits_for_its_next_flush(
        tmp_path: Path, model_dirs: dict[str, Path], events: Any) -> None:
    """When the loop's commit comes due while the group commit thread writes (it holds the store's writer lock), the
    loop does not block on the lock: the waiting answers get the thread's next flush, and only once it is done."""
    service, store, _, commits = _backlogged(tmp_path, model_dirs, events, backlog=3)

    class BusyGroup:
        def __init__(self) -> None:
            self.busy = True
            self.flushes: list[asyncio.Future[None]] = []

        def request(self) -> asyncio.Future[None]:
            self.flushes.append(asyncio.get_running_loop().create_future())
            return self.flushes[-1]

    group = BusyGroup()

    async def go() -> None:
        service._group = group  # type: ignore[assignment]
        waiting = service._loop_commit()
        await asyncio.sleep(0)  # the loop's commit runs
        assert not waiting.done() and len(group.flushes) == 1 and commits == []
        group.flushes[0].set_result(None)
        await asyncio.sleep(0)
        assert waiting.done() and waiting.exception() is None
        failed = service._loop_commit()
        await asyncio.sleep(0)
        group.flushes[1].set_exception(sqlite3.OperationalError("disk I/O error"))
        await asyncio.sleep(0)
        assert isinstance(failed.exception(), sqlite3.OperationalError)
        service._group = None

    asyncio.run(go())
    store.close()
    assert commits == [0]  # (only the store's own close)
