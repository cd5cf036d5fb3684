"""Serving against a real running server (`python -m components.serve`), promotion, rollback and the roll-out."""

import asyncio
import concurrent.futures
import http.server
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import ROOT, free_port, register_small, wait_until
from mlflow.tracking import MlflowClient

from components import model, predict, rollout, saved_model, serve, tracking
from components.errors import StepError

def start(mlflow_uri: str, model_uri: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """A model server; its output to a pipe (read it only once it has exited)."""
    port = free_port()
    if "--cache" not in extra:
        extra += ("--cache", tempfile.mkdtemp(prefix="serve-cache-"))  # each server fetches its own copy
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


def test_each_price_comes_with_its_range_as_the_version_gives_it_alone_or_in_a_batch(server, registered_model,
                                                                                     listings):
    rows = listings.iloc[100:140]
    answer = post(server, json=predict.payload(rows)).json()
    prices, ranges = answer["predictions"], pd.DataFrame(answer["price_ranges"])
    assert answer["coverage"] == 0.8 and len(ranges) == len(prices) == 40
    assert ((ranges["low"] <= prices) & (prices <= ranges["high"])).all()
    fitted, _ = saved_model.load_model(f"models:/{registered_model}/1", "test")  # batch and evaluate score so
    expected = model.price_ranges(fitted, rows)
    assert requests.get(f"{server}/version", timeout=10).json()["fast_path"]  # the model compiled to arrays...
    same = dict(rtol=0, atol=1e-9)  # ...gives the model's own figures
    assert np.allclose(prices, expected["price"], **same) and np.allclose(ranges, expected[["low", "high"]], **same)
    alone = post(server, json=predict.payload(rows.iloc[[5]])).json()
    assert alone["price_ranges"][0] == pytest.approx(answer["price_ranges"][5])
    assert alone["predictions"][0] == pytest.approx(prices[5])


def good(server, listings):
    response = post(server, json=predict.payload(listings.head(2)))
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2


def with_column(listings, column, value, row: int = 0) -> dict:
    body = predict.payload(listings.head(2))
    body["dataframe_split"]["data"][row][body["dataframe_split"]["columns"].index(column)] = value
    return body


def raw(data: bytes | str, content_type: str | None = "application/json") -> dict:
    return {"data": data, "headers": {"content-type": content_type} if content_type else {}}


ROW_1 = "1 row(s) cannot be priced: row 1, field "
BAD_REQUESTS = {
    "malformed JSON": (lambda l: raw(b'{"dataframe_split": ['), 400, "the body is not valid JSON"),
    "nested thousands deep": (lambda l: raw("[" * 100_000 + "]" * 100_000), 400, "the JSON is nested too deeply"),
    "deep object": (lambda l: raw('{"a":' * 50_000 + "1" + "}" * 50_000), 400, "the JSON is nested too deeply"),
    "unknown input format": (lambda l: {"json": {"rows": [1, 2]}}, 400,
                             "exactly one of ['dataframe_split', 'dataframe_records']"),
    "no content type": (lambda l: raw(json.dumps(predict.payload(l.head(1))), None), 415,
                        "content type '(none)' is not served: send application/json"),
    "text/plain": (lambda l: raw(b"x", "text/plain"), 415, "content type 'text/plain' is not served"),
    "missing column": (lambda l: {"json": {"dataframe_split": without(l, "room_type")}}, 400,
                       "field room_type: missing from the input"),
    "a number as text": (lambda l: {"json": with_column(l, "minimum_nights", "two", 1)}, 400,
                         ROW_1 + "minimum_nights: 'two' is not a finite number"),
    "empty list": (lambda l: {"json": {"dataframe_records": []}}, 400, "the request has no rows"),
    "more index labels than rows": (lambda l: {"json": {"dataframe_split": {**predict.payload(l.head(1))[
        "dataframe_split"], "index": [0, 1, 2]}}}, 400, "dataframe_split.index must have one label per data row (1)"),
    "a short row": (lambda l: {"json": {"dataframe_split": {"columns": ["a", "b"], "data": [[1]]}}}, 400,
                    "dataframe_split.data row 0 must be a list of 2 values"),
    "room type Castle": (lambda l: {"json": with_column(l, "room_type", "Castle", 1)}, 400,
                         ROW_1 + "room_type: 'Castle' is not among the values the model was trained on"),
    "borough Paris": (lambda l: {"json": with_column(l, "neighbourhood_group", "Paris", 1)}, 400,
                      ROW_1 + "neighbourhood_group: 'Paris' is not among the values"),
    "latitude -90": (lambda l: {"json": with_column(l, "latitude", -90, 1)}, 400,
                     ROW_1 + "latitude: -90 is outside the range the model was trained on (40."),
    "minimum nights -5": (lambda l: {"json": with_column(l, "minimum_nights", -5, 1)}, 400,
                          ROW_1 + "minimum_nights: -5 is outside the range the model was trained on (1 to "),
    "null room type": (lambda l: {"json": with_column(l, "room_type", None, 1)}, 400,
                       ROW_1 + "room_type: is null; the model was trained on no nulls here"),
    "an object as name": (lambda l: {"json": with_column(l, "name", {"a": [1]}, 1)}, 400,
                          ROW_1 + "name: {'a': [1]} is not text"),
    "true as a count": (lambda l: {"json": with_column(l, "number_of_reviews", True, 1)}, 400,
                        ROW_1 + "number_of_reviews: True is not a finite number"),
    "not a date": (lambda l: {"json": with_column(l, "last_review", "last spring", 1)}, 400,
                   ROW_1 + "last_review: 'last spring' is not a date (YYYY-MM-DD)"),
    "very large batch": (lambda l: {"json": predict.payload(pd.concat([l] * 6).head(100_000))}, 413,
                         "send smaller batches"),
    "NaN, not null": (lambda l: raw(json.dumps(with_column(l, "reviews_per_month", float("nan"), 1))), 400,
                      "the body is not valid JSON (NaN is not standard JSON: send null for a missing value"),
    "latin-1 sent as UTF-8": (lambda l: raw(json.dumps(with_column(l, "name", "Café", 1), ensure_ascii=False)
                                            .encode("latin-1")), 400, "the body is not valid utf-8 ("),
    "an unknown charset": (lambda l: raw(json.dumps(predict.payload(l.head(1))), "application/json; charset=klingon"),
                           415, "charset 'klingon' is not known: send UTF-8"),
}


def without(listings, column) -> dict:
    split = predict.payload(listings.head(2))["dataframe_split"]
    index = split["columns"].index(column)
    return {"columns": [c for c in split["columns"] if c != column],
            "data": [row[:index] + row[index + 1:] for row in split["data"]]}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_4xx_with_a_message_and_the_server_goes_on(case, server, listings):
    make, status, message = BAD_REQUESTS[case]
    response = post(server, **make(listings))
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert message in body["message"], body["message"]
    assert body["error_code"] == serve.ERROR_CODES[status]
    assert "Traceback" not in response.text and "stack_trace" not in body
    assert len(response.text) < 5000  # the input is not echoed back
    good(server, listings)


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/invocation", 404, "ENDPOINT_NOT_FOUND"), ("POST", "/", 404, "ENDPOINT_NOT_FOUND"),
    ("GET", "/invocations", 405, "METHOD_NOT_ALLOWED"), ("DELETE", "/ping", 405, "METHOD_NOT_ALLOWED"),
])
def test_unknown_paths_and_wrong_methods_get_404_and_405(server, method, path, status, code):
    response = requests.request(method, server + path, timeout=10)
    assert response.status_code == status and response.json()["error_code"] == code
    if status == 405:
        assert response.headers["allow"] in ("GET, HEAD", "POST")


