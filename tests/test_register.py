"""The register step against a real MLflow server: promotion rules, lineage, and retries that do not duplicate."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from components import model, tasks
from components import tracking as registry


@pytest.fixture
def candidate(tracking, listings) -> dict:
    """A logged (not yet registered) model, as the train step leaves it."""
    fitted = model.fit(listings.head(2000), model.ForestParams(n_estimators=3, criterion="squared_error"))
    mlflow.set_experiment(tracking["experiment"])
    with mlflow.start_run() as run, registry.feature_code() as code:
        info = mlflow.sklearn.log_model(fitted, name="model", code_paths=[code],
                                        **registry.model_kwargs(fitted, model.input_example(listings)))
    return {"mlflow_model_uri": info.model_uri, "mlflow_run_id": run.info.run_id}


def register(candidate, name, evaluation, margin=0.1):
    return tasks.register(candidate, evaluation, name, margin, {"source": "s", "sha256": "h"},
                          {"reference_uri": "runs:/x/data/clean"}, "abc123", "{}")


def test_first_version_becomes_prod_and_a_retry_reuses_it(tracking, candidate):
    name = tracking["model"]
    first = register(candidate, name, {"candidate_mae": 30.0, "candidate_r2": 0.5})
    assert (first["version"], first["promoted"]) == (1, True)
    # The same pipeline run (same KFP_RUN_ID) again, as a retry after a failure late in the step.
    again = register(candidate, name, {"candidate_mae": 30.0, "candidate_r2": 0.5})
    assert (again["version"], again["promoted"]) == (1, True)
    assert [v.version for v in MlflowClient().search_model_versions(f"name = '{name}'")] == ["1"]
    version = MlflowClient().get_model_version(name, "1")
    assert version.tags[registry.RUN_ID_TAG] == tracking["run"]
    assert version.tags["data_sha256"] == "h" and version.tags["git_commit"] == "abc123"


def test_a_better_candidate_moves_prod_and_keeps_the_previous(tracking, candidate, monkeypatch):
    name = tracking["model"]
    register(candidate, name, {"candidate_mae": 30.0, "candidate_r2": 0.5})
    monkeypatch.setenv("KFP_RUN_ID", tracking["run"] + "-2")
    better = register(candidate, name, {"candidate_mae": 29.0, "candidate_r2": 0.6, "prod_mae": 30.0,
                                        "prod_version": 1})
    assert (better["version"], better["promoted"]) == (2, True)
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "prod").version == "2"
    assert client.get_model_version_by_alias(name, "previous-prod").version == "1"


def test_prod_that_moved_during_the_run_is_left_alone(tracking, candidate, monkeypatch):
    name = tracking["model"]
    register(candidate, name, {"candidate_mae": 30.0, "candidate_r2": 0.5})
    monkeypatch.setenv("KFP_RUN_ID", tracking["run"] + "-2")
    # Evaluated against "no prod", but version 1 became prod meanwhile.
    late = register(candidate, name, {"candidate_mae": 10.0, "candidate_r2": 0.9})
    assert (late["version"], late["promoted"]) == (2, False)
    assert late["reason"] == "prod moved to version 1 during this run"
    assert MlflowClient().get_model_version_by_alias(name, "prod").version == "1"
