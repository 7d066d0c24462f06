"""The data contract: what the spec promises about the table, checked in DuckDB so any size works.

Checks: expected columns and types, nulls, ranges, duplicate ids, timestamps parseable and not in the future,
label values. Each finding names the column, counts the rows and shows a few examples. Structural findings
(a missing column, a wrong type, an unparseable timestamp) mean the data cannot be used at all; value findings
(nulls, ranges, duplicates, future times) mean some rows break the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from keel.data.sources import Source, quote_identifier
from keel.errors import ContractViolation, DataError
from keel.spec import Spec

Severity = Literal["structural", "violation", "warning"]

_TYPE_FAMILIES = {
    "int": ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"),
    "float": ("FLOAT", "DOUBLE", "DECIMAL", "REAL"),
    "string": ("VARCHAR",),
    "bool": ("BOOLEAN",),
    "timestamp": ("TIMESTAMP", "DATE", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S"),
}
# An int column satisfies a float expectation; nothing else is widened silently.
_ACCEPTS = {"float": ("int", "float"), "int": ("int",), "string": ("string",), "bool": ("bool",),
            "timestamp": ("timestamp",)}


def type_family(duckdb_type: str) -> str:
    """The spec's type word for a DuckDB type ('BIGINT' -> 'int'); 'other' when none fits."""
    upper = duckdb_type.upper()
    for family, names in _TYPE_FAMILIES.items():
        if any(upper == n or upper.startswith(n + "(") or upper.startswith(n + " ") for n in names):
            return family
    return "other"


@dataclass(frozen=True)
class Finding:
    check: str
    column: str
    severity: Severity
    rows: int
    message: str
    examples: tuple[str, ...] = ()


