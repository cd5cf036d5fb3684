"""Serving against a real running server (`python -m components.serve`), promotion, rollback and the roll-out."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading

import mlflow
import pandas as pd
import pytest
import requests
from conftest import ROOT, free_port, wait_until
from mlflow.tracking import MlflowClient

from components import predict, rollout, tracking
from components.errors import StepError

def start(mlflow_uri: str, model_uri: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "components.serve", "--model", model_uri, "--port", str(port),
                                *extra], cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def first_answer(url: str, process: subprocess.Popen) -> requests.Response:
    return wait_until(f"{url}/ping", ok=lambda response: True, process=process, timeout=60)


def ready(url: str, process: subprocess.Popen) -> None:
    wait_until(f"{url}/ping", process=process)


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(mlflow_server, registered_model):
    process, url = start(mlflow_server, f"models:/{registered_model}@prod", "--max-body-mb", "2")
    ready(url, process)
    yield url
    stop(process)


def post(url: str, **kwargs) -> requests.Response:
    return requests.post(f"{url}/invocations", timeout=120, **kwargs)


def test_alias_is_resolved_at_start_and_reported(server, listings):
    response = post(server, json=predict.payload(listings.head(3)))
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 3
    assert response.headers["x-model-version"] == "1"
    assert response.headers["x-model-uri"].endswith("/1")
    for route in ("/ping", "/health", "/version"):
        assert requests.get(server + route, timeout=5).status_code == 200


def good(server, listings):
    response = post(server, json=predict.payload(listings.head(2)))
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2


def with_column(listings, column, value) -> dict:
    body = predict.payload(listings.head(2))
    body["dataframe_split"]["data"][0][body["dataframe_split"]["columns"].index(column)] = value
    return body


BAD_REQUESTS = {
    "malformed JSON": (lambda l: {"data": b'{"dataframe_split": [', "headers": {"content-type": "application/json"}},
                       400, "valid JSON"),
    "unknown input format": (lambda l: {"json": {"rows": [1, 2]}}, 400, "exactly one of the input fields"),
    "unsupported content type": (lambda l: {"data": b"x", "headers": {"content-type": "text/plain"}}, 415,
                                 "only supports the following content types"),
    "missing column": (lambda l: {"json": {"dataframe_split": without(l, "room_type")}}, 400,
                       "missing inputs ['room_type']"),
    "wrong type": (lambda l: {"json": with_column(l, "minimum_nights", "two")}, 400, "minimum_nights"),
    "empty list": (lambda l: {"json": {"dataframe_records": []}}, 400, "Model is missing inputs"),
    "very large batch": (lambda l: {"json": predict.payload(pd.concat([l] * 6).head(100_000))}, 413,
                         "send smaller batches"),
}


def without(listings, column) -> dict:
    split = predict.payload(listings.head(2))["dataframe_split"]
    index = split["columns"].index(column)
    return {"columns": [c for c in split["columns"] if c != column],
            "data": [row[:index] + row[index + 1:] for row in split["data"]]}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_with_a_message_and_the_server_goes_on(case, server, listings):
    make, status, message = BAD_REQUESTS[case]
    response = post(server, **make(listings))
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert message in body["message"]
    assert "Traceback" not in response.text and "stack_trace" not in body
    assert len(response.text) < 2000  # the input is not echoed back
    good(server, listings)


def test_request_while_the_model_loads_gets_503(mlflow_server, registered_model, listings):
    # Freeze the MLflow server so the model cannot finish loading, then ask.
    pid = mlflow_group(mlflow_server)
    os.killpg(pid, signal.SIGSTOP)
    try:
        process, url = start(mlflow_server, f"models:/{registered_model}/2")
        answer = first_answer(url, process)
        assert answer.status_code == 503
        assert answer.json() == {"error_code": "MODEL_NOT_READY", "message": f"model models:/{registered_model}/2 is loading"}
        assert post(url, json=predict.payload(listings.head(1))).status_code == 503
    finally:
        os.killpg(pid, signal.SIGCONT)
    try:
        ready(url, process)
        assert post(url, json=predict.payload(listings.head(1))).headers["x-model-version"] == "2"
    finally:
        stop(process)


def mlflow_group(uri: str) -> int:
    port = uri.rsplit(":", 1)[1]
    out = subprocess.run(["pgrep", "-f", f"mlflow server --host 127.0.0.1 --port {port}"], capture_output=True, text=True)
    return os.getpgid(int(out.stdout.split()[0]))


def test_serving_without_prod_says_what_to_do(mlflow_server):
    process, _ = start(mlflow_server, "models:/never-registered@prod")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "serve: model 'never-registered' has no version with alias 'prod'" in output
    assert "run the pipeline first" in output


def test_predict_prints_prices(server, sample_path):
    result = subprocess.run([sys.executable, "-m", "components.predict", "--url", server, "--data", str(sample_path),
                             "--rows", "3"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"model version 1 at {server}:" and len(lines) == 4
    assert all(line.strip().startswith("$") and "listed at $" in line for line in lines[1:])


def test_promote_and_rollback(registered_model, mlflow_server):
    registered = registered_model
    mlflow.set_tracking_uri(mlflow_server)
    assert tracking.promote(registered, "2") == f"{registered}: prod 1 -> 2"
    assert tracking.rollback(registered) == f"{registered}: prod 2 -> 1"
    assert tracking.rollback(registered) == f"{registered}: prod 1 -> 2"
    tracking.promote(registered, "1")
    with pytest.raises(StepError, match=r"promote: VERSION: model '.*' has no version '7' \(versions: \[1, 2\]\)"):
        tracking.promote(registered, "7")
    assert MlflowClient().get_model_version_by_alias(registered, "prod").version == "1"


def test_rollback_without_a_previous_version_is_refused(mlflow_server, registered_model):
    registered = registered_model
    mlflow.set_tracking_uri(mlflow_server)
    MlflowClient().delete_registered_model_alias(registered, "previous-prod")
    with pytest.raises(StepError, match=f"rollback: previous-prod: model '{registered}' has no previous prod version"):
        tracking.rollback(registered)


def test_roll_serving_is_a_no_op_outside_a_cluster(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert rollout.roll_serving("3") == "not running in a cluster: no serving Deployment to roll"


@pytest.mark.parametrize("status, message", [
    (200, "patched deployment serving/rental-price-serve: rental-price/model-version=4, pods roll to it"),
    (403, "did not roll deployment serving/rental-price-serve (403 Forbidden): its pods load version 4 when they "
          "next start (make serve)"),
])
def test_roll_serving_patches_the_deployment_annotation(monkeypatch, status, message):
    """Against a local HTTP server standing in for the Kubernetes API: the exact request the pod would send.

    A refusal (no model server deployed yet, no RBAC) is reported, not raised: prod has moved already."""
    from kubernetes import client

    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PATCH(self):
            seen.update(path=self.path, type=self.headers["content-type"],
                        body=json.loads(self.rfile.read(int(self.headers["content-length"]))))
            answer = json.dumps({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    api_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=api_server.serve_forever, daemon=True).start()
    try:
        config = client.Configuration(host=f"http://127.0.0.1:{api_server.server_port}")
        monkeypatch.setenv("SERVING_NAMESPACE", "serving")
        result = rollout.roll_serving("4", api=client.AppsV1Api(client.ApiClient(config)))
    finally:
        api_server.shutdown()
    assert result == message
    assert seen["path"] == "/apis/apps/v1/namespaces/serving/deployments/rental-price-serve"
    assert seen["type"] == "application/strategic-merge-patch+json"
    assert seen["body"] == {"spec": {"template": {"metadata": {"annotations": {rollout.ANNOTATION: "4"}}}}}
