"""An answered event is in the online store's file: an answer alone in flight writes it itself, answers in
flight together share a group commit on the commit thread."""

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
