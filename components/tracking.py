"""MLflow side of the steps: one parent run per pipeline run, a child run per step, the model registry.

Endpoints come from the environment (MLFLOW_TRACKING_URI, KFP_RUN_ID), never from code, so tests and
every runner point the same code at their own server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

import mlflow
import requests
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.errors import StepError

PROD_ALIAS = "prod"
PREVIOUS_ALIAS = "previous-prod"
RUN_ID_TAG = "kfp_run_id"
STEP_TAG = "pipeline_step"
# On a model version: who last moved `prod` to it ("hand", or "pipeline run <id>") and when (epoch seconds).
PROMOTED_BY_TAG = "promoted_by"
PROMOTED_AT_TAG = "promoted_at"
HAND = "hand"
# The promotion lock of model X is a registered model of this name: MLflow creates one atomically or refuses.
LOCK_SUFFIX = ".promotion-lock"
LOCK_LEASE_SECONDS = 120


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "rental-price")


def require_server(step: str) -> str:
    """Fail fast, naming the step, when the tracking server does not answer (MLflow's own retries take minutes)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            raise StepError(
                step, "MLFLOW_TRACKING_URI",
                f"the MLflow tracking server at {uri} is not reachable ({type(exc).__name__}); "
                "start it (make mlflow) or point MLFLOW_TRACKING_URI at a running one",
            ) from exc
    return uri


def _pipeline_parent(client: MlflowClient, experiment_id: str) -> str | None:
    """The parent run of this pipeline run (by KFP_RUN_ID), created by whichever step comes first."""
    pipeline_run = os.environ.get("KFP_RUN_ID")
    if not pipeline_run:
        return None
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{RUN_ID_TAG} = '{pipeline_run}' and tags.{STEP_TAG} = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=f"pipeline {pipeline_run}", tags={RUN_ID_TAG: pipeline_run, STEP_TAG: "pipeline"}
    )
    return run.info.run_id


@contextmanager
def step_run(step: str, params: dict | None = None, last: bool = False) -> Iterator[mlflow.ActiveRun]:
    """The step's MLflow run, nested under the pipeline run's parent; logs the step's own compute time.

    In a cluster with KFP's MLflow plugin, KFP creates the parent run and a nested run per task and hands it to the
    step as MLFLOW_RUN_ID: the step logs into that one, and KFP ends both. Otherwise the step makes its own child
    run under one parent per KFP_RUN_ID; a failure marks the parent FAILED and the last step marks it FINISHED.
    """
    require_server(step)
    client = MlflowClient()
    tags = {STEP_TAG: step, RUN_ID_TAG: os.environ.get("KFP_RUN_ID", "")}
    given = os.environ.get("MLFLOW_RUN_ID")
    if given:
        parent, owned = client.get_run(given).data.tags.get("mlflow.parentRunId"), False
        started_run = mlflow.start_run(run_id=given, tags=tags)
    else:
        experiment_id = mlflow.set_experiment(experiment_name()).experiment_id
        parent, owned = _pipeline_parent(client, experiment_id), True
        started_run = mlflow.start_run(run_name=step, parent_run_id=parent, tags=tags)
    started = time.perf_counter()
    with started_run as run:
        if params:
            mlflow.log_params(params)
        try:
            yield run
        except Exception as exc:
            mlflow.set_tag("error", str(exc)[:5000])
            if parent:
                client.set_tag(parent, "error", f"{step}: {exc}"[:5000])
                if owned:
                    client.set_terminated(parent, "FAILED")
            raise
        finally:
            # Never let a failure to log this hide the step's own error.
            with suppress(MlflowException, requests.RequestException):
                mlflow.log_metric("step_seconds", time.perf_counter() - started)
    if last and parent and owned:
        client.set_terminated(parent, "FINISHED")


# ---------------------------------------------------------------- models

@contextmanager
def feature_code() -> Iterator[str]:
    """A temporary `components` package holding only features.py, for MLflow `code_paths`.

    The model refers to its feature functions as components.features.*, so the shipped code keeps
    that package path but nothing else of the project.
    """
    import components.features

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp, "components")
        package.mkdir()
        (package / "__init__.py").write_text('"""Feature code shipped with the model."""\n')
        shutil.copy(components.features.__file__, package / "features.py")
        yield str(package)


