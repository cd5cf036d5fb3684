"""Monitoring: new listings against prod's data with the check step's checks, and what clean dropped of them: a
verdict (ok, drift or invalid) and the drift report."""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException

from components import drift, report, tracking
from components.checks import SKIP, UNKNOWN, Check, failed
from components.cities import City
from components.drift import DriftLimits
from components.errors import InvalidData, StepError
from components.listings import read_listings
from components.prod import same_city
from components.validation import run_checks, subjects

DRIFT_REPORT = "reports/drift_report.html"

OK, DRIFT, INVALID = "ok", "drift", "invalid"


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
                                                             clean_meta.get("ignored_columns", []))
        trainable = not failed(own + against)
        if not failed(own):
            dropped, dropped_figures = clean_drops_check(prod, clean_meta, limits)
            against.append(dropped)
            figures |= dropped_figures
            mlflow.log_metrics(dropped_figures)
        checks, drifted = own + against, drift.drifted(against)
        verdict = INVALID if failed(own) else DRIFT if drifted else OK
        report.keep_report(report.data_report(df, checks, notes, reference, monitor_verdict=verdict), report_path,
                           DRIFT_REPORT)
        link = tracking.artifact_link(run, DRIFT_REPORT)
        mlflow.set_tags({"verdict": verdict, "drifted": ", ".join(drifted), "prod_version": prod.version})
        priced = int(df["price"].notna().sum())
        summary = {"verdict": verdict, "drifted": drifted, "model_name": model_name, "prod_version": int(prod.version),
                   "rows": len(df), "priced_rows": priced, "checks": len(checks), "report_link": link,
                   "trainable": trainable, "not_trainable_because": failed(against),
                   "training_params": {"model_name": model_name, "city": profile.as_param(), **vars(limits)},
                   **{k: v for k, v in figures.items() if k.startswith("prod_")}}
        for c in against:
            if c.check == drift.ERROR_CHECK and c.observed == UNKNOWN:  # no priced rows new to prod, say
                summary["prod_error_unknown"] = (c.message.removeprefix("price: ")
                                                 .removeprefix("prod's error on this data is unknown: "))
        mlflow.log_metrics({"rows": len(df), "priced_rows": priced, "drifted_columns": len(drifted),
                            "drift": int(verdict == DRIFT)})
        if verdict == INVALID:
            failures = failed(own)
            raise InvalidData("monitor", subjects(failures), f"the new listings are invalid: {len(failures)} check(s) "
                              f"failed (drift report: {link}):\n  - " + "\n  - ".join(failures))
        said = "; ".join(f"{name} {figure}" for name, figure in drifted.items())
        print(f"monitor: {verdict}" + (f": {said}" if said else f" against prod version {prod.version}"))
        return summary


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