def test_http_as_a_client_expects_it(server, listings):
    """HEAD where GET is allowed, the declared charset read, and fields the model ignores named."""
    for route in ("/ping", "/version", "/openapi.json"):
        got, head = requests.get(server + route, timeout=10), requests.head(server + route, timeout=10)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == got.headers["content-length"] != "0"
    assert requests.head(f"{server}/invocations", timeout=10).status_code == 405
    body = with_column(listings, "name", "Café près du parc", 1)
    text = json.dumps(body, ensure_ascii=False)
    utf8 = post(server, data=text.encode(), headers={"content-type": "application/json"})
    for charset in ("latin-1", "utf-16", "ISO-8859-1"):
        other = post(server, data=text.encode(charset),
                     headers={"content-type": f"application/json; charset={charset}"})
        assert other.status_code == 200 and other.json() == utf8.json(), (charset, other.text[:300])
    extra = predict.payload(listings.head(2))
    extra["dataframe_split"]["columns"] += ["price", "wifi", "pool"]  # a listing's price is known, and not read
    for row in extra["dataframe_split"]["data"]:
        row += [100, True, False]
    warned = post(server, json=extra).json()
    assert warned["warnings"] == ["unknown fields, ignored: 'wifi', 'pool'"]
    assert warned["predictions"] == post(server, json=predict.payload(listings.head(2))).json()["predictions"]
    assert "warnings" not in utf8.json()


