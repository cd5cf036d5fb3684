"""What each pipeline step does, as a typed function of file paths and parameters.

The KFP components in steps.py only unpack their artifacts and call one of these; tests call them directly.
Each returns the metadata its output artifacts carry.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from components import data, gate, model, report, rollout, tracking
from components.errors import StepError

# On a model version: where the ids of the rows it was trained on are, and what identifies its data, parameters
# and code.
TRAINING_IDS_TAG = "training_ids"
TRAINING_IDS_FILE = "training_ids.csv.gz"
FINGERPRINT_TAG = "fingerprint"
# Fewer test rows new to prod than this and the comparison says nothing: no automatic promotion.
MIN_COMPARE_ROWS = 200
# prod's error on new data is estimated on at most this many of its rows (a random sample): MAE's standard error on
# 50,000 rows is under 0.5 % of it, and scoring 500,000 rows cost check 15 s.
ERROR_CHECK_ROWS = 50_000
# Where the check and register runs keep their HTML reports in MLflow (KFP's output files have no extension).
DATA_REPORT, MODEL_CARD = "reports/data_report.html", "reports/model_card.html"
DRIFT_REPORT = "reports/drift_report.html"


def download(source: str, out_path: str, expected_sha256: str = "") -> dict:
    """Fetch and parse the data; keep its bytes in MLflow once per sha256 (MinIO in the cluster), so that every
    model's lineage points at the exact data it came from."""
    with tracking.step_run("download", params={"source": data.shown_source(source)}) as run:
        raw = data.fetch(source)
        df = data.parse_csv(raw)
        meta = data.describe_download(source, raw, df)
        if expected_sha256 and meta["sha256"] != expected_sha256:
            raise StepError("download", "source", f"the data at {meta['source']!r} changed since this run started (sha256 "
                                                  f"{expected_sha256[:12]} then, {meta['sha256'][:12]} now): run again")
        Path(out_path).write_bytes(raw)
        mlflow.log_metrics({"rows": meta["rows"], "bytes": meta["bytes"]})
        mlflow.set_tag("sha256", meta["sha256"])
        meta["data_uri"] = tracking.raw_data_uri(meta["sha256"]) or keep_raw_data(raw, meta["sha256"], run.info.run_id)
        print(f"download: {meta['rows']} rows, sha256 {meta['sha256'][:12]}")
        return meta


def keep_raw_data(raw: bytes, sha256: str, run_id: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, f"{sha256}.csv.gz")
        path.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))  # level 9: 1.7x the time, 1 % smaller
        mlflow.log_artifact(str(path), "raw")
    mlflow.set_tag(tracking.RAW_DATA_TAG, sha256)
    return f"runs:/{run_id}/raw/{path.name}"


def clean(raw_path: str, out_path: str, city: str | dict, keep_unpriced: bool = False) -> dict:
    """Clean the listings as the city's profile (`city`, a run's parameter) says. Its metadata carries the profile
    as used, and the unknown columns clean ignored."""
    profile = data.City.from_param(city, "clean")
    params = {**{"city" if k == "name" else k: json.dumps(v) if isinstance(v, list) else v
                 for k, v in profile.as_dict().items()}, "keep_unpriced": keep_unpriced}
    with tracking.step_run("clean", params=params) as run:
        df, ignored = data.known_columns(data.parse_csv(Path(raw_path).read_bytes(), "clean"), "clean")
        listing_format = data.listing_format(df.columns)
        df, dropped = data.clean_listings(df, profile, keep_unpriced)
        data.write_listings(df, out_path)
        counts = data.clean_counts(df, dropped)
        mlflow.log_metrics(counts)
        mlflow.set_tags({"city": profile.name, "format": listing_format, "ignored_columns": ", ".join(ignored)})
        # The clean data is the reference for later statistical checks, so it is kept in MLflow too.
        mlflow.log_artifact(out_path, "data")
        reference = f"runs:/{run.info.run_id}/data/{Path(out_path).name}"
        ignoring = f", ignoring {len(ignored)} unknown column(s) ({', '.join(ignored)})" if ignored else ""
        print(f"clean: {profile.name} listings in {listing_format}{ignoring}: {len(df)} rows kept; dropped "
              f"{', '.join(f'{n} ({rule})' for rule, n in dropped.items())}")
        return {**counts, "mlflow_run_id": run.info.run_id, "reference_uri": reference, "city": profile.as_dict(),
                "format": listing_format, "ignored_columns": ignored}


