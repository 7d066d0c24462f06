"""The serving core, apart from HTTP: model holder with atomic swap, online features, scoring with a time budget,
fallback, prediction log and metrics. :mod:`keel.serve.app` wires it into FastAPI.

Per event: ``features = store.features(event)``, ``store.stage(event)`` (before any ``await``, so concurrent
requests for the same entity see each other in arrival order, as the offline table does), then the staged events
are written: by the answer itself when it is the only request the server holds (no handoff); when the server holds
others (a backlog), by one commit on the loop's thread once the requests ready now have staged theirs (one SQLite
transaction for all of them); else (batches, the model scoring in the pool) by the store's group commit thread while
the model scores. Either way the answer waits for the write, so an answered event is on disk. The model scores
within ``serving.timeout_ms`` (inline for compiled trees, else in a worker thread); the fallback rule answers when
there is no model, it raises, runs out of time, abstains, or (``features.stale_action = "fallback"``) an entity's
state is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from keel.artifact import DecisionModel
from keel.errors import ServingError
from keel.features.definitions import feature_names, resolve_definitions
from keel.features.online import row_view
from keel.serve import fallback as fb
from keel.serve.metrics import ServiceMetrics
from keel.serve.predlog import PredictionBatch, PredictionLog
from keel.serve.provider import ModelProvider
from keel.serve.schemas import event_fields

log = logging.getLogger("keel.serve")

# Rows per extra timeout_ms a batch gets: scoring 10,000 rows may take longer than one event's budget.
BATCH_ROWS_PER_BUDGET = 1000


# A model scored in the event loop's thread (no thread hop) when it is known fast: LightGBM through compiled trees,
# and at most this many rows. Slower models, and larger batches, score in the worker pool under asyncio's timeout.
INLINE_MAX_ROWS = 256
# Consecutive inline overruns after which a version scores in the pool (where asyncio's timeout can answer on time).
INLINE_OVERRUNS = 3
# With freeze_gc: every this many seconds the young generations are collected and what survived is frozen, so the
# collector never walks the growing online state (a full collection over 540k objects paused the loop 0.7 s).
GC_FREEZE_SECONDS = 10.0
# Answers of at most this many events share the loop's commit under a backlog (see Service._start_commit); larger
# ones commit on the group thread, where SQLite's work on their blocks overlaps the loop's.
LOOP_COMMIT_ROWS = 16


@dataclass(frozen=True)
class LoadedModel:
    """What one swap installs: replaced as a whole, never mutated.

    ``columns`` picks the model's features from the service's feature matrix (None: same order); ``inline``
    says the model may score in the event loop's thread (compiled trees: tens of microseconds per row).
    """

    version: str
    model: DecisionModel
    loaded_at: str
    source: dict[str, Any]
    columns: np.ndarray | None = None
    inline: bool = False
    openmp: Any = None


def _openmp_libraries() -> Any:
    """The OpenMP runtimes loaded in this process (a threadpoolctl selection), or None when there are none."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return None
    selected = ThreadpoolController().select(user_api="openmp")
    return selected if selected.lib_controllers else None


def _limited_scores(model: DecisionModel, x: Any, openmp: Any) -> np.ndarray:
    """``model.scores(x)`` with the calling thread's OpenMP threads capped at ``model.threads`` (0: no cap).

    scikit-learn's gradient boosting opens one OpenMP parallel region per tree, each ending in a barrier; on a busy
    2-core machine a barrier waits for a descheduled thread, and one row of a 200-tree model took 57 ms at the
    median and up to 0.9 s (one thread: 4.4 ms). OpenMP's thread count is per calling thread, so the cap holds
    for this pool thread only, for this call only.
    """
    if openmp is None or not model.threads:
        return model.scores(x)
    with openmp.limit(limits=model.threads):
        return model.scores(x)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _jsonline(**fields: Any) -> str:
    return json.dumps(fields, default=str, separators=(",", ":"))


