"""`keel docs` on a small trained project: numbers match MLflow, the site opens offline with no broken links."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from keel.data.simulate import simulate, write_simulation
from keel.docs import check_docs, write_docs
from keel.docs.human import SECTIONS, human_dir
from keel.evaluate.report import write_report
from keel.registry import Registry
from keel.spec import load_spec
from keel.train import record, train

FLAGSHIP = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"
MONITOR_PAGE = "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Monitoring</title></head><body>" \
               "<h1>Monitoring report</h1></body></html>"


def small_spec_text() -> str:
    text = FLAGSHIP.read_text()
    for old, new in (('candidates = ["lightgbm", "hist_gradient_boosting"]', 'candidates = ["lightgbm"]'),
                     ("search_trials = 6", "search_trials = 1\nbootstrap = 20")):
        assert old in text, f"the flagship spec changed: {old!r} not found"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config):
    """Two versions of one trained model (v2 promoted then rolled back to v1), a monitor report, docs written."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        root = tmp_path_factory.mktemp("docs-project")
        (root / "keel.toml").write_text(small_spec_text())
        write_simulation(simulate(n_customers=300, n_terminals=600, n_days=60), root / "data")
        spec = load_spec(root / "keel.toml")
        spec.state_dir.mkdir(parents=True)
        cached = pytestconfig.cache.mkdir(f"keel-mlflow-template-{mlflow.__version__}") / "mlflow.db"
        if cached.exists():  # a migrated empty store, built by the registry unit tests; saves ~10 s
            shutil.copy(cached, spec.state_dir / "mlflow.db")
        outcome = train(spec)
        written = write_report(outcome, root / "reports" / "run")
        registry = Registry.from_spec(spec)
        artifacts = {f"report/{p.name}": p for p in written.values()}
        first = record(outcome, registry, artifacts=artifacts)
        second = record(outcome, registry, artifacts=artifacts)
        if registry.resolve("champion") is None:
            registry.promote(first.version, actor="test", reason="first champion", force=True)
        registry.promote(second.version, actor="test", reason="try v2", force=True)
        registry.rollback(actor="test", reason="alerts doubled")
        (spec.state_dir / "monitor").mkdir()
        (spec.state_dir / "monitor" / "monitor.html").write_text(MONITOR_PAGE)
        result = write_docs(spec, registry=registry)
        yield spec, registry, result


def test_every_version_gets_a_card_and_the_champion_is_named(project) -> None:
    _spec, registry, result = project
    versions = [v.version for v in registry.list_versions()]
    assert result.versions == versions == [1, 2]
    docs = result.out_dir
    for v in versions:
        assert (docs / f"model-card-v{v}.md").is_file() and (docs / "site" / f"model-card-v{v}.html").is_file()
        assert (docs / "site" / "reports" / f"report-v{v}.html").stat().st_size > 10_000
    index = (docs / "site" / "index.html").read_text()
    assert "Model card v1 (champion)" in index and "Model card v2 (champion)" not in index
    assert '<a href="monitor.html">Monitoring report</a>' in index
    assert (docs / "site" / "monitor.html").read_text() == MONITOR_PAGE
    operating = (docs / "operating.md").read_text()
    assert "| rollback | test | alerts doubled |" in operating and "Champion: version 1." in operating


ROW = re.compile(r"^\| (?P<cells>.+) \|$", re.MULTILINE)
KEY = re.compile(r"^`([^`]+)`$")


def _table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in m.group("cells").split(" | ")] for m in ROW.finditer(markdown)]