def check(
    clean_path: str, report_path: str, model_name: str, city: str | dict, limits: data.DriftLimits,
    clean_meta: dict | None = None,
) -> list[data.Check]:
    """Every check: the data's own (schema, ranges, as its city's profile says) and, against prod, its drift and
    prod's error on it. Writes the data report (HTML) to `report_path` and MLflow, then fails on any failure,
    listing each; warnings are reported and the run goes on."""
    profile = data.City.from_param(city, "check")
    params = {"city": profile.name, **vars(limits)}
    with tracking.step_run("check", params=params) as run:
        df = data.read_listings(clean_path)
        prod = same_city(tracking.prod_version(model_name), model_name, profile, "check")
        own, against, notes, reference, _ = run_checks(df, model_name, prod, profile, limits,
                                                       (clean_meta or {}).get("ignored_columns", []))
        checks = own + against
        keep_report(report.data_report(df, checks, notes, reference), report_path, DATA_REPORT)
        failures, warnings = data.failed(checks), data.warned(checks)
        mlflow.log_metrics({"checks": len(checks), "failed": len(failures), "warnings": len(warnings)})
        for warning in warnings:
            print(f"check: warning: {warning}")
        if failures:
            raise StepError("check", subjects(failures), f"{len(failures)} check(s) failed (data report: "
                            f"{tracking.artifact_link(run, DATA_REPORT)}):\n  - " + "\n  - ".join(failures))
        print(f"check: {len(checks)} checks passed" + (f", {len(warnings)} with a warning" if warnings else ""))
        return checks


def same_city(prod, model_name: str, city: data.City, step: str):
    """prod, unless it is a model of another city: then its data, error and place say nothing of these listings,
    and a new version must not replace it."""
    # Versions registered before cities had profiles are all NYC's.
    theirs = (prod.tags.get("city") or data.DEFAULT_CITY) if prod is not None else None
    if theirs and theirs != city.name:
        raise StepError(step, "model_name", f"prod version {prod.version} of {model_name!r} is a model of {theirs}'s "
                        f"listings, these are {city.name}'s: give each city its own model (model_name="
                        f"{model_name}-{city.name})")
    return prod


def run_checks(df: pd.DataFrame, model_name: str, prod, city: data.City, limits: data.DriftLimits,
               ignored: list[str] = ()):
    """The data's own checks and, when they pass and there is a prod, those against prod (their figures logged):
    (own, against prod, notes, prod's data, figures)."""
    own = data.deterministic_checks(df, city, ignored)
    if data.failed(own):
        # The comparisons with prod assume the schema the deterministic checks just found broken.
        return own, [], ["Checks against prod skipped: the deterministic checks failed."], None, {}
    if prod is None:
        return own, [], [f"Checks against prod skipped: model {model_name!r} has no '{tracking.PROD_ALIAS}' "
                         "version yet."], None, {}
    against, figures, notes, reference = checks_against_prod(model_name, prod, df, limits)
    mlflow.log_metrics(figures)
    return own, against, notes, reference, figures


def keep_report(html: str, path: str, artifact: str) -> None:
    """The report as the step's output file and in its MLflow run (written before any failure, to explain it)."""
    Path(path).write_text(html)
    mlflow.log_text(html, artifact)


def subjects(failures: list[str]) -> str:
    """The fields failed checks name ("price: ..." -> price), once each."""
    return ", ".join(dict.fromkeys(f.split(":")[0] for f in failures))


OK, DRIFT, INVALID = "ok", "drift", "invalid"


def monitor(
    clean_path: str, report_path: str, model_name: str, city: str | dict, limits: data.DriftLimits,
    clean_meta: dict | None = None,
) -> dict:
    """New listings against prod's data with the check step's checks, and what clean dropped (`clean_meta`, its
    metadata) against what it dropped of prod's data: a verdict (ok, drift naming what moved and how much, or
    invalid), the drift report, and prod's error on the new rows when they have prices. Fails on invalid data,
    after keeping the report; drift is a finding, not a failure. The summary says whether training would take
    this data (`trainable`: none of the checks it applies failed) and with which parameters."""
    profile = data.City.from_param(city, "monitor")
    params = {"model_name": model_name, "city": profile.name, **vars(limits)}
    with tracking.step_run("monitor", params=params, last=True) as run:
        prod = same_city(tracking.prod_version(model_name), model_name, profile, "monitor")
        if prod is None or not prod.tags.get("reference_data"):
            why = ("has no 'prod' version" if prod is None else
                   f"prod version {prod.version} names no reference data (tag reference_data)")
            raise StepError("monitor", "model_name", f"model {model_name!r} {why}: there is nothing to compare the "
                                                     "new listings with; register a model with the training pipeline")
        df = data.read_listings(clean_path)
        clean_meta = clean_meta or {}
        own, against, notes, reference, figures = run_checks(df, model_name, prod, profile, limits,
                                                             clean_meta.get("ignored_columns", []))
        trainable = not data.failed(own + against)
        if not data.failed(own):
            dropped, dropped_figures = clean_drops_check(prod, clean_meta, limits)
            against.append(dropped)
            figures |= dropped_figures
            mlflow.log_metrics(dropped_figures)
        checks, drifted = own + against, data.drifted(against)
        verdict = INVALID if data.failed(own) else DRIFT if drifted else OK
        keep_report(report.data_report(df, checks, notes, reference, monitor_verdict=verdict), report_path,
                    DRIFT_REPORT)
        link = tracking.artifact_link(run, DRIFT_REPORT)
        mlflow.set_tags({"verdict": verdict, "drifted": ", ".join(drifted), "prod_version": prod.version})
        priced = int(df["price"].notna().sum())
        summary = {"verdict": verdict, "drifted": drifted, "model_name": model_name, "prod_version": int(prod.version),
                   "rows": len(df), "priced_rows": priced, "checks": len(checks), "report_link": link,
                   "trainable": trainable, "not_trainable_because": data.failed(against),
                   "training_params": {"model_name": model_name, "city": profile.as_param(), **vars(limits)},
                   **{k: v for k, v in figures.items() if k.startswith("prod_")}}
        for c in against:
            if c.check == data.ERROR_CHECK and c.observed == data.UNKNOWN:  # no priced rows new to prod, say
                summary["prod_error_unknown"] = (c.message.removeprefix("price: ")
                                                 .removeprefix("prod's error on this data is unknown: "))
        mlflow.log_metrics({"rows": len(df), "priced_rows": priced, "drifted_columns": len(drifted),
                            "drift": int(verdict == DRIFT)})
        if verdict == INVALID:
            failures = data.failed(own)
            raise StepError("monitor", subjects(failures), f"the new listings are invalid: {len(failures)} check(s) "
                            f"failed (drift report: {link}):\n  - " + "\n  - ".join(failures))
        said = "; ".join(f"{name} {figure}" for name, figure in drifted.items())
        print(f"monitor: {verdict}" + (f": {said}" if said else f" against prod version {prod.version}"))
        return summary


