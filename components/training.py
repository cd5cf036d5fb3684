"""Training: the split, one sweep trial fitted and scored, the sweep's winner selected, the candidate evaluated on
the test rows against prod."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd

from components import model, saved_model, tracking
from components.errors import StepError
from components.listings import read_listings, split_listings, strata, write_listings
from components.params import replaced
from components.prod import TRAINING_IDS_FILE, compare_with_prod


def split(clean_path: str, trainval_path: str, test_path: str, test_size: float, seed: int) -> tuple[dict, dict]:
    with tracking.step_run("split", params={"test_size": test_size, "seed": seed}):
        df = read_listings(clean_path)
        trainval, test = split_listings(df, test_size, seed)
        how = "stratified by area group" if strata(df) is not None else "not stratified: no area groups"
        write_listings(trainval, trainval_path)
        write_listings(test, test_path)
        mlflow.log_metrics({"trainval_rows": len(trainval), "test_rows": len(test)})
        mlflow.set_tag("stratified", how)
        print(f"split: {len(trainval)} rows to train and validate on, {len(test)} to test on ({how})")
        return {"rows": len(trainval)}, {"rows": len(test)}


def train(trainval_path: str, model_path: str, base: dict, val_size: float, trial: dict | None = None) -> dict:
    """One trial: fit the model's parameters `base` (ModelParams' fields; numbers may be text) changed by `trial` on
    train, score on validation (the same rows for every trial), save the model to `model_path` and keep it in the
    trial's MLflow run."""
    trial = trial or {}
    try:
        params = replaced(model.ModelParams(), base)
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
        train_df, val_df = split_listings(read_listings(trainval_path), val_size, params.seed,
                                               step="train", field="val_size")
        started = time.perf_counter()
        try:
            fitted = model.fit(train_df, params)
        except ValueError as exc:
            if type(exc).__name__ != "InvalidParameterError":  # scikit-learn's, for a value out of its range
                raise
            raise StepError("train", f"sweep trial {json.dumps(trial)}" if trial else "parameters", str(exc)) from exc
        try:  # the price range, on rows the model was not fitted on
            model.calibrate(fitted, val_df)
        except ValueError as exc:
            raise StepError("train", "val_size", f"{exc}: a larger val_size gives more") from exc
        metrics = {f"val_{k}": v for k, v in model.score(fitted, val_df).items()}
        mlflow.log_metrics({**metrics, "fit_seconds": time.perf_counter() - started,
                            "range_margin": fitted[-1].margin_})
        label = f"{params.learner} {json.dumps(trial)}" if trial else params.learner
        print(f"train: {label}: validation MAE {metrics['val_mae']:.3f}")
        # Saved once, as the step's output; the same files go to MLflow, where register names them.
        with saved_model.feature_code(fitted) as code:
            mlflow.sklearn.save_model(fitted, model_path, code_paths=[code], **saved_model.model_kwargs(
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
        return {**metrics, "trial": json.dumps(trial), "learner": params.learner, "coverage": params.coverage,
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
        test = read_listings(test_path)
        candidate, _ = saved_model.load_model(model_path, "evaluate")
        ranges = model.price_ranges(candidate, test)
        predicted = ranges["price"]
        scores = {f"candidate_{k}": v for k, v in model.errors(test[model.TARGET], predicted).items()}
        scores |= {f"candidate_{k}": v for k, v in model.range_scores(test[model.TARGET], ranges).items()}
        importance = model.feature_importances(candidate, test)
        mlflow.log_figure(model.importance_figure(importance), "feature_importance.png")
        comparison = compare_with_prod(model_name, tracking.prod_version(model_name), predicted, test, ranges)
        mlflow.log_metrics(evaluation_metrics(scores, comparison))
        mlflow.log_dict(comparison, "comparison.json")
        c = comparison
        print(f"evaluate: candidate test MAE {scores['candidate_mae']:.3f}, price range holding "
              f"{scores['candidate_coverage']:.1%} of test prices (nominal {ranges.attrs['coverage']:.0%}, median "
              f"width ${scores['candidate_interval_width']:.0f}); " + (
            f"against prod version {c['prod_version']} on {c['rows']} rows new to it: MAE {c['candidate_mae']:.3f} vs "
            f"{c['prod_mae']:.3f}, gain {c['gain']:.3f} ({c['gain_low']:.3f} to {c['gain_high']:.3f})"
            if c["comparable"] else c["why"]))
        return scores, comparison, {k: round(float(v), 4) for k, v in importance.items()}


def evaluation_metrics(scores: dict, comparison: dict) -> dict[str, float]:
    """The figures the KFP run view and run comparison show: the candidate on every test row, then candidate and
    prod side by side on the rows prod was not trained on (when they could be compared)."""
    figures = {"test_mae": scores["candidate_mae"], "test_r2": scores["candidate_r2"],
               "test_coverage": scores["candidate_coverage"], "test_interval_width": scores["candidate_interval_width"]}
    if comparison["comparable"]:
        figures |= {"prod_version": comparison["prod_version"], "compared_rows": comparison["rows"],
                    "compared_candidate_mae": comparison["candidate_mae"], "compared_prod_mae": comparison["prod_mae"],
                    "compared_candidate_r2": comparison["candidate_r2"], "compared_prod_r2": comparison["prod_r2"],
                    "compared_gain": comparison["gain"], "compared_gain_low": comparison["gain_low"],
                    "compared_gain_high": comparison["gain_high"]}
    return figures
