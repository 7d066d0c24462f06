"""The monitoring report: one self-contained HTML page (inline SVG, no scripts or fonts from the network).

Charts: drift per feature over time (PSI heatmap and lines), score distribution (reference vs latest window),
performance with its label completeness, latency percentiles, alerts per day against capacity; and the triggers
with what fired and why. A small inline script checks on load that every chart drew something and records the
result in ``#render-check`` (what the headless-browser test reads). ``dashboard_html(spec)`` renders the same page
for ``GET /dashboard``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from keel.monitor.profile import SCORE

W, H = 720, 260
PAD_L, PAD_R, PAD_T, PAD_B = 56, 150, 28, 40
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf",
          "#bcbd22"]
LEVEL_COLORS = {"ok": "#2ca02c", "warn": "#ff7f0e", "act": "#d62728"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.level{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f5f5f5} figure{margin:8px 0 16px} figcaption{font-size:13px;color:#555;margin-top:2px}
svg text{font-size:11px;fill:#333} .muted{color:#777;font-size:13px} pre#render-check{display:none}
"""

_CHECK_JS = """
(function(){
  function check(){
    var out={charts:0,rendered:0,failed:[]};
    document.querySelectorAll('figure.chart').forEach(function(fig){
      out.charts++;
      var svg=fig.querySelector('svg'); var ok=false;
      if(svg){var b=svg.getBBox(); var marks=svg.querySelectorAll('rect,path,circle,polyline,line').length;
        ok=b.width>0&&b.height>0&&marks>0;}
      fig.setAttribute('data-rendered', ok?'yes':'no');
      if(ok){out.rendered++;}else{out.failed.push(fig.id);}
    });
    document.getElementById('render-check').textContent=JSON.stringify(out);
  }
  if(document.readyState==='loading'){document.addEventListener('DOMContentLoaded',check);}else{check();}
})();
"""


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _scale(lo: float, hi: float, a: float, b: float):  # type: ignore[no-untyped-def]
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _axes(y_lo: float, y_hi: float, labels: Sequence[str], y_label: str) -> list[str]:
    parts = [f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" stroke="#999"/>',
             f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="#999"/>']
    ys = _scale(y_lo, y_hi, H - PAD_B, PAD_T)
    for v in np.linspace(y_lo, y_hi, 5):
        parts.append(f'<text x="{PAD_L - 6}" y="{ys(v) + 4:.1f}" text-anchor="end">{_fmt(float(v), 3)}</text>')
        parts.append(f'<line x1="{PAD_L}" y1="{ys(v):.1f}" x2="{W - PAD_R}" y2="{ys(v):.1f}" stroke="#eee"/>')
    n = len(labels)
    step = max(1, n // 8)
    xs = _scale(0, max(n - 1, 1), PAD_L + 10, W - PAD_R - 10)
    for i in range(0, n, step):
        parts.append(f'<text x="{xs(i):.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{_esc(labels[i])}</text>')
    parts.append(f'<text x="14" y="{(H - PAD_B + PAD_T) / 2}" transform="rotate(-90 14 {(H - PAD_B + PAD_T) / 2})"'
                 f' text-anchor="middle">{_esc(y_label)}</text>')
    return parts


def line_chart(chart_id: str, labels: Sequence[str], series: dict[str, Sequence[float | None]], *, y_label: str,
               caption: str, hlines: dict[str, float] | None = None, y_min: float | None = 0.0,
               dashed: Sequence[str] = ()) -> str:
    """An SVG line chart (one x label per window, gaps where a value is None)."""
    vals = [float(v) for s in series.values() for v in s if v is not None and np.isfinite(v)]
    vals += list((hlines or {}).values())
    lo = y_min if y_min is not None else (min(vals) if vals else 0.0)
    hi = max(vals) if vals else 1.0
    hi = hi * 1.05 if hi > lo else lo + 1.0
    xs = _scale(0, max(len(labels) - 1, 1), PAD_L + 10, W - PAD_R - 10)
    ys = _scale(lo, hi, H - PAD_B, PAD_T)
    parts = _axes(lo, hi, labels, y_label)
    for i, (name, values) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        dash = ' stroke-dasharray="5,3"' if name in dashed else ""
        segment: list[str] = []
        segs: list[list[str]] = []
        for j, v in enumerate(values):
            if v is None or not np.isfinite(v):
                if segment:
                    segs.append(segment)
                segment = []
                continue
            segment.append(f"{xs(j):.1f},{ys(float(v)):.1f}")
            parts.append(f'<circle cx="{xs(j):.1f}" cy="{ys(float(v)):.1f}" r="2.5" fill="{color}"/>')
        if segment:
            segs.append(segment)
        for seg in segs:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{" ".join(seg)}"/>')
        parts.append(f'<rect x="{W - PAD_R + 10}" y="{PAD_T + 14 * i}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{W - PAD_R + 24}" y="{PAD_T + 9 + 14 * i}">{_esc(name[:22])}</text>')
    for k, (name, v) in enumerate((hlines or {}).items()):
        parts.append(f'<line x1="{PAD_L}" y1="{ys(v):.1f}" x2="{W - PAD_R}" y2="{ys(v):.1f}" stroke="#d62728"'
                     f' stroke-dasharray="4,4"/><text x="{W - PAD_R - 4}" y="{ys(v) - 3 - 10 * k:.1f}"'
                     f' text-anchor="end" fill="#d62728">{_esc(name)}</text>')
    return _figure(chart_id, parts, caption)


def bar_chart(chart_id: str, labels: Sequence[str], series: dict[str, Sequence[float]], *, y_label: str,
              caption: str, hlines: dict[str, float] | None = None) -> str:
    """Grouped SVG bars, one group per label."""
    vals = [float(v) for s in series.values() for v in s if v is not None and np.isfinite(v)]
    vals += list((hlines or {}).values())
    hi = (max(vals) if vals else 1.0) * 1.08 or 1.0
    n, k = max(len(labels), 1), max(len(series), 1)
    group = (W - PAD_R - PAD_L - 10) / n
    bw = max(1.0, group * 0.8 / k)
    ys = _scale(0.0, hi, H - PAD_B, PAD_T)
    parts = _axes(0.0, hi, [], y_label)
    step = max(1, n // 10)
    for i, lab in enumerate(labels):
        if i % step == 0:
            parts.append(f'<text x="{PAD_L + 5 + group * (i + 0.5):.1f}" y="{H - PAD_B + 16}" '
                         f'text-anchor="middle">{_esc(str(lab)[:14])}</text>')
    for s_i, (name, values) in enumerate(series.items()):
        color = COLORS[s_i % len(COLORS)]
        for i, v in enumerate(values):
            if v is None or not np.isfinite(v):
                continue
            x = PAD_L + 5 + group * i + group * 0.1 + bw * s_i
            parts.append(f'<rect x="{x:.1f}" y="{ys(float(v)):.1f}" width="{bw:.1f}" '
                         f'height="{max(0.0, H - PAD_B - ys(float(v))):.1f}" fill="{color}"><title>{_esc(name)} '
                         f'{_esc(labels[i])}: {_fmt(float(v))}</title></rect>')
        parts.append(f'<rect x="{W - PAD_R + 10}" y="{PAD_T + 14 * s_i}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{W - PAD_R + 24}" y="{PAD_T + 9 + 14 * s_i}">{_esc(name[:22])}</text>')
    for name, v in (hlines or {}).items():
        parts.append(f'<line x1="{PAD_L}" y1="{ys(v):.1f}" x2="{W - PAD_R}" y2="{ys(v):.1f}" stroke="#d62728"'
                     f' stroke-dasharray="4,4"/><text x="{W - PAD_R - 4}" y="{ys(v) - 3:.1f}" text-anchor="end"'
                     f' fill="#d62728">{_esc(name)}</text>')
    return _figure(chart_id, parts, caption)


def heatmap(chart_id: str, rows: Sequence[str], cols: Sequence[str], values: np.ndarray, *, caption: str,
            warn: float, act: float) -> str:
    """Feature x window PSI heatmap: green below ``warn``, orange to ``act``, red above."""
    h = max(H, PAD_T + PAD_B + 16 * len(rows))
    cw = (W - 190 - 20) / max(len(cols), 1)
    parts = []
    for i, r in enumerate(rows):
        parts.append(f'<text x="186" y="{PAD_T + 16 * i + 12}" text-anchor="end">{_esc(r[:30])}</text>')
        for j in range(len(cols)):
            v = values[i, j]
            color = "#eee" if not np.isfinite(v) else (
                "#2ca02c" if v < warn else "#ff7f0e" if v < act else "#d62728")
            opacity = 0.35 + 0.65 * min(1.0, (v / act) if np.isfinite(v) and act > 0 else 0.0)
            parts.append(f'<rect x="{190 + cw * j:.1f}" y="{PAD_T + 16 * i}" width="{max(cw - 1, 1):.1f}" height="15"'
                         f' fill="{color}" fill-opacity="{opacity:.2f}"><title>{_esc(r)} {_esc(cols[j])}: PSI '
                         f'{_fmt(float(v))}</title></rect>')
    step = max(1, len(cols) // 8)
    for j in range(0, len(cols), step):
        parts.append(f'<text x="{190 + cw * (j + 0.5):.1f}" y="{PAD_T + 16 * len(rows) + 14}" '
                     f'text-anchor="middle">{_esc(cols[j])}</text>')
    return _figure(chart_id, parts, caption, height=h)


def _figure(chart_id: str, parts: list[str], caption: str, height: int = H) -> str:
    return (f'<figure class="chart" id="{_esc(chart_id)}"><svg xmlns="http://www.w3.org/2000/svg" width="{W}" '
            f'height="{height}" viewBox="0 0 {W} {height}" role="img">{"".join(parts)}</svg>'
            f'<figcaption>{_esc(caption)}</figcaption></figure>')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if str(c).startswith('<span') else _esc(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(result: Any, *, spec: Any = None, title: str | None = None) -> str:
    """The whole monitoring page for a :class:`~keel.monitor.triggers.MonitorResult`."""
    drift, perf, ops = result.drift, result.performance, result.operations
    labels = [f"{w.start:%m-%d}" for w in drift]
    mon = spec.monitoring if spec is not None else None
    warn, act = (mon.psi_warn, mon.psi_act) if mon else (0.1, 0.2)
    level = result.level
    body: list[str] = [
        f"<h1>{_esc(title or f'Monitoring: {result.model}')}</h1>",
        f'<p>Model version <b>{_esc(result.version)}</b> · as of {result.as_of:%Y-%m-%d %H:%M} · '
        f'{result.rows:,} predictions in {len(drift)} window(s) · status <span class="level" '
        f'style="background:{LEVEL_COLORS[level]}">{level.upper()}</span></p>',
        "<h2>Triggers</h2>",
    ]
    trig_rows = [[f'<span class="level" style="background:{LEVEL_COLORS[f.level]}">{f.level}</span>', f.name,
                  f.metric, f.feature or "", f"> {f.above:g} × {f.windows}", f.reason] for f in result.firings]
    body.append(_table(["level", "trigger", "metric", "feature", "threshold", "why"], trig_rows)
                if trig_rows else '<p class="muted">No triggers configured and no implicit drift findings.</p>')
    charts = 0
    if drift:
        feats = [c for c in drift[0].columns if c != SCORE]
        names = [*feats, SCORE] if SCORE in drift[0].columns else feats
        grid = np.array([[w.columns[n].psi for w in drift] for n in names], dtype=float)
        body.append("<h2>Input and prediction drift</h2>")
        body.append(heatmap("chart-drift-heatmap", names, labels, grid, warn=warn, act=act,
                            caption=f"PSI per feature and window against the reference profile (green < {warn:g}, "
                                    f"orange < {act:g}, red ≥ {act:g})."))
        charts += 1
        last = np.nan_to_num(grid[:, -1], nan=-1)
        top = [names[i] for i in np.argsort(-last)[:5] if names[i] != SCORE]
        series: dict[str, Sequence[float | None]] = {n: [w.columns[n].psi for w in drift] for n in [SCORE, *top] if n in drift[0].columns}
        body.append(line_chart("chart-drift-lines", labels, series, y_label="PSI", hlines={"psi_act": act},
                               caption="PSI over time: the score and the most drifted features."))
        charts += 1
        ks_series: dict[str, Sequence[float | None]] = {n: [w.columns[n].ks for w in drift] for n in [SCORE, *top] if n in drift[0].columns}
        body.append(line_chart("chart-drift-ks", labels, ks_series, y_label="KS statistic",
                               caption="Kolmogorov–Smirnov statistic over time (same columns)."))
        charts += 1
        latest = drift[-1]
        rows = []
        for n in names:
            c = latest.columns[n]
            rows.append([n, _fmt(c.psi), _fmt(c.ks), _fmt(c.ks_pvalue, 3), _fmt(c.js), _fmt(c.chi2_pvalue, 3),
                         _fmt(c.missing_rate, 3), _fmt(c.out_of_range_rate, 3), ", ".join(c.new_categories[:5])])
        body.append(f"<p class='muted'>Latest window ({latest.start:%Y-%m-%d %H:%M}, {latest.rows:,} rows):</p>")
        body.append(_table(["column", "PSI", "KS", "KS p", "JS", "chi² p", "missing", "out of range", "new"], rows))
        if result.profile is not None and result.profile.score is not None and SCORE in latest.columns:
            ref = result.profile.score
            ref_share = np.asarray(ref.counts, float) / max(sum(ref.counts), 1)
            cur = np.asarray(latest.columns[SCORE].counts, float)
            cur_share = cur / cur.sum() if cur.sum() else cur
            body.append("<h2>Score distribution</h2>")
            body.append(bar_chart("chart-score-dist", ref.bin_labels(),
                                  {"reference": ref_share.tolist(), "latest window": cur_share.tolist()},
                                  y_label="share of rows",
                                  caption="Scores in the reference quantile bins: reference (held-out test window) "
                                          "vs the latest window."))
            charts += 1
    if perf:
        body.append("<h2>Performance (labels arrive late)</h2>")
        ap = [p.metrics.get("average_precision") for p in perf]
        est = [p.estimate.get("expected_precision") for p in perf]
        prec = [p.metrics.get("precision") for p in perf]
        cov = [p.label_coverage for p in perf]
        ref_ap = result.profile.reference_metrics.get("average_precision") if result.profile else None
        body.append(line_chart("chart-performance", labels,
                               {"AP (labelled)": ap, "alert precision": prec,
                                "alert precision (estimate)": est, "label coverage": cov},
                               y_label="value", dashed=("alert precision (estimate)", "label coverage"),
                               hlines={"reference AP": ref_ap} if ref_ap is not None else None,
                               caption="Measured metrics on labels known at the as-of time; dashed: the estimate "
                                       "from calibrated scores and the share of rows with a label."))
        charts += 1
        rows = [[f"{p.start:%Y-%m-%d}", p.rows, p.labelled, p.positives, "yes" if p.complete else "no (estimate)",
                 _fmt(p.metrics.get("average_precision")), _fmt(p.metrics.get("card_precision_at_k")),
                 _fmt(p.metrics.get("expected_cost")), _fmt(p.estimate.get("expected_cost")),
                 _fmt(p.metrics.get("ece"))] for p in perf]
        body.append(_table(["window", "rows", "labelled", "positives", "labels complete", "AP", "CP@k",
                            "cost/event", "cost/event (est.)", "ECE"], rows))
    if ops:
        body.append("<h2>Service</h2>")
        body.append(line_chart("chart-latency", labels,
                               {q: [o.latency_ms.get(q) for o in ops] for q in ("p50", "p95", "p99")},
                               y_label="latency (ms)", caption="Latency percentiles per window."))
        charts += 1
        cap = ops[0].capacity_per_day
        body.append(bar_chart("chart-alerts", labels, {"alerts/day": [o.alerts_per_day for o in ops]},
                              y_label="alerts per day", hlines={"capacity": cap} if cap else None,
                              caption="Positive decisions per day against the review capacity."))
        charts += 1
        body.append(line_chart("chart-rates", labels,
                               {"fallback rate": [o.fallback_rate for o in ops],
                                "error rate": [o.error_rate for o in ops],
                                "stale rate": [o.stale_rate for o in ops]},
                               y_label="share of requests", caption="Fallback, error and stale-state rates."))
        charts += 1
    if result.skew is not None:
        body.append("<h2>Training–serving skew</h2>")
        body.append(f"<p>{_esc(result.skew.summary())}</p>")
        body.append(_table(["feature", "compared", "mismatches", "rate", "max abs diff"],
                           [[r["feature"], r["compared"], r["mismatches"], _fmt(r["rate"]), _fmt(r["max_abs_diff"])]
                            for r in result.skew.rows()]))
    body.append(f'<pre id="render-check" data-expected="{charts}"></pre>')
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_esc(title or 'Keel monitoring')}</title><style>{_CSS}</style></head><body>"
            + "".join(body) + f"<script>{_CHECK_JS}</script></body></html>")


def dashboard_html(spec: Any, *, as_of: Any = None, registry: Any = None) -> str:
    """The monitoring page for ``GET /dashboard``: the serving log against the champion's profile, no skew check.

    Never raises for a missing or empty log or model: it returns a page that says what is missing.
    """
    from keel.errors import KeelError
    from keel.monitor.triggers import run_monitor

    try:
        result = run_monitor(spec, as_of=as_of, registry=registry, skew=False)
    except KeelError as exc:
        return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Keel monitoring</title>"
                f"<style>{_CSS}</style></head><body><h1>Monitoring: {_esc(spec.project.name)}</h1>"
                f"<p>Nothing to show yet: {_esc(exc.message)}</p><p class='muted'>{_esc(exc.hint or '')}</p>"
                f'<pre id="render-check" data-expected="0"></pre><script>{_CHECK_JS}</script></body></html>')
    return render_html(result, spec=spec)


__all__ = ["bar_chart", "dashboard_html", "heatmap", "line_chart", "render_html"]