def clean_drops_check(prod, counts: dict, limits: data.DriftLimits) -> tuple[data.Check, dict]:
    """What clean dropped of the new listings against what it dropped of prod's data (its clean run's counts)."""
    name = "rows clean drops drift"
    run_id = prod.tags["reference_data"].removeprefix("runs:/").split("/")[0]
    try:
        reference = mlflow.tracking.MlflowClient().get_run(run_id).data.metrics
    except MlflowException as exc:
        return data.Check(name, data.SKIP, data.UNKNOWN, "", f"prod's clean run {run_id} cannot be read: {exc}"), {}
    if "rows" not in counts or "rows" not in reference:
        return data.Check(name, data.SKIP, data.UNKNOWN, "", "clean's counts are not known"), {}
    return data.cleaning_check(counts, reference, limits)


def checks_against_prod(model_name: str, prod, df, limits: data.DriftLimits):
    """Drift from prod's clean data and prod's error on the new rows: (checks, figures, notes, prod's data)."""
    checks, figures, notes, reference = [], {}, [], None
    reference_uri = prod.tags.get("reference_data")
    drift = f"drift from prod version {prod.version}'s data"
    if reference_uri:
        with tempfile.TemporaryDirectory() as tmp:
            reference = data.read_listings(mlflow.artifacts.download_artifacts(reference_uri, dst_path=tmp))
        checks, figures = data.drift_checks(df, reference, limits)
        notes.append(f"Drift is measured against the data of prod version {prod.version} ({len(reference)} rows).")
    else:
        checks.append(data.Check(drift, data.WARN, data.UNKNOWN, "", f"drift: prod version {prod.version} names no "
                                 "reference data (tag reference_data)"))
    rows, why = new_rows(prod, df)
    error = data.ERROR_CHECK
    if rows is None:
        checks.append(data.Check(error, data.WARN, data.UNKNOWN, "", f"price: prod's error on this data is unknown: {why}"))
        return checks, figures, notes, reference
    new = len(rows)
    rows = rows.sample(min(new, ERROR_CHECK_ROWS), random_state=0)
    try:
        predicted = predict_with(model_name, prod, rows, "check")
    except Exception as exc:  # a prod that cannot score this data: report it, the candidate may still be fine
        checks.append(data.Check(error, data.WARN, data.UNKNOWN, "", f"price: prod version {prod.version} cannot score "
                                 f"this data ({type(exc).__name__}: {str(exc)[:200]})"))
        return checks, figures, notes, reference
    mae_now = float((rows[model.TARGET] - predicted).abs().mean())
    found, error_figures = data.error_check(mae_now, float(prod.tags["test_mae"]), len(rows), prod.version, limits)
    sampled = f" (a random {len(rows)} of them)" if len(rows) < new else ""
    notes.append(f"prod version {prod.version}'s error is measured on the {new} rows new to it{sampled}: MAE "
                 f"{mae_now:.2f}, {error_figures['prod_error_ratio']:.2f} x its test MAE at registration.")
    return checks + [found], figures | error_figures, notes, reference


