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


def version_of_pipeline_run(name: str, pipeline_run: str) -> ModelVersion | None:
    """The version a pipeline run already registered, if any."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and tags.{RUN_ID_TAG} = '{pipeline_run}'")
    return found[0] if found else None


def should_promote(candidate_mae: float, prod_mae: float | None, margin: float) -> tuple[bool, str]:
    """Promote when there is no prod yet, or the candidate's test MAE beats prod's by at least `margin`."""
    if prod_mae is None:
        return True, "no prod model yet"
    gain = prod_mae - candidate_mae
    if gain > 0 and gain >= margin:
        return True, f"test MAE {candidate_mae:.3f} beats prod {prod_mae:.3f} by {gain:.3f} >= margin {margin}"
    return False, f"test MAE {candidate_mae:.3f} does not beat prod {prod_mae:.3f} by margin {margin}"


def set_prod(name: str, version: str) -> None:
    """Move `prod` to `version`, keeping the version it leaves under `previous-prod` for rollback."""
    client = MlflowClient()
    current = prod_version(name)
    if current is not None and current.version != str(version):
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, current.version)
    client.set_registered_model_alias(name, PROD_ALIAS, str(version))


def promote(name: str, version: str) -> str:
    """Move `prod` to an existing version by hand; refuse a version that does not exist."""
    try:
        MlflowClient().get_model_version(name, str(version))
    except MlflowException:
        known = sorted((int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")))
        raise StepError("promote", "VERSION", f"model {name!r} has no version {version!r} (versions: {known})")
    before = prod_version(name)
    set_prod(name, version)
    return f"{name}: prod {before.version if before else None} -> {version}"


def rollback(name: str) -> str:
    """Move `prod` back to the version it replaced (`previous-prod`); the two swap, so rollback undoes itself."""
    previous = prod_version(name, PREVIOUS_ALIAS)
    if previous is None:
        raise StepError("rollback", "previous-prod", f"model {name!r} has no previous prod version to go back to")
    return promote(name, previous.version)
