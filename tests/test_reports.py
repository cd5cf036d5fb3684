"""The data report and the model card as a person sees them: rendered in headless Chromium, read back from the
page's DOM, screenshot to screenshots/. Built from the real sample and a real fitted model."""

import json
import re
from html import escape

import numpy as np
import pandas as pd
import pytest

from components import checks, cities, drift, listings, model, promotion, report

SECTIONS = {"data": ["checks", "columns", "distributions", "notes"],
            "card": ["decision", "metrics", "plots", "errors", "ranges", "importance", "data", "parameters", "lineage"]}
# What the page holds: its sections, each chart with the number of marks drawn in it, and anything that would
# fetch (a report is shown in KFP's sandboxed frame with no network).
DOM = """(() => ({
  sections: [...document.querySelectorAll('section')].map(s => s.id),
  charts: Object.fromEntries([...document.querySelectorAll('figure[data-chart]')].map(f => {
    const svg = f.querySelector('svg'), box = svg.getBoundingClientRect();
    return [f.dataset.chart, {marks: svg.querySelectorAll('rect,circle').length, width: box.width,
                              height: box.height, labels: [...svg.querySelectorAll('text')].map(t => t.textContent)}];
  })),
  fetchers: document.querySelectorAll('script,link,img,iframe,object,embed,[src]').length,
  verdict: document.querySelector('.verdict').textContent,
  badges: [...document.querySelectorAll('#checks .status')].map(b => b.textContent),
  text: document.body.innerText,
}))()"""


# How KFP's dashboard shows an HTML artifact (frontend/src/components/viewers/HTMLViewer.tsx at 2.17.0).
KFP_FRAME = ('<!DOCTYPE html><html><body><iframe src="about:blank" sandbox="allow-scripts" '
             'style="width:100%;min-height:600px" srcdoc="{}"></iframe></body></html>')


def rendered(browser, tmp_path, html: str, name: str) -> dict:
    """The page as a file of its own (read back and screenshot), then as KFP shows it, in a sandboxed frame."""
    path = tmp_path / f"{name}.html"
    path.write_text(html)
    browser.open(path.as_uri())
    page = browser.evaluate(DOM)
    browser.screenshot(name)
    # Nothing was fetched but the page itself, and nothing failed.
    assert browser.requests() == [path.as_uri()] and browser.failures() == [] and page["fetchers"] == 0
    assert all(chart["width"] > 200 and chart["height"] > 20 for chart in page["charts"].values()), page["charts"]
    host = tmp_path / f"{name}-kfp.html"
    host.write_text(KFP_FRAME.format(escape(html, quote=True)))
    browser.open(host.as_uri())
    framed = browser.evaluate_in_frame(DOM)
    assert (framed["sections"], framed["verdict"], framed["text"]) == (page["sections"], page["verdict"], page["text"])
    assert {k: c["marks"] for k, c in framed["charts"].items()} == {k: c["marks"] for k, c in page["charts"].items()}
    assert browser.requests() == [host.as_uri()] and browser.failures() == []
    return page


@pytest.fixture(scope="module")
def halves(sample):
    df, _ = listings.clean_listings(sample, cities.city())
    return listings.split_listings(df, 0.5, seed=7)


def test_data_report_shows_every_check_and_each_distribution_against_prods(browser, tmp_path, halves):
    new, reference = halves
    new = new[new["neighbourhood_group"] != "Staten Island"].assign(price=new["price"] * 1.2)
    found = checks.deterministic_checks(new, cities.city())
    moved, _ = drift.drift_checks(new, reference, drift.DriftLimits())
    error, _ = drift.error_check(np.full(5000, 41.0), 33.2, "3", drift.DriftLimits())
    found += moved + [error]
    page = rendered(browser, tmp_path, report.data_report(new, found, ["a note"], reference), "data_report")
    assert page["sections"] == SECTIONS["data"]
    assert page["badges"] == [c.status for c in found] and len(found) == 32
    # price out of range after the rise fails; price drift and prod's error warn.
    assert page["verdict"] == "1 of 32 checks failed" and page["badges"].count("warn") == 2
    # Every numeric column the 2019 format has (number_of_reviews_ltm is today's).
    assert list(page["charts"]) == drift.CATEGORY_COLUMNS + drift.DRIFT_COLUMNS[:-1]
    # Two bars (new data, prod's data) per category or decile.
    assert page["charts"]["neighbourhood_group"]["marks"] == 2 * 5
    assert page["charts"]["price"]["marks"] == 2 * 10
    assert "Staten Island" in page["charts"]["neighbourhood_group"]["labels"]


def test_a_data_report_without_prod_draws_the_new_datas_own_distributions(browser, tmp_path, halves):
    found = checks.deterministic_checks(halves[0], cities.city())
    page = rendered(browser, tmp_path, report.data_report(halves[0], found, ["no prod yet"], None), "data_report_first")
    assert page["sections"] == SECTIONS["data"]
    assert page["verdict"] == "All 21 checks passed: the data goes on to training"
    assert list(page["charts"]) == drift.CATEGORY_COLUMNS + drift.DRIFT_COLUMNS[:-1]
    # One bar per category; a number in 12 equal bins between its 1st and 99th percentile, and a bar per tail.
    assert page["charts"]["neighbourhood_group"]["marks"] == 5 and page["charts"]["price"]["marks"] == 14
    assert any(label.startswith("< ") for label in page["charts"]["price"]["labels"])
    assert "no prod model yet to compare with" in page["text"]


