"""Promotion: the candidate registered as a new version with its lineage, `prod` moved only on evidence (gate.py),
and the model card that says why."""

from __future__ import annotations

import hashlib
import json
import os

import mlflow
import pandas as pd

from components import gate, model, report, rollout, saved_model, tracking
from components.cities import City
from components.errors import StepError
from components.listings import read_listings
from components.prod import TRAINING_IDS_TAG, compare_with_prod

# On a model version: what identifies its data, parameters and code.
FINGERPRINT_TAG = "fingerprint"
# Where the register run keeps the model card in MLflow (KFP's output files have no extension).
MODEL_CARD = "reports/model_card.html"


def register(
    model_path: str, model_meta: dict, scores: dict, comparison: dict, test_path: str, model_name: str,
    margin: float, raw_meta: dict, clean_meta: dict, git_commit: str, images: str, importance: dict, card_path: str,
    trigger: str = "",
) -> dict:
    """Register the candidate as a new version (unless an identical one exists), then, holding the promotion lock,
    decide against the actual prod and move `prod` only on evidence. Writes the model card (HTML) to `card_path`,
    MLflow and the version's description. Returns version, promoted, test_mae, reason. `trigger`: why the run
    started, when monitoring started it (a tag of the version)."""
    with tracking.step_run("register", params={"model_name": model_name, "margin": margin}, last=True) as run:
        pipeline_run = os.environ.get("KFP_RUN_ID", "")
        tags = lineage(raw_meta, clean_meta, model_meta, git_commit, images)
        test_mae = scores["candidate_mae"]
        test = read_listings(test_path)
        candidate, _ = saved_model.load_model(model_path, "register")
        ranges = model.price_ranges(candidate, test)
        predicted = ranges["price"]

        def card(version, promoted: bool, reason: str, final: dict) -> str:
            facts = model_card_facts(model_name, version, promoted, reason, final, margin, scores, model_meta,
                                     raw_meta, clean_meta, tags, len(test), pipeline_run)
            html = report.model_card(facts, test.assign(predicted=predicted, low=ranges["low"], high=ranges["high"]),
                                     pd.Series(importance).sort_values())
            report.keep_report(html, card_path, MODEL_CARD)
            return report.model_card_markdown(facts, tracking.artifact_link(run, MODEL_CARD))

        # A retry of this step finds the version its first attempt registered; an identical re-run finds its twin.
        earlier = tracking.version_tagged(model_name, tracking.RUN_ID_TAG, pipeline_run) if pipeline_run else None
        twin = tracking.version_tagged(model_name, FINGERPRINT_TAG, tags[FINGERPRINT_TAG])
        for unfinished in unfinished_versions(model_name):
            # Its register step died before deciding (MLflow killed, the step killed). The same model: this run
            # finishes it. Another: it goes (prod never named it), so that no version lacks its decision and card.
            if twin is not None and unfinished.version == twin.version and earlier is None:
                print(f"register: version {twin.version} is this model and its register did not finish: finishing it")
                earlier = twin
            elif earlier is None or unfinished.version != earlier.version:
                tracking.delete_unfinished_version(model_name, unfinished.version)
                print(f"register: removed version {unfinished.version}: its register (pipeline run "
                      f"{unfinished.tags.get(tracking.RUN_ID_TAG, '?')}) died before deciding on it")
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
                     "test_r2": f"{scores['candidate_r2']:.4f}", "test_coverage": f"{scores['candidate_coverage']:.4f}",
                     "coverage": str(ranges.attrs["coverage"]), **({"trigger": trigger[:5000]} if trigger else {})}
            version = mlflow.register_model(model_meta["mlflow_model_uri"], model_name, tags=tags).version
            tracking.changed["registered"] = (f"version {version} of {model_name!r} was registered but not decided on "
                                              "(the next run of this model finishes or removes it)")
        else:
            version = earlier.version

        def compare_again(prod):
            return compare_with_prod(model_name, prod, predicted, test, ranges)

        holder = f"pipeline run {pipeline_run}"
        client = mlflow.tracking.MlflowClient()
        try:
            with tracking.promotion_lock(model_name, holder, "register"):
                promote, reason, final = gate.decide_promotion(model_name, version, comparison, margin,
                                                          tracking.pipeline_started(run.info.run_id), compare_again)
                # The version is complete (decision and card) before prod may point at it.
                client.set_model_version_tag(model_name, version, "promotion", reason)
                client.update_model_version(model_name, version, description=card(version, promote, reason, final))
                client.set_model_version_tag(model_name, version, "comparison", json.dumps(final, sort_keys=True))
                tracking.changed["registered"] = f"version {version} of {model_name!r} was registered, decided on"
                if promote:
                    tracking.set_prod(model_name, version, by=holder)
        except Exception:
            if earlier is None:  # no half-registered version: the one this run made goes (prod never named it)
                tracking.delete_unfinished_version(model_name, version)
            raise
        mlflow.set_tag("promotion", reason)
        if promote:
            print(rollout.roll_serving(version))
        mlflow.log_metrics({"version": int(version), "promoted": int(promote)})
        print(f"register: version {version}, {'now prod' if promote else 'prod unchanged'}")
        return {"version": int(version), "promoted": promote, "test_mae": test_mae, "reason": reason}


def unfinished_versions(name: str) -> list:
    """Versions of `name` whose register step died before finishing them (SIGKILLed, or MLflow away so that it
    could not delete them): made by this code (a fingerprint) for a pipeline run that has no RUNNING run left (one
    that has may still be deciding), with no decision (`comparison`) or no card (the description)."""
    client, found = mlflow.tracking.MlflowClient(), []
    experiment = mlflow.get_experiment_by_name(tracking.experiment_name())
    for version in client.search_model_versions(f"name = '{name}'"):
        if tracking.finished(version) or FINGERPRINT_TAG not in version.tags:
            continue
        running = experiment is not None and client.search_runs(
            [experiment.experiment_id], max_results=1, filter_string=f"tags.{tracking.RUN_ID_TAG} = "
            f"'{version.tags.get(tracking.RUN_ID_TAG, '')}' and attributes.status = 'RUNNING'")
        if not running:
            found.append(version)
    return found


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
                   "test_mae": scores["candidate_mae"], "test_r2": scores["candidate_r2"],
                   "test_coverage": scores["candidate_coverage"], "test_interval_width": scores["candidate_interval_width"]},
        "coverage": model_meta.get("coverage"), "rows": rows, "city": tags.get("city") or "-", "source": tags["data_source"], "sha256": tags["data_sha256"],
        "data_uri": tags["data_uri"],
        "parameters": json.loads(tags["parameters"]), "sweep": json.loads(board) if board else [],
        "sweep_choice": tags["sweep_choice"], "git_commit": tags["git_commit"], "images": json.loads(tags["images"] or "{}"),
    }


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
    city = City.from_dict(clean_meta["city"], "register") if clean_meta.get("city") else None
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