def new_rows(prod, df) -> tuple[pd.DataFrame | None, str]:
    """The rows of `df` that prod was not trained on, or None and why they cannot be known (or are too few)."""
    ids_uri = prod.tags.get(TRAINING_IDS_TAG)
    if not ids_uri:
        return None, (f"prod version {prod.version} has no record of the rows it was trained on (tag "
                      f"{TRAINING_IDS_TAG}), so no rows are known to be new to it")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            seen = pd.read_csv(mlflow.artifacts.download_artifacts(ids_uri, dst_path=tmp))["id"]
    except (MlflowException, OSError, KeyError, ValueError) as exc:
        return None, f"the training rows of prod version {prod.version} ({ids_uri}) cannot be read: {exc}"
    rows = df[~df["id"].isin(seen) & df["price"].notna()]  # listings with no price yet say nothing of the error
    if len(rows) < MIN_COMPARE_ROWS:
        return None, (f"only {len(rows)} of {len(df)} rows are priced and new to prod version {prod.version} (at "
                      f"least {MIN_COMPARE_ROWS} are needed)")
    return rows, ""


def predict_with(model_name: str, prod, rows: pd.DataFrame, step: str) -> pd.Series:
    fitted, _ = tracking.load_model(f"models:/{model_name}/{prod.version}", step)
    return model.predictions(fitted, rows)


def split(clean_path: str, trainval_path: str, test_path: str, test_size: float, seed: int) -> tuple[dict, dict]:
    with tracking.step_run("split", params={"test_size": test_size, "seed": seed}):
        df = data.read_listings(clean_path)
        trainval, test = data.split_listings(df, test_size, seed)
        how = "stratified by area group" if data.strata(df) is not None else "not stratified: no area groups"
        data.write_listings(trainval, trainval_path)
        data.write_listings(test, test_path)
        mlflow.log_metrics({"trainval_rows": len(trainval), "test_rows": len(test)})
        mlflow.set_tag("stratified", how)
        print(f"split: {len(trainval)} rows to train and validate on, {len(test)} to test on ({how})")
        return {"rows": len(trainval)}, {"rows": len(test)}


def train(trainval_path: str, model_path: str, base: dict, val_size: float, trial: dict | None = None) -> dict:
    """One trial: fit the parameters `base` changed by `trial` on train, score on validation (the same rows for
    every trial), save the model to `model_path` and keep it in the trial's MLflow run."""
    trial = trial or {}
    try:
        params = model.ModelParams(**base)
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        raise StepError("train", field, problem) from exc
    try:
        params = params.with_overrides(trial)
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        raise StepError("train", f"sweep {json.dumps(trial)}: {field}", problem) from exc
    trial = {key: getattr(params, key) for key in sorted(trial)}  # typed: KFP hands whole numbers over as floats
    with tracking.step_run("train", params={**params.used(), "val_size": val_size},
                           tags={"trial": json.dumps(trial)}, name=f"train {json.dumps(trial)}" if trial else "train"
                           ) as run:
        train_df, val_df = data.split_listings(data.read_listings(trainval_path), val_size, params.seed,
                                               step="train", field="val_size")
        started = time.perf_counter()
        try:
            fitted = model.fit(train_df, params)
        except ValueError as exc:
            if type(exc).__name__ != "InvalidParameterError":  # scikit-learn's, for a value out of its range
                raise
            raise StepError("train", f"sweep trial {json.dumps(trial)}" if trial else "parameters", str(exc)) from exc
        metrics = {f"val_{k}": v for k, v in model.score(fitted, val_df).items()}
        mlflow.log_metrics({**metrics, "fit_seconds": time.perf_counter() - started})
        label = f"{params.learner} {json.dumps(trial)}" if trial else params.learner
        print(f"train: {label}: validation MAE {metrics['val_mae']:.3f}")
        # Saved once, as the step's output; the same files go to MLflow, where register names them.
        with tracking.feature_code(fitted) as code:
            mlflow.sklearn.save_model(fitted, model_path, code_paths=[code], **tracking.model_kwargs(
                fitted, model.input_example(fitted, val_df),
                model.input_profile(pd.concat([train_df, val_df]), model.features_of(fitted))))
        mlflow.set_tag("features", ", ".join(model.features_of(fitted)))
        mlflow.log_artifacts(model_path, "model")
        # Every row that shaped the model (fit and validation): a later candidate is compared with this one only
        # on rows outside them.
        with tempfile.TemporaryDirectory() as tmp:
            ids = Path(tmp, TRAINING_IDS_FILE)
            pd.concat([train_df["id"], val_df["id"]]).to_frame().to_csv(ids, index=False)
            mlflow.log_artifact(str(ids), "data")
        return {**metrics, "trial": json.dumps(trial), "learner": params.learner,
                "train_rows": len(train_df), "val_rows": len(val_df),
                "mlflow_model_uri": f"runs:/{run.info.run_id}/model", "mlflow_run_id": run.info.run_id,
                "training_ids_uri": f"runs:/{run.info.run_id}/data/{TRAINING_IDS_FILE}",
                "trainval_sha256": hashlib.sha256(Path(trainval_path).read_bytes()).hexdigest()}


