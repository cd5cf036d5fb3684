"""The check step: the data's own checks (checks.py), then, against prod, its drift from prod's data and prod's
error on it (drift.py); the data report shows each, passed or not. The monitor step runs the same checks."""

from __future__ import annotations

import tempfile

import mlflow
import pandas as pd

from components import drift, model, names, report, tracking
from components.checks import UNKNOWN, WARN, Check, deterministic_checks, failed, warned
from components.cities import City
from components.drift import DriftLimits
from components.errors import InvalidData
from components.listings import read_listings
from components.prod import new_rows, ranges_with, same_city
from components.quality import quality_checks

# prod's error on new data is estimated on at most this many of its rows (a random sample): MAE's standard error on
# 50,000 rows is under 0.5 % of it, and scoring 500,000 rows cost check 15 s.
ERROR_CHECK_ROWS = 50_000
# Where the check run keeps its HTML report in MLflow (KFP's output files have no extension).
DATA_REPORT = "reports/data_report.html"


def check(
    clean_path: str, report_path: str, model_name: str, city: str | dict, limits: DriftLimits,
    clean_meta: dict | None = None,
) -> list[Check]:
    """Every check: the data's own (schema, ranges, as its city's profile says) and, against prod, its drift and
    prod's error on it. Writes the data report (HTML) to `report_path` and MLflow, then fails on any failure,
    listing each; warnings are reported and the run goes on."""
    profile = City.from_param(city, "check")
    with tracking.step_run("check", params={"city": profile.name, **vars(limits)}) as run:
        df = read_listings(clean_path)
        current = same_city(tracking.prod_version(model_name), model_name, profile, "check")
        own, against, notes, reference, _ = run_checks(df, model_name, current, profile, limits,
                                                       (clean_meta or {}).get("ignored_columns", []))
        notes = unreadable_notes(clean_meta) + notes
        found = own + against
        report.keep_report(report.data_report(df, found, notes, reference), report_path, DATA_REPORT)
        failures, warnings = failed(found), warned(found)
        mlflow.log_metrics({"checks": len(found), "failed": len(failures), "warnings": len(warnings)})
        for warning in warnings:
            print(f"check: warning: {warning}")
        if failures:
            raise InvalidData("check", subjects(failures), f"{len(failures)} check(s) failed (data report: "
                              f"{tracking.artifact_link(run, DATA_REPORT)}):\n  - " + "\n  - ".join(failures))
        print(f"check: {len(found)} checks passed" + (f", {len(warnings)} with a warning" if warnings else ""))
        return found


def run_checks(df: pd.DataFrame, model_name: str, current, city: City, limits: DriftLimits,
               ignored: list[str] = (), training: bool = True):
    """The data's own checks and, when they pass and there is a prod (`current`), those against prod (their figures
    logged): (own, against prod, notes, prod's data, figures)."""
    own = deterministic_checks(df, city, ignored, training)
    if failed(own):
        # The comparisons with prod assume the schema the deterministic checks just found broken.
        return own, [], ["Checks against prod skipped: the deterministic checks failed."], None, {}
    own += quality_checks(df)
    if failed(own):
        return own, [], ["Checks against prod skipped: the rows do not look like real listings."], None, {}
    if current is None:
        return own, [], [f"Checks against prod skipped: model {model_name!r} has no '{names.PROD_ALIAS}' "
                         "version yet."], None, {}
    against, figures, notes, reference = checks_against_prod(model_name, current, df, limits)
    mlflow.log_metrics(figures)
    return own, against, notes, reference, figures


def unreadable_notes(clean_meta: dict | None) -> list[str]:
    """What clean dropped because a value could not be read (its metadata, where KFP makes 3400 a 3400.0)."""
    return [f"clean dropped {int(found['rows'])} row(s) whose {column} cannot be read: {found['problem']}"
            for column, found in (clean_meta or {}).get("unreadable", {}).items()]


def subjects(failures: list[str]) -> str:
    """The fields failed checks name ("price: ..." -> price), once each."""
    return ", ".join(dict.fromkeys(f.split(":")[0] for f in failures))


def checks_against_prod(model_name: str, current, df, limits: DriftLimits):
    """Drift from prod's clean data and prod's error on the new rows: (checks, figures, notes, prod's data)."""
    found, figures, notes, reference = [], {}, [], None
    reference_uri = current.tags.get("reference_data")
    if reference_uri:
        with tempfile.TemporaryDirectory() as tmp:
            reference = read_listings(mlflow.artifacts.download_artifacts(reference_uri, dst_path=tmp))
        found, figures = drift.drift_checks(df, reference, limits)
        notes.append(f"Drift is measured against the data of prod version {current.version} ({len(reference)} rows).")
    else:
        found.append(Check(f"drift from prod version {current.version}'s data", WARN, UNKNOWN, "",
                           f"drift: prod version {current.version} names no reference data (tag reference_data)"))
    rows, why = new_rows(current, df)
    error = drift.ERROR_CHECK
    if rows is None:
        found.append(Check(error, WARN, UNKNOWN, "", f"price: prod's error on this data is unknown: {why}"))
        return found, figures, notes, reference
    new = len(rows)
    rows = rows.sample(min(new, ERROR_CHECK_ROWS), random_state=0)
    try:
        prices = ranges_with(model_name, current, rows, "check")
    except Exception as exc:  # a prod that cannot score this data: report it, the candidate may still be fine
        found.append(Check(error, WARN, UNKNOWN, "", f"price: prod version {current.version} cannot score this data "
                           f"({type(exc).__name__}: {str(exc)[:200]})"))
        return found, figures, notes, reference
    errors = (rows[model.TARGET] - prices["price"]).abs().to_numpy(dtype=float)
    error_check, error_figures = drift.error_check(errors, float(current.tags["test_mae"]), current.version, limits)
    found.append(error_check)
    if "low" in prices:  # prod's price ranges (versions since ranges have them)
        coverage_check, coverage_figures = drift.coverage_check(rows[model.TARGET], prices, current.version)
        found.append(coverage_check)
        error_figures |= coverage_figures
    sampled = f" (a random {len(rows)} of them)" if len(rows) < new else ""
    f = error_figures
    notes.append(f"prod version {current.version}'s error is measured on the {new} rows new to it{sampled}: MAE "
                 f"{f['prod_mae_now']:.2f}, {f['prod_error_ratio']:.2f} x its test MAE at registration "
                 f"({drift.CONFIDENCE:.0%} interval {f['prod_error_ratio_low']:.2f} to {f['prod_error_ratio_high']:.2f}"
                 ", a bootstrap over those rows).")
    return found, figures | error_figures, notes, reference