def test_the_openapi_document_describes_real_requests_and_answers(server, listings):
    """GET /openapi.json is a valid OpenAPI 3.1 document; the requests below are valid by it exactly when the
    server takes them, and every answer (each route, each status) matches its schema."""
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate

    document = requests.get(f"{server}/openapi.json", timeout=10).json()
    validate(document)
    assert set(document["paths"]) == set(serve.ROUTES)
    assert document["components"]["schemas"]["Listing"]["required"] == model.FEATURES

    def schema(pointer: str):
        return Draft202012Validator({**document, "$ref": "#/" + pointer})

    def conforms(method: str, path: str, response: requests.Response) -> None:
        pointer = (f"paths/{path.replace('/', '~1')}/{method}/responses/{response.status_code}/content/"
                   "application~1json/schema")
        errors = [e.message for e in schema(pointer).iter_errors(response.json())]
        assert not errors, (method, path, response.status_code, errors[:3])

    request_schema = schema("components/schemas/Request")
    records = json.loads(listings.head(2)[model.FEATURES].to_json(orient="records", date_format="iso"))
    bodies = [predict.payload(listings.head(3)), {"dataframe_records": records}, with_column(listings, "minimum_nights",
              "two", 1), {"rows": [1]}, {"dataframe_records": []}, {"dataframe_records": [{**records[0], "wifi": 1}]},
              {"dataframe_records": [{k: v for k, v in records[0].items() if k != "room_type"}]},
              {"dataframe_records": [{**records[0], "latitude": None}]}]
    for body in bodies:
        response = post(server, json=body)
        conforms("post", "/invocations", response)
        if "dataframe_records" in body:  # a split's cells are checked by the server, not by the schema
            assert request_schema.is_valid(body) == (response.status_code == 200), (body, response.text[:300])
    for path in ("/ping", "/health", "/version", "/openapi.json", "/nowhere"):
        response = requests.get(server + path, timeout=10)
        if path != "/nowhere":
            conforms("get", path, response)
        else:
            assert response.status_code == 404 and schema("components/schemas/Error").is_valid(response.json())
    conforms("post", "/invocations", post(server, **raw(b"x", "text/plain")))
    flagged = requests.post(f"{server}/invocations?flag=true", json=with_column(listings, "room_type", "Castle", 1),
                            timeout=60)
    conforms("post", "/invocations", flagged)


def test_unfamiliar_rows_are_priced_and_flagged_only_when_asked(server, listings):
    body = with_column(listings, "room_type", "Castle", 1)
    refused = post(server, json=body)
    assert refused.status_code == 400
    assert refused.json()["problems"] == [{"row": 1, "field": "room_type", "problem": ANY_TEXT}]
    assert "POST /invocations?flag=true" in refused.json()["message"]
    flagged = requests.post(f"{server}/invocations?flag=true", json=body, timeout=60)
    assert flagged.status_code == 200, flagged.text
    assert len(flagged.json()["predictions"]) == 2
    assert [(f["row"], f["field"]) for f in flagged.json()["flags"]] == [(1, "room_type")]
    # A broken row is never priced, flag or not.
    broken = requests.post(f"{server}/invocations?flag=true", json=with_column(listings, "latitude", "north", 0),
                           timeout=60)
    assert broken.status_code == 400 and broken.json()["problems"][0]["field"] == "latitude"
    # Records in, the same prices out as split.
    records = json.loads(listings.head(2)[model.FEATURES].to_json(orient="records", date_format="iso"))
    assert post(server, json={"dataframe_records": records}).json() == post(
        server, json=predict.payload(listings.head(2))).json()


class _AnyText(str):
    def __eq__(self, other):
        return isinstance(other, str) and bool(other)


