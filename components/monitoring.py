"""Monitoring: new listings against prod's data with the check step's checks, and what clean dropped of them: a
verdict a person and a scheduler can act on, with a one-line reason, and the drift report.

- ok: nothing moved that matters;
- shifted: distributions moved, but prod's error on the new priced rows is not worse with evidence (or there are
  no prices to tell);
- degraded: prod's error on the new priced rows is worse than at registration, its whole interval past the limit;
- suspect: the rows do not look like real listings (components/quality.py);
- invalid: the file cannot be read or cleaned, or fails the data's own checks.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from components import drift, model, names, report, saved_model, tracking
from components.checks import FAIL, SKIP, UNKNOWN, WARN, Check, failed
from components.cities import City
from components.drift import DriftLimits
from components.errors import InvalidData, StepError
from components.listings import read_listings
from components.prod import same_city
from components.quality import is_quality, suspect
from components.validation import ERROR_CHECK_ROWS, run_checks, subjects, unreadable_notes

DRIFT_REPORT = "reports/drift_report.html"

OK, SHIFTED, DEGRADED, SUSPECT, INVALID = "ok", "shifted", "degraded", "suspect", "invalid"
# `pipeline.py run --pipeline monitor`'s exit status by verdict (any other failure: 1).
EXIT_CODES = {OK: 0, SHIFTED: 0, INVALID: 2, DEGRADED: 3, SUSPECT: 4}
CONFIDENCE = drift.CONFIDENCE
PREDICTIONS_CHECK = "predicted price drift"


def monitor(
    clean_path: str, report_path: str, model_name: str, city: str | dict, limits: DriftLimits,
    clean_meta: dict | None = None,
) -> dict:
    """New listings against prod's data with the check step's checks, and what clean dropped (`clean_meta`, its
    metadata) against what it dropped of prod's data: a verdict (ok, drift naming what moved and how much, or
    invalid), the drift report, and prod's error on the new rows when they have prices. Fails on invalid data,
    after keeping the report; drift is a finding, not a failure. The summary says whether training would take
    this data (`trainable`: none of the checks it applies failed) and with which parameters."""
    profile = City.from_param(city, "monitor")
    params = {"model_name": model_name, "city": profile.name, **vars(limits)}
    with tracking.step_run("monitor", params=params, last=True) as run:
        prod = same_city(tracking.prod_version(model_name), model_name, profile, "monitor")
        if prod is None or not prod.tags.get("reference_data"):
            why = ("has no 'prod' version" if prod is None else
                   f"prod version {prod.version} names no reference data (tag reference_data)")
            raise StepError("monitor", "model_name", f"model {model_name!r} {why}: there is nothing to compare the "
                                                     "new listings with; register a model with the training pipeline")
        df = read_listings(clean_path)
        clean_meta = clean_meta or {}
        own, against, notes, reference, figures = run_checks(df, model_name, prod, profile, limits,
                                                             clean_meta.get("ignored_columns", []), training=False)
        notes = unreadable_notes(clean_meta) + notes
        priced = int(df["price"].notna().sum())
        not_trainable = failed(own + against) + ([f"price: only {priced} row(s) have a price, training needs "
                                                  f"{profile.min_rows}"] if priced < profile.min_rows else [])
        if reference is not None:
            for added, added_figures in (clean_drops_check(prod, clean_meta, limits),
                                         predictions_check(model_name, prod, df, reference, limits)):
                against.append(added)
                figures |= added_figures
                mlflow.log_metrics(added_figures)
        checks, drifted = own + against, drift.drifted(against)
        verdict, reason = verdict_of(own, against)
        report.keep_report(report.data_report(df, checks, notes, reference, monitor_verdict=verdict, reason=reason),
                           report_path, DRIFT_REPORT)
        link = tracking.artifact_link(run, DRIFT_REPORT)
        mlflow.set_tags({"verdict": verdict, "verdict_reason": reason[:5000], "drifted": ", ".join(drifted),
                         "prod_version": prod.version})
        summary = {"verdict": verdict, "reason": reason, "drifted": drifted, "model_name": model_name,
                   "prod_version": int(prod.version),
                   "rows": len(df), "priced_rows": priced, "checks": len(checks), "report_link": link,
                   "trainable": not not_trainable, "not_trainable_because": not_trainable,
                   "training_params": {"model_name": model_name, "city": profile.as_param(), **vars(limits),
                                       "trigger": f"monitoring run {run.info.run_id}: {verdict}: {reason}"[:5000]},
                   **{k: v for k, v in figures.items() if k.startswith("prod_")}}
        for c in against:
            if c.check == drift.ERROR_CHECK and c.observed == UNKNOWN:  # no priced rows new to prod, say
                summary["prod_error_unknown"] = (c.message.removeprefix("price: ")
                                                 .removeprefix("prod's error on this data is unknown: "))
        mlflow.log_metrics({"rows": len(df), "priced_rows": priced, "drifted_columns": len(drifted),
                            "drift": int(verdict in (SHIFTED, DEGRADED))})
        if verdict == INVALID:
            failures = failed(own)
            raise InvalidData("monitor", subjects(failures), f"the new listings are invalid: {len(failures)} check(s) "
                              f"failed (drift report: {link}):\n  - " + "\n  - ".join(failures))
        print(f"monitor: {verdict}: {reason}")
        return summary


def verdict_of(own: list[Check], against: list[Check]) -> tuple[str, str]:
    """The verdict on new listings from the data's own checks and those against prod, and its one-line reason."""
    broken = failed([c for c in own if not is_quality(c)])
    if broken:
        return INVALID, "; ".join(broken)
    if suspect(own):
        return SUSPECT, "; ".join(suspect(own))
    error = next((c for c in against if c.check == drift.ERROR_CHECK), None)
    worse = [c.message.removeprefix("price: ") for c in against if c.check in (drift.ERROR_CHECK, drift.COVERAGE_CHECK)
             and c.status in (WARN, FAIL) and c.observed != UNKNOWN]
    if worse:
        return DEGRADED, "; ".join(worse)
    moved = drift.drifted([c for c in against if c.check != drift.ERROR_CHECK])
    if error is None or error.observed == UNKNOWN:
        evidence = "prod's error on them is not measured" + (f" ({error.message.split(': ', 2)[-1]})" if error else "")
    else:
        evidence = f"prod's error is not worse with evidence: {error.observed}"
    if moved:
        return SHIFTED, "; ".join(f"{name} {figure}" for name, figure in moved.items()) + f"; {evidence}"
    return OK, f"nothing moved that matters; {evidence}"


