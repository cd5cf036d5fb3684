"""Run it again: `pipeline.py run` end to end, repeated, raced and faulted, against real MLflow servers.

New bytes behind an unchanged source reach training; identical re-runs reuse the cache and register nothing; two
overlapping runs and a hand promotion never overwrite each other; a server that goes away ends the run within a
bounded time, and the next run closes what it left RUNNING and reuses what finished; a reset server's old cache
entries are never reused.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from components import tracking

SMALL = ["learner=random_forest", "n_estimators=10", "max_depth=10"]
WEAK = ["learner=random_forest", "n_estimators=2", "max_depth=2"]
# These runs test what happens around a run, not the model: 6,000 listings of the sample are enough for every
# decision they make (a run on them takes about half the time of one on the whole sample).
ROWS = 6000


@pytest.fixture(scope="module")
def source(sample_path, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("source") / "listings.csv"
    pd.read_csv(sample_path).head(ROWS).to_csv(path, index=False)
    return f"source={path}"


def start(uri: str, tmp_path, model: str, *params: str, experiment: str = "rerun", host: str = "",
          env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment, **(env or {})}
    # Another host: the same machine under another hostname (its own UTS namespace; root only).
    other = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh"] if host else []
    command = other + [sys.executable, "pipeline.py", "run", "--pipeline-root", str(tmp_path / "outputs"),
                       "--param", f"model_name={model}"]
    for param in params:
        command += ["--param", param]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(uri: str, tmp_path, model: str, *params: str, experiment: str = "rerun", host: str = "",
        env: dict | None = None) -> tuple[int, str]:
    process = start(uri, tmp_path, model, *params, experiment=experiment, host=host, env=env)
    out, _ = process.communicate(timeout=900)
    return process.returncode, out


def versions(model: str) -> list[str]:
    return sorted((v.version for v in MlflowClient().search_model_versions(f"name = '{model}'")), key=int)


def running(experiment: str) -> list[str]:
    """The steps of `experiment` whose MLflow runs are RUNNING ("pipeline" for a parent run)."""
    if mlflow.get_experiment_by_name(experiment) is None:
        return []
    found = MlflowClient().search_runs([mlflow.get_experiment_by_name(experiment).experiment_id],
                                       filter_string="attributes.status = 'RUNNING'")
    return sorted(r.data.tags.get("pipeline_step", "") for r in found)


def wait_for_step(experiment: str, step: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        if step in running(experiment):
            return
        time.sleep(0.3)
    raise TimeoutError(f"step {step} never ran")


def test_new_bytes_behind_the_same_source_reach_training_and_identical_ones_are_reused(
        mlflow_server, sample_path, tmp_path):
    mlflow.set_tracking_uri(mlflow_server)
    model, source = f"rerun-{uuid.uuid4().hex[:6]}", tmp_path / "listings.csv"
    sample = pd.read_csv(sample_path)
    sample.iloc[:ROWS].to_csv(source, index=False)
    code, out = run(mlflow_server, tmp_path, model, f"source={source}", *SMALL)
    assert code == 0 and "version 1: now prod" in out, out[-3000:]
    # Next month: new listings behind the same path.
    sample.iloc[ROWS // 2:ROWS * 3 // 2].to_csv(source, index=False)
    code, out = run(mlflow_server, tmp_path, model, f"source={source}", *SMALL)
    assert code == 0, out[-3000:]
    assert "reused from the cache" not in out
    second = MlflowClient().get_model_version(model, "2")
    assert second.tags["data_sha256"] != MlflowClient().get_model_version(model, "1").tags["data_sha256"]
    assert second.tags["data_uri"].endswith(f"/raw/{second.tags['data_sha256']}.csv.gz")
    # The same bytes again: every cacheable step reused, nothing registered, and the run says so.
    code, out = run(mlflow_server, tmp_path, model, f"source={source}", *SMALL)
    assert code == 0, out[-3000:]
    assert f"reused from the cache: clean, download, select, split, train (same data sha256 " \
           f"{second.tags['data_sha256'][:12]}, parameters and code)" in out
    assert f"why: identical to version 2 (same training rows, parameters and code; data sha256 " \
           f"{second.tags['data_sha256'][:12]})" in out
    assert versions(model) == ["1", "2"]


def test_overlapping_good_and_weak_runs_leave_the_good_one_prod(mlflow_server, tmp_path, source):
    """Started together with no prod: whichever registers first, the good one ends as prod, and the other run
    says why it did not promote."""
    mlflow.set_tracking_uri(mlflow_server)
    for attempt in range(2):
        model = f"race-{attempt}-{uuid.uuid4().hex[:6]}"
        good = start(mlflow_server, tmp_path, model, source, *SMALL)
        weak = start(mlflow_server, tmp_path, model, source, *WEAK)
        (good_out, _), (weak_out, _) = good.communicate(timeout=900), weak.communicate(timeout=900)
        assert good.returncode == weak.returncode == 0, good_out[-2000:] + weak_out[-2000:]
        client = MlflowClient()
        prod = client.get_model_version_by_alias(model, "prod")
        maes = [float(v.tags["test_mae"]) for v in client.search_model_versions(f"name = '{model}'")]
        assert len(maes) == 2 and float(prod.tags["test_mae"]) == min(maes)
        good_why, weak_why = (next(line for line in out.splitlines() if line.startswith("why: "))
                              for out in (good_out, weak_out))
        assert "now prod" in good_out
        # Each compared with the other either at evaluate or, when prod moved meanwhile, at register.
        if "now prod" in weak_out:  # the weak one registered first, when there was no prod to compare with
            assert weak_why == "why: no prod model yet" and "better than prod on " in good_why
        else:
            assert "worse than prod on " in weak_why and "prod unchanged" in weak_out


def test_a_hand_promotion_while_the_run_trains_stands(mlflow_server, tmp_path, source):
    mlflow.set_tracking_uri(mlflow_server)
    model, experiment = f"hand-{uuid.uuid4().hex[:6]}", f"hand-{uuid.uuid4().hex[:6]}"
    for params in (WEAK, WEAK[:1] + ["n_estimators=3", "max_depth=2"]):
        code, out = run(mlflow_server, tmp_path, model, source, *params, experiment=experiment)
        assert code == 0, out[-3000:]
    promote = [sys.executable, "pipeline.py", "promote", "--model-name", model, "--version"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    assert subprocess.run(promote + ["1"], cwd=ROOT, env=env, capture_output=True).returncode == 0  # before: fine
    process = start(mlflow_server, tmp_path, model, source, *SMALL, experiment=experiment)
    wait_for_step(experiment, "train", process)
    promoted = subprocess.run(promote + ["2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert promoted.returncode == 0 and f"{model}: prod 1 -> 2" in promoted.stdout
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-3000:]
    assert "why: prod was set by hand to version 2 after this run started: a person's choice stands" in out
    assert MlflowClient().get_model_version_by_alias(model, "prod").version == "2"


def test_mlflow_gone_mid_train_fails_fast_and_the_next_run_cleans_up_and_reuses(own_server, tmp_path, source):
    model, experiment = f"gone-{uuid.uuid4().hex[:6]}", "gone"
    # The reference forest: a fit long enough to stop the server in the middle of it.
    process = start(own_server["uri"], tmp_path, model, source, "learner=random_forest", experiment=experiment)
    wait_for_step(experiment, "train", process)
    own_server["down"]()
    killed_at = time.monotonic()
    out, _ = process.communicate(timeout=600)
    took = time.monotonic() - killed_at
    assert process.returncode == 1
    assert "train: MLFLOW_TRACKING_URI: the MLflow server at " in out and "stopped answering during this step" in out
    assert "FAILED at train: train: MLFLOW_TRACKING_URI: the MLflow server at " in out.strip().splitlines()[-1]
    print(f"the run ended {took:.0f} s after the server went away")
    own_server["up"]()
    assert versions(model) == []
    assert running(experiment) == ["pipeline", "train"]  # left RUNNING while the server was gone
    # The next run comes from another host, which cannot see whether the owner lives: the heartbeat says it.
    lease = {tracking.LEASE_ENV: "5"}
    found = MlflowClient().search_runs([mlflow.get_experiment_by_name(experiment).experiment_id],
                                       filter_string="attributes.status = 'RUNNING'")
    last_beat = max(float(r.data.tags[tracking.HEARTBEAT_TAG]) for r in found)
    time.sleep(max(0.0, last_beat + 5.5 - time.time()))  # the owner is dead: nothing renews them
    code, out = run(own_server["uri"], tmp_path, model, source, "learner=random_forest", experiment=experiment,
                    host="another-host", env=lease)
    assert code == 0, out[-3000:]
    assert "closed the MLflow runs that pipeline run local-" in out and "when its owner died" in out
    closed = MlflowClient().get_run(found[0].info.run_id).data.tags["error"]
    assert closed.startswith("closed by a later run on another-host: its owner ") and "(lease 5 s)" in closed
    assert "reused from the cache: clean, download, split (same data sha256" in out, out
    assert running(experiment) == [] and versions(model) == ["1"]
    # The server reset (an empty database): cached outputs name runs that no longer exist, so none is reused.
    own_server["down"]()
    own_server["up"](reset=True)
    code, out = run(own_server["uri"], tmp_path, model, source, "learner=random_forest", experiment=experiment)
    assert code == 0, out[-3000:]
    assert "reused from the cache" not in out and versions(model) == ["1"]


def links(pid: int, fds: str = "*") -> set[str]:
    """What the descriptors `fds` of process `pid` are open on (pipe:[inode], a path...)."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").glob(fds):
        with contextlib.suppress(OSError):
            found.add(os.readlink(fd))
    return found