def select(trials: list[tuple[str, dict]], model_path: str) -> dict:
    """The sweep's winner: the trial with the lowest validation MAE (ties go to the earlier trial), copied to
    `model_path`. Returns its metadata with the whole sweep (each trial's changes, scores and run) under `sweep`."""
    with tracking.step_run("select", params={"trials": len(trials)}) as run:
        board = [{"trial": json.loads(meta["trial"]), "val_mae": meta["val_mae"], "val_r2": meta["val_r2"],
                  "mlflow_run_id": meta["mlflow_run_id"]} for _, meta in trials]
        best = min(range(len(trials)), key=lambda i: (trials[i][1]["val_mae"], i))
        path, meta = trials[best]
        shutil.copytree(path, model_path)
        mlflow.log_dict(board, "sweep.json")
        mlflow.log_metrics({"best_val_mae": meta["val_mae"], "best_trial": best})
        choice = (f"trial {best + 1} of {len(trials)} {json.dumps(board[best]['trial'], sort_keys=True)}: "
                  f"lowest validation MAE {meta['val_mae']:.3f}")
        if len(trials) > 1:
            others = ", ".join(f"{t['val_mae']:.3f}" for i, t in enumerate(board) if i != best)
            choice += f" (others: {others})"
        mlflow.set_tag("choice", choice)
        print(f"select: {choice}")
        return {**meta, "sweep": json.dumps(board, sort_keys=True), "sweep_choice": choice,
                "select_run_id": run.info.run_id}


def evaluate(model_path: str, test_path: str, model_name: str) -> tuple[dict, dict, dict]:
    """Score the candidate on the test split, and compare it with the current prod on the test rows that prod was
    not trained on. Returns (the candidate's scores, the comparison, each input column's importance)."""
    with tracking.step_run("evaluate", params={"model_name": model_name}):
        test = data.read_listings(test_path)
        candidate, _ = tracking.load_model(model_path, "evaluate")
        predicted = model.predictions(candidate, test)
        scores = {f"candidate_{k}": v for k, v in model.errors(test[model.TARGET], predicted).items()}
        importance = model.feature_importances(candidate, test)
        mlflow.log_figure(model.importance_figure(importance), "feature_importance.png")
        comparison = compare_with_prod(model_name, tracking.prod_version(model_name), predicted, test)
        mlflow.log_metrics(evaluation_metrics(scores, comparison))
        mlflow.log_dict(comparison, "comparison.json")
        c = comparison
        print(f"evaluate: candidate test MAE {scores['candidate_mae']:.3f}; " + (
            f"against prod version {c['prod_version']} on {c['rows']} rows new to it: MAE {c['candidate_mae']:.3f} vs "
            f"{c['prod_mae']:.3f}, gain {c['gain']:.3f} ({c['gain_low']:.3f} to {c['gain_high']:.3f})"
            if c["comparable"] else c["why"]))
        return scores, comparison, {k: round(float(v), 4) for k, v in importance.items()}


def evaluation_metrics(scores: dict, comparison: dict) -> dict[str, float]:
    """The figures the KFP run view and run comparison show: the candidate on every test row, then candidate and
    prod side by side on the rows prod was not trained on (when they could be compared)."""
    figures = {"test_mae": scores["candidate_mae"], "test_r2": scores["candidate_r2"]}
    if comparison["comparable"]:
        figures |= {"prod_version": comparison["prod_version"], "compared_rows": comparison["rows"],
                    "compared_candidate_mae": comparison["candidate_mae"], "compared_prod_mae": comparison["prod_mae"],
                    "compared_candidate_r2": comparison["candidate_r2"], "compared_prod_r2": comparison["prod_r2"],
                    "compared_gain": comparison["gain"], "compared_gain_low": comparison["gain_low"],
                    "compared_gain_high": comparison["gain_high"]}
    return figures


def write_metrics(metrics, figures: dict[str, float]) -> None:
    """Log figures on a KFP Metrics output. kfp.local's cache treats an output without a file as missing, so the
    figures go to its file too."""
    for name, value in figures.items():
        metrics.log_metric(name, value)
    Path(metrics.path).write_text(json.dumps(metrics.metadata))


COMPARISON_FIGURES = list(gate.Comparison.__dataclass_fields__)


def compare_with_prod(model_name: str, prod, predicted: pd.Series, test: pd.DataFrame) -> dict:
    """The candidate (its predictions on `test`) and `prod` (a ModelVersion, or None) on the test rows prod was not
    trained on. When they cannot be compared fairly, says why (comparable False) and compares nothing."""
    if prod is None:
        return {"prod_version": None, "comparable": False, "why": "no prod model yet"}
    version = int(prod.version)
    found = {"prod_version": version, "comparable": False}
    fair, why = new_rows(prod, test)
    if fair is None:
        return found | {"why": why}
    try:
        prod_predictions = predict_with(model_name, prod, fair, "evaluate")
    except Exception as exc:  # any failure to load or score prod means: no comparison, no automatic promotion
        return found | {"why": f"prod version {version} cannot score this data ({type(exc).__name__}: "
                               f"{str(exc)[:300]})"}
    comparison = gate.compare(fair[model.TARGET], predicted[fair.index], prod_predictions)
    r2 = {f"{who}_r2": model.errors(fair[model.TARGET], values)["r2"]
          for who, values in (("candidate", predicted[fair.index]), ("prod", prod_predictions))}
    return found | {"comparable": True, "why": "", **comparison.as_dict(), **r2}