def test_numbers_in_the_docs_match_mlflow(project) -> None:
    _spec, registry, result = project
    checked = 0
    for info in registry.list_versions():
        run = registry.run(info.run_id)
        card = (result.out_dir / f"model-card-v{info.version}.md").read_text()
        assert f"`{info.run_id}`" in card
        for cells in _table_rows(card):
            key = KEY.match(cells[-1])
            if not key or key.group(1) not in run.metrics:
                continue
            recorded = run.metrics[key.group(1)]
            shown = cells[1].replace(",", "")
            expected = f"{round(recorded):,}".replace(",", "") if key.group(1).split(".")[-1] in (
                "tp", "fp", "fn", "tn") else f"{recorded:.4f}"
            assert shown == expected, (key.group(1), shown, recorded)
            checked += 1
            interval = re.fullmatch(r"\[(.+), (.+)\]", cells[2]) if len(cells) > 3 else None
            if interval:
                assert interval.group(1) == f"{run.metrics[key.group(1) + '.low']:.4f}"
                assert interval.group(2) == f"{run.metrics[key.group(1) + '.high']:.4f}"
                checked += 1
        assert f"Scores at or above **{float(run.params['threshold']):.4f}**" in card
    assert checked >= 30
    # The design doc's baseline table: the chosen model's row and every baseline row, against the reference run.
    reference = registry.run(registry.version("champion").run_id).metrics
    design = (result.out_dir / "design.md").read_text()
    chosen = next(c for c in _table_rows(design) if c[0].startswith("**chosen"))
    assert chosen[1:] == [f"{reference[f'test.{m}']:.4f}" for m in ("card_precision_at_k", "average_precision",
                                                                     "expected_cost")]
    prior = next(c for c in _table_rows(design) if c[0] == "prior")
    assert prior[2] == f"{reference['baseline.prior.average_precision']:.4f}"
    evidence = (result.out_dir / "evidence.md").read_text()
    assert f"precision {reference['test.precision']:.4f} and recall {reference['test.recall']:.4f}" in evidence


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.targets.append(value)


def broken_links(site: Path) -> list[str]:
    problems = []
    for page in site.rglob("*.html"):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        for target in parser.targets:
            url = urlparse(target)
            if url.scheme in ("http", "https") or target.startswith("//"):
                problems.append(f"{page.name}: external resource {target}")
            elif url.scheme in ("", "file") and url.path and not (page.parent / unquote(url.path)).exists():
                problems.append(f"{page.name}: broken link {target}")
    return problems


def test_site_links_resolve_offline(project) -> None:
    _spec, _registry, result = project
    site = result.out_dir / "site"
    assert len(list(site.rglob("*.html"))) >= 8
    assert broken_links(site) == []
    for md in result.out_dir.glob("*.md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            assert (result.out_dir / target).exists(), (md.name, target)


def test_link_check_catches_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.html").write_text('<a href="b.html">b</a><img src="https://cdn.example/x.png">')
    assert broken_links(tmp_path) == ["a.html: broken link b.html", "a.html: external resource "
                                      "https://cdn.example/x.png"]


def chromium_console(pages: list[Path], tmp: Path) -> tuple[str, list[str]]:
    """Load every page in one headless Chromium (iframes of a harness page); (DOM, console messages)."""
    harness = tmp / "harness.html"
    harness.write_text("<!DOCTYPE html><html><body>" + "".join(
        f'<iframe src="{p.resolve().as_uri()}"></iframe>' for p in pages) + "</body></html>")
    proc = subprocess.run(
        [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", harness.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")


@chromium
def test_site_pages_load_in_headless_chromium_without_console_errors(project, tmp_path: Path) -> None:
    _spec, _registry, result = project
    pages = sorted((result.out_dir / "site").rglob("*.html"))
    # A control page with an error proves the check sees errors when there are some (one browser launch).
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom')</script></body></html>")
    dom, console = chromium_console([*pages, bad], tmp_path)
    assert dom.count("<iframe") == len(pages) + 1
    assert len(console) == 1 and '"boom"' in console[0] and "bad.html" in console[0], console


def test_check_passes_when_complete_and_flags_a_new_version(project) -> None:
    spec, registry, result = project
    assert any(p.startswith("docs/human/decision.md still holds its TODO line") for p in check_docs(spec))
    for section in SECTIONS:
        (human_dir(spec) / f"{section.name}.md").write_text(f"Answer for {section.name}.\n")
    write_docs(spec, registry=registry)
    assert check_docs(spec, registry=registry) == []
    assert "Answer for limitations." in (result.out_dir / "model-card-v2.md").read_text()
    run_id = registry.version(2).run_id
    registry.register(registry.log_run(
        spec=spec, model=registry.load(2)[0], metrics=registry.run(run_id).metrics, params={}, data_source="x",
        data_fingerprint="y", windows={}).run_id)
    assert check_docs(spec, registry=registry) == [
        "The registry holds versions [1, 2, 3] but the docs describe [1, 2]; run `keel docs` again."]