ANY_TEXT = _AnyText("any text")


def test_an_overloaded_server_refuses_at_once(mlflow_server, registered_model, listings):
    """Over HTTP (uvicorn, in a thread of this process), while the test holds the model: the requests beyond the
    queue are answered 429 while the admitted ones still wait, and those are priced once the model is let go."""
    import uvicorn

    mlflow.set_tracking_uri(mlflow_server)
    app = serve.ServingApp(f"models:/{registered_model}@prod", cache=tempfile.mkdtemp(prefix="serve-cache-"),
                           max_queue=2)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(f"{url}/ping")
        batch = predict.payload(listings.head(20))
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            app.predicting.acquire()  # the model is held: an admitted request waits for it
            try:
                answers = [pool.submit(requests.post, f"{url}/invocations", json=batch, timeout=120)
                           for _ in range(6)]
                first = concurrent.futures.as_completed(answers, timeout=60)
                refused = [next(first).result() for _ in range(4)]
                assert all(r.status_code == 429 and r.headers["retry-after"] == "1"
                           and r.json()["error_code"] == "TOO_MANY_REQUESTS" for r in refused)
                assert sum(not a.done() for a in answers) == 2  # still admitted, unanswered
                # Readiness says the pod is full, so Kubernetes routes new work elsewhere; liveness is unmoved.
                saturated = requests.get(f"{url}/ping", timeout=10)
                assert saturated.status_code == 503 and saturated.json()["error_code"] == "SATURATED"
                assert requests.get(f"{url}/health", timeout=10).status_code == 200
            finally:
                app.predicting.release()
            assert sorted(a.result(timeout=120).status_code for a in answers) == [200, 200, 429, 429, 429, 429]
        good(url, listings)
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_slow_clients_hold_no_slot(mlflow_server, registered_model, listings):
    """Eight clients that send headers and one byte of their body, and one that never finishes its headers: a
    normal request is still priced while they hang (the slots are taken only by read bodies), and the server's own
    deadline ends them: 408 for a body, a closed connection for headers."""
    process, url = start(mlflow_server, f"models:/{registered_model}@prod", "--max-queue", "2", "--read-seconds", "3")
    port = int(url.rsplit(":", 1)[1])
    slow = []
    try:
        ready(url, process)
        for _ in range(8):
            client = socket.create_connection(("127.0.0.1", port), timeout=60)
            client.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{")
            slow.append(client)
        headers_only = socket.create_connection(("127.0.0.1", port), timeout=60)
        headers_only.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):
            good(url, listings)
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200
        for client in slow:
            answer = read_all(client)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 3 s" in answer, answer[:300]
        assert read_all(headers_only) == b""  # closed without an answer: no request was made
        good(url, listings)
    finally:
        for client in slow:
            client.close()
        stop(process)