@dataclass
class ContractReport:
    source: str
    rows: int
    columns: dict[str, str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity != "warning" for f in self.findings)

    @property
    def structural(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "structural"]

    def raise_for_findings(self) -> None:
        """Raise the error that matches the worst finding (DataError for structural, else ContractViolation)."""
        bad = [f for f in self.findings if f.severity != "warning"]
        if not bad:
            return
        if self.structural:
            bad = self.structural
        text = "; ".join(f.message for f in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        if self.structural:
            raise DataError(f"{self.source} cannot be used: {text}.", hint="Run `keel validate` for the full report.")
        raise ContractViolation(f"{self.source} breaks its data contract: {text}.",
                                hint="Run `keel validate` for the full report.")


def _examples(source_con, query: str) -> tuple[str, ...]:
    return tuple(str(r[0]) for r in source_con.execute(query).fetchall())


def check_contract(spec: Spec, source: Source, now: datetime | None = None) -> ContractReport:
    """Check ``source`` against ``spec.data``; never raises for findings, only for unreadable sources."""
    data = spec.data
    now = now or datetime.now(UTC).replace(tzinfo=None)
    schema = source.schema()
    report = ContractReport(source=source.describe(), rows=0, columns=schema)
    add = report.findings.append

    roles: dict[str, str] = {}
    for col in data.schema_:
        roles[col] = "data.schema"
    for col in data.entity_keys:
        roles[col] = "data.entity_keys"
    if data.id_column:
        roles[data.id_column] = "data.id_column"
    if data.timestamp:
        roles[data.timestamp] = "data.timestamp"
    roles[data.label] = "data.label"
    for col in spec.features.raw:
        roles.setdefault(col, "features.raw")
    for col in data.ranges:
        roles.setdefault(col, "data.ranges")

    have = ", ".join(schema)
    present = {c for c in roles if c in schema}
    for col, role in roles.items():
        if col not in schema:
            close = [c for c in schema if c.lower() == col.lower()]
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            add(Finding("columns", col, "structural", 0,
                        f"column {col!r} named in {role} is missing{guess}; the table has: {have}"))

    for col, expected in data.schema_.items():
        if col in schema and type_family(schema[col]) not in _ACCEPTS[expected]:
            if expected == "timestamp" and type_family(schema[col]) == "string":
                continue  # checked below as parseable text
            add(Finding("types", col, "structural", 0,
                        f"column {col!r} should be {expected} (data.schema) but is {schema[col]}"))

    with source.connect() as con:
        report.rows = int(con.execute("SELECT count(*) FROM source").fetchone()[0])  # type: ignore[index]
        if report.rows == 0:
            add(Finding("rows", "(table)", "structural", 0, "the table has no rows"))
            return report

        nullable = set(data.nullable)
        for col in sorted(present - nullable):
            q = quote_identifier(col)
            n = int(con.execute(f"SELECT count(*) FROM source WHERE {q} IS NULL").fetchone()[0])  # type: ignore[index]
            if n:
                add(Finding("nulls", col, "violation", n,
                            f"column {col!r} has {n:,} null value{'s' if n > 1 else ''} "
                            "(list it in data.nullable if that is expected)"))

        for col, bounds in data.ranges.items():
            if col not in schema:
                continue
            q = quote_identifier(col)
            if type_family(schema[col]) not in ("int", "float"):
                add(Finding("ranges", col, "structural", 0,
                            f"column {col!r} has a range in data.ranges but is {schema[col]}, not a number"))
                continue
            conds = []
            if bounds.min is not None:
                conds.append(f"{q} < {float(bounds.min)!r}")
            if bounds.max is not None:
                conds.append(f"{q} > {float(bounds.max)!r}")
            if not conds:
                continue
            where = " OR ".join(conds)
            n = int(con.execute(f"SELECT count(*) FROM source WHERE {where}").fetchone()[0])  # type: ignore[index]
            if n:
                ex = _examples(con, f"SELECT DISTINCT {q} FROM source WHERE {where} LIMIT 3")
                add(Finding("ranges", col, "violation", n,
                            f"column {col!r} has {n:,} value{'s' if n > 1 else ''} outside "
                            f"[{bounds.min}, {bounds.max}] (e.g. {', '.join(ex)})", ex))

        if data.id_column and data.id_column in schema:
            q = quote_identifier(data.id_column)
            n = int(con.execute(
                f"SELECT coalesce(sum(c - 1), 0) FROM (SELECT count(*) c FROM source GROUP BY {q} HAVING c > 1)"
            ).fetchone()[0])  # type: ignore[index]
            if n:
                ex = _examples(con, f"SELECT {q} FROM source GROUP BY {q} HAVING count(*) > 1 LIMIT 3")
                add(Finding("duplicates", data.id_column, "violation", n,
                            f"id column {data.id_column!r} has {n:,} duplicate row{'s' if n > 1 else ''} "
                            f"(e.g. {', '.join(ex)})", ex))

        ts = data.timestamp
        if ts and ts in schema:
            q = quote_identifier(ts)
            family = type_family(schema[ts])
            expr = None
            if family == "timestamp":
                expr = f"CAST({q} AS TIMESTAMP)"
            elif family == "string":
                bad = int(con.execute(
                    f"SELECT count(*) FROM source WHERE {q} IS NOT NULL AND try_cast({q} AS TIMESTAMP) IS NULL"
                ).fetchone()[0])  # type: ignore[index]
                if bad:
                    ex = _examples(con, f"SELECT {q} FROM source WHERE {q} IS NOT NULL AND "
                                        f"try_cast({q} AS TIMESTAMP) IS NULL LIMIT 3")
                    add(Finding("timestamps", ts, "structural", bad,
                                f"timestamp column {ts!r} has {bad:,} value{'s' if bad > 1 else ''} that cannot "
                                f"be read as a time (e.g. {', '.join(repr(e) for e in ex)}); use ISO 8601 such "
                                "as 2018-04-01 08:30:00", ex))
                else:
                    expr = f"try_cast({q} AS TIMESTAMP)"
            else:
                add(Finding("timestamps", ts, "structural", 0,
                            f"timestamp column {ts!r} is {schema[ts]}, not a time; store ISO 8601 text or a "
                            "timestamp type"))
            if expr:
                limit = now + data.max_future_skew
                n = int(con.execute(f"SELECT count(*) FROM source WHERE {expr} > ?", [limit]).fetchone()[0])  # type: ignore[index]
                if n:
                    ex = _examples(con, f"SELECT {q} FROM source WHERE {expr} > ? LIMIT 3".replace("?", f"'{limit}'"))
                    add(Finding("timestamps", ts, "violation", n,
                                f"timestamp column {ts!r} has {n:,} event{'s' if n > 1 else ''} in the future "
                                f"(after {limit:%Y-%m-%d %H:%M}, e.g. {', '.join(ex)})", ex))

        if data.label in schema:
            q = quote_identifier(data.label)
            values = con.execute(
                f"SELECT {q}, count(*) FROM source WHERE {q} IS NOT NULL GROUP BY {q} ORDER BY 2 DESC LIMIT 4"
            ).fetchall()
            distinct = [v for v, _ in values]
            if len(values) > 2:
                add(Finding("labels", data.label, "structural", 0,
                            f"label column {data.label!r} has more than two values (e.g. "
                            f"{', '.join(repr(v) for v in distinct[:4])}); Keel learns binary decisions — map "
                            "it to 0/1 or set data.positive_label"))
            elif not any(_same(v, data.positive_label) for v in distinct):
                add(Finding("labels", data.label, "violation" if len(values) == 2 else "warning", 0,
                            f"label column {data.label!r} never equals data.positive_label "
                            f"{data.positive_label!r} (values: {', '.join(repr(v) for v in distinct)})"))
            elif len(values) == 1:
                add(Finding("labels", data.label, "warning", 0,
                            f"label column {data.label!r} holds a single class ({distinct[0]!r}); a model "
                            "cannot be trained or evaluated on it"))
    return report


def _same(value: object, positive: object) -> bool:
    if isinstance(positive, bool) or isinstance(value, bool):
        return bool(value) == bool(positive) and str(value).lower() in ("true", "1", "false", "0")
    try:
        return float(value) == float(positive)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value) == str(positive)


__all__ = ["ContractReport", "Finding", "check_contract", "type_family"]
