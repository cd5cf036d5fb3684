"""pipeline.py's command line: parameters, and submit against a fake kfp.Client (no KFP runs here)."""

import dataclasses
import hashlib
import os
import re
import shlex
import subprocess
import types

import kfp
import pytest

import pipeline
from conftest import ROOT, free_port
from pipelines import cli, dag, local, progress
from components import cities


def test_params_are_typed_by_the_pipeline_signature():
    assert cli.parse_params(["n_estimators=5", "margin=0.5", "source=s3://b/k.csv"]) == {
        "n_estimators": 5, "margin": 0.5, "source": "s3://b/k.csv"}


def test_a_sweep_is_a_json_list_of_trials_or_a_grid():
    assert cli.parse_params(['sweep=[{}, {"learner": "random_forest", "n_estimators": 50}]']) == {
        "sweep": [{}, {"learner": "random_forest", "n_estimators": 50}]}
    assert cli.sweep_grid("learning_rate=0.05,0.1 max_leaf_nodes=31,63 learner=hist_gbm") == [
        {"learning_rate": 0.05, "max_leaf_nodes": 31, "learner": "hist_gbm"},
        {"learning_rate": 0.05, "max_leaf_nodes": 63, "learner": "hist_gbm"},
        {"learning_rate": 0.1, "max_leaf_nodes": 31, "learner": "hist_gbm"},
        {"learning_rate": 0.1, "max_leaf_nodes": 63, "learner": "hist_gbm"}]


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "max_itr=3"], "--sweep 'max_itr=3': max_itr: not a parameter a trial can change"),
    (["--sweep", "max_iter"], "--sweep 'max_iter': 'max_iter': expected name=value"),
    (["--sweep", "seed=1,2"], "seed: not a parameter a trial can change"),
    (["--param", 'sweep=[{"max_iter": 1.5}]'], "is not a valid list of trials: max_iter: 1.5 is not a whole number"),
    (["--param", "sweep=[]"], "expected a non-empty JSON list of objects"),
    (["--param", "learner=svm"], "--param learner: 'svm' is not one of ['hist_gbm', 'random_forest']"),
])
def test_a_bad_sweep_or_learner_stops_the_command_before_anything_runs(argv, message, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # would it run, it would say so first
    with pytest.raises(SystemExit) as stopped:
        pipeline.main(["run", *argv])
    assert message in str(stopped.value)


@pytest.mark.parametrize("pair, message", [
    ("trees=5", r"trees is not a parameter of the training pipeline \(its parameters: .*n_estimators"),
    ("learning_rat=0.1", r"learning_rat is not a parameter of the training pipeline; did you mean learning_rate\?"),
    ("max_prise=500", "did you mean max_price?"),  # a field of the city profile
    ("n_estimators", "expected key=value"),
    ("n_estimators=many", "'many' is not a valid int"),
])
def test_bad_params_are_refused_with_a_message(pair, message):
    with pytest.raises(SystemExit, match=message):
        cli.parse_params([pair])


class FakeClient:
    """Records what submit asks of KFP; answers with a run in the given final state."""

    calls = []
    final_state = "SUCCEEDED"

    def __init__(self, host):
        self.calls.append(("host", host))

    def create_run_from_pipeline_package(self, spec, arguments, experiment_name, enable_caching=None):
        self.calls.append(("create", spec, arguments, experiment_name, enable_caching))
        return types.SimpleNamespace(run_id="run-123")

    def wait_for_run_completion(self, run_id, timeout):
        self.calls.append(("wait", run_id, timeout))
        return types.SimpleNamespace(state=self.final_state)


@pytest.mark.parametrize("state, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_prints_the_dashboard_url_and_waits_on_request(monkeypatch, capsys, tmp_path, state, code):
    FakeClient.calls, FakeClient.final_state = [], state
    monkeypatch.setattr(kfp, "Client", FakeClient)
    spec = tmp_path / "p.yaml"
    spec.write_text("{}")
    assert pipeline.main(["submit", "--spec", str(spec), "--host", "http://127.0.0.1:8080/", "--param",
                          "n_estimators=3", "--wait", "--timeout", "60"]) == code
    assert FakeClient.calls == [("host", "http://127.0.0.1:8080/"), ("create", str(spec), {"n_estimators": 3},
                                "rental-price", True), ("wait", "run-123", 60)]
    out = capsys.readouterr().out
    assert "started run run-123: http://127.0.0.1:8080/#/runs/details/run-123" in out
    assert f"finished: {state}" in out


def test_submit_without_wait_does_not_wait_and_can_reuse_nothing(monkeypatch, tmp_path):
    FakeClient.calls = []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    (tmp_path / "p.yaml").write_text("{}")
    assert pipeline.main(["submit", "--spec", str(tmp_path / "p.yaml"), "--host", "http://h", "--no-cache"]) == 0
    assert [c[0] for c in FakeClient.calls] == ["host", "create"]
    assert FakeClient.calls[1][-1] is False  # enable_caching


def test_submit_pins_the_sha256_of_a_source_it_can_read_so_the_clusters_cache_sees_new_bytes(monkeypatch, tmp_path,
                                                                                             capsys):
    FakeClient.calls = []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    (tmp_path / "p.yaml").write_text("{}")
    source = tmp_path / "listings.csv"
    for content in (b"id,price\n1,80\n", b"id,price\n1,95\n"):
        source.write_bytes(content)
        pipeline.main(["submit", "--spec", str(tmp_path / "p.yaml"), "--host", "http://h", "--param",
                       f"source={source}"])
        assert FakeClient.calls[-1][2] == {"source": str(source), "source_sha256": hashlib.sha256(content).hexdigest()}
    # The cluster's own MinIO is out of reach from here: it says what that means.
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    pipeline.main(["submit", "--spec", str(tmp_path / "p.yaml"), "--host", "http://h"])
    assert FakeClient.calls[-1][2] == {}
    assert "cannot be read from here (no S3_ENDPOINT_URL) to pin its sha256" in capsys.readouterr().out
    # Batch scoring and monitoring read their source every run (never cached): nothing to pin.
    for name in ("batch", "monitor"):
        pipeline.main(["submit", "--pipeline", name, "--spec", str(tmp_path / "p.yaml"), "--host", "http://h",
                       "--param", f"source={source}"])
        assert FakeClient.calls[-1][2] == {"source": str(source)}


def test_submit_names_what_is_missing(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="no pipeline spec at .*nope.yaml: run `make compile` first"):
        pipeline.main(["submit", "--spec", str(tmp_path / "nope.yaml")])

    def refuse(host):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(kfp, "Client", refuse)
    (tmp_path / "p.yaml").write_text("{}")
    with pytest.raises(SystemExit, match=r"KFP at http://127.0.0.1:9 refused or did not answer \(ConnectionError"):
        pipeline.main(["submit", "--spec", str(tmp_path / "p.yaml"), "--host", "http://127.0.0.1:9"])


@pytest.mark.parametrize("variables, expected", [
    (['PARAMS=sweep=[{},{"learner":"random_forest"}] margin=0.5'],
     {"margin": 0.5, "sweep": [{}, {"learner": "random_forest"}]}),
    (["SWEEP=learning_rate=0.03,0.05 max_leaf_nodes=31"],
     {"sweep": [{"learning_rate": 0.03, "max_leaf_nodes": 31}, {"learning_rate": 0.05, "max_leaf_nodes": 31}]}),
    # The README's other city: a profile and one of its values changed for this run.
    (["PARAMS=city=nyc max_price=500 date_formats=%m/%d/%y"],
     {"city": dataclasses.replace(cities.city(), max_price=500.0, date_formats=("%m/%d/%y",)).as_param()}),
])
def test_make_run_hands_json_params_and_a_sweep_grid_to_pipeline_py_intact(variables, expected, monkeypatch):
    """The README's `make run PARAMS='sweep=[...]'` and `make run SWEEP="..."`: what make runs parses as meant."""
    printed = subprocess.run(["make", "-n", "run", *variables], cwd=dag.ROOT, capture_output=True, text=True,
                             check=True).stdout
    [command] = [line for line in printed.splitlines() if "pipeline.py run" in line]
    argv = shlex.split(command)[command.split().index("pipeline.py") + 1:]
    seen = {}
    monkeypatch.setattr(local, "run", lambda pipeline, params, *args, **kwargs: seen.update(params) or 0)
    assert pipeline.main(argv) == 0
    assert seen == expected


def test_a_sweep_given_twice_is_refused():
    with pytest.raises(SystemExit, match="give the sweep once"):
        pipeline.main(["run", "--param", "sweep=[{}]", "--sweep", "max_iter=100,200"])


@pytest.mark.parametrize("lines, line, invalid_data", [
    (["Traceback (most recent call last):", 'File "x.py", line 3', "components.errors.InvalidData: clean: price: 2 "
      "value(s) are not numbers"], "clean: price: 2 value(s) are not numbers", True),
    (["components.errors.InvalidData: check: columns, price: 2 check(s) failed:", "- columns: expected [...]",
      "- price: 3 rows above max", "[KFP Executor 2026 INFO]: done"],
     "check: columns, price: 2 check(s) failed; columns: expected [...]; price: 3 rows above max", True),
    (["components.errors.StepError: monitor: model_name: model 'x' has no 'prod' version"],
     "monitor: model_name: model 'x' has no 'prod' version", False),
    (["Traceback (most recent call last):", "  sklearn.utils._param_validation.InvalidParameterError: bad alpha"],
     "InvalidParameterError: bad alpha", False),
    (["[KFP Executor 2026 INFO]: Looking for component `train`"],
     "its process ended without an error message (killed, or out of memory?)", False),
])
def test_a_failed_step_is_summed_up_by_its_own_error_and_whether_the_data_was_at_fault(lines, line, invalid_data):
    assert progress.error_line(lines) == (line, invalid_data)


def test_every_folder_of_components_is_declared_with_its_data():
    """setuptools warns of a folder inside the package that `packages` does not list ("Package would be ignored"):
    every folder is listed, and each of its data files matches its package-data."""
    import fnmatch
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in [ROOT / "components", *(ROOT / "components").glob("*/")]:
        if folder.name == "__pycache__" or not folder.is_dir():
            continue
        package = ".".join(folder.relative_to(ROOT).parts)
        assert package in config["packages"], f"pyproject.toml: {package} is not in [tool.setuptools] packages"
        for data in folder.iterdir():
            if data.is_file() and data.suffix != ".py":
                assert any(fnmatch.fnmatch(data.name, p) for p in config["package-data"].get(package, [])), data


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MAKE"))} | env
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=300)


def test_make_help_names_the_settings_and_a_mistyped_target_gets_the_nearest():
    shown = make("help").stdout
    for setting in ("MLFLOW_PORT", "MLFLOW_TRACKING_URI", "DATA_URL", "PARAMS", "TEST_WORKERS"):
        assert re.search(rf"^  {setting} +\S", shown, re.M), shown
    typo = make("tset-fast")
    assert typo.returncode != 0
    assert typo.stderr.strip().splitlines()[-1].endswith("no target 'tset-fast'; did you mean test-fast? (make help "
                                                         "lists them).  Stop.")


@pytest.mark.server
def test_make_mlflow_returns_when_the_api_answers_and_mlflow_stop_when_its_processes_are_gone(tmp_path):
    """A local address with any port is started there; a remote one that does not answer is refused saying what
    to do."""
    from mlflow.tracking import MlflowClient

    uri, folder = f"http://localhost:{free_port()}", str(tmp_path / "mlflow")
    started = make("mlflow", MLFLOW_TRACKING_URI=uri, MLFLOW_DIR=folder)
    assert started.returncode == 0, started.stderr
    assert MlflowClient(uri).search_experiments()[0].name == "Default"  # at once, no retry
    group = int((tmp_path / "mlflow" / "server.pid").read_text())
    # The server alone: MLflow's job runner and its 7 huey consumers are not started (Makefile).
    members = [line.split(None, 1) for line in subprocess.run(["ps", "-eo", "pgid=,args="], capture_output=True,
                                                              text=True).stdout.splitlines()]
    server = [args for pgid, args in members if int(pgid) == group]
    assert server and not [args for args in server if "mlflow.server.jobs" in args], server
    again = make("mlflow", MLFLOW_TRACKING_URI=uri, MLFLOW_DIR=folder)
    assert f"MLflow answers at {uri}: reusing it" in again.stdout
    stopped = make("mlflow-stop", MLFLOW_DIR=folder)
    assert stopped.returncode == 0 and "stopped the local MLflow server" in stopped.stdout
    with pytest.raises(ProcessLookupError):  # every process of the server is gone when the command returns
        os.killpg(group, 0)
    remote = make("mlflow", MLFLOW_TRACKING_URI="http://mlflow.invalid:5000", MLFLOW_DIR=folder)
    assert remote.returncode != 0
    assert "MLflow does not answer at http://mlflow.invalid:5000: start it there, or leave MLFLOW_TRACKING_URI " \
           "unset" in remote.stderr
