"""Calls to the KFP API: the monitoring pipeline's retrain step starts a training run, and `pipeline.py schedule`
makes monitoring a recurring run. kfp.Client does the talking; this only names things and says what went wrong."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from components.errors import StepError
from components.names import EXPERIMENT, MONITOR_PIPELINE, TRAINING_PIPELINE

# The API server as run pods see it (no auth in KFP's single-user install).
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"


def connect(host: str, step: str):
    import kfp

    try:
        with warnings.catch_warnings():  # kfp warns that it needs KFP 2.0.0-beta.2 or later, on every client
            warnings.simplefilter("ignore", FutureWarning)
            return kfp.Client(host=host)
    except Exception as exc:  # transport, API and timeout errors of several libraries
        raise StepError(step, "kfp_host", f"the KFP API at {host} did not answer ({type(exc).__name__}: "
                                          f"{str(exc)[:300]})") from exc


def by_name(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def upload(client, spec_path: str, name: str) -> tuple[str, str]:
    """Pipeline `name` with this spec among its versions, uploaded once per content: (pipeline id, version id)."""
    version_name = f"{name}-{hashlib.sha256(Path(spec_path).read_bytes()).hexdigest()[:12]}"
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:  # a new pipeline, with this spec as its first version
        pipeline_id = client.upload_pipeline(spec_path, pipeline_name=name).pipeline_id
        return pipeline_id, newest_version(client, pipeline_id)
    found = client.list_pipeline_versions(pipeline_id, filter=by_name(version_name), page_size=1).pipeline_versions
    if found:
        return pipeline_id, found[0].pipeline_version_id
    version = client.upload_pipeline_version(spec_path, version_name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def newest_version(client, pipeline_id: str) -> str:
    found = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1).pipeline_versions
    return found[0].pipeline_version_id


def start_training(host: str, source: str, source_sha256: str, params: dict, version_id: str, why: str) -> str:
    """A run of the training pipeline on `source` (checked against its sha256) with `params`: the version
    `version_id`, or the newest one uploaded. Returns the run's id."""
    client = connect(host, "retrain")
    pipeline_id = client.get_pipeline_id(TRAINING_PIPELINE)
    if pipeline_id is None:
        raise StepError("retrain", "pipeline", f"KFP has no pipeline named {TRAINING_PIPELINE!r} to start: "
                                               "`make schedule` uploads it")
    version_id = version_id or newest_version(client, pipeline_id)
    experiment = client.create_experiment(EXPERIMENT)
    verdict = why.split(":")[0]  # "degraded: prod's MAE ..."
    run = client.run_pipeline(experiment.experiment_id, f"retrain on {verdict} ({source_sha256[:12]})",
                              params={**params, "source": source, "source_sha256": source_sha256},
                              pipeline_id=pipeline_id, version_id=version_id)
    print(f"retrain: started training run {run.run_id} on {source}, the verdict being {why}")
    return run.run_id


def cron_schedule(cron: str) -> str:
    """KFP's cron has a seconds field first (6 fields); a usual 5-field expression gets "0" seconds."""
    fields = cron.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) != 6:
        raise StepError("schedule", "cron", f"{cron!r} has {len(fields)} fields: expected 5 (minute hour day month "
                                            "weekday) or 6 (seconds first, as KFP takes it)")
    return cron


def schedule(host: str, monitor_spec: str, training_spec: str, cron: str, params: dict) -> str:
    """Monitoring as a recurring run (one at a time, no catch-up), replacing any before it; the training pipeline is
    uploaded beside it for the retrain step, which starts exactly that version. Returns the recurring run's id."""
    cron = cron_schedule(cron)
    client = connect(host, "schedule")
    _, training_version = upload(client, training_spec, TRAINING_PIPELINE)
    pipeline_id, version_id = upload(client, monitor_spec, MONITOR_PIPELINE)
    experiment = client.create_experiment(EXPERIMENT).experiment_id
    before = scheduled(client, experiment)
    made = client.create_recurring_run(
        experiment, MONITOR_PIPELINE, description="new listings against prod's data; see pipeline.py",
        cron_expression=cron, max_concurrency=1, no_catchup=True,
        params={**params, "training_version": training_version},
        pipeline_id=pipeline_id, version_id=version_id)
    for old in before:  # after the new one exists, so that a failure never leaves monitoring unscheduled
        client.delete_recurring_run(old)
    return made.recurring_run_id


def scheduled(client, experiment_id: str) -> list[str]:
    found = client.list_recurring_runs(experiment_id=experiment_id, filter=by_name(MONITOR_PIPELINE), page_size=100)
    return [run.recurring_run_id for run in found.recurring_runs or []]


def unschedule(host: str) -> list[str]:
    """Remove the monitoring recurring runs; returns their ids (none when nothing was scheduled)."""
    client = connect(host, "unschedule")
    try:
        experiment = client.get_experiment(experiment_name=EXPERIMENT).experiment_id
    except ValueError:  # no such experiment: nothing was ever scheduled
        return []
    removed = scheduled(client, experiment)
    for run in removed:
        client.delete_recurring_run(run)
    return removed
