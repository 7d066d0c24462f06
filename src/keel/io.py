"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Write to a temporary file in the target's folder, flush and fsync, then ``os.replace`` — atomic on POSIX
within one file system. On any error the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on error it vanishes.

    Example::

        with atomic_path("out/scores.parquet") as tmp:
            frame.to_parquet(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def sweep_stale_temporaries(target: str | Path, older_than: float, patterns: tuple[str, ...] = (".{}.*.tmp",)
                            ) -> list[Path]:
    """Delete temporaries beside ``target`` (files or folders matching ``patterns``, ``{}`` = the target's name)
    last modified before ``older_than`` (epoch seconds).

    Every atomic writer here names its temporaries ``.<target name>.<random>.tmp``; one older than the current
    process's start belongs to a run that was killed before it could clean up.
    """
    target = Path(target)
    removed = []
    if target.parent.is_dir():
        for pattern in patterns:
            for leftover in target.parent.glob(pattern.format(target.name)):
                try:
                    if leftover.stat().st_mtime >= older_than:
                        continue
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink()
                    removed.append(leftover)
                except FileNotFoundError:  # another run swept it first
                    pass
    return removed


def process_start_time() -> float:
    """When Keel was imported in this process (epoch seconds); temporaries older than that belong to dead runs."""
    return _IMPORTED


_IMPORTED = time.time()


def swap_into_place(tmp: str | Path, target: str | Path) -> None:
    """Rename ``tmp`` (file or folder) to ``target``, replacing a file or folder there with renames only.

    A folder in the way is first renamed aside, then deleted, so readers see the old or the new, never a mix.
    """
    tmp, target = Path(tmp), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it takes ``target``'s place as a whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | Path, value: Any) -> Path:
    return atomic_write_text(target, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "swap_into_place"]
