"""The prediction log's writer process: :class:`keel.serve.predlog.PredictionLog` with ``process=True`` hands its
records to a process of its own, so turning them into rows (JSON text, ISO times, segments) and SQLite's inserts do
not take the serving process's GIL.

Parent side (in :mod:`keel.serve.predlog`): a sender thread takes the queue every few milliseconds and sends each
group of items as one pickle over a pipe; a receiver thread reads the child's acknowledgements. Child side
(:func:`child_main`): receives the groups, batches them into transactions by ``flush_rows``/``flush_ms`` (or at
once for a flush), writes them with the same code as the in-process writer and acknowledges each write.

Wire format, parent -> child: a frame per group, :data:`HEADER` (message number, rows, flush, stop) followed by the
pickle (protocol 5) of the group's queue items. Child -> parent: :data:`ACK` (the last message number written,
rows written and failures so far, cumulative over the child's life).

The child is started with ``subprocess`` (a fresh interpreter: the serving process has threads and is never
forked as is), imports only the writer's modules (not :mod:`keel.serve`'s web stack), ignores SIGINT/SIGTERM (the
service's shutdown closes the pipe, which is its signal to finish) and exits when the pipe reaches EOF, after
writing everything it received: a parent killed with SIGKILL leaves no orphan behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<qqBB")  # message number, rows, flush (write now), stop (write, close, exit)
ACK = struct.Struct("<qqq")  # last message number written, rows written, failures (the child's totals)
PIPE_BYTES = 1 << 20  # the data pipe's capacity when the kernel allows it (the sender blocks less often)
_F_SETPIPE_SZ = 1031

# Runs in the child: ``keel.serve`` as a bare package (its __init__ imports the web app), then the writer.
_BOOT = (
    "import os, sys, types\n"
    "import keel\n"
    "serve = types.ModuleType('keel.serve')\n"
    "serve.__path__ = [os.path.join(os.path.dirname(keel.__file__), 'serve')]\n"
    "sys.modules['keel.serve'] = serve\n"
    "from keel.serve.logwriter import child_main\n"
    "child_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])\n"
)


def item_rows(item: Any) -> int:
    """How many rows (or labels) a queue item of :class:`~keel.serve.predlog.PredictionLog` stands for."""
    kind, payload = item
    if kind == "P":
        return len(payload)
    if kind == "C":
        return int(payload.n)
    if kind == "c":  # (n, the pickled PredictionBatch)
        return int(payload[0])
    return 1 if kind in ("p", "l") else 0


def spawn(config: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Connection, Connection]:
    """Start a writer child for ``config`` (path, flush_rows, flush_ms, segment_rows, batch_segments). Returns the process, the
    connection to send frames on and the connection acknowledgements arrive on."""
    data_r, data_w = os.pipe()
    ack_r, ack_w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(data_w, _F_SETPIPE_SZ, PIPE_BYTES)
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(data_r), str(ack_w), json.dumps(config)],
            pass_fds=(data_r, ack_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    except BaseException:
        for fd in (data_r, data_w, ack_r, ack_w):
            os.close(fd)
        raise
    os.close(data_r)
    os.close(ack_w)
    return proc, Connection(data_w, readable=False), Connection(ack_r, writable=False)


def frame(number: int, rows: int, items: list[Any], *, flush: bool, stop: bool) -> bytes:
    """One message: header and the pickle of ``items`` (protocol 5: numpy arrays as one copy of their bytes)."""
    return HEADER.pack(number, rows, flush, stop) + pickle.dumps(items, protocol=5)


def child_main(data_fd: int, ack_fd: int, config_text: str) -> None:
    """The writer child's loop (see the module docstring). Returns when the parent stops it or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import logging

    from keel.serve import predlog

    log = logging.getLogger("keel.serve.predlog")
    _bind_directly()
    config = json.loads(config_text)
    predlog._pause = _no_pause  # nobody else to let in: the writer is this process's only thread
    writer = predlog.PredictionLog(config["path"], flush_rows=config["flush_rows"], flush_ms=config["flush_ms"],
                                   segment_rows=config["segment_rows"],
                                   batch_segments=config.get("batch_segments", False))  # not started: writes here
    rx = Connection(data_fd, writable=False)
    tx = Connection(ack_fd, readable=False)
    items: list[Any] = []
    rows = 0
    due: float | None = None  # when the oldest item waiting must be written (flush_ms after it came)
    last = -1  # the last message number received
    acked = -1
    while True:
        end = now = False
        if items and (rows >= writer.flush_rows or time.monotonic() >= (due or 0.0)):
            now = True
        elif rx.poll(None if due is None else max(0.0, due - time.monotonic())):
            try:
                data = rx.recv_bytes()
            except (EOFError, OSError):  # the parent closed the pipe or died: write what came, exit
                end = True
            else:
                number, count, flush, stop = HEADER.unpack_from(data)
                last = number
                try:
                    got = pickle.loads(memoryview(data)[HEADER.size:])
                except Exception as exc:  # (a record's class the child cannot import)
                    writer.failures += count
                    log.error(json.dumps({"event": "predlog_message_invalid", "rows": count, "error": repr(exc)}))
                    got = []
                if got:
                    items.extend(_unpickled(got, writer, log))
                    rows += count
                    if due is None:
                        due = time.monotonic() + writer.flush_seconds
                end = bool(stop)
                now = bool(flush) or end
                if not now and rows < writer.flush_rows:
                    continue
        else:  # flush_ms passed since the oldest item came
            now = True
        if items:
            writer._write(items)
            items, rows, due = [], 0, None
        if end:
            writer.close()  # the pending rows' segment, then the connection
        if now or end or last != acked:
            with contextlib.suppress(OSError):
                tx.send_bytes(ACK.pack(last, writer.written, writer.failures))
            acked = last
        if end:
            return


def _unpickled(items: list[Any], writer: Any, log: Any) -> list[Any]:
    """The queue items with each column batch pickled at append time (``("c", (n, bytes))``) loaded again."""
    if not any(kind == "c" for kind, _ in items):
        return items
    out = []
    for kind, payload in items:
        if kind == "c":
            try:
                out.append(("C", pickle.loads(payload[1])))
            except Exception as exc:
                writer.failures += int(payload[0])
                log.error(json.dumps({"event": "predlog_message_invalid", "rows": payload[0], "error": repr(exc)}))
            continue
        out.append((kind, payload))
    return out


def _bind_directly() -> None:
    """Make sqlite3 bind ``None`` (NULL) and ``bytes`` (BLOB) without its adaptation lookup.

    The sqlite3 module binds int, float and str as they are, but looks for an adapter (and for ``__adapt__`` and
    ``__conform__``, raising and clearing an AttributeError) before binding any other value: ~1,800 instructions
    for each NULL and blob of a row, two per logged row (its fallback reason, its feature blob). Registered here,
    in the writer process only: the same values bound (an identity adapter each), found with one dict lookup."""
    import sqlite3

    sqlite3.register_adapter(type(None), {}.get)  # {}.get(None) is None: bound as NULL, as without an adapter
    sqlite3.register_adapter(bytes, bytes)  # bytes(b) is b


def _no_pause() -> None:
    return None
