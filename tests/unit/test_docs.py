"""keel.docs without a registry: markup, human-text files, check_docs messages, atomic folder swap."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from keel.docs import check_docs, write_docs
from keel.docs.human import SECTIONS, ensure_human_files, human_dir, read_human
from keel.docs.markup import Document, render_html, render_markdown
from keel.docs.records import ProjectRecords, split_metrics
from keel.docs.site import html_resolver, md_resolver
from keel.errors import KeelError
from keel.spec import load_spec

FULL = """
[project]
name = "fraud"
owner = "risk team"
goals = ["catch fraud"]
non_goals = ["block payments"]
assumptions = ["labels in 7 days"]
constraints = ["100 reviews a day"]
deployment = "batch"
deployment_reason = "reviews happen next morning"

[decision]
question = "Review this card?"
positive_class = "fraud"
actor = "analysts"

[data]
source = "data/tx.parquet"
label = "y"
timestamp = "t"

[features]
raw = ["amount"]
"""


def make_spec(tmp_path: Path, text: str = FULL):
    (tmp_path / "keel.toml").write_text(text)
    return load_spec(tmp_path / "keel.toml")


def fill_human(spec) -> None:
    for section in SECTIONS:
        (human_dir(spec) / f"{section.name}.md").write_text(f"Written answer for {section.name}.\n\n- a point\n")


# ------------------------------------------------------------------------------------------------ markup
def test_links_resolve_per_format_and_text_is_escaped() -> None:
    doc = Document("T <1>")
    doc.text("See the [design](@design), the [report](@report-v3) and `a < b` with **bold** & <script>.")
    md = render_markdown(doc, md_resolver)
    page = render_html(doc, html_resolver)
    assert "[design](design.md)" in md and "[report](site/reports/report-v3.html)" in md
    assert '<a href="design.html">design</a>' in page and '<a href="reports/report-v3.html">report</a>' in page
    assert "<code>a &lt; b</code>" in page and "<strong>bold</strong>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "T &lt;1&gt;" in page


def test_human_block_keeps_paragraphs_and_bullets() -> None:
    doc = Document("T")
    doc.human("First paragraph\ncontinues.\n\n- one\n- two\n")
    page = render_html(doc, html_resolver)
    assert "<p>First paragraph continues.</p>" in page and "<ul><li>one</li><li>two</li></ul>" in page


def test_split_metrics_groups_by_model_with_dotted_and_odd_names() -> None:
    metrics = {"test.average_precision": 0.5, "test.average_precision.low": 0.4, "test.tp": 3.0,
               "baseline.rule: amount _ 2.5.average_precision": 0.2,
               "baseline.rule: amount _ 2.5.average_precision.low": 0.1, "baseline.prior.tp": 0.0,
               "candidate.hgb.average_precision": 0.45}
    grouped = split_metrics(metrics)
    assert grouped["test"] == {"average_precision": 0.5, "average_precision.low": 0.4, "tp": 3.0}
    assert grouped["baseline.rule: amount _ 2.5"] == {"average_precision": 0.2, "average_precision.low": 0.1}
    assert grouped["baseline.prior"] == {"tp": 0.0}
    assert grouped["candidate.hgb"] == {"average_precision": 0.45}


# ------------------------------------------------------------------------------------------------ human text
def test_human_files_are_created_once_and_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "human"
    created = ensure_human_files(folder)
    assert sorted(p.name for p in created) == sorted(f"{s.name}.md" for s in SECTIONS)
    assert not any(h.filled for h in read_human(folder).values())
    (folder / "labels.md").write_text("Chargebacks, 7 days late.\n")
    assert ensure_human_files(folder) == []
    assert (folder / "labels.md").read_text() == "Chargebacks, 7 days late.\n"
    texts = read_human(folder)
    assert texts["labels"].filled and texts["labels"].text == "Chargebacks, 7 days late."


@pytest.mark.parametrize("content, filled", [
    ("<!-- only a prompt -->\n", False),
    ("<!-- prompt -->\n\nTODO: answer the questions above.\n", False),
    ("An answer.\nTODO finish this\n", False),
    ("<!-- prompt -->\nAn answer.\n", True),
])
def test_filled_means_text_beyond_the_prompt_and_no_todo(tmp_path: Path, content: str, filled: bool) -> None:
    ensure_human_files(tmp_path)
    (tmp_path / "decision.md").write_text(content)
    assert read_human(tmp_path)["decision"].filled is filled


# ------------------------------------------------------------------------------------------------ check_docs
@pytest.mark.parametrize("remove, key", [
    ('owner = "risk team"\n', "project.owner"),
    ('goals = ["catch fraud"]\n', "project.goals"),
    ('non_goals = ["block payments"]\n', "project.non_goals"),
    ('deployment_reason = "reviews happen next morning"\n', "project.deployment_reason"),
    ('actor = "analysts"\n', "decision.actor"),
])
def test_check_names_each_missing_spec_field(tmp_path: Path, remove: str, key: str) -> None:
    spec = make_spec(tmp_path, FULL.replace(remove, ""))
    problems = check_docs(spec)
    assert any(p.startswith(f"keel.toml: {key} is empty") for p in problems), problems
    assert sum("keel.toml:" in p for p in problems) == 1


def test_check_names_missing_and_unfilled_human_files(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    problems = check_docs(spec)
    assert "docs/human/labels.md does not exist; run `keel docs` to create it with its questions." in problems
    write_docs(spec, records=ProjectRecords())
    problems = check_docs(spec)
    assert any(p.startswith("docs/human/escalation.md still holds its TODO line; answer: Who is on call")
               for p in problems)
    assert not any("keel.toml" in p for p in problems)


def test_check_passes_once_everything_is_written_and_current(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    write_docs(spec, records=ProjectRecords())
    fill_human(spec)
    assert check_docs(spec) == ["docs/human/decision.md, labels.md, metric-choice.md, tradeoffs.md, "
                                "limitations.md, escalation.md changed since the docs were generated; run "
                                "`keel docs` again."]
    result = write_docs(spec, records=ProjectRecords())
    assert result.problems == [] and check_docs(spec) == []
    (tmp_path / "keel.toml").write_text(FULL.replace("100 reviews a day", "80 reviews a day"))
    changed = load_spec(tmp_path / "keel.toml")
    assert check_docs(changed) == ["The docs in " + str(changed.resolve("docs")) + "/ were generated from another "
                                   "keel.toml; run `keel docs` again."]


# ------------------------------------------------------------------------------------------------ write_docs
def test_human_text_is_merged_and_survives_regeneration(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    first = write_docs(spec, records=ProjectRecords())
    assert len(first.human_created) == len(SECTIONS)
    design = (tmp_path / "docs" / "design.md").read_text()
    assert "> **TO WRITE:** Who acts on the prediction day to day" in design
    (human_dir(spec) / "decision.md").write_text("Analysts clear the queue by noon.\n")
    second = write_docs(spec, records=ProjectRecords())
    assert second.human_created == []
    assert (human_dir(spec) / "decision.md").read_text() == "Analysts clear the queue by noon.\n"
    design = (tmp_path / "docs" / "design.md").read_text()
    assert "Analysts clear the queue by noon." in design and "Who acts on the prediction day to day" not in design
    assert "Analysts clear the queue by noon." in (tmp_path / "docs" / "site" / "design.html").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".docs")]  # no temp folders left behind


def test_docs_without_a_model_say_so(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    result = write_docs(spec, records=ProjectRecords())
    assert result.versions == [] and result.index == tmp_path / "docs" / "site" / "index.html"
    assert "No model has been trained yet: run `keel train`" in (tmp_path / "docs" / "design.md").read_text()
    assert "No model is registered yet" in (tmp_path / "docs" / "evidence.md").read_text()
    index = (tmp_path / "docs" / "site" / "index.html").read_text()
    assert "Monitoring report: not run yet" in index and "No champion yet." in index
    manifest = json.loads((tmp_path / "docs" / "manifest.json").read_text())
    assert manifest["generator"] == "keel docs" and manifest["versions"] == {}


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    theirs = tmp_path / "handbook"
    theirs.mkdir()
    (theirs / "notes.md").write_text("mine")
    with pytest.raises(KeelError, match=r"handbook exists and was not written by `keel docs`"):
        write_docs(spec, theirs, records=ProjectRecords())
    assert (theirs / "notes.md").read_text() == "mine"


def test_failed_build_leaves_the_old_docs_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec(tmp_path)
    write_docs(spec, records=ProjectRecords())
    before = (tmp_path / "docs" / "design.md").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    (tmp_path / "keel.toml").write_text(FULL.replace("catch fraud", "catch more fraud"))
    changed = load_spec(tmp_path / "keel.toml")
    monkeypatch.setattr(os, "umask", boom)  # fails after the new tree is built, before the swap
    with pytest.raises(RuntimeError, match="disk full"):
        write_docs(changed, records=ProjectRecords())
    monkeypatch.undo()
    assert (tmp_path / "docs" / "design.md").read_text() == before
    assert len(list((tmp_path / "docs" / "human").glob("*.md"))) == len(SECTIONS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".docs")]