def test_a_city_without_area_groups_gets_reports_without_them(browser, tmp_path, halves, card_inputs):
    """A city whose listings have no area group (the column is empty): said plainly, never an 'area group' heading."""
    new = halves[0].assign(neighbourhood_group=None)
    found = checks.deterministic_checks(new, cities.city())
    page = rendered(browser, tmp_path, report.data_report(new, found, [], None), "data_report_no_groups")
    assert page["charts"]["neighbourhood_group"]["marks"] == 0
    assert "neighbourhood_group: no values in this data" in page["text"]
    assert not re.search(r"\b0 distinct", page["text"])
    predictions, importance, meta, tags, scores = card_inputs
    facts = promotion.model_card_facts("rental-price-x", "1", True, "no prod model yet", {
        "prod_version": None, "comparable": False, "why": "no prod model yet"}, 0.1, scores, {**meta, "sweep": ""},
        {}, {}, tags, len(predictions), "")
    card = rendered(browser, tmp_path, report.model_card(facts, predictions.assign(neighbourhood_group=None),
                                                         importance.drop("neighbourhood_group", errors="ignore")),
                    "model_card_no_groups")
    assert "Error by room type" in card["text"] and "area group" not in card["text"].lower()


@pytest.fixture(scope="module")
def card_inputs(halves):
    """A real model (small) and its predictions on real test rows."""
    train, test = halves
    train, validation = listings.split_listings(train, 0.2, seed=7)
    fitted = model.calibrate(model.fit(train, model.ModelParams(max_iter=60)), validation)
    ranges = model.price_ranges(fitted, test)
    predictions = test.assign(predicted=ranges["price"], low=ranges["low"], high=ranges["high"])
    importance = model.feature_importances(fitted, test, rows=500)
    sweep = [{"trial": {}, "val_mae": 30.1, "val_r2": 0.61, "mlflow_run_id": "a"},
             {"trial": {"learning_rate": 0.1}, "val_mae": 29.8, "val_r2": 0.62, "mlflow_run_id": "b"}]
    tags = {"data_source": "sample://nyc_airbnb_sample1.csv.gz", "data_sha256": "5c92c8f30e28" + "0" * 52,
            "data_uri": "runs:/r/raw/x.csv.gz", "parameters": json.dumps({"learner": "hist_gbm", "max_iter": "60"}),
            "sweep_choice": "trial 2 of 2", "git_commit": "abc", "images": json.dumps({"train": "rental-price-train:1"})}
    meta = {"val_mae": 29.8, "val_r2": 0.62, "train_rows": 6080.0, "val_rows": 1520.0, "learner": "hist_gbm",
            "sweep": json.dumps(sweep), "coverage": 0.8}
    scores = model.errors(test["price"], predictions["predicted"]) | model.range_scores(test["price"], ranges)
    return predictions, importance, meta, tags, {f"candidate_{k}": v for k, v in scores.items()}


def test_model_card_shows_data_metrics_plots_errors_importance_and_the_decision(browser, tmp_path, card_inputs):
    predictions, importance, meta, tags, scores = card_inputs
    comparison = {"prod_version": 3, "comparable": True, "why": "", "rows": 2400, "candidate_mae": 29.0,
                  "prod_mae": 31.0, "gain": 2.0, "gain_low": 1.2, "gain_high": 2.8, "candidate_r2": 0.63,
                  "prod_r2": 0.58}
    facts = promotion.model_card_facts("rental-price", "4", True, "better than prod ...", comparison, 0.1, scores, meta,
                                   {"rows": 20000.0}, {"rows": 19001.0}, tags, len(predictions), "run-1")
    page = rendered(browser, tmp_path, report.model_card(facts, predictions, importance), "model_card")
    assert page["sections"] == SECTIONS["card"]
    assert page["verdict"].startswith("Promoted to prod: better than prod")
    charts = page["charts"]
    assert list(charts) == ["predicted-vs-actual", "residuals", "residual-vs-predicted", "error-neighbourhood_group",
                            "error-room_type", "coverage-neighbourhood_group", "coverage-room_type", "importance"]
    # The price range: a bar per group against the nominal line, and the figures beside them.
    groups = predictions["neighbourhood_group"].nunique()
    assert charts["coverage-neighbourhood_group"]["marks"] == groups
    assert f"holds {scores['candidate_coverage']:.1%} of the prices" in page["text"]
    assert "nominal 80%" in " ".join(charts["coverage-room_type"]["labels"])
    assert charts["predicted-vs-actual"]["marks"] >= 1500  # a point per row, up to 1,500
    assert charts["error-neighbourhood_group"]["marks"] == predictions["neighbourhood_group"].nunique()
    # Every input column, by its readable name.
    assert charts["importance"]["marks"] == len(model.FEATURES)
    assert {"area group", "room type", "listing title"} <= set(charts["importance"]["labels"])
    text = page["text"]
    assert "prod (version 3)" in text and "0.580" in text and "Sweep: 2 trials" in text
    assert "validation (1520 rows)" in text and "20000" in text


def test_model_card_of_a_run_without_prod_says_why_nothing_was_compared(browser, tmp_path, card_inputs):
    predictions, importance, meta, tags, scores = card_inputs
    facts = promotion.model_card_facts("rental-price", "1", True, "no prod model yet", {"prod_version": None,
                                   "comparable": False, "why": "no prod model yet"}, 0.1, scores,
                                   {**meta, "sweep": ""}, {}, {}, tags, len(predictions), "")
    page = rendered(browser, tmp_path, report.model_card(facts, predictions, pd.Series(dtype=float)), "model_card_first")
    assert "No comparison with prod: no prod model yet." in page["text"]
    assert charts_drawn(page) and page["charts"]["importance"]["marks"] == 0


def charts_drawn(page: dict) -> bool:
    return all(chart["marks"] or name == "importance" for name, chart in page["charts"].items())