def test_a_request_on_its_way_when_the_server_stops_is_answered(mlflow_server, registered_model, listings):
    """SIGTERM while a client's connection is accepted but its request not yet read: the request is answered (then
    the connection closed and the server gone), not dropped with the connection (the soak found that)."""
    process, url = start(mlflow_server, f"models:/{registered_model}@prod", "--read-seconds", "60")
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(predict.payload(listings.head(1))).encode()
    try:
        ready(url, process)
        client = socket.create_connection(("127.0.0.1", port), timeout=60)
        client.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")  # on its way: the headers not complete
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200  # accepted: the one before this one
        os.killpg(process.pid, signal.SIGTERM)
        # Once nothing more is accepted, uvicorn has asked every open connection to close (in the same step).
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                time.sleep(0.05)
            except ConnectionRefusedError:
                break
        client.sendall(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = read_all(client)  # to the end: the server closes the connection after the answer
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["predictions"]
        assert process.wait(timeout=30) is not None
    finally:
        if process.poll() is None:
            stop(process)


def read_all(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("leaves", [True, False])
def test_a_request_whose_client_left_before_its_turn_is_not_computed(registered_model, mlflow_server, listings,
                                                                     leaves, caplog):
    """The app itself, with a real model, while another prediction holds the model: the client leaves (or
    stays) meanwhile."""
    mlflow.set_tracking_uri(mlflow_server)
    app = serve.ServingApp(f"models:/{registered_model}/1")
    app.model, app.profile = saved_model.load_model(f"models:/{registered_model}/1", "test")
    body = json.dumps(predict.payload(listings.head(3))).encode()
    scope = {"type": "http", "path": "/invocations", "method": "POST", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    sent = []

    async def scenario():
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        left = asyncio.Event()

        async def receive():
            if incoming:
                return incoming.pop(0)
            if leaves:
                left.set()
                return {"type": "http.disconnect"}
            await asyncio.Event().wait()  # the client waits for its answer

        async def send(message):
            sent.append(message)

        app.predicting.acquire()  # another request's prediction
        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.3)
        app.predicting.release()
        await task
        return left.is_set()

    with caplog.at_level(logging.INFO, logger="serve"):
        assert asyncio.run(scenario()) == leaves
    if leaves:
        assert sent == [] and "client left before its turn: 3 rows not priced" in caplog.text
    else:
        assert sent[0]["status"] == 200 and len(json.loads(sent[1]["body"])["predictions"]) == 3


def test_the_version_named_at_start_is_served_whatever_prod_is(server, mlflow_server, registered_model, listings):
    process, url = start(mlflow_server, f"models:/{registered_model}@prod", "--version", "2")
    try:
        ready(url, process)
        assert post(url, json=predict.payload(listings.head(1))).headers["x-model-version"] == "2"
        assert requests.get(url + "/version", timeout=5).json()["version"] == "2"
    finally:
        stop(process)


def test_a_pickled_model_is_refused_with_a_clear_message(mlflow_server, listings):
    mlflow.set_tracking_uri(mlflow_server)
    name = f"pickled-{uuid.uuid4().hex[:6]}"
    fitted = model.fit(listings.head(500), model.ModelParams(learner="random_forest", n_estimators=2, seed=1))
    with mlflow.start_run(), saved_model.feature_code(fitted) as code:
        mlflow.sklearn.log_model(fitted, name="model", code_paths=[code], registered_model_name=name,
                                 serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_CLOUDPICKLE)
    with pytest.raises(StepError, match=r"serve: model: the model at .* is saved as cloudpickle, which can run any "
                                        r"code when loaded: refused"):
        saved_model.load_model(f"models:/{name}/1", "serve")
    process, url = start(mlflow_server, f"models:/{name}/1")
    try:
        answer = wait_until(f"{url}/ping", ok=lambda r: "refused" in r.text, process=process, timeout=60)
        assert answer.status_code == 503 and "saved as cloudpickle" in answer.json()["message"]
    finally:
        stop(process)


def test_serving_rides_out_an_mlflow_outage(own_server, listings, tmp_path):
    """Up while MLflow goes away: answers. Restarted during the outage: serves its cached model. Started during the
    outage with nothing cached: 503 saying why, then ready once MLflow is back."""
    name = f"outage-{uuid.uuid4().hex[:6]}"
    register_small(name, listings)
    MlflowClient().set_registered_model_alias(name, "prod", "1")
    cache, uri = tmp_path / "cache", own_server["uri"]
    first, url = start(uri, f"models:/{name}@prod", "--version", "1", "--cache", str(cache))
    servers = [first]
    try:
        ready(url, first)
        own_server["down"]()
        good(url, listings)
        again, again_url = start(uri, f"models:/{name}@prod", "--version", "1", "--cache", str(cache))
        servers.append(again)
        ready(again_url, again)
        good(again_url, listings)
        empty, empty_url = start(uri, f"models:/{name}@prod", "--cache", str(tmp_path / "empty"))
        servers.append(empty)
        waiting = wait_until(f"{empty_url}/ping", ok=lambda r: "does not answer" in r.text, process=empty, timeout=60)
        assert waiting.status_code == 503 and waiting.headers["retry-after"] == "5"
        assert f"'{name}'@prod is not in the cache" in waiting.json()["message"]
        assert post(empty_url, json=predict.payload(listings.head(1))).status_code == 503
        own_server["up"]()
        ready(empty_url, empty)
        assert post(empty_url, json=predict.payload(listings.head(1))).headers["x-model-version"] == "1"
        # The server reset: its new version 1 is another model, and the cached copy of the old one is not served.
        own_server["down"]()
        own_server["up"](reset=True)
        register_small(name, listings)
        run_id = MlflowClient().get_model_version(name, "1").run_id
        later, later_url = start(uri, f"models:/{name}@prod", "--version", "1", "--cache", str(cache))
        servers.append(later)
        ready(later_url, later)
        [stamp] = cache.glob(f"*/{name}/1/{serve.STAMP}")
        assert stamp.read_text().split()[0] == run_id
    finally:
        for process in servers:
            stop(process)


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
    assert lines[0] == f"model version 1 at {server}; ranges hold 80% of prices:" and len(lines) == 4
    assert all(re.match(r"  \$ *[0-9.]+  \$[0-9]+ to \$[0-9]+ ", line) and "listed at $" in line for line in lines[1:])


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


@pytest.mark.parametrize("status, message, through", [
    (200, "patched deployment serving/rental-price-serve: rental-price/model-version=4, pods roll to it", "api"),
    (403, "did not roll deployment serving/rental-price-serve (403 Forbidden): its pods load version 4 when they "
          "next start (make serve)", "api"),
    (200, "patched deployment serving/rental-price-serve: rental-price/model-version=4, pods roll to it",
     "kubeconfig"),
])
def test_roll_serving_patches_the_deployment_annotation(monkeypatch, tmp_path, status, message, through):
    """Against a local HTTP server standing in for the Kubernetes API: the exact request the pod (or make
    promote-cluster, through a kubeconfig context) would send.

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
        host = f"http://127.0.0.1:{api_server.server_port}"
        monkeypatch.setenv("SERVING_NAMESPACE", "serving")
        if through == "api":
            result = rollout.roll_serving("4", api=client.AppsV1Api(client.ApiClient(client.Configuration(host=host))))
        else:
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "other",
                "clusters": [{"name": "kind", "cluster": {"server": host}}, {"name": "x", "cluster": {"server": "http://x"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "kind-ci", "context": {"cluster": "kind", "user": "u"}},
                             {"name": "other", "context": {"cluster": "x", "user": "u"}}]}))
            monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
            result = rollout.roll_serving("4", context="kind-ci")
    finally:
        api_server.shutdown()
    assert result == message
    assert seen["path"] == "/apis/apps/v1/namespaces/serving/deployments/rental-price-serve"
    assert seen["type"] == "application/strategic-merge-patch+json"
    assert seen["body"] == {"spec": {"template": {"metadata": {"annotations": {rollout.ANNOTATION: "4"}}}}}


@pytest.mark.server  # starts MLflow's basic-auth app itself
def test_the_cluster_s_mlflow_auth_refuses_strangers_and_admits_the_model_server(listings, tmp_path, monkeypatch):
    """MLflow's basic-auth app as manifests/mlflow/ configures it (its PostgreSQL swapped for SQLite): a request
    without a user gets 401, /health stays open for probes, and clients with the generated user work."""
    import configparser

    import yaml

    docs = yaml.safe_load_all((ROOT / "manifests" / "mlflow" / "mlflow.yaml").read_text())
    ini = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth")
    config = configparser.ConfigParser()
    config.read_string(ini["data"]["basic_auth.ini"])
    config["mlflow"]["database_uri"] = f"sqlite:///{tmp_path}/auth.db"
    with open(tmp_path / "basic_auth.ini", "w") as f:
        config.write(f)
    port, password = free_port(), uuid.uuid4().hex
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                               "--artifacts-destination", str(tmp_path / "art")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    processes = []
    try:
        wait_until(f"{uri}/health", process=server)
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(search, timeout=10).status_code == 401
        assert requests.get(search, auth=("admin", "wrong"), timeout=10).status_code == 401
        assert requests.get(search, auth=("admin", password), timeout=10).status_code == 200
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        mlflow.set_tracking_uri(uri)
        name = f"auth-{uuid.uuid4().hex[:6]}"
        register_small(name, listings)
        process, url = start(uri, f"models:/{name}/1")
        processes.append(process)
        ready(url, process)
        good(url, listings)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        stranger, stranger_url = start(uri, f"models:/{name}/1")
        processes.append(stranger)
        refused = wait_until(f"{stranger_url}/ping", ok=lambda r: "cannot serve" in r.text, process=stranger)
        assert refused.status_code == 503 and "401" in refused.json()["message"], refused.text
    finally:
        for process in processes:
            stop(process)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
