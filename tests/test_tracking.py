"""Steps inside KFP's MLflow plugin (manifests/kfp/mlflow-plugin.yaml), against a real MLflow server.

The plugin creates a parent run per KFP run and a nested run per task, and hands the task its run as
MLFLOW_RUN_ID (with MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID): the step must log into that run, make none of
its own, and leave the parent to KFP, which ends it when the KFP run ends. Here the test plays the plugin's part.
"""

import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from components import sources, tracking, training
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


@pytest.fixture
def read_only_store(tmp_path):
    """A real MLflow server whose artifact folder is mounted read-only (root only: chmod does not stop root), and
    the server's log, as `make` starts one."""
    import signal
    import subprocess
    import sys

    from conftest import free_port, wait_until

    if os.geteuid() != 0:
        pytest.fail("needs root, for a read-only bind mount (CI and this project's machines run as root)")
    port, store, log = free_port(), tmp_path / "artifacts", tmp_path / "server.log"
    store.mkdir()
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", str(store)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    mounted = False
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until(f"{uri}/health", process=server)
        subprocess.run(["mount", "--bind", str(store), str(store)], check=True)
        mounted = True
        subprocess.run(["mount", "-o", "remount,ro,bind", str(store)], check=True)
        yield {"uri": uri, "log": str(log)}
    finally:
        if mounted:
            subprocess.run(["umount", str(store)], check=False)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_a_store_that_refuses_is_named_at_once_with_its_cause(read_only_store, monkeypatch, tmp_path):
    """MLflow's client retries a 500 as if it would pass: the step instead ends at the first refusal, naming the
    file, the status and (from the local server's log) the cause, and its run ends FAILED."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", read_only_store["uri"])
    monkeypatch.setenv("MLFLOW_SERVER_LOG", read_only_store["log"])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "store")
    monkeypatch.setenv("KFP_RUN_ID", "store-run")
    mlflow.set_tracking_uri(read_only_store["uri"])
    (tmp_path / "model.skops").write_bytes(b"x" * 200_000)
    with pytest.raises(StepError) as caught:
        with tracking.step_run("train") as run:
            mlflow.log_artifact(str(tmp_path / "model.skops"), "model")
    message = str(caught.value)
    assert message.startswith("train: MLflow artifact store: MLflow could not store model/model.skops: HTTP 500 from "
                              f"{read_only_store['uri']}; the MLflow server's log says: "), message
    assert "Read-only file system" in message
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
    # Without the server's log, the message still says where to look.
    monkeypatch.delenv("MLFLOW_SERVER_LOG")
    with pytest.raises(StepError, match="the cause .* is in the MLflow server's log"):
        with tracking.step_run("evaluate"):
            mlflow.log_artifact(str(tmp_path / "model.skops"), "model")


def test_runs_whose_owner_died_are_closed_from_any_host_once_their_lease_ends(tracking):
    """An owner on another host is known dead only by its heartbeat: past the lease, its runs are closed FAILED with
    the reason; a live owner's runs (fresh heartbeat, or a live process on this host) stay RUNNING."""
    import time

    from components import tracking as runs

    client = MlflowClient()
    experiment_id = mlflow.set_experiment(tracking["experiment"]).experiment_id
    now, lease = time.time(), runs.lease_seconds()

    def run(pipeline_run: str, owner: str, beat: float | None) -> str:
        tags = {runs.RUN_ID_TAG: pipeline_run, runs.OWNER_TAG: owner}
        if beat is not None:
            tags[runs.HEARTBEAT_TAG] = str(int(beat))
        return client.create_run(experiment_id, tags=tags).info.run_id

    stale = run("far-dead", "other-host:4242", now - lease - 5)
    alive_far = run("far-alive", "other-host:4243", now)
    dead_here = run("here-dead", "this-host:999999999", now)  # no such process
    alive_here = run("here-alive", f"this-host:{os.getpid()}", now - lease - 5)  # its process lives
    assert runs.close_abandoned_runs("this-host") == ["far-dead", "here-dead"]
    status = {r: client.get_run(r).info.status for r in (stale, alive_far, dead_here, alive_here)}
    assert status == {stale: "FAILED", alive_far: "RUNNING", dead_here: "FAILED", alive_here: "RUNNING"}
    assert client.get_run(stale).data.tags["error"].startswith(
        "closed by a later run on this-host: its owner other-host:4242 stopped renewing its heartbeat ")
    assert "its pipeline process 999999999 had ended" in client.get_run(dead_here).data.tags["error"]
    # The owner's heartbeat keeps its runs alive past the lease; once it stops, the lease runs out.
    for left in (alive_far, alive_here):
        client.set_terminated(left)
    os.environ[runs.LEASE_ENV] = "3"
    try:
        beating = run("beating", "other-host:4244", time.time() - 10)
        with runs.heartbeat("beating"):
            for _ in range(2):  # renewed twice (every 0.5 s), so well inside the lease
                beat = client.get_run(beating).data.tags[runs.HEARTBEAT_TAG]
                while client.get_run(beating).data.tags[runs.HEARTBEAT_TAG] == beat:
                    time.sleep(0.1)
            assert runs.close_abandoned_runs("this-host") == []
        last = float(client.get_run(beating).data.tags[runs.HEARTBEAT_TAG])
        time.sleep(max(0.0, last + 3.5 - time.time()))  # nothing renews it now
        assert runs.close_abandoned_runs("this-host") == ["beating"]
    finally:
        os.environ.pop(runs.LEASE_ENV)
    assert client.get_run(beating).info.status == "FAILED"


# The next two run in this order (a module runs whole in one worker): the first points MLflow at a server that is
# gone, as a test with a server of its own leaves it; the second must not inherit that (conftest's autouse fixture).
GONE = "http://127.0.0.1:9"
LEFT = {}


def test_a_test_may_point_mlflow_at_a_server_of_its_own(tracking):
    # set_experiment sets MLFLOW_EXPERIMENT_ID too, which pipeline runs would inherit
    LEFT["experiment"] = mlflow.set_experiment(tracking["experiment"]).experiment_id
    mlflow.set_tracking_uri(GONE)
    assert mlflow.get_tracking_uri() == GONE


@pytest.mark.server  # runs with the one before (make test-fast deselects that one, which needs a server)
def test_the_next_test_finds_mlflow_where_the_session_left_it():
    from mlflow.tracking import fluent

    assert GONE not in (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    assert LEFT["experiment"] not in (fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID"))
