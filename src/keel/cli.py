"""The `keel` command line: one thin command per verb. The only module that prints and sets exit codes.

Exit codes: 0 ok; 1 a check found problems (contract violations, a monitor warning); 2 bad input or
configuration (spec, missing file or column, unparseable data). Errors are one paragraph on stderr, no traceback
(set KEEL_DEBUG=1 to see one).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from keel.errors import KeelError

app = typer.Typer(
    name="keel",
    help="Keel: production-aware machine learning for tabular decisions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

SpecOpt = Annotated[
    Path, typer.Option("--spec", "-s", help="Path to keel.toml (or its folder).", show_default=True)
]


def handles_errors(fn: F) -> F:
    """Turn Keel's typed errors into one paragraph on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeelError as exc:
            if os.environ.get("KEEL_DEBUG"):
                raise
            kind = type(exc).__name__.replace("Error", " error").replace("Violation", " violation")
            err.print(f"[bold red]{kind}:[/] {exc.message}", soft_wrap=True, markup=True)
            if exc.hint:
                err.print(f"[yellow]How to fix:[/] {exc.hint}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]Interrupted; nothing was left half-written.[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _iso_time(flag: str, value: str, example: str) -> Any:
    """A time option's value as a datetime; a clear error naming the flag otherwise."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise KeelError(f"{flag} must be an ISO time such as '{example}'. Got {value!r} instead.") from None


def _load(spec_path: Path):
    from keel.spec import load_spec

    return load_spec(spec_path)


# --------------------------------------------------------------------------------------------------- init
@app.command()
@handles_errors
def init(
    table: Annotated[Path, typer.Argument(help="A CSV, Parquet or DuckDB file to describe.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the spec.")] = Path("keel.toml"),
    name: Annotated[str | None, typer.Option(help="Project name (default: the table's file name).")] = None,
    label: Annotated[str | None, typer.Option(help="The label column, if the guess would be wrong.")] = None,
    timestamp: Annotated[str | None, typer.Option(help="The event time column, if the guess would be wrong.")] = None,
    db_table: Annotated[str | None, typer.Option("--table", help="Table name inside a DuckDB file.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing spec.")] = False,
) -> None:
    """Write a starter keel.toml inferred from a table (columns, types, a guessed timestamp and label).

    Example: [bold]keel init data/loans.csv -o keel.toml[/]
    """
    from keel.data.infer import write_starter_spec
    from keel.data.sources import open_source

    if output.exists() and not force:
        raise KeelError(f"{output} already exists.", hint="Pass --force to overwrite it, or -o to write elsewhere.")
    source = open_source(table, table=db_table)
    try:
        rel = os.path.relpath(table.resolve(), output.resolve().parent)
    except ValueError:
        rel = str(table.resolve())
    inf = write_starter_spec(source, output, name or table.stem, rel, label=label, timestamp=timestamp)
    grid = Table(title=f"Roles guessed for {table} ({inf.rows:,} rows)", show_header=True)
    grid.add_column("role")
    grid.add_column("column(s)")
    grid.add_row("label", str(inf.label))
    grid.add_row("timestamp", str(inf.timestamp))
    grid.add_row("id", str(inf.id_column))
    grid.add_row("entity keys", ", ".join(inf.entity_keys) or "-")
    grid.add_row("features", ", ".join(inf.features) or "-")
    out.print(grid)
    for note in inf.notes:
        out.print(f"  • {note}")
    out.print(f"Wrote [bold]{output}[/]. Check the lines marked CHECK, then run `keel validate -s {output}`.")


# ----------------------------------------------------------------------------------------------- validate
@app.command()
@handles_errors
def validate(
    spec: SpecOpt = Path("keel.toml"),
    source: Annotated[Path | None, typer.Option(help="Check this table instead of data.source.")] = None,
) -> None:
    """Check the data against its contract: columns, types, nulls, ranges, duplicate ids, timestamps, labels.

    Exit 0 when the contract holds, 1 on violations, 2 when the data cannot be used at all.

    Example: [bold]keel validate -s examples/card-fraud/keel.toml[/]
    """
    from keel.data.contracts import check_contract
    from keel.data.sources import open_source, source_from_spec

    s = _load(spec)
    src = open_source(source, s.data.format, s.data.table) if source else source_from_spec(s)
    report = check_contract(s, src)
    report.raise_for_findings() if report.structural else _print_contract(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_contract(report: Any) -> None:
    out.print(f"[bold]Data contract[/] for {report.source}: {report.rows:,} rows, {len(report.columns)} columns")
    if not report.findings:
        out.print("[green]✓ contract holds[/] (columns, types, nulls, ranges, ids, timestamps, labels)")
        return
    grid = Table(show_header=True)
    for col in ("severity", "check", "column", "rows", "finding"):
        grid.add_column(col, overflow="fold")
    colour = {"structural": "red", "violation": "yellow", "warning": "cyan"}
    for f in report.findings:
        grid.add_row(f"[{colour[f.severity]}]{f.severity}[/]", f.check, f.column, f"{f.rows:,}", f.message)
    out.print(grid)


# ----------------------------------------------------------------------------------------------- simulate
@app.command()
@handles_errors
def simulate(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for transactions/customers/terminals.parquet.")] = Path("data"),
    customers: Annotated[int, typer.Option(help="Number of customers.")] = 5000,
    terminals: Annotated[int, typer.Option(help="Number of terminals.")] = 10000,
    days: Annotated[int, typer.Option(help="Number of days.")] = 183,
    start: Annotated[str, typer.Option(help="First day (YYYY-MM-DD).")] = "2018-04-01",
    radius: Annotated[float, typer.Option(help="A customer uses terminals closer than this.")] = 5.0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    shift_day: Annotated[int | None, typer.Option(help="Inject a shift from this day index on.")] = None,
    shift_amount_factor: Annotated[float, typer.Option(help="With --shift-day: multiply amounts by this.")] = 1.0,
    shift_new_fraud: Annotated[bool, typer.Option(help="With --shift-day: add a new fraud pattern.")] = False,
) -> None:
    """Simulate card transactions with the handbook's generative process (customers, terminals, 3 fraud scenarios).

    Example: [bold]keel simulate -o data --customers 5000 --days 183 --seed 0[/]
    """
    from keel.data.simulate import make_shift, write_simulation
    from keel.data.simulate import simulate as run_simulation

    shift = make_shift(shift_day, shift_amount_factor, shift_new_fraud) if shift_day is not None else None
    t0 = time.perf_counter()
    with out.status("Simulating transactions..."):
        sim = run_simulation(n_customers=customers, n_terminals=terminals, n_days=days, start_date=start,
                             radius=radius, seed=seed, shift=shift)
        paths = write_simulation(sim, out_dir)
    _print_summary("Simulated", sim.summary())
    out.print(f"Wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.1f} s")


def _print_summary(title: str, summary: dict[str, Any]) -> None:
    grid = Table(title=title, show_header=False)
    grid.add_column("what")
    grid.add_column("value", justify="right")
    for key, value in summary.items():
        text = f"{value:,.4g}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) else str(value))
        grid.add_row(key.replace("_", " "), text)
    out.print(grid)


# -------------------------------------------------------------------------------------------------- train
@app.command()
@handles_errors
def train(
    spec: SpecOpt = Path("keel.toml"),
    protocol: Annotated[str | None, typer.Option(help="single or prequential (default: split.protocol).")] = None,
    reports: Annotated[Path | None, typer.Option(help="Reports folder (default: reports/ beside the spec).")] = None,
    register: Annotated[bool, typer.Option(help="Log the run and register the model in the registry.")] = True,
) -> None:
    """Train candidates against baselines under a time-aware split; calibrate, pick the threshold, report.

    Example: [bold]keel train -s examples/card-fraud/keel.toml[/] ([bold]--protocol prequential[/] for rolling folds)
    """
    s = _load(spec)
    if protocol:
        if protocol not in ("single", "prequential"):
            raise KeelError(f"--protocol must be 'single' or 'prequential'. Got {protocol!r} instead.")
        s = s.model_copy(update={"split": s.split.model_copy(update={"protocol": protocol})})
    run_training(s, reports_dir=reports, register=register)


def run_training(s: Any, *, reports_dir: Path | None = None, register: bool = True) -> Any:
    """Train, print the comparison, write the report and (optionally) register; shared by train and demo."""
    from keel.train import train as run_train

    with out.status("Training...") as status:
        outcome = run_train(s, progress=lambda m: (status.update(m), out.print(f"   · {m}")))
    _print_comparison(outcome)
    run_dir = (reports_dir or s.resolve("reports")) / time.strftime("%Y%m%d-%H%M%S")
    from keel.evaluate.report import write_report

    written = write_report(outcome, run_dir)
    out.print(f"Report: [bold]{written.get('html', run_dir)}[/] and {written.get('markdown', '')}")
    if register:
        from keel.registry import Registry
        from keel.train import record

        artifacts = {f"report/{p.name}": p for p in written.values()}
        info = record(outcome, Registry(s), artifacts=artifacts)
        out.print(f"Tracked run [bold]{info.run_id}[/]; model version [bold]{info.version}[/] {info.note}.")
        outcome.registered = info
    return outcome


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}"


def _print_comparison(outcome: Any) -> None:
    prequential = outcome.prequential is not None
    grid = Table(title="Test " + ("(mean ± std over prequential folds)" if prequential else
                                  "(95 % bootstrap intervals)"), show_header=True)
    for col in ("model", "role", "valid.", "ROC AUC", "avg precision", "CP@k", "cost/event", "chosen"):
        grid.add_column(col, justify="left" if col in ("model", "role") else "right")
    def cell(e: Any, metric: str) -> str:
        v = e.test.get(metric)
        if prequential and f"{metric}_std" in e.test:
            return f"{_fmt(v)} ± {_fmt(e.test[f'{metric}_std'])}"
        iv = e.intervals.get(metric)
        return f"{_fmt(v)} [{_fmt(iv.low)}, {_fmt(iv.high)}]" if iv else _fmt(v)

    for e in outcome.evaluated:
        grid.add_row(e.name, e.role, _fmt(e.validation_score), cell(e, "roc_auc"), cell(e, "average_precision"),
                     cell(e, "card_precision_at_k"), cell(e, "expected_cost"), "✓" if e is outcome.best else "")
    out.print(grid)
    if outcome.split_warning:
        out.print(f"[bold red]WARNING:[/] {outcome.split_warning}")
    losers = [b for b, res in outcome.beats_baselines.items() if res and not all(res.values())]
    if losers:
        out.print(f"[yellow]The chosen model does not beat {', '.join(losers)} with non-overlapping intervals on "
                  "every headline metric; see the report.[/]")
    else:
        out.print("[green]The chosen model beats every baseline on average precision and Card Precision@k "
                  "with non-overlapping intervals.[/]")
    th = outcome.threshold_choice
    out.print(f"Threshold {th.threshold:.4f} (bound by {th.bound}); expected cost per event at it on validation "
              f"{th.expected_cost:.4f}. Took {outcome.seconds.get('total', 0):.1f} s.")


# -------------------------------------------------------------------------------------------------- serve
@app.command()
@handles_errors
def serve(
    spec: SpecOpt = Path("keel.toml"),
    host: Annotated[str | None, typer.Option(help="Interface (default: serving.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: serving.port).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: serving.workers).")] = None,
    model: Annotated[Path | None, typer.Option(help="Serve this artifact folder instead of the registry alias.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve decisions over HTTP: raw event in, online features, calibrated score, decision, fallback, logging.

    The service follows the registry alias (serving.alias, polled every serving.reload_interval_seconds), so
    `keel models promote` / `rollback` take effect without a restart. Admin calls need $KEEL_API_KEY.

    Example: [bold]keel serve -s examples/card-fraud/keel.toml --port 8000[/]
    """
    from keel.serve.app import run

    run(_load(spec), host=host, port=port, workers=workers, model_path=model, log_level=log_level)


# ----------------------------------------------------------------------------------------------- features
features_app = typer.Typer(help="Point-in-time feature tables: build (incremental) and status.", no_args_is_help=True)
app.add_typer(features_app, name="features")


@features_app.command("build")
@handles_errors
def features_build(
    spec: SpecOpt = Path("keel.toml"),
    table: Annotated[Path | None, typer.Option(help="Feature table folder (default: under the state dir).")] = None,
    full: Annotated[bool, typer.Option(help="Recompute everything instead of adding new days.")] = False,
    chunk_rows: Annotated[int, typer.Option(
        help="Rows per chunk: memory is about this many rows plus one horizon (longest window + delay) of "
             "history; any value gives the same table.")] = 1_000_000,
) -> None:
    """Materialise the spec's features, point in time correct; adds only new days unless --full.

    Example: [bold]keel features build -s examples/card-fraud/keel.toml[/]
    """
    from keel.features.offline import build_features

    t0 = time.perf_counter()
    with out.status("Building features..."):
        result = build_features(_load(spec), table=table, full=full, chunk_rows=chunk_rows)
    took = time.perf_counter() - t0
    out.print(f"{'Rebuilt' if result.full_rebuild else 'Updated'} [bold]{result.path}[/]: "
              f"{result.rows_added:,} rows added in {result.chunks} chunk(s), {result.rows_total:,} in all, events up to "
              f"{result.max_event_time} ({result.reason}; {took:.1f} s)")


@features_app.command("online")
@handles_errors
def features_online(
    spec: SpecOpt = Path("keel.toml"),
    until: Annotated[str | None, typer.Option(help="Load state as of this time (default: the last event).")] = None,
) -> None:
    """Warm the online store from the source: recent events and the labels known by then.

    Run it before the first `keel serve` (and after restoring a store); re-running is safe.

    Example: [bold]keel features online -s examples/card-fraud/keel.toml[/]
    """

    from keel.features.materialize import warm_online_store
    from keel.features.online import OnlineStore

    s = _load(spec)
    when = _iso_time("--until", until, "2018-09-01 00:00") if until else None
    store = OnlineStore.from_spec(s)
    try:
        with out.status("Loading the online store..."):
            result = warm_online_store(s, store, until=when)
    finally:
        store.close()
    out.print(f"Online store {s.store_path(s.features.store)}: {result.events:,} events in "
              f"({result.since}, {result.until}], {result.labels:,} labels known by then.")


@features_app.command("status")
@handles_errors
def features_status(
    spec: SpecOpt = Path("keel.toml"),
    table: Annotated[Path | None, typer.Option(help="Feature table folder (default: under the state dir).")] = None,
) -> None:
    """Say whether the feature table is fresh: definitions, source and new events since it was built.

    Exit 0 when fresh, 1 when stale or missing.

    Example: [bold]keel features status[/]
    """
    from keel.features.offline import features_status as status_of

    st = status_of(_load(spec), table=table)
    if not st.exists:
        out.print(f"[yellow]No feature table at {st.path}[/]; run `keel features build`.")
        raise typer.Exit(1)
    out.print(f"Feature table {st.path}: {st.rows:,} rows, events up to {st.max_event_time}, "
              f"computed {st.computed_at}")
    if st.stale:
        for reason in st.reasons:
            out.print(f"  [yellow]stale:[/] {reason}")
        raise typer.Exit(1)
    out.print("[green]✓ fresh[/]")


# ----------------------------------------------------------------------------------- runs, models, ui
runs_app = typer.Typer(help="Tracked training runs (MLflow).", no_args_is_help=True)
models_app = typer.Typer(help="Registered model versions: list, promote, rollback, history.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")


def _registry(spec_path: Path, tracking_uri: str | None = None) -> Any:
    from keel.registry import Registry

    return Registry.from_spec(_load(spec_path), tracking_uri=tracking_uri)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@runs_app.command("list")
@handles_errors
def runs_list(
    spec: SpecOpt = Path("keel.toml"),
    limit: Annotated[int, typer.Option(help="How many runs, newest first.")] = 20,
) -> None:
    """Summarise the latest training runs without opening the MLflow UI.

    Example: [bold]keel runs list -s examples/card-fraud/keel.toml[/]
    """
    runs = _registry(spec).runs(limit=limit)
    if not runs:
        out.print("No runs yet. Train one with `keel train`.")
        return
    grid = Table(show_header=True)
    for col in ("run", "started", "status", "headline", "value", "data", "git"):
        grid.add_column(col)
    for r in runs:
        grid.add_row(r.run_id, _when(r.start_time), r.status, r.headline_metric, _fmt(r.headline_value, 4),
                     r.data_fingerprint[:12], r.git_commit[:10])
    out.print(grid)


@runs_app.command("show")
@handles_errors
def runs_show(
    run_id: Annotated[str, typer.Argument(help="The run id (from `keel runs list`).")],
    spec: SpecOpt = Path("keel.toml"),
) -> None:
    """Everything a run recorded: parameters, metrics, tags and artifacts.

    Example: [bold]keel runs show 3f2a... -s examples/card-fraud/keel.toml[/]
    """
    d = _registry(spec).run(run_id)
    out.print(f"[bold]Run {d.summary.run_id}[/] ({d.summary.status}, started {_when(d.summary.start_time)})")
    for title, values in (("parameters", d.params), ("metrics", d.metrics), ("tags", d.tags)):
        grid = Table(title=title, show_header=False)
        grid.add_column("name")
        grid.add_column("value", overflow="fold")
        for k in sorted(values):
            v = values[k]
            grid.add_row(k, _fmt(v, 6) if isinstance(v, float) else str(v))
        out.print(grid)
    out.print("artifacts: " + ", ".join(d.artifacts))
    out.print(f"artifact store: {d.artifact_uri}")


@models_app.command("list")
@handles_errors
def models_list(spec: SpecOpt = Path("keel.toml")) -> None:
    """Registered versions with their aliases, headline metric and data reference.

    Example: [bold]keel models list[/]
    """
    versions = _registry(spec).list_versions()
    if not versions:
        out.print("No registered versions yet. `keel train` registers one.")
        return
    grid = Table(show_header=True)
    for col in ("version", "aliases", "headline", "value", "data", "run", "created"):
        grid.add_column(col)
    for v in versions:
        grid.add_row(str(v.version), ", ".join(v.aliases) or "-", v.headline_metric, _fmt(v.headline_value, 4),
                     v.data_fingerprint[:12], v.run_id[:12], _when(v.created))
    out.print(grid)


@models_app.command("promote")
@handles_errors
def models_promote(
    version: Annotated[int, typer.Argument(help="The version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit log).")],
    spec: SpecOpt = Path("keel.toml"),
    actor: Annotated[str | None, typer.Option(help="Who (default: $KEEL_ACTOR or your login).")] = None,
    force: Annotated[bool, typer.Option(help="Promote even if it does not beat the champion.")] = False,
) -> None:
    """Make a version champion; refused when it does not beat the current champion on the headline metric.

    Example: [bold]keel models promote 3 --reason "wins on the last 4 weeks"[/]
    """
    from keel.registry import default_actor

    event = _registry(spec).promote(version, actor=actor or default_actor(), reason=reason, force=force)
    out.print(f"Champion: version {event.from_version or '-'} → [bold]{event.to_version}[/] "
              f"({'forced, ' if event.forced else ''}by {event.actor}: {event.reason})")


@models_app.command("rollback")
@handles_errors
def models_rollback(
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit log).")],
    spec: SpecOpt = Path("keel.toml"),
    actor: Annotated[str | None, typer.Option(help="Who (default: $KEEL_ACTOR or your login).")] = None,
) -> None:
    """Put the previous champion back, in one atomic alias change.

    Example: [bold]keel models rollback --reason "alert rate doubled after promote"[/]
    """
    from keel.registry import default_actor

    event = _registry(spec).rollback(actor=actor or default_actor(), reason=reason)
    out.print(f"Rolled back: champion version {event.from_version} → [bold]{event.to_version}[/] "
              f"(by {event.actor}: {event.reason})")


