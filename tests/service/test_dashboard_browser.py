"""The monitoring page renders in headless Chromium: every chart draws, and nothing reaches the console.

Needs Debian's ``chromium`` (``apt-get install -y chromium``). Skipped only when it is absent outside CI; in CI
(``CI`` set) its absence is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.monitor.profile import build_profile
from keel.monitor.report import _CHECK_JS, dashboard_html
from keel.monitor.triggers import run_monitor
from keel.serve.predlog import PredictionLog
from keel.spec import parse_spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Debian's chromium for the dashboard browser test: apt-get install -y chromium")
    pytest.skip("chromium is not installed (apt-get install -y chromium); this test runs in CI",
                allow_module_level=True)


def _render(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after scripts ran, and every console line Chromium logged."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def _check(dom: str) -> tuple[dict, int]:
    m = re.search(r'<pre id="render-check" data-expected="(\d+)">(.*?)</pre>', dom, re.S)
    assert m, "the page's render check did not run"
    return json.loads(m.group(2)), int(m.group(1))


def _spec(tmp_path: Path):
    return parse_spec({
        "project": {"name": "fraud", "state_dir": str(tmp_path / "state")},
        "decision": {"question": "review?", "positive_class": "fraud", "capacity": {"max_positives": 40}},
        "data": {"source": "x.parquet", "timestamp": "t", "label": "y", "label_delay": "2d"},
        "monitoring": {"triggers": [{"name": "drift", "metric": "psi", "feature": "*", "above": 0.2}]},
    }, root=tmp_path)


def test_every_chart_renders_without_console_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    log = tmp_path / "predictions.sqlite"
    t0 = datetime(2018, 9, 1)
    with PredictionLog(log, flush_rows=1000) as pl:
        for i, s in enumerate(np.sort(rng.uniform(0, 5 * 86400, 2500))):
            t = t0 + timedelta(seconds=float(s))
            shift = 1.8 if s > 3 * 86400 else 1.0
            score = float(rng.beta(1, 15))
            pl.append({"request_id": str(i), "event_id": str(i), "event_time": t, "time": t,
                       "inputs": {"a": 1}, "features": {"a": float(rng.gamma(2, 3) * shift), "b": float(rng.normal())},
                       "score": score, "decision": "review" if score > 0.2 else "approve",
                       "latency_ms": float(rng.gamma(2, 2))})
            if s < 2 * 86400:
                pl.add_labels([(str(i), float(rng.random() < score), t + timedelta(days=2))])
    ref = pd.DataFrame({"a": rng.gamma(2, 3, 3000), "b": rng.normal(size=3000)})
    prof = build_profile(ref, rng.beta(1, 15, 3000), model="fraud", version=1,
                         reference_metrics={"average_precision": 0.3})
    result = run_monitor(_spec(tmp_path), log_path=log, profile=prof, out_dir=tmp_path / "out", skew=False)
    assert result.level == "act"
    dom, console = _render(result.paths["html"], tmp_path)
    check, expected = _check(dom)
    assert expected == 8  # drift heatmap, PSI, KS, score distribution, performance, latency, alerts, rates
    assert check == {"charts": expected, "rendered": expected, "failed": []}
    assert dom.count('data-rendered="yes"') == expected
    assert console == []


def test_the_check_catches_a_broken_chart_and_console_errors(tmp_path: Path) -> None:
    """Negative control: the same harness sees an empty chart and a script error."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><figure class="chart" id="empty"><svg width="10" height="10"></svg></figure>'
                    '<pre id="render-check" data-expected="1"></pre><script>undefinedFunction();</script>'
                    + f"<script>{_CHECK_JS}</script>"
                    + "</body></html>")
    dom, console = _render(page, tmp_path)
    check, _ = _check(dom)
    assert check["failed"] == ["empty"]
    assert any("undefinedFunction" in line for line in console)


def test_dashboard_without_a_log_says_what_is_missing(tmp_path: Path) -> None:
    page = dashboard_html(_spec(tmp_path))
    assert "Nothing to show yet" in page
