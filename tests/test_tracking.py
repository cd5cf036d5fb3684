"""Steps inside KFP's MLflow plugin (manifests/kfp/mlflow-plugin.yaml), against a real MLflow server.

The plugin creates a parent run per KFP run and a nested run per task, and hands the task its run as
MLFLOW_RUN_ID (with MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID): the step must log into that run, make none of
its own, and leave the parent to KFP, which ends it when the KFP run ends. Here the test plays the plugin's part.
"""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from components import sources, training
from components.errors import StepError
from components.listings import write_listings


@pytest.fixture
def plugin_runs(tracking, monkeypatch) -> dict:
    """A parent and a nested run made as the plugin makes them, the nested one handed over in the environment."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(tracking["experiment"]).experiment_id
    parent = client.create_run(experiment_id, run_name="kfp run", tags={"kfp.pipeline_run_id": tracking["run"]})
    nested = client.create_run(experiment_id, run_name="split", tags={"mlflow.parentRunId": parent.info.run_id})
    monkeypatch.setenv("MLFLOW_RUN_ID", nested.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    return {"experiment_id": experiment_id, "parent": parent.info.run_id, "nested": nested.info.run_id}


def runs_of(experiment_id: str) -> set[str]:
    return {r.info.run_id for r in MlflowClient().search_runs([experiment_id])}


def test_a_step_logs_into_the_run_kfp_hands_it(plugin_runs, listings, tmp_path):
    clean = tmp_path / "clean.csv"
    write_listings(listings.head(500), str(clean))
    training.split(str(clean), str(tmp_path / "trainval.csv"), str(tmp_path / "test.csv"), 0.2, 42)
    client = MlflowClient()
    assert runs_of(plugin_runs["experiment_id"]) == {plugin_runs["parent"], plugin_runs["nested"]}
    nested = client.get_run(plugin_runs["nested"])
    assert nested.data.metrics["trainval_rows"] == 400 and nested.data.metrics["test_rows"] == 100
    assert nested.data.params == {"test_size": "0.2", "seed": "42"}
    assert nested.data.tags["pipeline_step"] == "split" and "step_seconds" in nested.data.metrics
    # KFP ends the parent when the KFP run ends; the step leaves it alone.
    assert client.get_run(plugin_runs["parent"]).info.status == "RUNNING"


def test_a_failing_step_marks_its_run_and_names_itself_on_the_parent(plugin_runs, tmp_path):
    clean = tmp_path / "clean.csv"
    clean.write_text("id,neighbourhood_group\n1,Bronx\n")
    with pytest.raises(StepError, match="split: test_size: must be between 0 and 1"):
        training.split(str(clean), str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), 2.0, 42)
    client = MlflowClient()
    assert client.get_run(plugin_runs["nested"]).info.status == "FAILED"
    parent = client.get_run(plugin_runs["parent"])
    assert parent.data.tags["error"].startswith("split: split: test_size: must be between 0 and 1")
    assert parent.info.status == "RUNNING"
    assert runs_of(plugin_runs["experiment_id"]) == {plugin_runs["parent"], plugin_runs["nested"]}


def test_without_the_plugin_a_step_makes_its_own_run_under_one_parent(tracking, listings, tmp_path):
    clean = tmp_path / "clean.csv"
    write_listings(listings.head(500), str(clean))
    for _ in range(2):
        training.split(str(clean), str(tmp_path / "trainval.csv"), str(tmp_path / "test.csv"), 0.2, 42)
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name(tracking["experiment"]).experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline_step") == "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["kfp_run_id"] == tracking["run"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert [r.data.tags["pipeline_step"] for r in children] == ["split", "split"]


def test_a_presigned_source_is_logged_without_its_query(tracking, sample_path, tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "l.csv").write_bytes(sample_path.read_bytes()[:20_000].rsplit(b"\n", 1)[0])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/l.csv"
        meta = sources.download(url + "?X-Amz-Signature=s3cret", str(tmp_path / "raw.csv"))
        with pytest.raises(StepError, match=r"cannot read 'http://127.0.0.1:\d+/gone.csv': HTTP Error 404") as failed:
            sources.download(url.replace("l.csv", "gone.csv") + "?X-Amz-Signature=s3cret", str(tmp_path / "x.csv"))
    finally:
        server.shutdown()
    assert meta["source"] == url and "s3cret" not in str(failed.value)
    experiment = mlflow.get_experiment_by_name(tracking["experiment"]).experiment_id
    for run in MlflowClient().search_runs([experiment]):
        assert "s3cret" not in str(run.data.params) + str(run.data.tags)
