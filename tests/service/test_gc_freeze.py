"""A serving process freezes its long-lived objects out of the garbage collector's walks, and unfreezes at stop."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from conftest import make_spec
from keel.serve import PathProvider, create_app
from keel.serve.service import Service


def test_freeze_gc_freezes_after_startup_and_unfreezes_at_stop(tmp_path: Path, model_dirs: dict[str, Path],
                                                               event: dict[str, Any]) -> None:
    gc.unfreeze()
    with TestClient(create_app(make_spec(tmp_path / "plain"), PathProvider(model_dirs["a"]))) as client:
        assert client.post("/v1/predict", json=event).status_code == 200
        assert gc.get_freeze_count() == 0  # a library caller's process is left alone
    with TestClient(create_app(make_spec(tmp_path / "frozen"), PathProvider(model_dirs["a"]),
                               freeze_gc=True)) as client:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the model, the store, the app
        assert client.post("/v1/predict", json=event).status_code == 200
    assert gc.get_freeze_count() == 0


def test_survivors_of_young_collections_join_the_frozen_objects() -> None:
    async def go() -> tuple[int, int]:
        gc.unfreeze()
        task = asyncio.create_task(Service._freeze_survivors(0.0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        before = gc.get_freeze_count()
        kept = [{"state": [i]} for i in range(5000)]  # new long-lived (tracked) objects
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        after = gc.get_freeze_count()
        task.cancel()
        gc.unfreeze()
        assert len(kept) == 5000
        return before, after

    before, after = asyncio.run(go())
    assert after >= before + 10_000
