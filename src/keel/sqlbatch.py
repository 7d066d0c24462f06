"""Many rows through one SQLite statement: one statement step (with its reset and AUTOINCREMENT upkeep) per chunk
of rows instead of per row. The online store's commits and the prediction log's writer both insert this way."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any


def execute_chunked(db: sqlite3.Connection, one: str, many: str, rows: Sequence[Sequence[Any]],
                    per_statement: int) -> None:
    """``db.executemany(one, rows)`` in order, in the caller's transaction: whole chunks of ``per_statement`` rows
    through ``many`` (``one`` for that many rows at once: a multi-row VALUES or an ``in (...)`` list), the rest
    through ``one``. Rows of unequal width all go through ``one``: sqlite3 then refuses the bad row instead of its
    values being shifted into its neighbours'."""
    whole = len(rows) - len(rows) % per_statement
    if whole and len(set(map(len, rows))) == 1:
        flat = list(chain.from_iterable(rows[:whole]))
        step = len(rows[0]) * per_statement
        db.executemany(many, [flat[i:i + step] for i in range(0, len(flat), step)])
    else:
        whole = 0
    if whole < len(rows):
        db.executemany(one, rows[whole:])


__all__ = ["execute_chunked"]
