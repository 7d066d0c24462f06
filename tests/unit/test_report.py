"""The training report on a real (small) training outcome: files, self-containment, order, computed numbers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.data.simulate import simulate, write_simulation
from keel.errors import TrainingError
from keel.evaluate import report as R
from keel.evaluate.metrics import Interval
from keel.evaluate.split import RANDOM_SPLIT_WARNING
from keel.spec import load_spec
from keel.train import TrainOutcome, train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> TrainOutcome:
    root = tmp_path_factory.mktemp("fraud")
    write_simulation(simulate(n_customers=400, n_terminals=800, n_days=75, seed=1), root / "data")
    shutil.copy(EXAMPLE, root / "keel.toml")
    spec = load_spec(root / "keel.toml")
    models = spec.models.model_copy(update={"candidates": ["lightgbm"], "search_trials": 1, "threads": 1,
                                            "bootstrap": 100})
    return train(spec.model_copy(update={"models": models}))


@pytest.fixture(scope="module")
def written(outcome: TrainOutcome, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return R.write_report(outcome, tmp_path_factory.mktemp("reports") / "run-1")


@pytest.fixture(scope="module")
def markdown(written: dict[str, Path]) -> str:
    return written["markdown"].read_text(encoding="utf-8")


def _text(o: TrainOutcome) -> str:
    return R.render_markdown(R.build_report(o, figures=False))


def _with_baseline(o: TrainOutcome, name: str, **changes: object) -> TrainOutcome:
    evaluated = [dataclasses.replace(e, **changes) if e.name == name else e for e in o.evaluated]
    best = next(e for e in evaluated if e.name == o.best.name)
    return dataclasses.replace(o, evaluated=evaluated, best=best)


def _num(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", cell)]


def test_every_file_is_written_and_returned(written: dict[str, Path]):
    assert {"markdown", "html", "metrics", "roc", "pr", "calibration", "cost_curve",
            "score_distribution"} <= set(written)
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0, path
    for key in ("roc", "pr", "calibration", "cost_curve", "score_distribution"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folder = written["markdown"].parent
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temp folder
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_html_is_self_contained(written: dict[str, Path]):
    page = written["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)


def test_headings_appear_in_order(written: dict[str, Path], markdown: str):
    page = written["html"].read_text(encoding="utf-8")
    keys = ["Which decision", "Where the features and labels come from", "Which baselines the model beats",
            "Which metric matches the decision", "Which errors matter most", "Which data to collect next",
            "Search budget and timings"]
    for text in (markdown, page):
        positions = [text.find(k) for k in keys]
        assert all(p >= 0 for p in positions), positions
        assert positions == sorted(positions)
    assert [line for line in markdown.splitlines() if line.startswith("## ")] == [f"## {h}" for h in R.HEADINGS]


def test_numbers_in_the_report_match_the_outcome(outcome: TrainOutcome, markdown: str):
    m = outcome.metrics()
    best = outcome.best.name
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {best} | candidate (chosen)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in markdown.splitlines() if line.startswith("| model | role |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    ap = _num(cells[columns.index("average precision")])
    assert ap == pytest.approx([m["test.average_precision"], m["test.average_precision.low"],
                                m["test.average_precision.high"]], abs=6e-4)
    auc = _num(cells[columns.index("ROC AUC")])
    assert auc[0] == pytest.approx(m["test.roc_auc"], abs=6e-4)
    prevalence = float(re.search(r"a prevalence of (\d+\.\d+) %", markdown).group(1))
    assert prevalence / 100 == pytest.approx(m["test.prevalence"], abs=6e-5)
    tp = re.search(r"\| actually positive \| ([\d,]+) \(true positives\) \| ([\d,]+) \(false negatives\)", markdown)
    assert int(tp.group(1).replace(",", "")) == m["test.tp"]
    assert int(tp.group(2).replace(",", "")) == m["test.fn"]
    threshold = float(re.search(r"The threshold \*\*(\d+\.\d+)\*\*", markdown).group(1))
    assert threshold == pytest.approx(outcome.threshold_choice.threshold, abs=6e-5)


def test_metrics_json_holds_the_outcome_metrics(outcome: TrainOutcome, written: dict[str, Path]):
    text = written["metrics"].read_text(encoding="utf-8")
    data = json.loads(text)
    assert "NaN" not in text and "Infinity" not in text
    assert data["chosen"] == outcome.best.name
    assert data["metrics"] == pytest.approx(outcome.metrics())
    assert data["test_decisions"]["tp"] == outcome.metrics()["test.tp"]
    assert data["data_fingerprint"] == outcome.dataset.fingerprint
    assert len(data["comparison"]) == len(outcome.evaluated)


def test_the_prior_is_beaten_and_said_so(outcome: TrainOutcome, markdown: str):
    # The prior's interval sits far below any model with signal: the report must say "beats".
    assert f"**{outcome.best.name} beats prior** on average precision" in markdown


def test_overlapping_intervals_say_does_not_beat(outcome: TrainOutcome):
    best = outcome.best
    same = {m: Interval(iv.estimate, iv.low, iv.high, iv.level, iv.resamples) for m, iv in best.intervals.items()}
    test = {**best.test, "average_precision": best.test["average_precision"] - 1e-3}
    tied = _with_baseline(outcome, "logistic regression", intervals=same, test=test)
    vs = [v for v in R.verdicts(tied) if v.baseline == "logistic regression" and v.metric == "average_precision"]
    assert vs and vs[0].better and vs[0].separated is False and not vs[0].beats
    text = _text(tied)
    assert f"**{best.name} does not beat logistic regression** on average precision with confidence" in text
    assert "intervals overlap" in text
    assert f"**Verdict: {best.name} does not beat every baseline.**" in text


def test_a_baseline_that_wins_is_named_the_winner(outcome: TrainOutcome):
    best = outcome.best
    high = best.test["average_precision"] + 0.2
    strong = _with_baseline(outcome, "prior", test={**best.test, "average_precision": high},
                            intervals={**best.intervals,
                                       "average_precision": Interval(high, high - 0.01, high + 0.01, 0.95, 100)})
    text = _text(strong)
    assert f"**prior wins over {best.name}** on average precision" in text
    assert "do not overlap" in text.split("**prior wins over")[1].split("\n")[0]


def test_random_split_warning_is_loud(outcome: TrainOutcome):
    text = _text(dataclasses.replace(outcome, split_warning=RANDOM_SPLIT_WARNING))
    first = text.index("> **WARNING:** Random split")
    assert first < text.index("## 1.")
    section3 = text[text.index("## 3."):text.index("## 4.")]
    assert "> **WARNING:** Random split" in section3
    assert "Record an event time for every row" in text
    assert "WARNING" not in _text(outcome)


def test_prequential_outcome_shows_the_per_fold_table(outcome: TrainOutcome):
    rows, evaluated = [], []
    for e in outcome.evaluated:
        test = dict(e.test)
        for fold in (0, 1):
            rows.append({"model": e.name, "role": e.role, "fold": fold, "test_window": f"week {fold}",
                         "train_window": f"before week {fold}", "roc_auc": 0.7 + fold / 100,
                         "average_precision": 0.3 + fold / 100})
        test.update(roc_auc_std=0.005, average_precision_std=0.005)
        evaluated.append(dataclasses.replace(e, test=test, intervals={}))
    best = next(e for e in evaluated if e.name == outcome.best.name)
    text = _text(dataclasses.replace(outcome, evaluated=evaluated, best=best, prequential=pd.DataFrame(rows)))
    assert "Per test fold" in text and "| before week 1 | week 1 | 0.710 | 0.310 |" in text
    assert "mean ± std over the prequential test folds" in text
    assert "in-sample and optimistic" in text


def test_data_to_collect_next_is_computed_from_the_outcome(outcome: TrainOutcome):
    t = R._test_facts(outcome)
    sentences = R.collect_next(outcome, t)
    worst = outcome.slices.worst[outcome.slices.worst["dimension"] != "period"].iloc[0]
    assert any(f"`{worst['dimension']}` in `{worst['segment']}`" in s and f"{worst['average_precision']:.3f}" in s
               for s in sentences)
    train_w = outcome.windows["train"]
    assert any(f"holds {train_w.positives:,} positives in {train_w.rows:,} rows" in s for s in sentences)
    # Leakage sentences come from the findings, not from a template: without findings they go.
    assert any("Leakage finding" in s for s in sentences) == bool(outcome.leakage)
    clean = dataclasses.replace(outcome, leakage=[])
    assert not any("Leakage finding" in s for s in R.collect_next(clean, t))


def test_accuracy_sentence_uses_the_prevalence(outcome: TrainOutcome, markdown: str):
    y = np.asarray(outcome.dataset.y)[outcome.test_mask]
    assert f"Approving everything is {100 * (1 - y.mean()):.2f} % accurate" in markdown


def test_the_folder_is_replaced_whole_or_not_at_all(outcome: TrainOutcome, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    for name in ("roc_png", "pr_png", "reliability_png", "cost_curve_png", "score_distribution_png"):
        monkeypatch.setattr(R.plots, name, lambda *a, **k: b"\x89PNG\r\n\x1a\n")  # drawing is not under test
    monkeypatch.setattr(R, "FIGURES", {**R.FIGURES, "roc": "missing-folder/roc.png"})
    with pytest.raises(OSError):
        R.write_report(outcome, out)
    assert (out / "stale.txt").read_text() == "old" and not (out / "report.md").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_outcome_without_test_scores_is_refused(outcome: TrainOutcome):
    with pytest.raises(TrainingError, match="no test scores"):
        R.build_report(dataclasses.replace(outcome, test_scores=None), figures=False)


def test_verdicts_agree_with_the_training_outcome(outcome: TrainOutcome, markdown: str):
    vs = R.verdicts(outcome)
    for baseline, results in outcome.beats_baselines.items():
        for metric, beaten in results.items():
            v = next(v for v in vs if v.baseline == baseline and v.metric == metric)
            assert v.beats == beaten, (baseline, metric)
    everything = all(all(r.values()) for r in outcome.beats_baselines.values())
    assert R.beats_every_baseline(outcome) == everything
    verdict = "beats every baseline" if everything else "does not beat every baseline"
    assert f"**Verdict: {outcome.best.name} {verdict}" in markdown
