"""Writing the docs folder: Markdown beside a small static HTML site, swapped in as a whole.

Layout (``docs/`` by default)::

    README.md  design.md  operating.md  evidence.md  model-card-v<N>.md  manifest.json
    human/                     the files people edit (kept across runs, never overwritten)
    site/index.html            the site: one page per document, opens offline (no scripts, no CDN)
    site/reports/report-v<N>.html   each version's training report, as logged to MLflow
    site/monitor.html          the latest monitoring report, when `keel monitor` wrote one
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keel.docs.fmt import code, num
from keel.docs.human import HumanText
from keel.docs.markup import Document, render_html, render_markdown
from keel.docs.records import ProjectRecords
from keel.errors import KeelError
from keel.spec import Spec

GENERATOR = "keel docs"
MANIFEST = "manifest.json"
SITE = "site"


def md_resolver(target: str) -> str:
    if target == "index":
        return "README.md"
    if target.startswith("report-"):
        return f"{SITE}/reports/{target}.html"
    if target == "monitor":
        return f"{SITE}/monitor.html"
    return f"{target}.md"


def html_resolver(target: str) -> str:
    if target.startswith("report-"):
        return f"reports/{target}.html"
    return f"{target}.html"


def build_index(spec: Spec, records: ProjectRecords, human: dict[str, HumanText], pages: dict[str, str],
                problems: list[str]) -> Document:
    doc = Document(f"{spec.project.name}: system documentation")
    p = spec.project
    doc.text(p.description or spec.decision.question)
    doc.text(f"Owner: **{p.owner or '(not set)'}**. Deployment: {p.deployment}.")
    champion = records.champion
    head = spec.decision.headline_metric
    if champion is not None:
        doc.text(f"Champion: version {champion.version} ({code(champion.run_id)}), {head.replace('_', ' ')} "
                 f"{num(champion.metric(f'test.{head}'))}.")
    else:
        doc.text("No champion yet.")
    doc.heading("Documents")
    items = [f"[{title}](@{target})" for target, title in pages.items()]
    reference = records.reference
    if reference is not None and reference.report_html is not None:
        items.insert(0, f"[Training report (version {reference.version})](@report-v{reference.version})")
    items.append("[Monitoring report](@monitor)" if records.monitor_report else "Monitoring report: not run yet "
                 "(`keel monitor`).")
    doc.bullets(items)
    doc.heading("Human text")
    doc.table(["file", "section", "state"],
              [[code(f"docs/human/{name}.md"), h.section.title, "written" if h.filled else "**to write**"]
               for name, h in human.items()])
    if problems:
        doc.heading("Open problems (`keel docs --check`)")
        doc.bullets(problems)
    return doc


def _may_replace(out_dir: Path) -> bool:
    """Only a folder keel docs wrote (or one holding nothing but human/) is replaced as a whole."""
    if not out_dir.exists():
        return True
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(manifest.read_text(encoding="utf-8")).get("generator") == GENERATOR
    return {e.name for e in out_dir.iterdir()} <= {"human"}


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def manifest_for(spec: Spec, records: ProjectRecords, human: dict[str, HumanText]) -> dict[str, Any]:
    """What the docs were generated from; deterministic, so committed docs change only when their inputs do."""
    return {
        "generator": GENERATOR,
        "project": spec.project.name,
        "spec_hash": spec.spec_hash(),
        "versions": {str(v.version): {"run_id": v.run_id, "aliases": v.info.aliases} for v in records.versions},
        "human": {name: file_hash(h.path) for name, h in human.items()},
        "monitor_report": bool(records.monitor_report),
    }


def write_tree(out_dir: Path, fill: Callable[[Path], None], *, keep: Path | None) -> None:
    """Build the folder with ``fill(tmp)`` beside ``out_dir``, then swap it in; ``keep`` (a sub-folder of
    ``out_dir`` holding people's files) is moved across, never copied or deleted."""
    if not _may_replace(out_dir):
        raise KeelError(
            f"{out_dir} exists and was not written by `keel docs` (no {MANIFEST} from it); refusing to replace it.",
            hint="Pass another output folder (`keel docs --out PATH`) or move that folder away.",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fill(tmp)
        mask = os.umask(0)
        os.umask(mask)
        for path in [tmp, *tmp.rglob("*")]:
            if path.is_dir():
                path.chmod(0o777 & ~mask)  # mkdtemp makes 0700; docs are meant to be read
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    os.replace(out_dir, old / "x")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / "x", out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        raise
    if keep is not None:
        kept = old / "x" / keep.relative_to(out_dir)
        if kept.exists():
            # On failure the old tree (with the human files) stays in `old` rather than being deleted.
            os.replace(kept, keep)
    shutil.rmtree(old, ignore_errors=True)


def render_pages(docs: dict[str, Document], nav: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(markdown by file name, html by file name) for every document."""
    markdown = {(("README" if name == "index" else name) + ".md"): render_markdown(doc, md_resolver)
                for name, doc in docs.items()}
    pages = {f"{name}.html": render_html(doc, html_resolver, nav) for name, doc in docs.items()}
    return markdown, pages


__all__ = ["GENERATOR", "MANIFEST", "SITE", "build_index", "file_hash", "html_resolver", "manifest_for",
           "md_resolver", "render_pages", "write_tree"]
