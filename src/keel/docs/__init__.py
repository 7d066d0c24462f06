"""`keel docs`: the design doc, model cards, operating note and evidence pack, from the spec and recorded runs.

Every number comes from the registry (the runs' metrics and parameters, the training report each run logged);
the parts no record can supply are written by people in ``docs/human/*.md`` (created with prompts on the first
run, never overwritten) and merged in. :func:`check_docs` lists what is still missing.

Example::

    spec = load_spec("examples/card-fraud/keel.toml")
    result = write_docs(spec)          # docs/ beside keel.toml
    result.index                       # docs/site/index.html (opens offline)
    check_docs(spec)                   # [] once the spec and the human text are complete
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from keel.docs.design import build_design
from keel.docs.evidence import build_evidence
from keel.docs.human import SECTIONS, ensure_human_files, human_dir, read_human
from keel.docs.markup import Document
from keel.docs.model_card import build_model_card
from keel.docs.operating import build_operating
from keel.docs.records import ProjectRecords, collect_records
from keel.docs.site import MANIFEST, SITE, build_index, file_hash, manifest_for, render_pages, write_tree
from keel.registry import Registry
from keel.spec import Spec


@dataclass(frozen=True)
class DocsResult:
    """What :func:`write_docs` wrote: the folder, the site's index page, every file, and what is still open."""

    out_dir: Path
    index: Path
    markdown: list[Path] = field(default_factory=list)
    html: list[Path] = field(default_factory=list)
    human_created: list[Path] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    monitor_report: Path | None = None
    problems: list[str] = field(default_factory=list)


def spec_problems(spec: Spec) -> list[str]:
    """What keel.toml still lacks for the docs to say who, why and within which limits."""
    p = spec.project
    needed = [
        ("project.owner", p.owner, "name who owns the system after launch (a person or team)"),
        ("project.goals", p.goals, "say what success means, in words"),
        ("project.non_goals", p.non_goals, "say what the system will not do"),
        ("project.assumptions", p.assumptions, "state what must hold for it to work (write \"none\" if nothing)"),
        ("project.constraints", p.constraints, "state the limits it must respect (capacity, latency, budget)"),
        ("project.deployment_reason", p.deployment_reason.strip(),
         f"say why it is deployed {p.deployment} (batch, online or hybrid)"),
        ("decision.actor", spec.decision.actor.strip(), "name who acts on the prediction"),
    ]
    return [f"keel.toml: {key} is empty; {why}." for key, value, why in needed if not value]


def human_problems(spec: Spec) -> list[str]:
    folder = human_dir(spec)
    problems = []
    for name, h in read_human(folder).items():
        shown = f"docs/human/{name}.md"
        if not h.exists:
            problems.append(f"{shown} does not exist; run `keel docs` to create it with its questions.")
        elif not h.filled:
            state = "still holds its TODO line" if h.text.strip() else "is empty"
            problems.append(f"{shown} {state}; answer: {' '.join(h.section.questions)}")
    return problems