class _GroupCommit:
    """Group commit: every caller gets a future that completes once a flush that started after its call is done.

    One thread of its own runs the flushes, one at a time; callers arriving meanwhile share the next one. The
    handoff is a condition variable one way and one ``call_soon_threadsafe`` per flush back (no executor
    future chained to an asyncio future per group).
    """

    def __init__(self, flush: Any, name: str = "keel-store-commit") -> None:
        self._flush = flush
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._wake = threading.Condition()
        self._closed = False
        self.busy = False  # a flush is being taken or written (read without a lock: a hint)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def request(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._wake:
            self._waiting.append((loop, future))
            self._wake.notify()
        return future

    def close(self) -> None:
        """Finish the flushes asked for so far, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if not self._waiting:
                    return
                batch, self._waiting = self._waiting, []
                self.busy = True
            error: BaseException | None = None
            try:
                self._flush()
            except BaseException as exc:  # handed to every waiter; the thread goes on
                error = exc
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for loop, future in batch:
                by_loop.setdefault(loop, []).append(future)
            for loop, futures in by_loop.items():
                with contextlib.suppress(RuntimeError):  # a loop closed meanwhile: nobody waits any more
                    loop.call_soon_threadsafe(_settle, futures, error)
            self.busy = False


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class Service:
    """One service instance: call :meth:`start` (async, in the app lifespan) and :meth:`stop` around use.

    ``freeze_gc``: after start, move every object alive (store state, model) out of the garbage collector's
    reach (``gc.freeze``) until stop; for a process that serves, not for a library caller sharing the process.
    """

    def __init__(
        self,
        spec: Any,
        provider: ModelProvider | None,
        *,
        store: Any = None,
        prediction_log: str | None = None,
        metrics: ServiceMetrics | None = None,
        freeze_gc: bool = False,
    ) -> None:
        self.spec = spec
        self.freeze_gc = freeze_gc
        self._frozen = False
        self.provider = provider
        self.alias = getattr(provider, "alias", spec.serving.alias) if provider is not None else spec.serving.alias
        self.metrics = metrics or ServiceMetrics()
        self.timeout = spec.serving.timeout_ms / 1000.0
        self.stale_fallback = spec.features.stale_action == "fallback"
        self.id_column = spec.data.id_column
        self.timestamp = spec.data.timestamp
        self.feature_names = feature_names(resolve_definitions(spec.features, spec.data))
        self.fields = event_fields(spec)
        self.fallback = fb.FallbackRule(spec.fallback_rule, positive_action=spec.decision.positive_action,
                                        negative_action=spec.decision.negative_action)
        self.fallback.check_columns([*self.fields, *self.feature_names])
        self.log_path = spec.store_path(prediction_log or spec.serving.prediction_log)
        self._store = store
        self._owns_store = store is None
        self._store_error: str | None = None
        self._loaded: LoadedModel | None = None
        self._load_error: str | None = None if provider is not None else "no model provider configured"
        self._model_error: str | None = None
        self._reload_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="keel-score")
        self._admin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-reload")
        self._group: _GroupCommit | None = None
        self._in_flight = 0  # answers begun and not finished
        # requests the server has taken in and not answered, this one included (run() reads uvicorn's; None: unknown)
        self.backlog: Callable[[], int] | None = None
        self._loop_pending: asyncio.Future[None] | None = None  # the loop commit scheduled and not yet run
        self._pool_only: set[str] = set()  # versions that overran their budget inline: pool from now on
        self._overruns = 0  # consecutive inline answers over budget
        self._children: dict[tuple[str, Any], Any] = {}  # labelled metric children, by (metric, label)
        self._poller: asyncio.Task[None] | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self.predlog: PredictionLog | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store and the prediction log, load the model, start the alias poller. Never raises for a
        model or store problem: the service starts degraded and the fallback answers."""
        loop = asyncio.get_running_loop()
        if self._store is None:
            try:
                from keel.features.online import OnlineStore

                self._store = await loop.run_in_executor(self._admin, OnlineStore.from_spec, self.spec)
                # Every entity's state in memory now, so first requests do not each pay a load from SQLite.
                await loop.run_in_executor(self._admin, self._store.preload)
            except Exception as exc:  # the service still answers with the fallback
                self._store_error = f"online store unavailable: {exc}"
                log.error(_jsonline(event="store_open_failed", error=str(exc)))
        self.predlog = PredictionLog(self.log_path, flush_rows=self.spec.serving.log_flush_rows,
                                     flush_ms=self.spec.serving.log_flush_ms,
                                     process=self.spec.serving.log_writer == "process",
                                     batch_segments=self.spec.serving.log_batch_segments).start()
        if self.provider is not None:
            try:
                await loop.run_in_executor(self._admin, self.reload)
            except Exception as exc:
                log.error(_jsonline(event="model_load_failed", error=str(exc)))
            interval = self.spec.serving.reload_interval_seconds
            if interval > 0:
                self._poller = asyncio.create_task(self._poll(interval), name="keel-model-poller")
        if self.freeze_gc:
            # The preloaded store and the model are hundreds of thousands of long-lived objects; frozen, the
            # collector never walks them again (a full collection over them paused requests for tens of ms).
            gc.collect()
            gc.freeze()
            self._frozen = True
            self._gc_task = asyncio.create_task(self._freeze_survivors(GC_FREEZE_SECONDS), name="keel-gc-freeze")

    async def stop(self) -> None:
        """Stop polling, flush the prediction log (nothing queued is lost), close what the service opened."""
        if self._gc_task is not None:
            self._gc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gc_task
            self._gc_task = None
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
            self._poller = None
        if self.predlog is not None:
            self.predlog.close()
        if self._group is not None:
            self._group.close()
            self._group = None
        commit = getattr(self._store, "commit_staged", None)
        if commit is not None:
            with contextlib.suppress(Exception):  # a failed last write is logged by the request that waited
                commit()
        if self._owns_store and self._store is not None:
            with contextlib.suppress(Exception):  # closing a broken store must not block shutdown
                self._store.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._admin.shutdown(wait=False, cancel_futures=True)
        if self._frozen:
            gc.unfreeze()
            self._frozen = False

    @staticmethod
    async def _freeze_survivors(interval: float) -> None:
        """Collect the young generations (cheap: recent objects only), then freeze the survivors: new online state
        joins the frozen objects instead of growing a generation a full collection would walk. Cyclic garbage
        only becomes unreachable in the frozen set if it outlived two young collections first (rare: requests
        free their objects by reference counting)."""
        while True:
            await asyncio.sleep(interval)
            gc.collect(1)
            gc.freeze()

    async def _poll(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(self._admin, self.reload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(_jsonline(event="model_poll_failed", alias=self.alias, error=str(exc)))

    # --- model -----------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def _check_model(self, model: DecisionModel) -> None:
        missing = [n for n in model.feature_names if n not in self.feature_names]
        if missing:
            raise ServingError(
                f"The model reads features {missing} that this spec's [features] does not define.",
                hint="Serve it with the spec it was trained with, or retrain on the current features.",
            )
        # A model that cannot score one row is refused before it replaces a working one.
        row = np.zeros((1, len(model.feature_names)))
        warm = model.scores(pd.DataFrame(row, columns=model.feature_names) if model.categories else row)
        if warm.shape != (1,):
            raise ServingError(f"The model returned {warm.shape} scores for one row.")

    def reload(self, force: bool = False) -> tuple[str | None, str | None, bool]:
        """Follow the provider: load the current version fully, then swap one reference. Returns
        ``(previous, current, changed)``. Raises (and keeps serving the old model) when the new one fails."""
        if self.provider is None:
            raise ServingError("This service has no model provider to reload from.")
        with self._reload_lock:
            previous = self._loaded.version if self._loaded else None
            try:
                label = self.provider.resolve()
                if label is None:
                    raise ServingError(f"The model source {self.provider!r} points at no model version.",
                                       hint="Promote a version to the alias, or check --model PATH.")
                if label == previous and not force:
                    self.metrics.reloads.labels("unchanged").inc()
                    return previous, previous, False
                model = self.provider.load(label)
                self._check_model(model)
                source = self.provider.describe(label)
            except Exception as exc:
                self.metrics.reloads.labels("failed").inc()
                if self._loaded is None:
                    self._load_error = f"model could not be loaded: {exc}"
                log.error(_jsonline(event="model_reload_failed", alias=self.alias, previous=previous,
                                    error=str(exc)))
                raise
            columns = None
            if list(model.feature_names) != self.feature_names:
                columns = np.array([self.feature_names.index(n) for n in model.feature_names], dtype=np.intp)
            inline = model.kind == "lightgbm" and not model.categories and model.compiled() is not None
            # Looked up after the load: the model's own OpenMP runtime (scikit-learn's, LightGBM's) is in by now.
            openmp = None if inline else _openmp_libraries()
            # the swap: one reference
            self._loaded = LoadedModel(label, model, _now_iso(), source, columns, inline, openmp)
            self._load_error = None
            self._model_error = None
            self.metrics.reloads.labels("swapped").inc()
            if previous is not None:
                self.metrics.model_info.remove(previous)
            self.metrics.model_info.labels(label).set(1)
            log.info(_jsonline(event="model_swapped", alias=self.alias, previous=previous, version=label))
            return previous, label, label != previous

    # --- health ----------------------------------------------------------------------------------------------
    def readiness(self) -> list[str]:
        """Reasons the service is degraded (empty: ready)."""
        reasons = []
        if self._loaded is None:
            reasons.append(self._load_error or "no model loaded")
        elif self._model_error:
            reasons.append(self._model_error)
        if self._store is None or self._store_error:
            reasons.append(self._store_error or "online store not open")
        return reasons

    # --- scoring ---------------------------------------------------------------------------------------------
    def _features_one(self, event: Mapping[str, Any]) -> tuple[dict[str, float] | None, bool, bool]:
        """(features, stale, staged) of one event, for a store without ``features_many``."""
        store = self._store
        if store is None:
            return None, False, False
        try:
            row = store.features(event)
        except Exception as exc:
            self._store_failed("features", exc)
            return None, False, False
        stage = getattr(store, "stage", None)
        try:
            if stage is not None:
                stage(event)
            else:
                store.update(event)
        except Exception as exc:
            self._store_failed("update", exc)
            staged = False
        else:
            self._store_error = None
            staged = stage is not None
        return dict(row), bool(getattr(row, "stale", False)), staged

    def _features(self, events: Sequence[Mapping[str, Any]], cols: Mapping[str, Any] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """(matrix in ``feature_names`` order, stale, failed, staged) for events in order; each event sees the
        earlier ones (features, then staged for the group commit, before any ``await``). ``cols``: the same
        events as a column batch (:mod:`keel.serve.columns`), for a store that reads columns."""
        n = len(events)
        store = self._store
        many = getattr(store, "features_many", None)
        if many is not None and getattr(store, "feature_names", None) == self.feature_names:
            by_columns = getattr(store, "features_columns", None) if cols is not None else None
            try:
                batch = many(events, stage=True) if by_columns is None else by_columns(cols, stage=True)
            except Exception as exc:
                self._store_failed("features", exc)
                return np.full((n, len(self.feature_names)), math.nan), np.zeros(n, bool), np.ones(n, bool), False
            for _, op, error in batch.errors:
                self._store_failed(op, error)
            if not batch.errors:
                self._store_error = None
            return batch.matrix, batch.stale, batch.failed, not _all(batch.failed)
        matrix = np.full((n, len(self.feature_names)), math.nan)
        stale = np.zeros(n, bool)
        failed = np.zeros(n, bool)
        staged = False
        for i, event in enumerate(events):
            f, st, g = self._features_one(event)
            if f is None:
                failed[i] = True
            else:
                matrix[i] = [f.get(name, math.nan) for name in self.feature_names]
            stale[i] = st
            staged = staged or g
        return matrix, stale, failed, staged

    def _start_commit(self, staged: bool, rows: int) -> asyncio.Future[None] | None:
        """Write what the features staged for an answer of ``rows`` events; the answer awaits the returned future.

        - The server holds other requests (a backlog: uvicorn's count, :attr:`backlog`) and the answer is small:
          the loop's commit, one transaction on the loop's thread for every answer that staged before it runs
          (:meth:`_loop_commit`). A commit per request cost the loop's thread more than its SQLite work: at 16
          connections, closed loop, sharing it served 17-22% more requests per second (4,226-4,294 against
          3,470-3,663), and the open-loop p99 at 2,000-3,000 req/s did not grow.
        - Alone in flight: here, at once (the lowest latency: no handoff, no extra turn of the loop).
        - Else (a batch under load, the model scoring in the pool): the group commit thread, while the model
          scores. Not for small answers under a backlog: there the thread waited for the GIL at the loop's switch
          interval and the latency tail grew (docs/dev/commit-off-the-loop.md).
        """
        if not staged:
            return None
        group = self._group
        if group is not None and group.busy:
            return self._commit()
        backlog = self.backlog
        if rows <= LOOP_COMMIT_ROWS and (self._loop_pending is not None or (backlog is not None and backlog() > 1)):
            return self._loop_commit()
        if self._in_flight == 1:
            try:
                self._store.commit_staged()  # type: ignore[union-attr]
            except Exception as exc:
                self._store_failed("update", exc)
            return None
        return self._commit()

    def _loop_commit(self) -> asyncio.Future[None]:
        """The future of the loop's next commit, scheduled by the first answer to ask: it runs after the callbacks
        ready now (the other requests' answers, each staging its rows first) and writes all they staged."""
        future = self._loop_pending
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._loop_pending = loop.create_future()
            loop.call_soon(self._run_loop_commit)
        return future

    def _run_loop_commit(self) -> None:
        future, self._loop_pending = self._loop_pending, None
        assert future is not None  # (scheduled once per future, by _loop_commit)
        group = self._group
        if group is not None and group.busy:  # its flush holds the store's writer lock: do not block the loop
            group.request().add_done_callback(lambda done: _settle([future], done.exception()))
            return
        try:
            self._store.commit_staged()  # type: ignore[union-attr]
        except Exception as exc:  # each waiting answer reports it
            _settle([future], exc)
        else:
            _settle([future], None)

    async def _end_commit(self, commit: asyncio.Future[None] | None) -> None:
        if commit is not None:
            try:
                await commit
            except Exception as exc:
                self._store_failed("update", exc)

    def _commit(self) -> asyncio.Future[None]:
        if self._group is None:
            self._group = _GroupCommit(self._store.commit_staged)  # type: ignore[union-attr]
        return self._group.request()

    def _store_failed(self, op: str, exc: Exception) -> None:
        self.metrics.store_errors.labels(op).inc()
        self._store_error = f"online store {op} failed: {exc}"
        log.error(_jsonline(event="store_failed", op=op, error=str(exc)))

    async def _score(self, loaded: LoadedModel, matrix: np.ndarray) -> tuple[Any, str | None]:
        """Scores of the rows, or (None, fallback reason). A known-fast model scores inline, timed: over its budget
        its answer is dropped like a timed-out one and the version scores in the worker pool from then on."""
        model = loaded.model
        n = matrix.shape[0]
        x: Any = matrix if loaded.columns is None else matrix[:, loaded.columns]
        if model.categories:
            x = pd.DataFrame(x, columns=model.feature_names)
        budget = self.timeout * max(1, math.ceil(n / BATCH_ROWS_PER_BUDGET))
        try:
            if loaded.inline and n <= INLINE_MAX_ROWS and loaded.version not in self._pool_only:
                t0 = time.perf_counter()
                scores = model.scores(x)
                if time.perf_counter() - t0 > budget:
                    self._overruns += 1
                    if self._overruns >= INLINE_OVERRUNS:  # not one preemption on a busy machine: a slow model
                        self._pool_only.add(loaded.version)
                        log.warning(_jsonline(event="model_scores_in_pool", version=loaded.version))
                    raise TimeoutError
                self._overruns = 0
            else:
                loop = asyncio.get_running_loop()
                scores = await asyncio.wait_for(
                    loop.run_in_executor(self._pool, _limited_scores, model, x, loaded.openmp), budget)
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
            if scores.shape[0] != n:
                raise ServingError(f"The model returned {scores.shape[0]} scores for {n} rows.")
        except TimeoutError:
            self._model_error = f"model exceeded serving.timeout_ms ({self.spec.serving.timeout_ms:g} ms)"
            log.warning(_jsonline(event="model_timeout", budget_ms=budget * 1000, rows=n))
            return None, fb.MODEL_TIMEOUT
        except Exception as exc:
            self._model_error = f"model failed: {type(exc).__name__}: {exc}"
            log.error(_jsonline(event="model_error", error=f"{type(exc).__name__}: {exc}", rows=n))
            return None, fb.MODEL_ERROR
        self._model_error = None
        return scores, None

    async def answer(self, events: Sequence[Mapping[str, Any]], request_id: str, *, endpoint: str,
                     started: float) -> list[dict[str, Any]]:
        """Decisions for events, in order; never raises for a valid event (the fallback answers instead).

        A batch is answered as its events would be one by one, in order (each sees the earlier ones), with one
        pass over the online store, one model call on the feature matrix and one prediction-log append.
        """
        self._in_flight += 1
        try:
            return await self._answer(events, request_id, endpoint=endpoint, started=started)
        finally:
            self._in_flight -= 1

    async def _answer(self, events: Sequence[Mapping[str, Any]], request_id: str, *, endpoint: str,
                      started: float) -> list[dict[str, Any]]:
        n = len(events)
        matrix, stale, failed, staged = self._features(events)
        commit = self._start_commit(staged, n)
        loaded = self._loaded  # one read: the whole request uses one model even if a swap happens meanwhile
        scores: list[float | None] = [None] * n
        reasons: list[str | None] = [None] * n
        decisions: list[str | None] = [None] * n
        if loaded is None:
            reasons = [fb.MODEL_UNAVAILABLE] * n
        else:
            any_failed = _any(failed)
            ok = np.flatnonzero(~failed).tolist() if any_failed else range(n)
            if any_failed:
                for i in np.flatnonzero(failed).tolist():
                    reasons[i] = fb.FEATURES_UNAVAILABLE
            if len(ok):
                result, reason = await self._score(loaded, matrix[ok] if any_failed else matrix)
                if result is None:
                    for i in ok:
                        reasons[i] = reason
                else:
                    actions = loaded.model.decide(result).tolist()
                    values = result.tolist()
                    abstain_falls_back = bool(self.fallback.expression)
                    for j, i in enumerate(ok):
                        value = values[j]
                        if not math.isfinite(value):
                            reasons[i] = fb.MODEL_ERROR
                            continue
                        scores[i] = value
                        action = decisions[i] = str(actions[j])
                        if action == "abstain" and abstain_falls_back:
                            reasons[i] = fb.ABSTAIN
        stale_list: list[bool] = stale.tolist()
        if self.stale_fallback:
            for i in range(n):
                if stale_list[i] and reasons[i] is None:
                    reasons[i] = fb.STALE_FEATURES
        names = self.feature_names
        rows: list[list[float]] = matrix.tolist()
        failed_list: list[bool] = failed.tolist()
        feats: list[dict[str, float] | None] = [
            None if failed_list[i] else dict(zip(names, rows[i], strict=True)) for i in range(n)]
        need = [i for i in range(n) if reasons[i] is not None]
        if need:
            answers = self.fallback.decide([{**events[i], **(feats[i] or {})} for i in need])
            for i, action in zip(need, answers, strict=True):
                decisions[i] = action
        await self._end_commit(commit)
        latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
        version = loaded.version if loaded else None
        now = datetime.now(UTC)
        id_column = self.id_column
        single = endpoint == "predict"
        out = [{
            "request_id": request_id if single else f"{request_id}.{i}",
            "event_id": events[i].get(id_column) if id_column else None, "score": scores[i],
            "decision": decisions[i], "model_version": version, "fallback": reasons[i] is not None,
            "fallback_reason": reasons[i], "stale": stale_list[i], "latency_ms": latency_ms,
        } for i in range(n)]
        self._count(scores, reasons, decisions, stale_list)
        if self.predlog is not None:
            # One queue item for the whole request; the log's writer (its process) turns records into rows.
            ts = self.timestamp
            self.predlog.append_many([{
                **item, "item": i, "time": now, "endpoint": endpoint,
                "event_time": events[i].get(ts) if ts else None, "inputs": events[i], "features": feats[i],
            } for i, item in enumerate(out)])
        return out

    async def answer_columns(self, n: int, cols: Mapping[str, Any], request_id: str, *,
                             started: float) -> list[dict[str, Any]]:
        """:meth:`answer` for a batch already validated as columns (:mod:`keel.serve.columns`): the same answers,
        log rows and metrics, computed column-wise (one array operation per step instead of one per event)."""
        self._in_flight += 1
        try:
            return await self._answer_columns(n, cols, request_id, started=started)
        finally:
            self._in_flight -= 1

    async def _answer_columns(self, n: int, cols: Mapping[str, Any], request_id: str, *,
                              started: float) -> list[dict[str, Any]]:
        events = _LazyRows(n, cols, self.timestamp)
        matrix, stale, failed, staged = self._features(events, cols)
        commit = self._start_commit(staged, n)
        loaded = self._loaded
        scores = np.full(n, math.nan)
        reasons = np.full(n, None, dtype=object)
        decisions = np.full(n, None, dtype=object)
        if loaded is None:
            reasons[:] = fb.MODEL_UNAVAILABLE
        else:
            reasons[failed] = fb.FEATURES_UNAVAILABLE
            ok = np.flatnonzero(~failed)
            if ok.size:
                result, reason = await self._score(loaded, matrix if ok.size == n else matrix[ok])
                if result is None:
                    reasons[ok] = reason
                else:
                    finite = np.isfinite(result)
                    reasons[ok[~finite]] = fb.MODEL_ERROR
                    scored = ok[finite]
                    scores[scored] = result[finite]
                    actions = loaded.model.decide(result[finite])
                    decisions[scored] = actions
                    if self.fallback.expression:
                        reasons[scored[actions == "abstain"]] = fb.ABSTAIN
        if self.stale_fallback:
            reasons[stale & np.equal(reasons, None)] = fb.STALE_FEATURES
        need = np.flatnonzero(np.not_equal(reasons, None))
        if need.size:
            names = self.feature_names
            decisions[need] = self.fallback.decide([
                {**events[i], **({} if failed[i] else dict(zip(names, matrix[i].tolist(), strict=True)))}
                for i in need.tolist()])
        await self._end_commit(commit)
        latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
        version = loaded.version if loaded else None
        ids = cols[self.id_column] if self.id_column else None
        score_list = scores.tolist()
        if need.size:  # a score is NaN only where a fallback reason is set
            score_list = [None if v != v else v for v in score_list]
        reason_list = reasons.tolist()
        decision_list = decisions.tolist()
        stale_list = stale.tolist()
        out = [{"request_id": f"{request_id}.{i}", "event_id": event_id, "score": score, "decision": decision,
                "model_version": version, "fallback": reason is not None, "fallback_reason": reason,
                "stale": st, "latency_ms": latency_ms}
               for i, (event_id, score, decision, reason, st) in enumerate(
                   zip([None] * n if ids is None else ids, score_list, decision_list, reason_list, stale_list,
                       strict=True))]
        self._count(score_list, reason_list, decision_list, stale_list)
        if self.predlog is not None:
            self.predlog.append_columns(PredictionBatch(
                request_id=request_id, endpoint="batch", time=datetime.now(UTC), inputs=cols,
                event_ids=ids, timestamp=self.timestamp,
                scores=scores, decisions=decision_list, model_version=version, fallback_reasons=reason_list,
                stale=stale, latency_ms=latency_ms, features=matrix, feature_names=self.feature_names,
                failed=failed))
        return out

    def _count(self, scores: Sequence[float | None], reasons: Sequence[str | None],
               decisions: Sequence[str | None], stale: Sequence[bool]) -> None:
        """Metrics of one request's answers: one increment per distinct label, one observation per score."""
        m = self.metrics
        m.events.inc(len(scores))
        if len(scores) == 1:
            if scores[0] is not None:
                m.scores.observe(scores[0])
        else:
            values = np.array(scores, dtype=np.float64)  # (None reads as NaN: the events no model scored)
            m.scores.observe_many(values[~np.isnan(values)])
        children = self._children
        if len(scores) == 1:  # one event: no Counter to build
            counts: Any = ((("fallbacks", reasons[0]), 1),) if reasons[0] is not None else ()
            counts = (*counts, (("decisions", decisions[0]), 1))
        else:  # (Counter counts a list in C; the keys are labelled after)
            counts = [*((("fallbacks", r), k) for r, k in Counter(reasons).items() if r is not None),
                      *((("decisions", d), k) for d, k in Counter(decisions).items())]
        for key, k in counts:
            child = children.get(key)
            if child is None:  # labelled children cached: .labels() takes a lock and builds a key each time
                child = children[key] = getattr(m, key[0]).labels(key[1])
            child.inc(k)
        if any(stale):
            m.stale.inc(sum(stale))

    def add_labels(self, labels: Sequence[tuple[Any, float, datetime | None]]) -> tuple[int, int]:
        """Feed late labels to the online store (label features) and the prediction log (monitoring)."""
        now = datetime.now(UTC).replace(tzinfo=None)
        rows = [(event_id, label, at or now) for event_id, label, at in labels]
        known = 0
        if self._store is not None:
            for event_id, label, at in rows:
                try:
                    known += bool(self._store.add_label(event_id, label, at))
                except Exception as exc:
                    self._store_failed("add_label", exc)
                    break
        if self.predlog is not None:
            self.predlog.add_labels(rows)
        self.metrics.labels.inc(len(rows))
        return len(rows), known

    def model_description(self) -> dict[str, Any]:
        loaded = self._loaded
        base: dict[str, Any] = {"version": None, "alias": self.alias, "fallback_rule": self.fallback.expression}
        if loaded is None:
            return base
        model = loaded.model
        meta = model.metadata or {}
        training = {k: meta[k] for k in ("data_source", "data_fingerprint", "windows", "definitions_hash",
                                          "spec_hash", "project", "protocol") if k in meta}
        metrics = meta.get("test_metrics", meta.get("metrics", {}))
        return {
            **base, "version": loaded.version, "kind": model.kind, "threshold": model.threshold,
            "abstain_band": model.abstain_band, "positive_action": model.positive_action,
            "negative_action": model.negative_action, "feature_names": list(model.feature_names),
            "training_data": training, "metrics": metrics if isinstance(metrics, dict) else {},
            "source": loaded.source, "loaded_at": loaded.loaded_at,
        }


def _any(mask: np.ndarray) -> bool:
    """``mask.any()`` without a numpy reduction for the few-event case (a reduction costs microseconds)."""
    return any(mask.tolist()) if mask.size <= 16 else bool(mask.any())


def _all(mask: np.ndarray) -> bool:
    return all(mask.tolist()) if mask.size <= 16 else bool(mask.all())


class _LazyRows(Sequence[dict[str, Any]]):
    """The events of a column batch as rows, built only if a reader asks (a store without ``features_columns``, the
    fallback rule, the log's row path): the column path never needs them."""

    def __init__(self, n: int, cols: Mapping[str, Any], timestamp: str | None) -> None:
        self.n, self.cols, self.timestamp = n, cols, timestamp
        self._rows: list[dict[str, Any]] | None = None

    def _all(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = row_view(self.n, self.cols, self.timestamp)
        return self._rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        return self._all()[i]


__all__ = ["LoadedModel", "Service"]
