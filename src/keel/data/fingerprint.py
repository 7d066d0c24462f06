"""A content fingerprint of a dataset: the same rows in the same order give the same hash, whatever the file.

Streams the table in Arrow batches, hashes each row with pandas' stable ``hash_pandas_object`` and folds the
row hashes and the schema into one SHA-256. Datetimes are normalised to nanoseconds so that a CSV and a Parquet
copy of the same data agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import pandas as pd
import pyarrow as pa

from keel.data.sources import Source


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    out = {}
    for name, col in frame.items():
        if isinstance(col.dtype, pd.DatetimeTZDtype):
            col = col.dt.tz_convert("UTC").dt.tz_localize(None)
        if pd.api.types.is_datetime64_any_dtype(col.dtype):
            col = col.astype("datetime64[ns]")
        elif pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_integer_dtype(col.dtype):
            col = col.astype("int64")
        elif pd.api.types.is_float_dtype(col.dtype):
            col = col.astype("float64")
        else:
            col = col.astype("string")
        out[name] = col
    return pd.DataFrame(out)


def fingerprint_frames(frames: Iterable[pd.DataFrame]) -> str:
    """SHA-256 over column names, normalised kinds and every row's hash, in order."""
    digest = hashlib.sha256()
    header_done = False
    rows = 0
    for frame in frames:
        norm = _normalise(frame)
        if not header_done:
            header = "|".join(f"{c}:{norm[c].dtype.kind}" for c in norm.columns)
            digest.update(header.encode())
            header_done = True
        digest.update(pd.util.hash_pandas_object(norm, index=False).to_numpy().tobytes())
        rows += len(norm)
    digest.update(f"rows={rows}".encode())
    return digest.hexdigest()


def fingerprint_frame(frame: pd.DataFrame) -> str:
    """Fingerprint of an in-memory table."""
    return fingerprint_frames([frame])


def fingerprint_source(source: Source, columns: Sequence[str] | None = None, batch_rows: int = 500_000) -> str:
    """Fingerprint of a source, streamed (bounded memory)."""
    batches: Iterable[pa.RecordBatch] = source.batches(columns=columns, batch_rows=batch_rows)
    return fingerprint_frames(b.to_pandas() for b in batches)


__all__ = ["fingerprint_frame", "fingerprint_frames", "fingerprint_source"]
