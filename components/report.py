"""The run's reports as self-contained HTML pages: the data report (check step) and the model card (register).

KFP's dashboard shows an HTML artifact in a sandboxed frame with no network, and MLflow shows it as an artifact, so
every page carries its own style and its charts as inline SVG: no script, no font, nothing fetched. Pure functions
of figures and frames, but for the two that write a step's outputs (keep_report, write_metrics).
"""

from __future__ import annotations

import re
import json
from html import escape, unescape
from pathlib import Path

import numpy as np
import pandas as pd

import mlflow

from components import model
from components.checks import FAIL, PASS, SKIP, UNKNOWN, WARN, Check, failed, warned
from components.drift import CATEGORY_COLUMNS, MAX_COVERAGE_GAP, category_shares, drift_columns, numeric_shares

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;margin:0;background:#f6f7f9}
main{max-width:980px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
h3{font-size:14px;margin:0 0 4px}
p.lede{color:#4a5363;margin:0 0 12px}
.verdict{padding:10px 14px;border-radius:6px;font-weight:600;margin:12px 0}
.verdict.pass{background:#e3f4e8;color:#14532d}.verdict.fail{background:#fde4e1;color:#7f1d1d}
.verdict.warn{background:#fff3d6;color:#713f12}.verdict.skipped{background:#e8ebf0;color:#374151}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e5e8ee;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.status{font-weight:700;text-transform:uppercase;font-size:11px;padding:1px 6px;border-radius:3px}
.status.pass{background:#d1f0da;color:#14532d}.status.fail{background:#fbd0ca;color:#7f1d1d}
.status.warn{background:#fde9b5;color:#713f12}.status.skipped{background:#e1e5eb;color:#374151}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #e5e8ee;border-radius:6px;padding:8px}
figcaption{font-size:12px;color:#4a5363;margin-top:4px}
svg{display:block;width:100%;height:auto}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;vertical-align:middle}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0 0 10px}dt{color:#4a5363}
dd{margin:0;overflow-wrap:anywhere}
code{font-size:12px;word-break:break-all}
"""
NEW, REFERENCE = "#2563eb", "#f59e0b"  # the current data / prod's data; candidate / prod


def page(title: str, lede: str, *sections: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><main><h1>{escape(title)}</h1><p class=\"lede\">{escape(lede)}</p>"
            + "".join(sections) + "</main></body></html>\n")


def section(name: str, title: str, *parts: str) -> str:
    return f'<section id="{name}"><h2>{escape(title)}</h2>{"".join(parts)}</section>'


def verdict(status: str, text: str) -> str:
    return f'<div class="verdict {status}">{escape(text)}</div>'


def para(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def table(header: list[str], rows: list[list], numeric: set[int] = frozenset(), badge: int | None = None) -> str:
    """A table of plain values; the cells of column `badge` (a PASS.. status) show as badges."""
    def cell(i, value):
        if i == badge:
            return f'<td><span class="status {value}">{value}</span></td>'
        return f'<td class="num">{escape(str(value))}</td>' if i in numeric else f"<td>{escape(str(value))}</td>"
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pairs(items: dict) -> str:
    return "<dl>" + "".join(f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in items.items()) + "</dl>"


def figure(chart: str, caption: str, name: str) -> str:
    return f'<figure data-chart="{escape(name)}">{chart}<figcaption>{escape(caption)}</figcaption></figure>'


def legend(*items: tuple[str, str]) -> str:
    return '<div class="legend">' + "".join(f'<span style="background:{c}"></span>{escape(t)}' for t, c in items) + "</div>"


def money(x: float) -> str:
    return f"{x:,.2f}"


def number(x: float) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


# ---------------------------------------------------------------- charts (inline SVG)

W, H, PAD = 320, 170, 40


def _svg(title: str, body: str, height: int = H) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height}" role="img">'
            f"<title>{escape(title)}</title>{body}</svg>")


def _text(x, y, text, anchor="middle", size=9, rotate=False):
    turn = f' transform="rotate(-35 {x:.1f} {y:.1f})"' if rotate else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="#4a5363"{turn}>'
            f"{escape(text)}</text>")


def grouped_bars(title: str, labels: list[str], series: list[tuple[str, str, list[float]]], unit: str = "") -> str:
    """Vertical bars, one group per label, one bar per series (name, colour, values)."""
    top = max((max(v, default=0) for _, _, v in series), default=0) or 1
    plot_w, plot_h = W - PAD - 8, H - PAD - 40
    step = plot_w / max(len(labels), 1)
    width = step * 0.8 / len(series)
    parts = [f'<line x1="{PAD}" y1="{8 + plot_h}" x2="{W - 8}" y2="{8 + plot_h}" stroke="#9aa3b2"/>',
             _text(PAD - 3, 12, f"{number(top)}{unit}", "end", 8), _text(PAD - 3, 8 + plot_h, "0", "end", 8)]
    for i, label in enumerate(labels):
        for j, (name, colour, values) in enumerate(series):
            h = plot_h * values[i] / top
            x = PAD + i * step + step * 0.1 + j * width
            parts.append(f'<rect x="{x:.1f}" y="{8 + plot_h - h:.1f}" width="{width:.1f}" height="{h:.1f}" '
                         f'fill="{colour}"><title>{escape(name)} {escape(label)}: {number(values[i])}{unit}</title>'
                         "</rect>")
        if i % -(-len(labels) // 12):  # at most 12 labels
            continue
        short = label if len(label) <= 14 else label[:13] + "…"
        parts.append(_text(PAD + (i + 0.5) * step, 18 + plot_h, short, "end" if len(labels) > 4 else "middle",
                           rotate=len(labels) > 4))
    return _svg(title, "".join(parts))


def hbars(title: str, values: pd.Series, colour: str = NEW, unit: str = "") -> str:
    """Horizontal bars, largest first, labelled with the index."""
    values = values.sort_values(ascending=False)
    if values.empty:
        return _svg(title, _text(W / 2, 20, "no figures"), 30)
    row, left = 15, 130
    height = 10 + row * len(values)
    top = max(float(values.abs().max()), 1e-9)
    parts = []
    for i, (label, value) in enumerate(values.items()):
        w = (W - left - 50) * max(float(value), 0) / top
        y = 5 + i * row
        parts += [_text(left - 4, y + 10, str(label), "end"),
                  f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="{colour}"/>',
                  _text(left + w + 3, y + 10, f"{number(float(value))}{unit}", "start")]
    return _svg(title, "".join(parts), height)


def coverage_bars(title: str, coverage: pd.Series, nominal: float) -> str:
    """Horizontal bars of shares, one per label, from 50 % (a few points apart must show), with a dashed line at the
    nominal share."""
    row, left = 15, 130
    height = 22 + row * len(coverage)
    scale = lambda share: left + (W - left - 40) * max(share - 0.5, 0) / 0.5  # noqa: E731
    parts = [f'<line x1="{scale(nominal):.1f}" y1="2" x2="{scale(nominal):.1f}" y2="{height - 14}" stroke="#374151" '
             f'stroke-dasharray="4 3"/>', _text(scale(nominal), height - 3, f"nominal {nominal:.0%}", size=8),
             _text(left, height - 3, "50%", size=8), _text(scale(1.0), height - 3, "100%", size=8)]
    for i, (label, share) in enumerate(coverage.items()):
        y = 5 + i * row
        off = abs(share - nominal) > MAX_COVERAGE_GAP
        parts += [_text(left - 4, y + 10, str(label), "end"),
                  f'<rect x="{left}" y="{y + 2}" width="{scale(share) - left:.1f}" height="{row - 4}" '
                  f'fill="{"#b91c1c" if off else NEW}"><title>{escape(str(label))}: {share:.1%}</title></rect>',
                  _text(scale(share) + 3, y + 10, f"{share:.1%}", "start")]
    return _svg(title, "".join(parts), height)


def scatter(title: str, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, diagonal: bool = False,
            points: int = 1500, seed: int = 0) -> str:
    """Up to `points` points (a random sample), with the line y = x or y = 0 for reference."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) > points:
        keep = np.random.default_rng(seed).choice(len(x), points, replace=False)
        x, y = x[keep], y[keep]
    low_x, high_x = (min(x.min(), y.min()), max(x.max(), y.max())) if diagonal else (x.min(), x.max())
    low_y, high_y = (low_x, high_x) if diagonal else (min(y.min(), 0), max(y.max(), 0))
    plot_w, plot_h = W - PAD - 8, H - PAD - 14
    sx = lambda v: PAD + plot_w * (v - low_x) / ((high_x - low_x) or 1)  # noqa: E731
    sy = lambda v: 6 + plot_h * (1 - (v - low_y) / ((high_y - low_y) or 1))  # noqa: E731
    guide = ((low_x, low_y, high_x, high_y) if diagonal else (low_x, 0, high_x, 0))
    parts = [f'<rect x="{PAD}" y="6" width="{plot_w}" height="{plot_h}" fill="none" stroke="#d8dce3"/>',
             f'<line x1="{sx(guide[0]):.1f}" y1="{sy(guide[1]):.1f}" x2="{sx(guide[2]):.1f}" y2="{sy(guide[3]):.1f}" '
             'stroke="#dc2626" stroke-dasharray="4 3"/>',
             "".join(f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="1.4" fill="{NEW}" fill-opacity="0.35"/>'
                     for a, b in zip(x, y)),
             _text(PAD + plot_w / 2, H - 4, xlabel), _text(PAD, 4 + plot_h + 12, number(low_x), "start", 8),
             _text(W - 8, 4 + plot_h + 12, number(high_x), "end", 8),
             _text(PAD - 3, 12, number(high_y), "end", 8), _text(PAD - 3, 6 + plot_h, number(low_y), "end", 8),
             f'<text x="9" y="{6 + plot_h / 2:.1f}" font-size="9" fill="#4a5363" text-anchor="middle" '
             f'transform="rotate(-90 9 {6 + plot_h / 2:.1f})">{escape(ylabel)}</text>']
    return _svg(title, "".join(parts))


def histogram(title: str, values: np.ndarray, bins: int = 24, unit: str = "") -> str:
    counts, edges = np.histogram(np.asarray(values, float), bins=bins)
    labels = [number(e) for e in edges[:-1]]
    return grouped_bars(title, labels, [("rows", NEW, counts.astype(float).tolist())], unit)


# ---------------------------------------------------------------- the data report

def column_profile(df: pd.DataFrame) -> list[list]:
    """Per column: type, missing, min / median / max of numbers and dates, the top values of text."""
    rows = []
    for column in df.columns:
        s = df[column]
        missing = f"{int(s.isna().sum())} ({s.isna().mean():.1%})"
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_datetime64_any_dtype(s):
            shown = (lambda v: str(v.date()) if hasattr(v, "date") else number(float(v))) if len(s.dropna()) else None
            low, mid, high = (shown(s.min()), shown(s.median()), shown(s.max())) if shown else ("-",) * 3
            top = ""
        else:
            low = mid = high = "-"
            counts = s.value_counts().head(3)
            top = (f"{s.nunique()} distinct: " + ", ".join(f"{str(v)[:24]} ({n})" for v, n in counts.items())
                   if len(counts) else "no values")
        rows.append([column, str(s.dtype), missing, low, mid, high, top])
    return rows


def distribution_charts(df: pd.DataFrame, reference: pd.DataFrame | None, checks: list[Check]) -> list[str]:
    """Each column the checks look at: its shares of rows in the new data and, when there is a prod, in prod's data
    (numbers between prod's deciles); with no prod, the new data's own histogram. A column with no values says so."""
    found = {c.check.removesuffix(" drift"): c for c in checks}
    numeric = drift_columns(df, df if reference is None else reference)
    charts = []
    for column in [c for c in CATEGORY_COLUMNS if c in df.columns] + numeric:
        if df[column].isna().all():
            charts.append(figure(_svg(column, _text(W / 2, 20, "no values in this data"), 30),
                                 f"{column}: no values in this data", column))
            continue
        then = None if reference is None else reference[column]
        if column in CATEGORY_COLUMNS:
            labels, now, then = category_shares(df[column], df[column] if then is None else then)
            labels, what = [str(v) for v in labels], "per category"
        elif then is None:
            labels, now, what = value_bins(df[column])
        else:
            edges, now, then = numeric_shares(df[column], then)
            labels = [f"≤ {number(edges[0])}"] + [f"{number(a)}–{number(b)}" for a, b in zip(edges, edges[1:])] + \
                [f"> {number(edges[-1])}"]
            what = "between the deciles of prod's data"
        check = found.get(column)
        verdict_ = f" ({check.observed}: {check.status})" if check else ""
        series = [("new data", NEW, list(now * 100))] + ([] if reference is None else
                                                          [("prod's data", REFERENCE, list(then * 100))])
        charts.append(figure(grouped_bars(f"{column}: % of rows {what}", labels, series, "%"),
                             f"{column}: % of rows {what}{verdict_}", column))
    return charts


def value_bins(values: pd.Series, bins: int = 12) -> tuple[list[str], np.ndarray, str]:
    """Equal-width bins between the 1st and 99th percentile (a long tail would squeeze the rest into one bar),
    the tails in a bin of their own each: labels, shares of rows, and what the bins are."""
    values = values.dropna().astype(float)
    low, high = np.quantile(values, [0.01, 0.99])
    if low == high:
        return [number(low)], np.array([1.0]), "(a single value)"
    edges = np.linspace(low, high, bins + 1)
    inner = np.histogram(values.clip(low, high), edges)[0].astype(float)
    inner[0] -= (values < low).sum()
    inner[-1] -= (values > high).sum()
    counts = np.concatenate([[(values < low).sum()], inner, [(values > high).sum()]]) / len(values)
    labels = [f"< {number(low)}"] + [f"{number(a)}–{number(b)}" for a, b in zip(edges, edges[1:])] + \
        [f"> {number(high)}"]
    return labels, counts, "in equal bins (tails apart)"


def data_report(df: pd.DataFrame, checks: list[Check], notes: list[str],
                reference: pd.DataFrame | None, monitor_verdict: str = "", reason: str = "") -> str:
    """The check step's report; with `monitor_verdict` (components/monitoring.py) and its reason, the monitoring
    pipeline's."""
    failures, warnings = failed(checks), warned(checks)
    status = FAIL if failures else WARN if warnings else PASS
    summary = (f"{len(failures)} of {len(checks)} checks failed" if failures else
               f"All {len(checks)} checks passed" + (f", {len(warnings)} with a warning" if warnings else ""))
    headline = verdict(status, summary + ("" if failures else ": the data goes on to training"))
    title, lede = f"Data report: {len(df)} rows", "The check step's verdict on the clean data, before training."
    if monitor_verdict:
        status = {"ok": PASS, "shifted": WARN}.get(monitor_verdict, FAIL)
        unmeasured = [c.check for c in checks if c.status == SKIP or c.observed == UNKNOWN]
        if unmeasured and monitor_verdict != "invalid":
            reason += f" (not measured: {', '.join(unmeasured)})"
        headline = verdict(status, f"Verdict: {monitor_verdict}: {reason}")
        title, lede = f"Drift report: {len(df)} new listings", "The monitoring pipeline's verdict on new listings."
    rows = [[c.check, c.status, c.observed, c.threshold] for c in checks]
    problems = [para(m) for m in failures + warnings]
    sections = [
        headline,
        section("checks", "Checks", table(["check", "result", "observed", "threshold"], rows, badge=1), *problems),
        section("columns", "Columns", table(["column", "type", "missing", "min", "median", "max", "top values"],
                                            column_profile(df), {2})),
    ]
    charts = '<div class="charts">' + "".join(distribution_charts(df, reference, checks)) + "</div>"
    if reference is None:
        sections.append(section("distributions", "Distributions (no prod model yet to compare with)", charts))
    else:
        sections.append(section("distributions", f"New data against prod's data ({len(reference)} rows)",
                                legend(("new data", NEW), ("prod's data", REFERENCE)), charts))
    sections.append(section("notes", "Notes", *[para(n) for n in notes]))
    return page(title, lede, *sections)


def as_text(html: str) -> str:
    """The report's words without markup (for a log or a test)."""
    words = re.sub(r"<[^>]+>", " ", re.sub(r"<(head|svg)\b.*?</\1>", " ", html, flags=re.S))
    return re.sub(r"\s+", " ", unescape(words)).strip()


# ---------------------------------------------------------------- the model card

def error_by(predictions: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows, mean price and MAE of the candidate per value of `column`, largest group first."""
    errors = (predictions["price"] - predictions["predicted"]).abs()
    grouped = predictions.assign(error=errors).groupby(column)
    return pd.DataFrame({"rows": grouped.size(), "mean price": grouped["price"].mean(),
                         "MAE": grouped["error"].mean()}).sort_values("rows", ascending=False)


def coverage_by(predictions: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows, the share of prices inside their range and its median width per value of `column`, largest first."""
    grouped = predictions.assign(inside=predictions["price"].between(predictions["low"], predictions["high"]),
                                 width=predictions["high"] - predictions["low"]).groupby(column)
    return pd.DataFrame({"rows": grouped.size(), "coverage": grouped["inside"].mean(),
                         "width": grouped["width"].median()}).sort_values("rows", ascending=False)


def range_section(card: dict, predictions: pd.DataFrame, columns: list[str]) -> str:
    """How far the price ranges can be trusted: the share of test prices inside them, overall and by group."""
    nominal, scores = card["coverage"], card["scores"]
    parts = [para(f"Each price comes with a range meant to hold the price of {nominal:.0%} of listings "
                  f"(conformalized quantile regression, calibrated on the {card['rows'].get('validation', '-')} "
                  f"validation rows). On the {card['rows'].get('test', '-')} test rows it holds "
                  f"{scores['test_coverage']:.1%} of the prices; its median width is "
                  f"{money(scores['test_interval_width'])} $. Groups of fewer than 200 test rows vary by chance.")]
    charts = []
    for column in columns:
        found = coverage_by(predictions, column)
        parts.append(table([model_label(column), "test rows", "prices in range", "median width ($)"],
                           [[k, int(r["rows"]), f"{r['coverage']:.1%}", money(r["width"])] for k, r in found.iterrows()],
                           {1, 2, 3}))
        charts.append(figure(coverage_bars(f"Range coverage by {model_label(column)}", found["coverage"], nominal),
                             f"Share of test prices inside their range by {model_label(column)} (dashed: nominal; red: "
                             f"more than {MAX_COVERAGE_GAP * 100:.0f} points off)", f"coverage-{column}"))
    return section("ranges", "Price range", *parts, '<div class="charts">' + "".join(charts) + "</div>")


def model_card(card: dict, predictions: pd.DataFrame, importance: pd.Series) -> str:
    """The card of one candidate: where it came from, how good it is, and why it was or was not promoted.

    `card` holds the facts promotion.register gathers (see there); `predictions` the test rows with the column
    `predicted`; `importance` the MAE increase per input column (permutation importance)."""
    c, comparison, scores = card, card["comparison"], card["scores"]
    status = PASS if c["promoted"] else SKIP
    head = "Promoted to prod" if c["promoted"] else "Not promoted, prod unchanged"
    residual = predictions["price"] - predictions["predicted"]
    metrics = [["MAE ($)", money(scores["val_mae"]), money(scores["test_mae"])],
               ["R²", f"{scores['val_r2']:.3f}", f"{scores['test_r2']:.3f}"]]
    by_group, grouped, columns = [], [], []
    for column in ("neighbourhood_group", "room_type"):
        if predictions[column].isna().all():  # a city without area groups
            continue
        grouped.append(model_label(column))
        columns.append(column)
        found = error_by(predictions, column)
        by_group += [table([model_label(column), "test rows", "mean price ($)", "MAE ($)"],
                           [[k, int(r["rows"]), money(r["mean price"]), money(r["MAE"])] for k, r in found.iterrows()],
                           {1, 2, 3}),
                     '<div class="charts">' + figure(hbars(f"MAE by {model_label(column)}", found["MAE"], unit=" $"),
                                                     f"Test MAE by {model_label(column)} ($)", f"error-{column}")
                     + "</div>"]
    readable = importance.rename(index=model_label)
    sections = [
        verdict(status, f"{head}: {c['reason']}"),
        section("decision", "Promotion decision", decision_table(comparison, c["margin"]),
                para("The candidate takes prod only when the whole 95 % interval of its MAE gain over prod, on test "
                     "rows neither model was trained on, lies above the margin.")),
        section("metrics", "Validation and test metrics",
                table(["metric", f"validation ({c['rows'].get('validation', '-')} rows)",
                       f"test ({c['rows'].get('test', '-')} rows)"], metrics, {1, 2})),
        section("plots", "Predictions on the test rows", '<div class="charts">' + figure(
            scatter("Predicted against actual price", predictions["price"], predictions["predicted"],
                    "actual price ($)", "predicted ($)", diagonal=True),
            "Predicted against actual price on the test rows (dashed: a perfect prediction)", "predicted-vs-actual")
            + figure(histogram("Residuals", residual.clip(-300, 300), unit=""),
                     "Residual (actual - predicted, $) of each test row: rows per bin", "residuals")
            + figure(scatter("Residual against predicted price", predictions["predicted"], residual,
                             "predicted price ($)", "residual ($)"),
                     "Residual against predicted price (dashed: no error)", "residual-vs-predicted") + "</div>"),
        section("errors", "Error by " + " and ".join(grouped), *by_group) if grouped else "",
        range_section(c, predictions, columns) if "low" in predictions and c.get("coverage") else "",
        section("importance", "Feature importance", '<div class="charts">' + figure(
            hbars("Feature importance", readable, unit=" $"),
            "How much the test MAE grows ($) when the column is shuffled (permutation importance)", "importance")
            + "</div>"),
        section("data", "Data", pairs({"city": c.get("city", "-"), "source": c["source"], "sha256": c["sha256"],
                                       "kept at": c["data_uri"]}),
                table(["step", "rows"], [[step, rows] for step, rows in c["rows"].items()], {1})),
        section("parameters", "Parameters", table(["parameter", "value"], sorted(c["parameters"].items())),
                *sweep_table(c["sweep"], c.get("sweep_choice", ""))),
        section("lineage", "Code and images", pairs({"git commit": c["git_commit"]}),
                table(["step", "image"], sorted(c["images"].items()))),
    ]
    title = f"Model card: {c['name']} version {c['version']}" if c["version"] else f"Model card: {c['name']}"
    return page(title, f"{c['learner']} regression of the nightly price, pipeline run {c['pipeline_run'] or '-'}.",
                *sections)


def model_label(column: str) -> str:
    return model.LABELS.get(column, column)


def decision_table(comparison: dict, margin: float) -> str:
    if not comparison.get("comparable"):
        return para(f"No comparison with prod: {comparison.get('why') or 'no prod model'}.")
    c = comparison
    rows = [["MAE ($)", money(c["candidate_mae"]), money(c["prod_mae"])],
            ["R²", f"{c['candidate_r2']:.3f}", f"{c['prod_r2']:.3f}"] if "prod_r2" in c else None]
    gain = (f"MAE gain {c['gain']:.3f} $ (95 % interval {c['gain_low']:.3f} to {c['gain_high']:.3f}), margin "
            f"{margin}, on {c['rows']} test rows neither model was trained on")
    return table(["on the same rows", "candidate", f"prod (version {c['prod_version']})"], [r for r in rows if r],
                 {1, 2}) + para(gain)


def sweep_table(sweep: list[dict], choice: str) -> list[str]:
    if len(sweep) <= 1:
        return []
    best = min(range(len(sweep)), key=lambda i: (sweep[i]["val_mae"], i))
    rows = [[i + 1, ", ".join(f"{k}={v}" for k, v in t["trial"].items()) or "(base)", number(t["val_mae"]),
             f"{t['val_r2']:.3f}", "chosen" if i == best else ""] for i, t in enumerate(sweep)]
    return [f"<h3>Sweep: {len(sweep)} trials</h3>",
            table(["trial", "changes", "validation MAE", "validation R²", ""], rows, {0, 2, 3}), para(choice)]


def model_card_markdown(card: dict, link: str) -> str:
    """The card's summary as the model version's description in MLflow (Markdown)."""
    c, s, comparison = card, card["scores"], card["comparison"]
    lines = [f"**{'Promoted to prod' if c['promoted'] else 'Not promoted'}**: {c['reason']}", "",
             "| | validation | test |", "|---|---|---|",
             f"| MAE ($) | {s['val_mae']:.2f} | {s['test_mae']:.2f} |", f"| R² | {s['val_r2']:.3f} | {s['test_r2']:.3f} |",
             "", f"Data: {c.get('city', '-')} listings, `{c['source']}` (sha256 `{c['sha256'][:12]}`), "
             + ", ".join(f"{step} {rows}" for step, rows in c["rows"].items()) + " rows."]
    if comparison.get("comparable"):
        lines.append(f"Against prod version {comparison['prod_version']} on {comparison['rows']} rows: MAE "
                     f"{comparison['candidate_mae']:.2f} vs {comparison['prod_mae']:.2f}.")
    lines += ["", f"Model card: {link}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- a step's outputs

def keep_report(html: str, path: str, artifact: str) -> None:
    """The report as the step's output file and in its MLflow run (written before any failure, to explain it)."""
    Path(path).write_text(html)
    mlflow.log_text(html, artifact)


def write_metrics(metrics, figures: dict[str, float]) -> None:
    """Log figures on a KFP Metrics output. kfp.local's cache treats an output without a file as missing, so the
    figures go to its file too."""
    for name, value in figures.items():
        metrics.log_metric(name, value)
    Path(metrics.path).write_text(json.dumps(metrics.metadata))