def register(
    model_path: str, model_meta: dict, scores: dict, comparison: dict, test_path: str, model_name: str,
    margin: float, raw_meta: dict, clean_meta: dict, git_commit: str, images: str, importance: dict, card_path: str,
) -> dict:
    """Register the candidate as a new version (unless an identical one exists), then, holding the promotion lock,
    decide against the actual prod and move `prod` only on evidence. Writes the model card (HTML) to `card_path`,
    MLflow and the version's description. Returns version, promoted, test_mae, reason."""
    with tracking.step_run("register", params={"model_name": model_name, "margin": margin}, last=True) as run:
        pipeline_run = os.environ.get("KFP_RUN_ID", "")
        tags = lineage(raw_meta, clean_meta, model_meta, git_commit, images)
        test_mae = scores["candidate_mae"]
        test = data.read_listings(test_path)
        candidate, _ = tracking.load_model(model_path, "register")
        predicted = model.predictions(candidate, test)

        def card(version, promoted: bool, reason: str, final: dict) -> str:
            facts = model_card_facts(model_name, version, promoted, reason, final, margin, scores, model_meta,
                                     raw_meta, clean_meta, tags, len(test), pipeline_run)
            html = report.model_card(facts, test.assign(predicted=predicted), pd.Series(importance).sort_values())
            Path(card_path).write_text(html)
            mlflow.log_text(html, MODEL_CARD)
            return report.model_card_markdown(facts, tracking.artifact_link(run, MODEL_CARD))

        # A retry of this step finds the version its first attempt registered; an identical re-run finds its twin.
        earlier = tracking.version_tagged(model_name, tracking.RUN_ID_TAG, pipeline_run) if pipeline_run else None
        twin = tracking.version_tagged(model_name, FINGERPRINT_TAG, tags[FINGERPRINT_TAG])
        if earlier is None and twin is not None:
            reason = (f"identical to version {twin.version} (same training rows, parameters and code; data sha256 "
                      f"{tags['data_sha256'][:12]}): nothing registered, prod unchanged")
            mlflow.log_metrics({"version": int(twin.version), "promoted": 0})
            mlflow.set_tag("promotion", reason)
            card(None, False, reason, comparison)
            print(f"register: identical to version {twin.version}, nothing registered")
            return {"version": int(twin.version), "promoted": False, "test_mae": test_mae, "reason": reason}
        if earlier is None:
            tags |= {tracking.RUN_ID_TAG: pipeline_run, "test_mae": f"{test_mae:.4f}",
                     "test_r2": f"{scores['candidate_r2']:.4f}"}
            version = mlflow.register_model(model_meta["mlflow_model_uri"], model_name, tags=tags).version
        else:
            version = earlier.version

        def compare_again(prod):
            return compare_with_prod(model_name, prod, predicted, test)

        holder = f"pipeline run {pipeline_run}"
        with tracking.promotion_lock(model_name, holder, "register"):
            promote, reason, final = decide_promotion(model_name, version, comparison, margin,
                                                      tracking.pipeline_started(run.info.run_id), compare_again)
            if promote:
                tracking.set_prod(model_name, version, by=holder)
        client = mlflow.tracking.MlflowClient()
        client.set_model_version_tag(model_name, version, "promotion", reason)
        client.set_model_version_tag(model_name, version, "comparison", json.dumps(final, sort_keys=True))
        client.update_model_version(model_name, version, description=card(version, promote, reason, final))
        mlflow.set_tag("promotion", reason)
        if promote:
            print(rollout.roll_serving(version))
        mlflow.log_metrics({"version": int(version), "promoted": int(promote)})
        print(f"register: version {version}, {'now prod' if promote else 'prod unchanged'}")
        return {"version": int(version), "promoted": promote, "test_mae": test_mae, "reason": reason}


def model_card_facts(name: str, version, promoted: bool, reason: str, comparison: dict, margin: float, scores: dict,
                     model_meta: dict, raw_meta: dict, clean_meta: dict, tags: dict, test_rows: int,
                     pipeline_run: str) -> dict:
    """What the model card shows, gathered from the run's artifacts' metadata and the version's tags."""
    # KFP hands whole numbers in metadata back as floats.
    rows = {step: int(n) for step, n in (("downloaded", raw_meta.get("rows")), ("clean", clean_meta.get("rows")),
                                          ("train", model_meta.get("train_rows")),
                                          ("validation", model_meta.get("val_rows")), ("test", test_rows)) if n}
    board = model_meta.get("sweep")
    return {
        "name": name, "version": version, "promoted": promoted, "reason": reason, "comparison": comparison,
        "margin": margin, "pipeline_run": pipeline_run, "learner": model_meta.get("learner", "-"),
        "scores": {"val_mae": model_meta["val_mae"], "val_r2": model_meta["val_r2"],
                   "test_mae": scores["candidate_mae"], "test_r2": scores["candidate_r2"]},
        "rows": rows, "city": tags.get("city") or "-", "source": tags["data_source"], "sha256": tags["data_sha256"],
        "data_uri": tags["data_uri"],
        "parameters": json.loads(tags["parameters"]), "sweep": json.loads(board) if board else [],
        "sweep_choice": tags["sweep_choice"], "git_commit": tags["git_commit"], "images": json.loads(tags["images"] or "{}"),
    }


