"""The evidence pack: five short stories from the project's own records, each citing its runs and numbers."""

from __future__ import annotations

from keel.docs.fmt import code, count, duration, interval, metric_label, money, num, pct, period, run_ref
from keel.docs.human import HumanText
from keel.docs.markup import Document
from keel.docs.model_card import add_human
from keel.docs.records import ProjectRecords, VersionRecord
from keel.spec import Spec

LOWER = {"expected_cost", "log_loss", "brier", "ece"}


def _cite(ref: VersionRecord, *keys: str) -> str:
    return f"Records: {run_ref(ref.run_id)} (version {ref.version}); " + ", ".join(code(k) for k in keys) + "."


def baseline_story(doc: Document, spec: Spec, records: ProjectRecords, ref: VersionRecord) -> None:
    head = spec.decision.headline_metric
    label = metric_label(head, spec)
    models = ref.models()
    names = ref.baseline_names()
    scored = [(shown, value, ml) for ml, shown in names.items()
              if (value := models.get(f"baseline.{ml}", {}).get(head)) is not None]
    mine = ref.metric(f"test.{head}")
    doc.heading("1. Baseline story")
    if not scored or mine is None:
        doc.text("The run recorded no baseline comparison.")
        return
    best = (min if head in LOWER else max)(scored, key=lambda s: s[1])
    prior = models.get("baseline.prior", {})
    text = (f"Before any model we measured what simple rules reach on the same test window. The best of them, "
            f"**{best[0]}**, reaches {label} {num(best[1])}; the prior (no signal) reaches "
            f"{num(prior.get(head))} and its average precision equals the prevalence, {num(prior.get('average_precision'))}. "
            f"The chosen {ref.params.get('model', 'model')} reaches {num(mine)} "
            f"{interval(ref.metric(f'test.{head}.low'), ref.metric(f'test.{head}.high'))}")
    beats = ref.report_value("beats_every_baseline")
    if beats is True:
        text += ", and beats every baseline with separated intervals: the added complexity is paid for."
    elif beats is False:
        losing = sorted({v["baseline"] for v in ref.report_value("verdicts") or [] if not v.get("beats")
                         and v.get("metric") != "expected_cost"})
        text += (f", but does **not** beat every baseline ({', '.join(losing)} hold on some metric): the simple rule "
                 "stays the fallback, and the model has to earn its place on the next data.")
    else:
        text += "."
    doc.text(text)
    if len(records.versions) > 1:
        doc.table(["version", "run", label, "aliases"],
                  [[str(v.version), code(v.run_id), num(v.metric(f"test.{head}")), ", ".join(v.info.aliases) or "-"]
                   for v in records.versions])
    doc.note(_cite(ref, f"test.{head}", f"baseline.{best[2]}.{head}", f"baseline.prior.{head}"))


def data_story(doc: Document, spec: Spec, ref: VersionRecord, human: dict[str, HumanText]) -> None:
    data = spec.data
    doc.heading("2. Data story")
    windows = ref.report_value("windows") or {}
    train = windows.get("train") or {}
    test = windows.get("test") or {}
    text = (f"Labels ({code(data.label)}) come from {code(data.source)} and are known {duration(data.label_delay)} "
            f"after each event, so every window is separated by a {duration(spec.gap)} gap and label-based features "
            "only read labels old enough to be known.")
    if train and test:
        text += (f" Training used {train.get('dates')} ({count(train.get('rows'))} events, "
                 f"{count(train.get('positives'))} positives); the test window {test.get('dates')} "
                 f"({count(test.get('rows'))} events, {count(test.get('positives'))} positives).")
    doc.text(text)
    findings = ref.report_value("leakage") or []
    if findings:
        doc.text("What could leak, as the leakage checks found it:")
        doc.bullets([f"{code(f.get('column'))}: {f.get('reason')}" for f in findings])
    else:
        doc.text("The leakage checks (single-feature AUC, functions of the label, future timestamps, overlaps) "
                 "found nothing on the model inputs.")
    removed = ref.report_value("removed_known_positives") or {}
    if removed:
        doc.text("Changed because of it: " + ", ".join(f"{count(v)} events of already-known positive entities "
                                                      f"dropped from {k}" for k, v in removed.items())
                 + (f"; {', '.join(code(c) for c in data.exclude)} excluded from the inputs" if data.exclude else "")
                 + ".")
    add_human(doc, human, "labels")
    doc.note(f"Records: {run_ref(ref.run_id)}; data fingerprint {code(ref.info.data_fingerprint[:16])}; "
             "training report `leakage`, `windows`, `removed_known_positives`.")


