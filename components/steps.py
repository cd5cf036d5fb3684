"""The KFP components, one per step. Each unpacks its artifacts and calls one function of its stage's module
(sources, listings, validation, training, promotion, scoring, monitoring), which tests call directly.

The bodies run inside the step's image (or the local interpreter), where the `components` package is
installed, so they import it at run time; kfp itself is baked into the images (install_kfp_package=False).
A group of parameters (the model's, the drift limits) arrives as one dict input (components/params.py).
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from images.catalog import step_images

IMAGES = step_images()


def _component(step: str):
    return dsl.component(base_image=IMAGES[step], install_kfp_package=False)


@_component("download")
def download(source: str, expected_sha256: str, raw_data: Output[Dataset], log_hours: float = 0.0):
    """Fetch the raw listings CSV (sample://, https://, s3://, file:// or a local path), checking its sha256 when
    the run names one; or a model server's inference log (a folder), its last `log_hours`."""
    from components import sources

    raw_data.metadata.update(sources.download(source, raw_data.path, expected_sha256, log_hours))


@_component("clean")
def clean(raw_data: Input[Dataset], clean_data: Output[Dataset], city: str, keep_unpriced: bool = False):
    """Type the listings' known columns as the city's profile says; keep those with a plausible price (or none,
    with keep_unpriced) inside its box; drop duplicate ids."""
    from components import listings

    clean_data.metadata.update(listings.clean(raw_data.path, clean_data.path, city, keep_unpriced))


@_component("check")
def check(clean_data: Input[Dataset], data_report: Output[HTML], model_name: str, city: str, limits: dict):
    """The data's own checks against the city's profile, then its drift from prod's data and prod's error on it (within
    `limits`, the drift limits); the data report (HTML) shows each, passed or not."""
    from components import params, validation
    from components.drift import DriftLimits

    validation.check(clean_data.path, data_report.path, model_name, city,
                     params.from_values(DriftLimits, limits, "check", "limits"), dict(clean_data.metadata))


@_component("split")
def split(
    clean_data: Input[Dataset], trainval_data: Output[Dataset], test_data: Output[Dataset],
    test_size: float, seed: int,
):
    """Train+validation / test split, stratified by area group (neighbourhood_group) when the city has them."""
    from components import training

    trainval_meta, test_meta = training.split(clean_data.path, trainval_data.path, test_data.path, test_size, seed)
    trainval_data.metadata.update(trainval_meta)
    test_data.metadata.update(test_meta)


@_component("train")
def train(trainval_data: Input[Dataset], model: Output[Model], metrics: Output[Metrics], trial: dict, params: dict,
          val_size: float):
    """One trial of the sweep: the model's parameters (`params`) changed by `trial`, fitted on train and scored on
    validation."""
    from components import report, training

    model.metadata.update(training.train(trainval_data.path, model.path, params, val_size, trial))
    report.write_metrics(metrics, {"val_mae": model.metadata["val_mae"], "val_r2": model.metadata["val_r2"]})


@_component("select")
def select(trials: Input[List[Model]], model: Output[Model], metrics: Output[Metrics]):
    """The trial with the lowest validation MAE goes on; its version will record the whole sweep."""
    from components import report, training

    result = training.select([(trial.path, trial.metadata) for trial in trials], model.path)
    model.metadata.update(result)
    report.write_metrics(metrics, {"val_mae": result["val_mae"], "val_r2": result["val_r2"], "trials": len(trials)})


@_component("evaluate")
def evaluate(
    model: Input[Model], test_data: Input[Dataset], metrics: Output[Metrics], model_name: str,
) -> NamedTuple("Evaluation", comparison=str, importance=str):
    """Score the candidate on the test split and compare it with prod on the test rows prod was not trained on."""
    import json

    from components import report, training

    scores, comparison, importance = training.evaluate(model.path, test_data.path, model_name)
    report.write_metrics(metrics, training.evaluation_metrics(scores, comparison))
    return (json.dumps(comparison), json.dumps(importance))


@_component("register")
def register(
    model: Input[Model], evaluation: Input[Metrics], test_data: Input[Dataset], raw_data: Input[Dataset],
    clean_data: Input[Dataset], model_card: Output[HTML], comparison: str, importance: str, model_name: str,
    margin: float, git_commit: str, images: str, trigger: str = "",
) -> NamedTuple("Registered", version=int, promoted=bool, test_mae=float, reason=str):
    """Register the candidate as a new model version; move `prod` to it only on evidence against the actual prod.
    The model card (HTML) says where it came from, how good it is and why it was or was not promoted."""
    import json

    from components import promotion

    scores = {f"candidate_{k}": evaluation.metadata[f"test_{k}"] for k in ("mae", "r2", "coverage", "interval_width")}
    result = promotion.register(model.path, model.metadata, scores, json.loads(comparison), test_data.path, model_name,
                            margin, raw_data.metadata, clean_data.metadata, git_commit, images, json.loads(importance),
                            model_card.path, trigger)
    return (result["version"], result["promoted"], result["test_mae"], result["reason"])


@_component("score")
def score(
    raw_data: Input[Dataset], predictions: Output[Dataset], predictions_csv: Output[Dataset],
    rejected_rows: Output[Dataset], metrics: Output[Metrics], model: str, price_unfamiliar: bool, max_rejected: float,
) -> NamedTuple("Scored", summary=str):
    """Price each listing with the model version `model` names (resolved once): Parquet and CSV, and every row
    that cannot be priced with why."""
    import json

    from components import report, scoring

    summary = scoring.score(raw_data.path, model, predictions.path, predictions_csv.path, rejected_rows.path,
                          price_unfamiliar, max_rejected)
    for output, kind in ((predictions, "parquet"), (predictions_csv, "csv"), (rejected_rows, "csv")):
        output.metadata.update({"format": kind, "model_version": summary["model_version"]})
    report.write_metrics(metrics, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return (json.dumps({**summary, "predictions": predictions.uri, "predictions_csv": predictions_csv.uri,
                        "rejected_rows": rejected_rows.uri}),)


@_component("monitor")
def monitor(
    clean_data: Input[Dataset], drift_report: Output[HTML], metrics: Output[Metrics], model_name: str, city: str,
    limits: dict,
) -> NamedTuple("Monitored", verdict=str, summary=str):
    """New listings against prod's data, with the check step's checks: ok, drift (what moved, how much) or invalid;
    the drift report (HTML) shows each check."""
    import json

    from components import monitoring, params, report
    from components.drift import DriftLimits

    summary = monitoring.monitor(clean_data.path, drift_report.path, model_name, city,
                                 params.from_values(DriftLimits, limits, "monitor", "limits"), dict(clean_data.metadata))
    report.write_metrics(metrics, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return (summary["verdict"], json.dumps({**summary, "report": drift_report.uri}))


@_component("retrain")
def retrain(raw_data: Input[Dataset], source: str, model_name: str, kfp_host: str, training_version: str,
            drift: str, on_shift: bool = False) -> str:
    """Start the training pipeline (as uploaded to KFP) on the listings monitored, the same bytes by their sha256
    and with the monitor's check parameters, when the verdict calls for it (monitoring.retrain_decision); returns
    its run id, or nothing (saying why)."""
    import json

    from components import kfp_api, monitoring

    summary = json.loads(drift)
    start, why = monitoring.retrain_decision(summary, on_shift)
    if not start:
        print(f"retrain: not started: {why}")
        return ""
    return kfp_api.start_training(kfp_host, source, raw_data.metadata["sha256"], summary["training_params"],
                                  training_version, f"{summary['verdict']}: {summary['reason']}"[:500])