def decide_promotion(name: str, version: str, comparison: dict, margin: float, run_started: float,
                     compare_again) -> tuple[bool, str, dict]:
    """Whether `version` takes `prod`, decided against the actual prod (call it holding the promotion lock).

    prod as evaluated: the evaluation decides. prod moved by another pipeline run since: compare with that one now
    (compare_again). prod set by hand after this run started: a person's choice stands. Returns (promote, reason,
    the comparison the decision rests on)."""
    current = tracking.prod_version(name)
    if current is not None and current.version == str(version):
        return True, f"already prod (an earlier attempt of this run promoted version {version})", comparison
    if current is not None and current.tags.get(tracking.PROMOTED_BY_TAG) == tracking.HAND \
            and float(current.tags.get(tracking.PROMOTED_AT_TAG, 0)) > run_started:
        return False, (f"prod was set by hand to version {current.version} after this run started: a person's "
                       "choice stands (run again to compare with it)"), comparison
    current_version = int(current.version) if current else None
    moved = ""
    if current_version != comparison.get("prod_version"):
        comparison = compare_again(current)
        moved = f"prod moved to version {current_version} during this run; compared with it instead: "
    if current is None:
        return True, "no prod model yet", comparison
    if not comparison["comparable"]:
        return False, f"{moved}not promoted automatically: {comparison['why']}", comparison
    promote, reason = gate.decide(gate.Comparison(**{k: comparison[k] for k in COMPARISON_FIGURES}), margin)
    return promote, moved + reason, comparison


def sweep_tag(model_meta: dict, limit: int = 4000) -> str:
    """The sweep's trials and scores, or where they are when too many for a tag."""
    board = model_meta.get("sweep", "")
    if len(board) <= limit:
        return board
    return f"{len(json.loads(board))} trials: runs:/{model_meta.get('select_run_id')}/sweep.json"


def lineage(raw_meta: dict, clean_meta: dict, model_meta: dict, git_commit: str, images: str) -> dict[str, str]:
    """Version tags that say where a model came from: data, code, images and every parameter used."""
    client = mlflow.tracking.MlflowClient()
    # Typed again: KFP hands whole numbers in metadata back as floats.
    city = data.City.from_dict(clean_meta["city"], "register") if clean_meta.get("city") else None
    params = {}
    for run_id in (clean_meta.get("mlflow_run_id"), model_meta.get("mlflow_run_id")):
        if run_id:
            try:
                params |= client.get_run(run_id).data.params
            except mlflow.exceptions.MlflowException as exc:
                raise StepError("register", "mlflow_run_id", f"run {run_id} of an earlier step is not on "
                                f"{mlflow.get_tracking_uri()} ({exc.error_code}): was the MLflow server reset? "
                                "Run again with --no-cache") from exc
    tags = {
        "data_source": str(raw_meta.get("source", "")),
        "data_sha256": str(raw_meta.get("sha256", "")),
        "data_uri": str(raw_meta.get("data_uri", "")),
        "reference_data": str(clean_meta.get("reference_uri", "")),
        # The city's profile as the run used it: what its data was checked and cleaned against.
        "city": city.name if city else "",
        "city_profile": city.as_param() if city else "{}",
        TRAINING_IDS_TAG: str(model_meta.get("training_ids_uri", "")),
        "git_commit": git_commit,
        "images": images,
        "parameters": json.dumps(params, sort_keys=True),
        "sweep_choice": str(model_meta.get("sweep_choice", "")),
        "sweep": sweep_tag(model_meta),
    }
    # The same training rows, parameters and code (the images' tags hash the code) make the same model.
    same = json.dumps([model_meta.get("trainval_sha256", tags["data_sha256"]), tags["parameters"], images])
    return tags | {FINGERPRINT_TAG: hashlib.sha256(same.encode()).hexdigest()[:32]}


# ---------------------------------------------------------------- batch scoring

# Rows read, checked and priced at a time: memory stays bounded whatever the size of the file.
SCORE_CHUNK = 50_000
PREDICTION_COLUMNS = [model.ID, model.HOST, "predicted_price", "model_version", "flags"]