def _out(spec: Spec, out_dir: Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else spec.resolve("docs")


def check_docs(spec: Spec, out_dir: Path | None = None, *, registry: Registry | None = None) -> list[str]:
    """Problems that keep the docs from being complete and current; ``[]`` when there are none.

    Missing spec fields (owner, goals, non-goals, assumptions, constraints, deployment reason, actor), human-text
    files that are absent or still hold their prompt, and generated docs that are missing or older than the
    spec, the human text or the registry's versions. Each message names what is missing and where.
    """
    problems = spec_problems(spec) + human_problems(spec)
    out = _out(spec, out_dir)
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return [*problems, f"{out}/ holds no generated docs; run `keel docs`."]
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("spec_hash") != spec.spec_hash():
        problems.append(f"The docs in {out}/ were generated from another keel.toml; run `keel docs` again.")
    changed = [name for name in (s.name for s in SECTIONS)
               if manifest.get("human", {}).get(name) != file_hash(human_dir(spec) / f"{name}.md")]
    if changed:
        problems.append(f"docs/human/{', '.join(n + '.md' for n in changed)} changed since the docs were generated; "
                        "run `keel docs` again.")
    from keel.docs.records import store_exists

    registry = registry or Registry.from_spec(spec)
    # No store at all: e.g. the committed docs of an example whose state folder is not in the repository.
    if store_exists(registry):
        recorded = {str(v.version): v.run_id for v in registry.list_versions()}
        written = {k: v.get("run_id") for k, v in manifest.get("versions", {}).items()}
        if recorded != written:
            problems.append(f"The registry holds versions {sorted(map(int, recorded)) or 'none'} but the docs "
                            f"describe {sorted(map(int, written)) or 'none'}; run `keel docs` again.")
    return problems


def build_documents(spec: Spec, records: ProjectRecords, human_folder: Path) -> dict[str, Document]:
    """Every document by file stem (``design``, ``operating``, ``evidence``, ``model-card-v<N>``), index first."""
    human = read_human(human_folder)
    docs: dict[str, Document] = {}
    docs["design"] = build_design(spec, records, human)
    for rec in records.versions:
        docs[f"model-card-v{rec.version}"] = build_model_card(spec, rec, human)
    docs["operating"] = build_operating(spec, records, human)
    docs["evidence"] = build_evidence(spec, records, human)
    return docs


def write_docs(spec: Spec, out_dir: Path | None = None, *, registry: Registry | None = None,
               records: ProjectRecords | None = None) -> DocsResult:
    """Render every document to Markdown and to a static site under ``out_dir`` (default ``docs/``), atomically.

    Creates the human-text files with their prompts on the first run (never overwrites them). Reads the
    registry once (pass ``records`` to reuse a :func:`collect_records` result). Raises
    :class:`~keel.errors.KeelError` when ``out_dir`` exists and was not written by `keel docs`.
    """
    out = _out(spec, out_dir)
    folder = human_dir(spec)
    created = ensure_human_files(folder)
    records = records if records is not None else collect_records(spec, registry)
    human = read_human(folder)
    docs = build_documents(spec, records, folder)
    reference = records.reference
    titles = {"design": "Design doc"}
    titles.update({name: f"Model card v{name.rsplit('v', 1)[1]}"
                   + (" (champion)" if records.champion and name == f"model-card-v{records.champion.version}" else "")
                   for name in docs if name.startswith("model-card-")})
    titles.update(operating="Operating note", evidence="Evidence pack")
    nav = {"Index": "@index", "Design": "@design", "Operating": "@operating", "Evidence": "@evidence"}
    if reference is not None:
        nav[f"Model card v{reference.version}"] = f"@model-card-v{reference.version}"
        if reference.report_html is not None:
            nav["Training report"] = f"@report-v{reference.version}"
    if records.monitor_report:
        nav["Monitoring"] = "@monitor"
    # The index lists problems as of after this run (these docs exist and are current).
    problems = spec_problems(spec) + human_problems(spec)
    docs = {"index": build_index(spec, records, human, titles, problems), **docs}
    markdown, pages = render_pages(docs, nav)
    manifest = manifest_for(spec, records, human)

    def fill(tmp: Path) -> None:
        site = tmp / SITE
        (site / "reports").mkdir(parents=True)
        for name, text in markdown.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, text in pages.items():
            (site / name).write_text(text, encoding="utf-8")
        for rec in records.versions:
            if rec.report_html is not None:
                (site / "reports" / f"report-v{rec.version}.html").write_bytes(rec.report_html)
        if records.monitor_report:
            shutil.copyfile(records.monitor_report, site / "monitor.html")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    inside = folder.resolve().is_relative_to(out.resolve())
    write_tree(out.resolve(), fill, keep=folder.resolve() if inside else None)
    return DocsResult(
        out_dir=out, index=out / SITE / "index.html", markdown=[out / n for n in markdown],
        html=[out / SITE / n for n in pages], human_created=created, versions=[v.version for v in records.versions],
        monitor_report=records.monitor_report, problems=problems,
    )


__all__ = ["DocsResult", "build_documents", "check_docs", "collect_records", "write_docs"]