def retrain_decision(summary: dict, on_shift: bool) -> tuple[bool, str]:
    """Whether monitoring starts training on the listings it judged, and why (asked with retrain=true): on degraded,
    and on shifted only when asked too (retrain_on_shift=true); never on suspect or invalid data, nor on data
    training's checks would refuse."""
    verdict = summary["verdict"]
    wanted = (DEGRADED, SHIFTED) if on_shift else (DEGRADED,)
    if verdict not in wanted:
        return False, (f"the verdict is {verdict}: training starts on {' or '.join(wanted)}"
                       + ("" if on_shift else " (and on shifted with retrain_on_shift=true)"))
    if not summary["trainable"]:
        return False, "training's checks would refuse this data: " + "; ".join(summary["not_trainable_because"])
    return True, f"the verdict is {verdict}: {summary['reason']}"


def predictions_check(model_name: str, prod, df: pd.DataFrame, reference: pd.DataFrame, limits: DriftLimits
                      ) -> tuple[Check, dict]:
    """prod's prices for the new rows against its prices for its own data: how far the model's answers moved, priced
    rows or not (an inference log has no prices)."""
    sample = lambda rows: rows.sample(min(len(rows), ERROR_CHECK_ROWS), random_state=0)  # noqa: E731
    try:
        fitted, _ = saved_model.load_model(names.model_uri(model_name, version=prod.version), "monitor")
        now, before = model.predictions(fitted, sample(df)), model.predictions(fitted, sample(reference))
    except Exception as exc:  # a prod that cannot score these rows: say so, the other checks still tell
        return Check(PREDICTIONS_CHECK, WARN, UNKNOWN, "", f"predicted price: prod version {prod.version} cannot "
                     f"score these rows ({type(exc).__name__}: {str(exc)[:200]})"), {}
    return drift.numeric_check(PREDICTIONS_CHECK.removesuffix(" drift"), now, before, limits)


def clean_drops_check(prod, counts: dict, limits: DriftLimits) -> tuple[Check, dict]:
    """What clean dropped of the new listings against what it dropped of prod's data (its clean run's counts)."""
    name = "rows clean drops drift"
    run_id = prod.tags["reference_data"].removeprefix("runs:/").split("/")[0]
    try:
        reference = mlflow.tracking.MlflowClient().get_run(run_id).data.metrics
    except MlflowException as exc:
        return Check(name, SKIP, UNKNOWN, "", f"prod's clean run {run_id} cannot be read: {exc}"), {}
    if "rows" not in counts or "rows" not in reference:
        return Check(name, SKIP, UNKNOWN, "", "clean's counts are not known"), {}
    return drift.cleaning_check(counts, reference, limits)
