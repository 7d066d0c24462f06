"""Reading tables through DuckDB: CSV, Parquet (file or glob) and DuckDB database tables.

One entry point, :func:`open_source`, turns what the spec says into a :class:`Source`; every reader works on a
DuckDB relation built from it, so large files are streamed and filtered in DuckDB before they reach pandas.

Example::

    src = open_source("data/transactions.parquet")
    schema = src.schema()                    # {'tx_amount': 'DOUBLE', ...}
    frame = src.read(columns=["tx_amount"])  # pandas DataFrame
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
import pandas as pd
import pyarrow as pa

from keel.errors import DataError
from keel.spec import Spec

Format = Literal["csv", "parquet", "duckdb"]
_SUFFIXES: dict[str, Format] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".duckdb": "duckdb",
    ".db": "duckdb",
}


def quote_identifier(name: str) -> str:
    """Quote a column or table name for DuckDB SQL."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class Source:
    """A readable table: ``path`` (file, glob or database), its ``format`` and, for DuckDB, its ``table``."""

    path: str
    format: Format
    table: str | None = None

    @property
    def files(self) -> list[str]:
        """The files the source covers now (a glob may match several)."""
        return sorted(globlib.glob(self.path)) if _is_glob(self.path) else [self.path]

    def describe(self) -> str:
        return f"{self.path}" + (f" (table {self.table})" if self.table else "")

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A fresh in-memory DuckDB connection with this source reachable as the view ``source``."""
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
        try:
            if self.format == "duckdb":
                con.execute(f"ATTACH {_literal(self.path)} AS src (READ_ONLY)")
                con.execute(f"CREATE VIEW source AS SELECT * FROM src.{quote_identifier(self.table or '')}")
            elif self.format == "parquet":
                con.execute(f"CREATE VIEW source AS SELECT * FROM read_parquet({_literal(self.path)})")
            else:
                con.execute(
                    f"CREATE VIEW source AS SELECT * FROM read_csv({_literal(self.path)}, auto_detect=true,"
                    " sample_size=-1)"
                )
        except duckdb.Error as exc:
            con.close()
            raise DataError(
                f"Cannot read {self.describe()} as {self.format}: {_first_line(exc)}.",
                hint="Check that the file is a valid table of that format (or set data.format in keel.toml).",
            ) from exc
        return con

    def schema(self) -> dict[str, str]:
        """Column name -> DuckDB type name, in file order."""
        with self.connect() as con:
            rows = con.execute("DESCRIBE SELECT * FROM source").fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def sql(self, query: str, params: Sequence[object] | None = None) -> pd.DataFrame:
        """Run a query against the view ``source`` and return a DataFrame."""
        with self.connect() as con:
            try:
                return con.execute(query, params or []).df()
            except duckdb.Error as exc:
                raise DataError(f"Query on {self.describe()} failed: {_first_line(exc)}.") from exc

    def read(
        self,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        order_by: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Read (some columns of) the table into pandas, optionally filtered and ordered in DuckDB."""
        if columns is not None:
            require_columns(self, columns)
        return self.sql(_select(columns, where, order_by))

    def count(self) -> int:
        with self.connect() as con:
            row = con.execute("SELECT count(*) FROM source").fetchone()
        return int(row[0]) if row else 0

    def batches(
        self,
        columns: Sequence[str] | None = None,
        batch_rows: int = 1_000_000,
        where: str | None = None,
        order_by: Sequence[str] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream the table as Arrow record batches of at most ``batch_rows`` rows (bounded memory)."""
        if columns is not None:
            require_columns(self, columns)
        con = self.connect()
        try:
            reader = con.sql(_select(columns, where, order_by)).to_arrow_reader(batch_rows)
            yield from reader
        except duckdb.Error as exc:
            raise DataError(f"Reading {self.describe()} failed: {_first_line(exc)}.") from exc
        finally:
            con.close()


def _select(columns: Sequence[str] | None, where: str | None, order_by: Sequence[str] | None) -> str:
    cols = ", ".join(quote_identifier(c) for c in columns) if columns else "*"
    query = f"SELECT {cols} FROM source"
    if where:
        query += f" WHERE {where}"
    if order_by:
        query += " ORDER BY " + ", ".join(quote_identifier(c) for c in order_by)
    return query


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def open_source(
    path: str | Path,
    format: Literal["auto", "csv", "parquet", "duckdb"] = "auto",
    table: str | None = None,
) -> Source:
    """Check that ``path`` exists (a glob must match), work out its format, and return a :class:`Source`."""
    text = str(path)
    if _is_glob(text):
        matches = sorted(globlib.glob(text))
        if not matches:
            raise DataError(
                f"The data source glob {text} matches no file.",
                hint="Check data.source in keel.toml (relative paths start at the spec's folder).",
            )
        probe = matches[0]
    else:
        if not Path(text).exists():
            raise DataError(
                f"The data source {text} does not exist.",
                hint="Check data.source in keel.toml (relative paths start at the spec's folder).",
            )
        if Path(text).is_dir():
            raise DataError(
                f"The data source {text} is a folder.",
                hint="Name a file, or a glob such as 'folder/*.parquet'.",
            )
        probe = text
    fmt: Format
    if format == "auto":
        suffix = Path(probe).suffix.lower()
        if suffix not in _SUFFIXES:
            raise DataError(
                f"Cannot tell the format of {text} from its extension {suffix or '(none)'}.",
                hint="Use .csv, .parquet or .duckdb, or set data.format in keel.toml.",
            )
        fmt = _SUFFIXES[suffix]
    else:
        fmt = format
    if fmt == "duckdb":
        if _is_glob(text):
            raise DataError(f"A DuckDB source must be one database file, not the glob {text}.")
        if not table:
            raise DataError(
                f"{text} is a DuckDB database but no table is named.",
                hint="Set data.table in keel.toml (or pass --table).",
            )
    return Source(path=text, format=fmt, table=table)


def require_columns(source: Source, columns: Sequence[str], purpose: str = "") -> None:
    """Raise a :class:`DataError` naming every missing column and the columns the source has."""
    schema = source.schema()
    missing = [c for c in columns if c not in schema]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        have = ", ".join(schema)
        raise DataError(
            f"Column{'s' if len(missing) > 1 else ''} {names}{' ' + purpose if purpose else ''} "
            f"{'are' if len(missing) > 1 else 'is'} missing from {source.describe()}, which has: {have}.",
            hint="Fix the name in keel.toml, or add the column to the data.",
        )


def source_from_spec(spec: Spec) -> Source:
    """The :class:`Source` a spec's ``[data]`` section names, with its path resolved against the spec."""
    return open_source(spec.resolve(spec.data.source), spec.data.format, spec.data.table)


__all__ = ["Source", "open_source", "quote_identifier", "require_columns", "source_from_spec"]
