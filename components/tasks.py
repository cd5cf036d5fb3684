"""What each pipeline step does, as a typed function of file paths and parameters.

The KFP components in steps.py only unpack their artifacts and call one of these; tests call them directly.
Each returns the metadata its output artifacts carry.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import mlflow

from components import data, model, rollout, tracking
from components.errors import StepError


def download(source: str, out_path: str) -> dict:
    with tracking.step_run("download", params={"source": source}):
        raw = data.fetch(source)
        df = data.parse_csv(raw)
        Path(out_path).write_bytes(raw)
        meta = data.describe_download(source, raw, df)
        mlflow.log_metrics({"rows": meta["rows"], "bytes": meta["bytes"]})
        mlflow.set_tag("sha256", meta["sha256"])
        return meta


def clean(raw_path: str, out_path: str, min_price: float, max_price: float, box: data.Box) -> dict:
    params = {"min_price": min_price, "max_price": max_price, **vars(box)}
    with tracking.step_run("clean", params=params) as run:
        df, dropped = data.clean_listings(data.parse_csv(Path(raw_path).read_bytes(), "clean"), min_price, max_price, box)
        data.write_listings(df, out_path)
        counts = {"rows": len(df), **{f"dropped_{rule}": n for rule, n in dropped.items()}}
        mlflow.log_metrics(counts)
        # The clean data is the reference for later statistical checks, so it is kept in MLflow too.
        mlflow.log_artifact(out_path, "data")
        reference = f"runs:/{run.info.run_id}/data/{Path(out_path).name}"
        return {**counts, "mlflow_run_id": run.info.run_id, "reference_uri": reference}


def check(
    clean_path: str, model_name: str, min_price: float, max_price: float, box: data.Box,
    min_rows: int, max_rows: int, kl_threshold: float, ks_alpha: float,
) -> str:
    """Run every check, log a report, and fail listing every failed check. Returns the report (Markdown)."""
    params = {"kl_threshold": kl_threshold, "ks_alpha": ks_alpha, "min_rows": min_rows, "max_rows": max_rows}
    with tracking.step_run("check", params=params):
        df = data.read_listings(clean_path)
        failures = data.deterministic_checks(df, min_price, max_price, box, min_rows, max_rows)
        lines = [f"# Data checks on {len(df)} rows", "", f"Deterministic checks: {len(failures)} failed."]
        prod = tracking.prod_version(model_name)
        reference_uri = prod.tags.get("reference_data") if prod else None
        if failures:
            # The statistical tests assume the schema the deterministic checks just found broken.
            lines.append("Statistical checks skipped: the deterministic checks failed.")
        elif reference_uri:
            with tempfile.TemporaryDirectory() as tmp:
                reference = data.read_listings(mlflow.artifacts.download_artifacts(reference_uri, dst_path=tmp))
            stat_failures, figures = data.statistical_checks(df, reference, kl_threshold, ks_alpha)
            mlflow.log_metrics(figures)
            failures += stat_failures
            lines.append(f"Statistical checks against the data of prod version {prod.version} ({len(reference)} rows): "
                         f"{len(stat_failures)} failed.")
        else:
            lines.append(f"Statistical checks skipped: model {model_name!r} has no '{tracking.PROD_ALIAS}' version yet.")
        lines += [f"- FAILED {f}" for f in failures]
        report = "\n".join(lines) + "\n"
        mlflow.log_text(report, "check_report.md")
        if failures:
            subjects = ", ".join(dict.fromkeys(f.split(":")[0] for f in failures))
            raise StepError("check", subjects, f"{len(failures)} check(s) failed:\n  - " + "\n  - ".join(failures))
        return report


def split(clean_path: str, trainval_path: str, test_path: str, test_size: float, seed: int) -> tuple[dict, dict]:
    with tracking.step_run("split", params={"test_size": test_size, "seed": seed}):
        trainval, test = data.split_listings(data.read_listings(clean_path), test_size, seed)
        data.write_listings(trainval, trainval_path)
        data.write_listings(test, test_path)
        mlflow.log_metrics({"trainval_rows": len(trainval), "test_rows": len(test)})
        return {"rows": len(trainval)}, {"rows": len(test)}


def train(trainval_path: str, model_path: str, params: model.ForestParams, val_size: float) -> dict:
    """Fit on train, score on validation, save the model to `model_path` and log it to MLflow."""
    with tracking.step_run("train", params={**vars(params), "val_size": val_size}) as run:
        train_df, val_df = data.split_listings(data.read_listings(trainval_path), val_size, params.seed,
                                               step="train", field="val_size")
        started = time.perf_counter()
        fitted = model.fit(train_df, params)
        metrics = {f"val_{k}": v for k, v in model.score(fitted, val_df).items()}
        mlflow.log_metrics({**metrics, "fit_seconds": time.perf_counter() - started})
        mlflow.log_figure(model.importance_figure(model.feature_importances(fitted)), "feature_importance.png")

        example = model.input_example(val_df)
        kwargs = tracking.model_kwargs(fitted, example)
        with tracking.feature_code() as code:
            mlflow.sklearn.save_model(fitted, model_path, code_paths=[code], **kwargs)
            info = mlflow.sklearn.log_model(fitted, name="model", code_paths=[code], **kwargs)
        return {**metrics, "mlflow_model_uri": info.model_uri, "mlflow_run_id": run.info.run_id}


def evaluate(model_path: str, test_path: str, model_name: str) -> dict:
    """Score the candidate and the current prod model (if any) on the same test split."""
    with tracking.step_run("evaluate", params={"model_name": model_name}):
        test = data.read_listings(test_path)
        scores = {f"candidate_{k}": v for k, v in model.score(mlflow.sklearn.load_model(model_path), test).items()}
        prod = tracking.prod_version(model_name)
        if prod is not None:
            prod_model = mlflow.sklearn.load_model(f"models:/{model_name}/{prod.version}")
            scores |= {f"prod_{k}": v for k, v in model.score(prod_model, test).items()}
            scores["prod_version"] = int(prod.version)
        mlflow.log_metrics(scores)
        return scores


def register(
    model_meta: dict, evaluation: dict, model_name: str, margin: float,
    raw_meta: dict, clean_meta: dict, git_commit: str, images: str,
) -> dict:
    """Register the candidate as a new version; move `prod` to it only if it is better by `margin`."""
    with tracking.step_run("register", params={"model_name": model_name, "margin": margin}, last=True):
        pipeline_run = os.environ.get("KFP_RUN_ID", "")
        # A retry of this step (cluster) finds the version its first attempt registered, and reuses it.
        earlier = tracking.version_of_pipeline_run(model_name, pipeline_run) if pipeline_run else None
        candidate_mae = evaluation["candidate_mae"]
        promote, reason = tracking.should_promote(candidate_mae, evaluation.get("prod_mae"), margin)
        current = tracking.prod_version(model_name)
        current_version = int(current.version) if current else None
        evaluated = evaluation.get("prod_version")
        moved_by_earlier_attempt = earlier is not None and current_version == int(earlier.version)
        if not moved_by_earlier_attempt and current_version != (int(evaluated) if evaluated is not None else None):
            promote, reason = False, f"prod moved to version {current_version} during this run"
        if earlier is None:
            tags = {**lineage(raw_meta, clean_meta, model_meta, git_commit, images), tracking.RUN_ID_TAG: pipeline_run,
                    "test_mae": f"{candidate_mae:.4f}", "test_r2": f"{evaluation['candidate_r2']:.4f}",
                    "promotion": reason}
            version = mlflow.register_model(model_meta["mlflow_model_uri"], model_name, tags=tags).version
        else:
            version = earlier.version
        if promote:
            tracking.set_prod(model_name, version)
            print(rollout.roll_serving(version))
        mlflow.log_metrics({"version": int(version), "promoted": int(promote)})
        return {"version": int(version), "promoted": promote, "test_mae": candidate_mae, "reason": reason}


def lineage(raw_meta: dict, clean_meta: dict, model_meta: dict, git_commit: str, images: str) -> dict[str, str]:
    """Version tags that say where a model came from: data, code, images and every parameter used."""
    client = mlflow.tracking.MlflowClient()
    params = {}
    for run_id in (clean_meta.get("mlflow_run_id"), model_meta.get("mlflow_run_id")):
        if run_id:
            try:
                params |= client.get_run(run_id).data.params
            except mlflow.exceptions.MlflowException as exc:
                raise StepError("register", "mlflow_run_id", f"run {run_id} of an earlier step is not on "
                                f"{mlflow.get_tracking_uri()} ({exc.error_code}): was the MLflow server reset? "
                                "Run again with --no-cache") from exc
    return {
        "data_source": str(raw_meta.get("source", "")),
        "data_sha256": str(raw_meta.get("sha256", "")),
        "reference_data": str(clean_meta.get("reference_uri", "")),
        "git_commit": git_commit,
        "images": images,
        "parameters": json.dumps(params, sort_keys=True),
    }