def evaluation_story(doc: Document, spec: Spec, ref: VersionRecord, human: dict[str, HumanText]) -> None:
    d = spec.decision
    doc.heading("3. Evaluation story")
    decisions = ref.report_value("test_decisions") or {}
    th = ref.report_value("threshold") or {}
    text = (f"The decision is a {d.positive_action} queue, so the headline is {metric_label(d.headline_metric, spec)}; "
            f"errors are priced (a miss costs {code(d.costs.false_negative)}, a needless {d.positive_action} "
            f"{code(d.costs.false_positive)}). At the threshold {num(ref.params.get('threshold'))} (bound by "
            f"{th.get('bound', 'not recorded')}) the test window cost {money(decisions.get('total_cost'))} against "
            f"{money(decisions.get('do_nothing_cost'))} for doing nothing, with precision "
            f"{num(ref.metric('test.precision'))} and recall {num(ref.metric('test.recall'))}.")
    doc.text(text)
    worst = ref.report_value("worst_slices") or []
    if worst:
        w = worst[0]
        doc.text(f"Error analysis: the weakest segment is {code(w.get('dimension'))} in {code(w.get('segment'))} "
                 f"({count(w.get('rows'))} events, {count(w.get('positives'))} positives), average precision "
                 f"{num(w.get('average_precision'))} against {num(ref.metric('test.average_precision'))} overall.")
    nxt = ref.report_value("collect_next") or []
    if nxt:
        doc.text("What the report says to collect next: " + nxt[0])
    add_human(doc, human, "metric-choice")
    doc.note(_cite(ref, "test.precision", "test.recall", "test.average_precision", "threshold")
             .replace("`threshold`", "parameter `threshold`"))


def production_story(doc: Document, spec: Spec, records: ProjectRecords, ref: VersionRecord) -> None:
    doc.heading("4. Production story")
    p = spec.project
    champion = records.champion
    text = (f"It runs {p.deployment} ({p.deployment_reason.rstrip('.') or 'reason not stated'}), serving the "
            f"{code(spec.serving.alias)} alias"
            + (f", now version {champion.version} ({run_ref(champion.run_id)})" if champion else ", which is not set yet")
            + ". When the model cannot answer, "
            + (f"the rule {code(spec.fallback_rule)} decides" if spec.fallback_rule else "the negative action is taken")
            + f". {len(spec.monitoring.triggers)} trigger(s) watch it ("
            + (", ".join(t.name for t in spec.monitoring.triggers) or "none") + "); "
            + ("the latest [monitoring report](@monitor) is linked." if records.monitor_report
               else "monitoring has not run yet.")
            + " Rollback is one alias change (`keel models rollback`), retraining `keel retrain`.")
    doc.text(text)
    events = [e for e in records.history if e.alias == "champion"]
    if events:
        doc.table(["time (UTC)", "champion from", "to", "action", "actor", "reason"],
                  [[e.time.strftime("%Y-%m-%d %H:%M"), str(e.from_version or "-"), str(e.to_version or "-"),
                    e.action + (" (forced)" if e.forced else ""), e.actor, e.reason] for e in events[-8:]])
    else:
        doc.text("No champion change is recorded yet.")
    doc.note("Records: registry audit log (`keel models history`); versions "
             + ", ".join(f"{v.version} = {code(v.run_id)}" for v in records.versions) + ".")


def collaboration_story(doc: Document, spec: Spec, ref: VersionRecord, human: dict[str, HumanText]) -> None:
    d = spec.decision
    doc.heading("5. Collaboration story")
    th = ref.report_value("threshold") or {}
    rate = ref.metric("test.positive_rate")
    text = (f"The trade-off put to the product manager: the model finds more positives the more "
            f"{d.positive_action}s we afford.")
    if d.capacity and th:
        cap = f"{d.capacity.max_positives} {d.positive_action}s per {period(d.capacity.per)}"
        if th.get("bound") == "capacity":
            text += (f" Capacity binds: the cost-optimal threshold {num(th.get('cost_optimal_threshold'))} (expected "
                     f"cost per event {num(th.get('cost_optimal_expected_cost'))}) would need more than {cap}, so the "
                     f"threshold is raised to {num(th.get('threshold'))} (expected cost {num(th.get('expected_cost'))}"
                     "); the gap is what more reviewers would buy (validation).")
        else:
            text += (f" Capacity ({cap}) does not bind: the cost-optimal threshold {num(th.get('threshold'))} "
                     f"(expected cost per event {num(th.get('expected_cost'))}) stays within it; capacity alone would "
                     f"allow thresholds down to {num(th.get('capacity_threshold'))} (validation).")
    text += (f" On the test window {pct(rate)} of events were sent to {d.positive_action}, catching "
             f"{pct(ref.metric('test.recall'))} of the positives with precision {num(ref.metric('test.precision'))}.")
    doc.text(text)
    add_human(doc, human, "tradeoffs")
    doc.note(_cite(ref, "test.positive_rate", "test.recall", "test.precision")
             + " Training report `threshold` (validation).")


def build_evidence(spec: Spec, records: ProjectRecords, human: dict[str, HumanText]) -> Document:
    doc = Document(f"Evidence pack: {spec.project.name}")
    ref = records.reference
    doc.note("Five short stories from the project's own records, generated by `keel docs`. Each cites the runs "
             "and recorded values it draws on.")
    if ref is None:
        doc.missing("No model is registered yet: run `keel train`, then `keel docs`.")
        return doc
    baseline_story(doc, spec, records, ref)
    data_story(doc, spec, ref, human)
    evaluation_story(doc, spec, ref, human)
    production_story(doc, spec, records, ref)
    collaboration_story(doc, spec, ref, human)
    return doc


__all__ = ["build_evidence"]