def step_process(pid: int, step: str) -> int:
    """The process of a kfp.local task of `step` of `pipeline.py run` process `pid`: named by its step, it writes its
    output to a pipe that the run reads (pipelines/warm.py forks both the run and its tasks from the step server,
    and the run writes where `pid` does)."""
    processes = [int(comm.parent.name) for comm in Path("/proc").glob("[0-9]*/comm")]
    runs = [other for other in processes if links(other, "1") & links(pid, "1")]
    ours = {link for run in runs for link in links(run) if link.startswith("pipe:")}
    for other in processes:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{other}/comm").read_text().strip() == f"kfp:{step}" and links(other, "1") & ours:
                return other
    raise LookupError(f"no process of step {step} of {pid}")


def test_a_train_step_killed_mid_fit_fails_the_run_and_the_next_run_reuses_only_finished_steps(mlflow_server, tmp_path,
                                                                                               source):
    mlflow.set_tracking_uri(mlflow_server)
    model, experiment = f"killed-{uuid.uuid4().hex[:6]}", f"killed-{uuid.uuid4().hex[:6]}"
    code, out = run(mlflow_server, tmp_path, model, source, *WEAK, experiment=experiment)
    assert code == 0, out[-3000:]
    process = start(mlflow_server, tmp_path, model, source, "learner=random_forest", experiment=experiment)
    wait_for_step(experiment, "train", process)
    os.kill(step_process(process.pid, "train"), signal.SIGKILL)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 1, out[-3000:]
    assert out.strip().splitlines()[-1].startswith(
        "FAILED at train: its process ended without an error message (killed, or out of memory?) (full log: ")
    assert versions(model) == ["1"] and MlflowClient().get_model_version_by_alias(model, "prod").version == "1"
    assert running(experiment) == []  # the killed step's run was closed by its pipeline process
    code, out = run(mlflow_server, tmp_path, model, source, "learner=random_forest", experiment=experiment)
    assert code == 0, out[-3000:]
    assert "reused from the cache: clean, download, split (same data sha256" in out  # train ran again, whole
    assert versions(model) == ["1", "2"] and running(experiment) == []
