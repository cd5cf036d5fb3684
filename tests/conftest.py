"""Shared fixtures: a real MLflow server (sqlite + local artifacts on 127.0.0.1) and small listing frames."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "nyc_airbnb_sample1.csv"


# A test that needs any of these is marked `server`; `make test-fast` runs the rest.
SERVERS = {"mlflow_server", "own_server", "browser", "read_only_store"}
# Modules by how long they take, longest first (README, "Where the time goes"): a free worker takes the next module
# (or test) in this order, so starting the long ones first ends both workers together.
SLOWEST_FIRST = ["test_rerun", "test_serve", "test_monitor", "test_local", "test_promotion", "test_batch",
                 "test_cities", "test_model"]
# Modules whose tests xdist may spread over workers one by one: they share no module-scoped fixture (or only a cheap
# one), and each is long. Every other module runs whole in one worker, so its module fixtures are built once.
ONE_BY_ONE = {"test_rerun", "test_serve"}


def pytest_configure(config):
    # MLflow's usage telemetry would call a public endpoint from the tests and every server they start.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # Nor its job runner: 8 processes more with every server the tests start (Makefile).
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"


def pytest_xdist_make_scheduler(config, log):
    """xdist's --dist loadfile, but the modules of ONE_BY_ONE are spread test by test. (Its loadgroup would do this
    with marks, but it sets a node id attribute that pytest 9.2 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if Path(module).stem in ONE_BY_ONE else module

    return Scheduling(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVERS & set(item.fixturenames):
            item.add_marker("server")
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))


@pytest.fixture(autouse=True)
def mlflow_state_restored():
    """Each test leaves MLflow's tracking URI and active experiment, and the MLFLOW_* variables MLflow sets with them
    (which pipeline runs inherit), as it found them. A test that points MLflow at a server of its own would otherwise
    leave the next test in its worker talking to a server that is gone (seen with four workers: test_batch after an
    own_server test), or to an experiment id of another server. The globals are the private ones MLflow's own
    _use_tracking_uri keeps."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    uri, experiment = utils._tracking_uri, fluent._active_experiment_id
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = experiment
    for key in [k for k in os.environ if k.startswith("MLFLOW_") and k not in env]:
        del os.environ[key]
    os.environ.update(env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(url: str, ok=lambda response: response.ok, process: subprocess.Popen | None = None,
               timeout: float = 120) -> requests.Response:
    """Poll `url` until an answer satisfies `ok`; fail at once if the server's process has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            response = requests.get(url, timeout=2)
            if ok(response):
                return response
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} gave no acceptable answer within {timeout} s")


def run_pipeline(mlflow_uri: str, experiment: str, root, pipeline: str, *params: str,
                 timeout: float = 900) -> subprocess.CompletedProcess:
    """`pipeline.py run --pipeline PIPELINE` (kfp.local) as a person runs it, with `--param` for each of params."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    command = [sys.executable, "pipeline.py", "run", "--pipeline", pipeline, "--pipeline-root", str(root)]
    for param in params:
        command += ["--param", param]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` for the whole session; tests keep apart by experiment and model name."""
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        # One worker process (MLflow's default is 4, each importing MLflow): it answers concurrent requests in threads.
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", str(home / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_until(f"{uri}/health", process=process)
        yield uri
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def own_server(tmp_path):
    """An MLflow server of this test's own, which the test may kill, restart and reset."""
    port, home = free_port(), tmp_path / "mlflow"
    state = {"uri": f"http://127.0.0.1:{port}", "process": None}

    def up(reset: bool = False):
        if reset:
            subprocess.run(["rm", "-rf", str(home)], check=True)
        home.mkdir(exist_ok=True)
        state["process"] = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", str(home / "art")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(f"{state['uri']}/health", process=state["process"])
        mlflow.set_tracking_uri(state["uri"])

    def down():
        os.killpg(state["process"].pid, signal.SIGKILL)
        state["process"].wait(timeout=30)

    state |= {"up": up, "down": down}
    up()
    yield state
    if state["process"].poll() is None:
        down()


@pytest.fixture
def tracking(mlflow_server, monkeypatch) -> dict:
    """Point MLflow at the session server, with a fresh experiment, model name and pipeline run id."""
    names = {"experiment": f"test-{uuid.uuid4().hex[:8]}", "model": f"model-{uuid.uuid4().hex[:8]}",
             "run": f"run-{uuid.uuid4().hex[:8]}"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", names["experiment"])
    monkeypatch.setenv("KFP_RUN_ID", names["run"])
    mlflow.set_tracking_uri(mlflow_server)
    yield {"uri": mlflow_server, **names}
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def listings(sample) -> pd.DataFrame:
    """The sample, cleaned with the default rules."""
    from components.cities import city
    from components.listings import clean_listings

    df, _ = clean_listings(sample, city())
    return df


@pytest.fixture(scope="session")
def registered_model(mlflow_server, listings) -> str:
    """A small model registered twice on the session server, version 1 under `prod`."""
    mlflow.set_tracking_uri(mlflow_server)
    name = f"serve-{uuid.uuid4().hex[:6]}"
    register_small(name, listings, versions=2)
    mlflow.tracking.MlflowClient().set_registered_model_alias(name, "prod", "1")
    return name


def register_small(name: str, listings: pd.DataFrame, versions: int = 1) -> None:
    """A small forest registered `versions` times under `name` at the current tracking URI, as train saves one."""
    from components import model, saved_model

    fitted = model.fit(listings.head(5000), model.ModelParams(learner="random_forest", n_estimators=10,
                                                              criterion="squared_error", seed=3))
    model.calibrate(fitted, listings.iloc[5000:6000])
    mlflow.set_experiment("serving")
    for _ in range(versions):
        with mlflow.start_run(), saved_model.feature_code(fitted) as code:
            mlflow.sklearn.log_model(fitted, name="model", code_paths=[code], registered_model_name=name,
                                     **saved_model.model_kwargs(fitted, model.input_example(fitted, listings),
                                                             model.input_profile(listings.head(5000))))


@pytest.fixture(scope="session")
def sample_path() -> Path:
    assert SAMPLE.exists(), f"the shared sample is missing: {SAMPLE}"
    return SAMPLE


@pytest.fixture(scope="session")
def sample(sample_path) -> pd.DataFrame:
    return pd.read_csv(sample_path)


def listing(**overrides) -> dict:
    """One valid raw listing row; override any field."""
    row = {
        "id": 1, "name": "Sunny room near the park", "host_id": 10, "host_name": "Ann",
        "neighbourhood_group": "Brooklyn", "neighbourhood": "Williamsburg", "latitude": 40.71,
        "longitude": -73.95, "room_type": "Private room", "price": 80, "minimum_nights": 2,
        "number_of_reviews": 12, "last_review": "2019-06-01", "reviews_per_month": 0.5,
        "calculated_host_listings_count": 1, "availability_365": 100,
    }
    row.update(overrides)
    return row


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def nyc(**changes):
    """The default city's profile, with `changes`."""
    import dataclasses

    from components.cities import city

    return dataclasses.replace(city(), **changes)


def clean_frame(*rows: dict) -> pd.DataFrame:
    """Rows made by `listing`, cleaned with the default city's rules."""
    from components.cities import city
    from components.listings import clean_listings

    df, _ = clean_listings(frame(*rows), city())
    return df


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (tests/browser.py)."""
    from browser import Browser

    found = Browser()
    yield found
    found.close()