def model_kwargs(model, example) -> dict:
    """Arguments shared by save_model and log_model: skops with exactly the trusted types the model holds."""
    from mlflow.models import infer_signature

    from components.model import SKOPS_TRUSTED_TYPES

    return dict(
        signature=infer_signature(example, model.predict(example)),
        input_example=example,
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        skops_trusted_types=SKOPS_TRUSTED_TYPES,
    )


def prod_version(name: str, alias: str = PROD_ALIAS) -> ModelVersion | None:
    """The version holding `alias`, or None when the model or the alias does not exist yet."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def version_tagged(name: str, tag: str, value: str) -> ModelVersion | None:
    """The oldest version of `name` whose tag `tag` is `value`, if any."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and tags.{tag} = '{value}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def pipeline_started(run_id: str) -> float:
    """When the pipeline run of a step's run started (epoch seconds): its parent's start, else its own."""
    client = MlflowClient()
    run = client.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    return (client.get_run(parent) if parent else run).info.start_time / 1000


@contextmanager
def promotion_lock(name: str, holder: str, step: str, wait: float = 300) -> Iterator[None]:
    """One promotion of model `name` at a time, across processes and machines that share the MLflow server.

    The lock is the registered model `<name>.promotion-lock`: MLflow's registry creates a name once or answers
    RESOURCE_ALREADY_EXISTS, so exactly one creator holds it; releasing deletes it. A holder that died leaves it
    behind; once its lease (LOCK_LEASE_SECONDS) has run out, the next one takes it over.
    """
    client, lock = MlflowClient(), name + LOCK_SUFFIX
    deadline, delay = time.monotonic() + wait, 0.1
    while True:
        try:
            client.create_registered_model(
                lock, tags={"holder": holder, "expires": str(time.time() + LOCK_LEASE_SECONDS)},
                description=f"Held while {holder} moves alias {PROD_ALIAS!r} of {name!r}; deleted when it is done.")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
            if time.time() > float(held.tags.get("expires", 0)):
                log_stale = f"took over the promotion lock of {held.tags.get('holder')!r}, whose lease ran out"
                client.delete_registered_model(lock)
                print(log_stale)
                continue
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue  # released meanwhile: try again at once
        if time.monotonic() > deadline:
            raise StepError(step, PROD_ALIAS, f"another promotion of {name!r} ({held.tags.get('holder')}) has held "
                                              f"the lock for over {wait:.0f} s; try again later")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    try:
        yield
    finally:
        with suppress(MlflowException):
            client.delete_registered_model(lock)


def set_prod(name: str, version: str, by: str) -> None:
    """Move `prod` to `version`, keeping the version it leaves under `previous-prod` for rollback, and record on
    the version who moved it and when. Call it holding promotion_lock."""
    client = MlflowClient()
    current = prod_version(name)
    if current is not None and current.version != str(version):
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, current.version)
    client.set_model_version_tag(name, str(version), PROMOTED_BY_TAG, by)
    client.set_model_version_tag(name, str(version), PROMOTED_AT_TAG, f"{time.time():.3f}")
    client.set_registered_model_alias(name, PROD_ALIAS, str(version))


def promote(name: str, version: str) -> str:
    """Move `prod` to an existing version by hand; refuse a version that does not exist. A pipeline run that
    started before this will not move `prod` over it."""
    try:
        MlflowClient().get_model_version(name, str(version))
    except MlflowException:
        known = sorted((int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")))
        raise StepError("promote", "VERSION", f"model {name!r} has no version {version!r} (versions: {known})")
    with promotion_lock(name, HAND, "promote"):
        before = prod_version(name)
        set_prod(name, version, by=HAND)
    return f"{name}: prod {before.version if before else None} -> {version}"


def rollback(name: str) -> str:
    """Move `prod` back to the version it replaced (`previous-prod`); the two swap, so rollback undoes itself."""
    previous = prod_version(name, PREVIOUS_ALIAS)
    if previous is None:
        raise StepError("rollback", "previous-prod", f"model {name!r} has no previous prod version to go back to")
    return promote(name, previous.version)
