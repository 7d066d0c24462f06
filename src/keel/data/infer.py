"""`keel init`: a starter keel.toml guessed from a table, with comments saying what to check.

The guesses are deliberately cautious: the label is a two-valued column with a label-like name (or the last
two-valued column), the timestamp the first time-typed or time-parseable column, the id a unique integer or
text column named like an id, entity keys the other id-like columns that repeat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from keel.data.contracts import type_family
from keel.data.sources import Source, quote_identifier
from keel.io import atomic_write_text

_LABEL_NAMES = re.compile(r"(^|_)(label|target|y|class|outcome|fraud|churn|default|is_\w+|tx_fraud|response)$", re.I)
_ID_NAMES = re.compile(r"(^id$|_id$|^id_|_key$|uuid$|_uid$)", re.I)
_TIME_NAMES = re.compile(r"(time|date|_at$|^ts$|timestamp|datetime)", re.I)


@dataclass
class Inference:
    columns: dict[str, str]
    kinds: dict[str, str]
    rows: int
    label: str | None = None
    positive_label: object = 1
    timestamp: str | None = None
    id_column: str | None = None
    entity_keys: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def infer(source: Source, label: str | None = None, timestamp: str | None = None) -> Inference:
    """Profile ``source`` in DuckDB and guess the roles of its columns."""
    schema = source.schema()
    kinds = {c: type_family(t) for c, t in schema.items()}
    with source.connect() as con:
        rows = int(con.execute("SELECT count(*) FROM source").fetchone()[0])  # type: ignore[index]
        stats = {}
        for col in schema:
            q = quote_identifier(col)
            distinct, nulls = con.execute(
                f"SELECT count(DISTINCT {q}), count(*) - count({q}) FROM source"
            ).fetchone()  # type: ignore[misc]
            stats[col] = (int(distinct), int(nulls))
        parseable: dict[str, bool] = {}
        for col, kind in kinds.items():
            if kind == "string":
                q = quote_identifier(col)
                bad = con.execute(
                    f"SELECT count(*) FROM (SELECT {q} FROM source WHERE {q} IS NOT NULL LIMIT 1000)"
                    f" WHERE try_cast({q} AS TIMESTAMP) IS NULL"
                ).fetchone()[0]  # type: ignore[index]
                parseable[col] = bad == 0 and stats[col][0] > 1
        binary_values: dict[str, list[object]] = {}
        for col, (distinct, _) in stats.items():
            if distinct <= 3:
                q = quote_identifier(col)
                vals = [r[0] for r in con.execute(
                    f"SELECT DISTINCT {q} FROM source WHERE {q} IS NOT NULL ORDER BY 1 LIMIT 3").fetchall()]
                if len(vals) == 2:
                    binary_values[col] = vals

    out = Inference(columns=schema, kinds=kinds, rows=rows)
    # Timestamp
    if timestamp:
        out.timestamp = timestamp
    else:
        typed = [c for c, k in kinds.items() if k == "timestamp"]
        texty = [c for c, ok in parseable.items() if ok and _TIME_NAMES.search(c)]
        candidates = typed or texty
        if candidates:
            named = [c for c in candidates if _TIME_NAMES.search(c)]
            out.timestamp = (named or candidates)[0]
            out.notes.append(f"timestamp: guessed {out.timestamp!r} (a time column); check it is the event time.")
        else:
            out.notes.append("timestamp: no time column found; the split will be random (set data.timestamp "
                             "if there is one).")
    # Label
    if label:
        out.label = label
    else:
        named = [c for c in binary_values if _LABEL_NAMES.search(c)]
        pool = named or list(binary_values)
        if pool:
            out.label = pool[0] if named else pool[-1]
            out.notes.append(f"label: guessed {out.label!r} (two values: {binary_values[out.label]}); check it.")
        else:
            out.notes.append("label: no two-valued column found; set data.label to the outcome column.")
    if out.label in binary_values:
        vals = binary_values[out.label]
        truthy = [v for v in vals if str(v).lower() in ("1", "true", "yes", "y", "positive", "1.0")]
        out.positive_label = truthy[0] if truthy else vals[-1]
    # Ids and entities
    for col, (distinct, nulls) in stats.items():
        if col in (out.label, out.timestamp) or not _ID_NAMES.search(col):
            continue
        if kinds[col] not in ("int", "string"):
            continue
        if distinct >= 0.97 * rows and nulls == 0 and out.id_column is None:
            out.id_column = col
        elif distinct < 0.97 * rows:
            out.entity_keys.append(col)
    roles = {out.label, out.timestamp, out.id_column, *out.entity_keys}
    for col, kind in kinds.items():
        if col in roles:
            continue
        if kind in ("int", "float", "bool"):
            out.features.append(col)
        elif kind == "string" and stats[col][0] <= 50:
            out.features.append(col)
            out.categorical.append(col)
    return out


def _toml_str(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


def render_spec(inf: Inference, source_path: str, name: str) -> str:
    """A commented keel.toml for the inferred roles."""
    lines = [
        f"# Starter spec written by `keel init` from {source_path} ({inf.rows:,} rows, {len(inf.columns)} columns).",
        "# Check every line marked CHECK, then run `keel validate`.",
        *[f"#   - {n}" for n in inf.notes],
        "",
        "[project]",
        f"name = {_toml_str(name)}",
        'owner = ""            # CHECK: who owns this system after launch',
        "goals = []            # CHECK: what success means, in words",
        "",
        "[decision]",
        'question = "Should we act on this row?"   # CHECK: the decision the prediction supports',
        f'positive_class = "{inf.label or "label"} is {inf.positive_label}"   # CHECK: what a positive means',
        'positive_action = "act"',
        'negative_action = "skip"',
        "",
        "[decision.costs]        # CHECK: what each kind of error costs (numbers or column expressions)",
        "false_positive = 1.0",
        "false_negative = 5.0",
        "",
        "[data]",
        f"source = {_toml_str(source_path)}",
    ]
    if inf.id_column:
        lines.append(f"id_column = {_toml_str(inf.id_column)}")
    if inf.entity_keys:
        lines.append(f"entity_keys = {_toml_list(inf.entity_keys)}")
    if inf.timestamp:
        lines.append(f"timestamp = {_toml_str(inf.timestamp)}   # CHECK: the event time")
    lines.append(f"label = {_toml_str(inf.label or 'CHANGE_ME')}   # CHECK: the outcome to predict")
    lines.append(f"positive_label = {_toml_str(inf.positive_label)}")
    lines.append('label_delay = "0d"     # CHECK: how long after the event the label is known')
    if inf.categorical:
        lines.append(f"categorical = {_toml_list(inf.categorical)}")
    lines += ["", "[data.schema]"]
    for col, kind in inf.kinds.items():
        if kind != "other" and not (col == inf.timestamp and kind == "string"):
            lines.append(f"{_toml_key(col)} = {_toml_str(kind)}")
    lines += ["", "[features]", f"raw = {_toml_list(inf.features)}", "", "[split]"]
    lines.append('strategy = "time"' if inf.timestamp else 'strategy = "random"')
    lines += ["", "[models]", 'candidates = ["lightgbm", "hist_gradient_boosting"]', ""]
    return "\n".join(lines)


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_str(name)


def write_starter_spec(source: Source, target: Path, name: str, source_path: str,
                       label: str | None = None, timestamp: str | None = None) -> Inference:
    """Infer and write ``target`` atomically; returns the inference for the CLI to summarise."""
    inf = infer(source, label=label, timestamp=timestamp)
    atomic_write_text(target, render_spec(inf, source_path, name))
    return inf


__all__ = ["Inference", "infer", "render_spec", "write_starter_spec"]