def score(raw_path: str, model_uri: str, predictions_path: str, csv_path: str, rejected_path: str,
          price_unfamiliar: bool, max_rejected: float) -> dict:
    """Price every listing of a CSV with the version `model_uri` names (resolved once): the predictions as Parquet
    and CSV, and each row that cannot be priced with why (model.check_inputs, the model server's rule). Fails when
    more than `max_rejected` of the rows are rejected. Returns the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 0 <= max_rejected <= 1:
        raise StepError("score", "max_rejected", f"must be a share between 0 and 1, got {max_rejected}")
    params = {"model": model_uri, "price_unfamiliar": price_unfamiliar, "max_rejected": max_rejected}
    with tracking.step_run("score", params=params, last=True):
        version = tracking.model_version(model_uri, "score")
        fitted, profile = tracking.load_model(f"models:/{version.name}/{version.version}", "score")
        mlflow.set_tags({"model_name": version.name, "model_version": version.version})
        # The city's export may write dates its own way: read them as training did (the model takes ISO).
        date_formats = json.loads(version.tags.get("city_profile") or "{}").get("date_formats", [])
        schema = pa.schema([(model.ID, pa.int64()), (model.HOST, pa.int64()), ("predicted_price", pa.float64()),
                            ("model_version", pa.int64()), ("flags", pa.string())])
        rows, prices, rejected, reasons = 0, [], 0, {}
        with pq.ParquetWriter(predictions_path, schema) as parquet, open(csv_path, "w") as csv, \
                open(rejected_path, "w") as refused_file:
            # Text stays text: a city whose neighbourhoods are zip codes.
            for chunk in pd.read_csv(raw_path, chunksize=SCORE_CHUNK,
                                     dtype={c: "str" for c in data.TEXT_COLUMNS + data.IDS}):
                chunk = chunk.reset_index(drop=True)
                # Ids stay exact (19 digits today: past a float's); one not written as a whole number is refused.
                ids = {c: data.exact_ids(chunk[c]) for c in data.IDS if c in chunk.columns}
                chunk = model.numbers_from_text(chunk)
                for column, exact in ids.items():
                    chunk[column] = exact.astype(object).where(exact.notna(), chunk[column].astype(str))
                if date_formats and model.DATE in chunk.columns:
                    dates = data.read_dates(chunk[model.DATE].astype("str"), date_formats, "score")
                    chunk[model.DATE] = dates.dt.strftime("%Y-%m-%d").where(dates.notna(), chunk[model.DATE])
                typed, problems = model.check_inputs(chunk, profile)
                missing = [p.field for p in problems if p.row < 0]
                if missing:
                    raise StepError("score", missing[0], f"column missing from the data (missing: {missing})")
                refused = model.refused(problems, price_unfamiliar)
                bad = {p.row for p in refused}
                keep = [i for i in range(len(chunk)) if i not in bad]
                flags = {}
                for p in problems:
                    if p.row not in bad:
                        flags[p.row] = "; ".join(filter(None, [flags.get(p.row), f"{p.field}: {p.problem}"]))
                priced = typed.iloc[keep]
                out = pd.DataFrame({model.ID: ids[model.ID].iloc[keep].astype("int64").to_numpy(),
                                    model.HOST: ids[model.HOST].iloc[keep].astype("int64").to_numpy(),
                                    "predicted_price": fitted.predict(priced) if keep else [],
                                    "model_version": int(version.version),
                                    "flags": [flags.get(i) for i in keep]}, columns=PREDICTION_COLUMNS)
                parquet.write_table(pa.Table.from_pandas(out, schema=schema, preserve_index=False))
                out.to_csv(csv, header=rows == 0, index=False)
                pd.DataFrame([{"row": rows + p.row, model.ID: chunk[model.ID].iloc[p.row], "field": p.field,
                               "problem": p.problem} for p in refused], columns=["row", model.ID, "field", "problem"]
                             ).to_csv(refused_file, header=rows == 0, index=False)
                for p in refused:
                    key = f"{p.field}: {'broken' if p.broken else 'unfamiliar'}"
                    reasons[key] = reasons.get(key, 0) + 1
                rows, rejected = rows + len(chunk), rejected + len(bad)
                prices.append(out["predicted_price"].to_numpy())
        all_prices = pd.Series(np.concatenate(prices) if prices else [], dtype=float)
        summary = {"model": model_uri, "model_name": version.name, "model_version": int(version.version),
                   "rows": rows, "scored": rows - rejected, "rejected": rejected,
                   "rejected_share": rejected / rows if rows else 0.0, "reasons": reasons,
                   **({"mean_price": float(all_prices.mean()),
                       **{f"p{q}_price": float(all_prices.quantile(q / 100)) for q in (10, 50, 90)}}
                      if len(all_prices) else {})}
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_dict(summary, "summary.json")
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda item: -item[1]))
        print(f"score: {rows - rejected} of {rows} rows priced with {version.name} version {version.version}"
              + (f"; {rejected} rejected ({why})" if rejected else ""))
        if rows and rejected / rows > max_rejected:
            raise StepError("score", "rows", f"{rejected} of {rows} rows ({rejected / rows:.1%}) cannot be priced, "
                            f"more than max_rejected {max_rejected:.1%} ({why}); each is listed with why in the "
                            f"rejected rows ({rejected_path})")
        return summary
