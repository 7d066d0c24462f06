"""`keel pipeline run`: validate -> features -> train (+ register) -> score -> monitor, as a small cached DAG.

Each step has an *input key*: a hash of exactly what it reads (the source fingerprint, the spec sections it
uses, the champion version, ...). A step runs when its key differs from the one recorded after its last
successful run, when a step before it ran in this invocation, or when ``--from`` names it or an earlier step;
otherwise it is skipped as cached. The record (``state_dir/pipeline.json``) is written atomically after each
successful step, so an interrupted run resumes where it stopped.

Example::

    result = run_pipeline(spec, start="train", on_event=print)
    [(s.name, s.status) for s in result.steps]  # [('validate', 'cached'), ..., ('train', 'ran'), ...]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keel.errors import KeelError
from keel.io import atomic_write_json
from keel.spec import Spec

STEPS = ("validate", "features", "train", "score", "monitor")
Event = Callable[[str, str, str], None]  # (step, status, message)


@dataclass
class StepResult:
    name: str
    status: str  # ran | cached | skipped | failed
    message: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineResult:
    steps: list[StepResult]
    record: Path

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.steps)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cron_line(spec: Spec, spec_path: Path) -> str:
    """A crontab line that runs the pipeline once per monitoring window (daily by default), at 02:00."""
    hours = spec.monitoring.window.total_seconds() / 3600
    when = "0 2 * * *" if hours >= 24 else f"0 */{max(int(hours), 1)} * * *"
    return f"{when} cd {spec_path.resolve().parent} && keel pipeline run -s {spec_path.name} >> .keel/pipeline.log 2>&1"


def run_pipeline(spec: Spec, *, start: str | None = None, on_event: Event | None = None,
                 score_output: Path | None = None) -> PipelineResult:
    """Run the steps in order with caching; stops at the first failing step (its error propagates)."""
    import time

    if start is not None and start not in STEPS:
        raise KeelError(f"--from must be one of {', '.join(STEPS)}. Got {start!r} instead.")
    say = on_event or (lambda _s, _st, _m: None)
    record_path = spec.state_dir / "pipeline.json"
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.exists() else {}
    results: list[StepResult] = []
    selected = start is None
    upstream_ran = False
    context: dict[str, Any] = {"score_output": score_output}
    for name in STEPS:
        step = _STEP_FUNCS[name]
        previous = record.get(name, {})
        if not selected and name != start:
            results.append(StepResult(name, "cached", f"before --from {start}", outputs=previous.get("outputs", {})))
            say(name, "cached", results[-1].message)
            continue
        forced = not selected or start is not None  # --from: this step and every later one run
        selected = True
        key = step.key(spec, context)
        if key is None:
            results.append(StepResult(name, "skipped", step.skip_reason))
            say(name, "skipped", step.skip_reason)
            continue
        if not (forced or upstream_ran or previous.get("key") != key):
            results.append(StepResult(name, "cached", f"inputs unchanged since {previous.get('finished', '?')}",
                                      outputs=previous.get("outputs", {})))
            say(name, "cached", results[-1].message)
            continue
        say(name, "running", step.what)
        t0 = time.perf_counter()
        message, outputs = step.run(spec, context)
        seconds = time.perf_counter() - t0
        results.append(StepResult(name, "ran", message, seconds, outputs))
        say(name, "ran", f"{message} ({seconds:.1f} s)")
        upstream_ran = True
        record[name] = {"key": step.key(spec, context), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                        "outputs": outputs}
        atomic_write_json(record_path, record)
    return PipelineResult(steps=results, record=record_path)


@dataclass(frozen=True)
class _Step:
    what: str
    key: Callable[[Spec, dict[str, Any]], str | None]
    run: Callable[[Spec, dict[str, Any]], tuple[str, dict[str, str]]]
    skip_reason: str = ""


def _source_fingerprint(spec: Spec, context: dict[str, Any]) -> str:
    if "fingerprint" not in context:
        from keel.data.fingerprint import fingerprint_source
        from keel.data.sources import source_from_spec

        context["fingerprint"] = fingerprint_source(source_from_spec(spec))
    return str(context["fingerprint"])


def _validate_key(spec: Spec, context: dict[str, Any]) -> str:
    return _digest(_source_fingerprint(spec, context), spec.content()["data"])


def _validate_run(spec: Spec, context: dict[str, Any]) -> tuple[str, dict[str, str]]:
    from keel.data.contracts import check_contract
    from keel.data.sources import source_from_spec

    report = check_contract(spec, source_from_spec(spec))
    report.raise_for_findings()
    warnings = len(report.findings)
    return f"contract holds on {report.rows:,} rows" + (f" ({warnings} warnings)" if warnings else ""), {}


def _features_key(spec: Spec, context: dict[str, Any]) -> str | None:
    if not (spec.features.windows or spec.features.row or spec.features.ratios):
        return None
    from keel.features.definitions import definitions_hash, resolve_definitions

    return _digest(_source_fingerprint(spec, context), definitions_hash(resolve_definitions(spec.features, spec.data)))


def _features_run(spec: Spec, context: dict[str, Any]) -> tuple[str, dict[str, str]]:
    from keel.features.offline import build_features

    built = build_features(spec)
    return (f"{built.rows_added:,} rows added, {built.rows_total:,} in all ({built.reason})",
            {"table": str(built.path)})


def _train_key(spec: Spec, context: dict[str, Any]) -> str:
    return _digest(_source_fingerprint(spec, context), spec.spec_hash())


def _train_run(spec: Spec, context: dict[str, Any]) -> tuple[str, dict[str, str]]:
    from keel.evaluate.report import write_report
    from keel.registry import Registry
    from keel.train import record, train

    outcome = train(spec, fingerprint=_source_fingerprint(spec, context))  # the source is not streamed again
    run_dir = spec.resolve("reports") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    written = write_report(outcome, run_dir)
    info = record(outcome, Registry.from_spec(spec), artifacts={f"report/{p.name}": p for p in written.values()},
                  actor="keel pipeline")
    return (f"{outcome.best.name}: test AP {outcome.best.test['average_precision']:.3f}; version {info.version} "
            f"{info.note}", {"report": str(written["html"]), "run": info.run_id})


def _champion(spec: Spec) -> int | None:
    from keel.registry import Registry

    return Registry.from_spec(spec).resolve(spec.serving.alias)


def _score_key(spec: Spec, context: dict[str, Any]) -> str | None:
    champion = _champion(spec)
    return None if champion is None else _digest(_source_fingerprint(spec, context), champion)


def _score_run(spec: Spec, context: dict[str, Any]) -> tuple[str, dict[str, str]]:
    from keel.score import run_score

    output = context.get("score_output") or spec.state_dir / "scores" / "scores.parquet"
    summary = run_score(spec, spec.resolve(spec.data.source), output, model=spec.serving.alias)
    counts = ", ".join(f"{k}: {v:,}" for k, v in sorted(summary.decisions.items()))
    return (f"{summary.rows:,} rows scored by version {summary.model_version} ({counts}; {summary.rejected:,} "
            "rejected)", {"scores": summary.output, "summary": summary.summary_path})


def _monitor_key(spec: Spec, context: dict[str, Any]) -> str | None:
    log = spec.store_path(spec.serving.prediction_log)
    if not log.exists():
        return None
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(log.parent.glob(log.name + "*"))]
    return _digest(stamp, _champion(spec), spec.content()["monitoring"])


def _monitor_run(spec: Spec, context: dict[str, Any]) -> tuple[str, dict[str, str]]:
    from keel.monitor.triggers import run_monitor

    result = run_monitor(spec)
    fired = ", ".join(f.name for f in result.firings if f.fired) or "nothing fired"
    return f"level {result.level} ({fired})", {k: str(v) for k, v in result.paths.items()}


_STEP_FUNCS: dict[str, _Step] = {
    "validate": _Step("the data contract", _validate_key, _validate_run),
    "features": _Step("point-in-time feature table", _features_key, _features_run,
                      skip_reason="the spec declares no derived features"),
    "train": _Step("baselines vs candidates, report, registry", _train_key, _train_run),
    "score": _Step("batch re-score of the source with the champion", _score_key, _score_run,
                   skip_reason="no champion in the registry yet"),
    "monitor": _Step("drift, delayed-label performance, operations, triggers", _monitor_key, _monitor_run,
                     skip_reason="no prediction log yet (nothing served)"),
}


__all__ = ["STEPS", "PipelineResult", "StepResult", "cron_line", "run_pipeline"]