@models_app.command("history")
@handles_errors
def models_history(
    spec: SpecOpt = Path("keel.toml"),
    at: Annotated[str | None, typer.Option(help="Answer: which version was champion at this UTC time?")] = None,
) -> None:
    """The audit log of alias changes; with --at, the champion at that time.

    Example: [bold]keel models history --at "2026-11-29 14:00"[/]
    """
    registry = _registry(spec)
    if at:
        when = _iso_time("--at", at, "2026-11-29 14:00")
        version = registry.champion_at(when)
        out.print(f"Champion at {when}: {'version ' + str(version) if version else 'none'}")
        return
    grid = Table(show_header=True)
    for col in ("time (UTC)", "alias", "from", "to", "action", "actor", "reason", "status"):
        grid.add_column(col, overflow="fold")
    for e in registry.history():
        grid.add_row(_when(e.time), e.alias, str(e.from_version or "-"), str(e.to_version or "-"),
                     e.action + (" (forced)" if e.forced else ""), e.actor, e.reason, e.status)
    out.print(grid)


@app.command()
@handles_errors
def ui(
    spec: SpecOpt = Path("keel.toml"),
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on the project's local tracking store.

    Example: [bold]keel ui --port 5000[/]
    """
    import subprocess

    argv = _registry(spec).ui_command(port=port, host=host)
    out.print(f"MLflow UI on http://{host}:{port} (Ctrl-C to stop): {' '.join(argv)}")
    raise typer.Exit(subprocess.call(argv))


@app.command()
@handles_errors
def reproduce(
    run_id: Annotated[str, typer.Argument(help="The run to re-train (from `keel runs list`).")],
    spec: SpecOpt = Path("keel.toml"),
) -> None:
    """Re-train a recorded run from its spec and data reference and say whether its metrics match.

    Exit 0 when every recorded metric is reproduced (within 1e-9), 1 otherwise.

    Example: [bold]keel reproduce 3f2a...[/]
    """
    from keel.train import reproduce as run_reproduce

    with out.status("Re-training the recorded run..."):
        _outcome, rows = run_reproduce(_registry(spec), run_id)
    grid = Table(title=f"Reproduction of run {run_id}", show_header=True)
    for col in ("metric", "recorded", "now", "match"):
        grid.add_column(col)
    for name, old, new, ok in rows:
        grid.add_row(name, _fmt(old, 9), _fmt(new, 9), "[green]✓[/]" if ok else "[red]✗[/]")
    out.print(grid)
    bad = [r for r in rows if not r[3]]
    if bad:
        out.print(f"[red]{len(bad)} of {len(rows)} metrics differ.[/]")
        raise typer.Exit(1)
    out.print(f"[green]All {len(rows)} recorded metrics reproduced.[/]")


# -------------------------------------------------------------------------------------------------- score
@app.command()
@handles_errors
def score(
    input: Annotated[Path, typer.Argument(help="Events to score: CSV, Parquet file or glob, or a DuckDB file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file (or folder with --partition-by-day).")],
    spec: SpecOpt = Path("keel.toml"),
    model: Annotated[str, typer.Option(help="Registry alias or version number.")] = "champion",
    engine: Annotated[str, typer.Option(help="local (DuckDB + NumPy, out of core) or spark.")] = "local",
    master: Annotated[str | None, typer.Option(help="Spark master URL (default local[*]).")] = None,
    chunk_rows: Annotated[int, typer.Option(help="Rows per chunk (bounds memory).")] = 1_000_000,
    rejects: Annotated[Path | None, typer.Option(help="Where rows failing validation go (default: beside output).")] = None,
    history: Annotated[Path | None, typer.Option(help="Older events that warm up the windows (e.g. data.source).")] = None,
    table: Annotated[str | None, typer.Option(help="Table name when INPUT is a DuckDB file.")] = None,
    partition_by_day: Annotated[bool, typer.Option(help="Write one file per day (re-running a day replaces it).")] = False,
) -> None:
    """Score a table in batch: point-in-time features, calibrated scores, decisions, atomically written.

    Example: [bold]keel score data/new.parquet -o scores.parquet --history data/transactions.parquet[/]
    """
    from keel.score import run_score

    if engine not in ("local", "spark"):
        raise KeelError(f"--engine must be 'local' or 'spark'. Got {engine!r} instead.")
    if chunk_rows < 1:
        raise KeelError(f"--chunk-rows must be at least 1. Got {chunk_rows} instead.")
    s = _load(spec)
    with out_progress() as bar:
        task = bar.add_task("scoring", total=None)
        summary = run_score(s, input, output, model=model, engine=engine, master=master,  # type: ignore[arg-type]
                            chunk_rows=chunk_rows, rejects=rejects, partition_by_day=partition_by_day,
                            history=history, table=table,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    counts = ", ".join(f"{k}: {v:,}" for k, v in sorted(summary.decisions.items()))
    out.print(f"Scored [bold]{summary.rows:,}[/] rows with model version {summary.model_version} ({engine}): {counts}; "
              f"{summary.rejected:,} rejected{' → ' + summary.rejects if summary.rejected else ''}.")
    out.print(f"Output {summary.output}; summary {summary.summary_path}")


# ------------------------------------------------------------------------------------------ monitor, retrain
@app.command()
@handles_errors
def monitor(
    spec: SpecOpt = Path("keel.toml"),
    as_of: Annotated[str | None, typer.Option("--as-of", help="Evaluate as of this time (default: the log's newest).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder (default: .keel/monitor).")] = None,
) -> None:
    """Drift, delayed-label performance, training–serving skew and operations over the prediction log.

    Writes monitor.json and a self-contained monitor.html; exits 0 (ok), 1 (warn) or 2 (act) so a scheduler can
    retrain or roll back.

    Example: [bold]keel monitor -s keel.toml || keel retrain -s keel.toml[/]
    """
    from keel.monitor.triggers import run_monitor

    s = _load(spec)
    with out.status("Monitoring the prediction log..."):
        result = run_monitor(s, as_of=as_of, out_dir=out_dir or s.state_dir / "monitor")
    out.print(result.summary(), soft_wrap=True)
    if result.paths:
        out.print(f"Report: [bold]{result.paths.get('html', next(iter(result.paths.values())))}[/]")
    raise typer.Exit(result.exit_code)


@app.command()
@handles_errors
def retrain(
    spec: SpecOpt = Path("keel.toml"),
    dry_run: Annotated[bool, typer.Option(help="Show the plan (windows, rows) without training.")] = False,
    as_of: Annotated[str | None, typer.Option("--as-of", help="Labels known by this time (default: now).")] = None,
) -> None:
    """Train a challenger on the latest labelled window; promote it only if it beats the champion on the same rows.

    Example: [bold]keel retrain -s keel.toml --dry-run[/]
    """
    from keel.monitor.retrain import retrain as run_retrain

    s = _load(spec)
    with out.status("Retraining...") as status:
        result = run_retrain(s, dry_run=dry_run, as_of=as_of,
                             progress=lambda m: (status.update(m), out.print(f"   · {m}")))
    out.print(result.summary(), soft_wrap=True)


# ---------------------------------------------------------------------------------------------------- log
log_app = typer.Typer(help="The prediction log: maintenance.", no_args_is_help=True)
app.add_typer(log_app, name="log")


LogOpt = Annotated[Path | None, typer.Option(help="Prediction log (default: the spec's, under the state dir).")]


def _existing_log(spec: Path, log: Path | None) -> Path:
    """The prediction log to work on (``--log``, else the spec's); exits 2 when there is none."""
    if log is None:
        s = _load(spec)
        log = s.store_path(s.serving.prediction_log)
    if not log.is_file():
        out.print(f"[red]No prediction log at {log}[/]: serve some traffic first, or pass --log PATH.")
        raise typer.Exit(2)
    return log


@log_app.command("backfill")
@handles_errors
def log_backfill(
    spec: SpecOpt = Path("keel.toml"),
    log: LogOpt = None,
    segment_rows: Annotated[int | None, typer.Option(
        min=1, help="Rows per columnar segment (default: the service's).")] = None,
) -> None:
    """Give rows logged before columnar segments existed their segments, so monitoring reads them without parsing.

    One-time and offline: run it while no service writes the log. Example: [bold]keel log backfill -s keel.toml[/]
    """
    from keel.serve.predlog import SEGMENT_ROWS, backfill_segments

    log = _existing_log(spec, log)
    t0 = time.perf_counter()
    with out.status("Writing columnar segments..."):
        covered = backfill_segments(log, segment_rows=segment_rows or SEGMENT_ROWS)
    out.print(f"{covered:,} rows newly covered by segments in {time.perf_counter() - t0:.1f} s ({log}).")


@log_app.command("pack")
@handles_errors
def log_pack(
    spec: SpecOpt = Path("keel.toml"),
    log: LogOpt = None,
    before: Annotated[str | None, typer.Option(
        help="Only segments answered entirely before this ISO date/time (UTC unless it has an offset).")] = None,
    vacuum: Annotated[bool, typer.Option(
        help="Then VACUUM, returning the freed pages to the file system (needs no service writing the log).")] = False,
) -> None:
    """Store rows that a columnar segment already holds only in that segment: the log shrinks ~5x, readers
    return the same rows and labels.

    What the service does for batch answers by default, for rows logged one by one or before it existed; run
    [bold]keel log backfill[/] first for rows without a segment. Safe while the service writes (each segment
    packs in its own short transaction); don't run monitoring at the same time.
    Example: [bold]keel log pack -s keel.toml --before 2026-11-01[/]
    """
    import sqlite3

    from rich.progress import Progress

    from keel.serve.predlog import pack_segments

    log = _existing_log(spec, log)
    t0, size0 = time.perf_counter(), _log_bytes(log)
    with Progress(console=out, transient=True) as progress:
        task = progress.add_task("Packing segments", total=None)
        result = pack_segments(log, before=before,
                               on_segment=lambda done, total: progress.update(task, completed=done, total=total))
    out.print(f"{result.rows:,} rows in {result.segments:,} segments now stored only in their segment "
              f"({time.perf_counter() - t0:.1f} s, {log}).")
    if result.mismatched or result.incomplete:
        out.print(f"[yellow]Left as they were:[/] {result.mismatched} segments whose rows differ from what the "
                  f"segment rebuilds, {result.incomplete} whose rows are not all in the table.")
    if vacuum:
        db = sqlite3.connect(log, timeout=10)
        try:
            db.execute("vacuum")
        except sqlite3.OperationalError as exc:
            out.print(f"[red]VACUUM failed[/] ({exc}): stop the service writing {log} and run again with --vacuum.")
            raise typer.Exit(1) from exc
        finally:
            db.close()
        out.print(f"Log file {size0 / 1e6:,.1f} MB -> {_log_bytes(log) / 1e6:,.1f} MB after VACUUM.")


def _log_bytes(path: Path) -> int:
    """A SQLite file's size with its WAL."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.is_file() else 0)


# ----------------------------------------------------------------------------------------------- pipeline
pipeline_app = typer.Typer(help="The lifecycle as a cached DAG: validate, features, train, score, monitor.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("run")
@handles_errors
def pipeline_run(
    spec: SpecOpt = Path("keel.toml"),
    from_step: Annotated[str | None, typer.Option("--from", help="Re-run from this step on (validate, features, "
                                                             "train, score, monitor).")] = None,
) -> None:
    """Run validate → features → train (+register) → score → monitor, skipping steps whose inputs did not change.

    Prints a crontab line to schedule it. Exit codes follow the monitor step (0 ok, 1 warn, 2 act).

    Example: [bold]keel pipeline run -s keel.toml --from train[/]
    """
    from keel.pipeline import cron_line, run_pipeline

    s = _load(spec)
    marks = {"running": "[cyan]…[/]", "ran": "[green]✓[/]", "cached": "[dim]=[/]", "skipped": "[yellow]-[/]"}

    def show(step: str, status: str, message: str) -> None:
        out.print(f"{marks.get(status, '?')} {step:<9} {status:<8} {message}", soft_wrap=True)

    run_pipeline(s, start=from_step, on_event=show)
    out.print(f"Schedule it: [bold]{cron_line(s, spec if spec.suffix == '.toml' else spec / 'keel.toml')}[/]")


# --------------------------------------------------------------------------------------------------- docs
@app.command()
@handles_errors
def docs(
    spec: SpecOpt = Path("keel.toml"),
    out_dir: Annotated[Path | None, typer.Option("--out", help="Docs folder (default: docs/ beside the spec).")] = None,
    check: Annotated[bool, typer.Option(help="Only check: fail while human parts are empty or docs are stale.")] = False,
) -> None:
    """Render the design doc, model cards, operating note and evidence pack from the spec and recorded runs.

    The human parts live in docs/human/*.md (created with questions, never overwritten). With --check, exit 1
    and name what is missing while any is empty, the spec lacks owner/goals, or the docs are out of date.

    Example: [bold]keel docs -s examples/card-fraud/keel.toml[/] then open docs/site/index.html
    """
    from keel.docs import check_docs, write_docs

    s = _load(spec)
    if check:
        problems = check_docs(s, out_dir)
        for problem in problems:
            out.print(f"[yellow]✗[/] {problem}", soft_wrap=True)
        if problems:
            raise typer.Exit(1)
        out.print("[green]Docs complete and current.[/]")
        return
    result = write_docs(s, out_dir)
    for created in result.human_created:
        out.print(f"Created {created} — answer its questions.")
    for problem in result.problems:
        out.print(f"[yellow]to do:[/] {problem}", soft_wrap=True)
    out.print(f"Docs: [bold]{result.index}[/] ({len(result.markdown)} Markdown files, {len(result.html)} pages)")


# --------------------------------------------------------------------------------------------------- demo
@app.command()
@handles_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo project (created).")] = Path("demo-out"),
    customers: Annotated[int, typer.Option(help="Customers to simulate.")] = 2000,
    terminals: Annotated[int, typer.Option(help="Terminals to simulate.")] = 4000,
    days: Annotated[int, typer.Option(help="Days to simulate (history + live).")] = 150,
    live_days: Annotated[int, typer.Option(help="Last days served through the API, with a drift injected; "
                                                "retraining needs about 5 weeks of them.")] = 42,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    fresh: Annotated[bool, typer.Option(help="Delete the folder first.")] = True,
) -> None:
    """Run the whole lifecycle on the embedded simulator with the flagship card-fraud spec.

    History (all but the last --live-days) trains the model; the live days, with a price inflation and a new
    fraud pattern injected, are served through the API with labels arriving 7 days late.

    Example: [bold]keel demo -o demo-out[/] (smaller and faster: [bold]--customers 1000 --terminals 2000 --days 120[/])
    """
    import pandas as pd

    from keel.data.contracts import check_contract
    from keel.data.fingerprint import fingerprint_source
    from keel.data.simulate import make_shift, write_simulation
    from keel.data.simulate import simulate as run_simulation
    from keel.data.sources import source_from_spec
    from keel.io import atomic_path

    if live_days < 1 or live_days > days - 65:
        raise KeelError(f"--live-days must be between 1 and days - 65 ({days - 65}): training needs 30 days of "
                        f"feature warm-up and 35 days of windows. Got {live_days} instead.")
    flagship = Path(__file__).parent / "examples" / "card-fraud.toml"
    if fresh and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "keel.toml"
    shutil.copyfile(flagship, spec_path)
    steps = _Steps()
    shift_day = days - live_days

    with steps("1. simulate", f"{days} days with the handbook's process; a drift injected from day {shift_day}"):
        sim = run_simulation(n_customers=customers, n_terminals=terminals, n_days=days, seed=seed,
                             shift=make_shift(shift_day, amount_factor=1.6, new_fraud=True))
        paths = write_simulation(sim, out_dir / "data")
        tx = sim.transactions
        live_start = tx["tx_datetime"].min().normalize() + pd.Timedelta(days=shift_day)
        history, live = tx[tx["tx_datetime"] < live_start], tx[tx["tx_datetime"] >= live_start]
        with atomic_path(paths["transactions"]) as tmp:
            history.to_parquet(tmp, index=False)
        with atomic_path(out_dir / "data" / "live.parquet") as tmp:
            live.to_parquet(tmp, index=False)
        steps.done(f"{len(history):,} history transactions (fraud {history['tx_fraud'].mean():.3%}); "
                   f"{len(live):,} live ones from {live_start:%Y-%m-%d} (fraud {live['tx_fraud'].mean():.3%}, "
                   "prices ×1.6, a new card-testing pattern)", paths["transactions"])

    s = _load(spec_path)
    with steps("2. validate", "the data contract declared in keel.toml"):
        src = source_from_spec(s)
        report = check_contract(s, src)
        if not report.ok:
            _print_contract(report)
            raise KeelError("The simulated data breaks its contract; this is a bug in the simulator or the spec.")
        steps.done(f"contract holds on {report.rows:,} rows; fingerprint {fingerprint_source(src)[:12]}", spec_path)

    with steps("3. features", "point-in-time window features, materialised with lineage"):
        from keel.features.definitions import feature_names, resolve_definitions
        from keel.features.offline import build_features

        built = build_features(s)
        n_features = len(feature_names(resolve_definitions(s.features, s.data)))
        steps.done(f"{built.rows_total:,} rows × {n_features} features, events up to {built.max_event_time}",
                   built.path)

    with steps("4. train", "baselines vs candidates on a time split with a 7-day label-delay gap"):
        outcome = run_training(s, register=True)
        steps.done(f"chosen {outcome.best.name}: test AP {outcome.best.test['average_precision']:.3f}, "
                   f"Card Precision@100 {outcome.best.test.get('card_precision_at_k', float('nan')):.3f}",
                   s.state_dir)

    with steps("5. registry", "champion/challenger aliases on the local MLflow store"):
        from keel.registry import Registry

        registry = Registry.from_spec(s)
        if registry.resolve("champion") is None:
            registry.promote(outcome.registered.version, actor="keel demo", force=True,
                             reason="demo: first model made champion so the service has one to load")
        steps.done(f"champion is version {registry.resolve('champion')}; `keel models list -s {spec_path}`",
                   s.state_dir / "mlflow.db")

    with steps("6. serve", "the live days through the API (online features, labels 7 days late)"):
        served = _demo_serve(s, history, live)
        steps.done(served, s.store_path(s.serving.prediction_log))

    with steps("7. score", "the live days in batch (nightly audit), out of core, atomically written"):
        from keel.score import run_score

        scored = run_score(s, out_dir / "data" / "live.parquet", out_dir / "scores" / "live.parquet",
                           history=s.resolve(s.data.source))
        counts = ", ".join(f"{k}: {v:,}" for k, v in sorted(scored.decisions.items()))
        steps.done(f"{scored.rows:,} rows ({counts}; {scored.rejected:,} rejected) in "
                   f"{scored.seconds:.1f} s", scored.output)

    with steps("8. ingest", "the warehouse catches up: live events join the source table (labels as known)"):
        with atomic_path(paths["transactions"]) as tmp:
            pd.concat([history, live], ignore_index=True).to_parquet(tmp, index=False)
        steps.done(f"{len(history) + len(live):,} rows in the source; retraining uses only labels older than "
                   f"{s.data.label_delay.days} days", paths["transactions"])

    with steps("9. monitor", "drift, delayed-label performance, skew and operations over the prediction log"):
        from keel.monitor.triggers import run_monitor

        monitored = run_monitor(s, out_dir=s.state_dir / "monitor")
        fired = [f for f in monitored.firings if f.fired]
        steps.done(f"level {monitored.level.upper()} (exit code {monitored.exit_code}); fired: "
                   f"{'; '.join(f'{f.name} ({f.reason})' for f in fired) or 'nothing'}",
                   monitored.paths.get("html"))

    with steps("10. retrain", "a challenger on the latest labelled window, compared on the same rows"):
        from keel.monitor.retrain import retrain as run_retrain

        retrained = run_retrain(s, progress=lambda m: out.print(f"   · {m}"))
        steps.done(retrained.decision or ("promoted" if retrained.promoted else "champion kept"),
                   s.state_dir / "mlflow.db")

    with steps("11. docs", "design doc, model cards, operating note, evidence pack, static site"):
        from keel.docs import write_docs

        site = write_docs(s)
        steps.done(f"{len(site.markdown)} documents; {len(site.problems)} human parts still to write", site.index)

    out.print(f"\n[bold green]Demo finished[/] in {steps.total:.1f} s. Project folder: [bold]{out_dir}[/]")
    out.print(f"Open [bold]{site.index}[/] (offline). Next: `keel serve -s {spec_path}` and the README's curl "
              f"example; `keel ui -s {spec_path}`")


def _demo_serve(s: Any, history: Any, live: Any) -> str:
    """Replay live days through the API in-process: batches per day, labels posted once they are due."""
    import logging
    import warnings

    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's TestClient asks for httpx2; irrelevant in-process
        from fastapi.testclient import TestClient

    from keel.features.materialize import warm_online_store
    from keel.features.online import OnlineStore
    from keel.serve.app import JsonFormatter, create_app

    data = s.data
    handler = logging.FileHandler(s.state_dir / "serve.log")  # the service's JSON lines go to a file, not the demo
    handler.setFormatter(JsonFormatter())
    service_log = logging.getLogger("keel.serve")
    service_log.handlers[:], service_log.propagate = [handler], False
    store = OnlineStore.from_spec(s)
    warmed = warm_online_store(s, store)
    store.close()
    fields = [data.id_column, data.timestamp, *data.entity_keys, *s.features.raw]
    recent = history[history[data.timestamp] > history[data.timestamp].max() - data.label_delay]
    pending = pd.concat([recent, live])[[data.id_column, data.timestamp, data.label]]
    pending = pending.assign(at=pending[data.timestamp] + data.label_delay).sort_values("at")
    decisions: dict[str, int] = {}
    fallbacks = labels_posted = 0
    days = live[data.timestamp].dt.normalize()
    with TestClient(create_app(s)) as client, out_progress() as bar:
        task = bar.add_task("serving live days", total=len(live))
        for day in sorted(days.unique()):
            # Labels that become known during the day go in first, each with its own known-at time: the store
            # counts a label only for events at or after it, exactly as the offline pipeline does.
            due = pending[(pending["at"] > day) & (pending["at"] <= day + pd.Timedelta(days=1))]
            for chunk in range(0, len(due), s.serving.max_batch):
                part = due.iloc[chunk:chunk + s.serving.max_batch]
                body = [{"event_id": int(r[data.id_column]), "label": float(r[data.label]),
                         "at": r["at"].isoformat()} for r in part.to_dict("records")]
                client.post("/v1/labels", json={"labels": body}).raise_for_status()
                labels_posted += len(body)
            todays = live[days == day]
            for chunk in range(0, len(todays), s.serving.max_batch):
                part = todays.iloc[chunk:chunk + s.serving.max_batch]
                events = [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in rec.items()}
                          for rec in part[fields].to_dict("records")]
                resp = client.post("/v1/predict/batch", json={"events": events})
                if resp.status_code != 200:
                    raise KeelError(f"The demo's batch request failed with {resp.status_code}: {resp.text[:300]}")
                for item in resp.json()["data"]:
                    decisions[item["decision"]] = decisions.get(item["decision"], 0) + 1
                    fallbacks += bool(item["fallback"])
                bar.advance(task, len(part))
        one = live.iloc[-1]
        single = client.post("/v1/predict", json={k: (one[k].isoformat() if hasattr(one[k], "isoformat") else
                                                      one[k].item() if hasattr(one[k], "item") else one[k])
                                                  for k in fields}).json()
        ready = client.get("/ready").json()
    per_day = decisions.get(s.decision.positive_action, 0) / max(days.nunique(), 1)
    return (f"warmed the online store with {warmed.events:,} events; served {len(live):,} events "
            f"({', '.join(f'{k}: {v:,}' for k, v in sorted(decisions.items()))}; {per_day:.0f} "
            f"{s.decision.positive_action}s/day; fallback {fallbacks:,}); {labels_posted:,} labels posted; "
            f"/ready: {ready['status']}; last event {_answer_text(single)}")


def _answer_text(answer: dict[str, Any]) -> str:
    """One /v1/predict answer in words; a fallback answer has no model score (it is a rule's decision)."""
    if answer.get("score") is None:
        return f"answered by the fallback ({answer.get('fallback_reason')}) → {answer['decision']}"
    return f"scored {answer['score']:.4f} → {answer['decision']}"


def out_progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=out, transient=True)


class _Steps:
    """Prints each demo step with its time and where its outputs are."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0 = 0.0

    def __call__(self, name: str, what: str) -> _Steps:
        self._name = name
        out.print(f"[bold cyan]{name}[/] — {what}")
        return self

    def __enter__(self) -> _Steps:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total += time.perf_counter() - self._t0

    def done(self, message: str, where: Path | str | None = None) -> None:
        took = time.perf_counter() - self._t0
        out.print(f"   [green]✓[/] {message} [dim]({took:.1f} s{'; ' + str(where) if where else ''})[/]")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
