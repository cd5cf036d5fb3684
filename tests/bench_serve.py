"""Serving benchmark (`make bench-serve`): prints figures, asserts nothing.

First the floor: the production model in this process, through scikit-learn and through its fast path
(components/fast_path.py), for 1 row and 10,000 rows, and the input checks of 1 row. Then it starts
`python -m components.serve` (with --workers, then with 2) and measures on 127.0.0.1 only: single-row latency
p50/p99, requests per second and the share refused (429) with 1, 8 and 32 concurrent clients, beside the floor; a
request's time while 8 slow clients hold connections; what 30 clients that give up after 1 s cost the next
request; rows per second for 1,000- and 10,000-row batches; then the same requests with the inference log on,
against it off. The clients share the machine's two cores with the server.
"""

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import mlflow
import pandas as pd
import requests

from components import cities, fast_path, inference_log, listings, model, names, predict, saved_model, serve, sources
from conftest import free_port, wait_until  # tests/ is this script's folder


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def clients(url: str, body: dict, concurrency: int, requests_each: int) -> tuple[list[float], list[float], float]:
    """(latencies of answered requests, latencies of refused ones, answered requests per second)."""
    def one_client(_):
        answered, refused = [], []
        with requests.Session() as session:
            for _ in range(requests_each):
                started = time.perf_counter()
                response = session.post(url, json=body, timeout=60)
                took = time.perf_counter() - started
                if response.status_code == 429:
                    refused.append(took)
                else:
                    response.raise_for_status()
                    answered.append(took)
        return answered, refused

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one_client, range(concurrency)))
    answered = [t for a, _ in results for t in a]
    return answered, [t for _, r in results for t in r], len(answered) / (time.perf_counter() - started)


def abandoned(url: str, body: dict, count: int, one: dict) -> float:
    """Seconds the next request waits after `count` clients sent `body` and gave up after 1 s."""
    def give_up(_):
        try:
            requests.post(url, json=body, timeout=1)
        except requests.RequestException:
            pass

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(give_up, range(count)))
    started = time.perf_counter()
    requests.post(url, json=one, timeout=120).raise_for_status()
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 else values[0] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models:/rental-price@prod")
    parser.add_argument("--data", default=sources.DEFAULT_SOURCE, help="listings CSV to take requests from")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--requests", type=int, default=400, help="single-row requests per client")
    args = parser.parse_args()

    name, alias, version = names.parse_model_uri(args.model)
    if alias:
        version = mlflow.tracking.MlflowClient().get_model_version_by_alias(name, alias).version
    uri = f"models:/{name}/{version}" if name else args.model
    rows, _ = listings.clean_listings(listings.parse_csv(sources.fetch(args.data)), cities.city())
    many = pd.concat([rows] * (10_000 // len(rows) + 1)).head(10_000)
    one, batch, big = predict.payload(rows.head(1)), predict.payload(rows.head(1000)), predict.payload(many)

    # The floor: the same model in this process, through scikit-learn and through its fast path.
    sk_model, profile = saved_model.load_model(uri, "bench-serve")
    learner = sk_model.steps[-1][0]
    fast = fast_path.compile_model(sk_model)
    print(f"model {uri} (version {version}, {learner}); fast path: {'yes' if fast else fast_path.why_not(sk_model)}")
    single, typed_many = model.check_inputs(rows.head(1), profile)[0], model.check_inputs(many, profile)[0]
    one_body = json.dumps(one).encode()
    columns = model.typed_inputs(serve.parse_rows(one_body), profile)[0]
    # As the server checks a request: its body read into columns, then checked.
    figures = {"checks": statistics.median(timed(lambda: model.typed_inputs(serve.parse_rows(one_body), profile), 200))}
    def through_sklearn(x):  # a model saved before ranges has none: its price alone
        return model.price_ranges(sk_model, x) if hasattr(sk_model[-1], "predict_range") else sk_model.predict(x)

    for label, score, source in [("scikit-learn", through_sklearn, single),
                                 ("fast path", lambda x: fast.price_ranges(x), columns)]:
        if label == "fast path" and fast is None:
            continue
        score(source)
        one_row = statistics.median(timed(lambda: score(source), 200 if fast else 50))
        ten_k = statistics.median(timed(lambda: score(typed_many), 21 if label == "fast path" else 5))
        figures[label] = one_row
        print(f"in-process, {label}: 1 row p50 {one_row * 1000:.2f} ms; 10,000 rows {ten_k * 1000:.0f} ms "
              f"({10_000 / ten_k:,.0f} rows/s)")
    print(f"in-process input checks of 1 row (its body parsed and checked): {figures['checks'] * 1000:.2f} ms")
    floor = figures.get("fast path", figures["scikit-learn"]) + figures["checks"]

    for workers in dict.fromkeys([args.workers, 2]):
        server, url = start(uri, workers)
        try:
            clients(url, one, 1, 20)  # warm-up
            print(f"server: {workers} worker(s)")
            for concurrency in (1, 8, 32):
                latencies, refused, rps = clients(url, one, concurrency, max(20, args.requests // concurrency))
                share = len(refused) / (len(refused) + len(latencies))
                print(f"  1 row, {concurrency} client(s): p50 {pct(latencies, 50):.1f} ms, p99 {pct(latencies, 99):.1f} "
                      f"ms, {rps:.0f} req/s, {share:.0%} refused (429)"
                      + (f" in p50 {pct(refused, 50):.1f} ms, p99 {pct(refused, 99):.1f} ms" if refused else "")
                      + f"; p50 / in-process checks and scoring = {pct(latencies, 50) / 1000 / floor:.1f}x")
            if workers != args.workers:
                continue
            print(f"  with 8 slow clients holding connections (headers and 1 byte of the body), a 1-row request "
                  f"took {slow_clients(url, one, 8) * 1000:.0f} ms")
            print(f"  after 30 clients sent 1,000 rows each and gave up after 1 s, the next 1-row request took "
                  f"{abandoned(url, batch, 30, one) * 1000:.0f} ms")
            for label, body, n in [("1,000-row", batch, 1000), ("10,000-row", big, 10_000)]:
                # Rows outside what prod was trained on are priced and flagged, not refused.
                median = statistics.median(clients(f"{url}?flag=true", body, 1, 5)[0])
                print(f"  {label} batches: {n / median:,.0f} rows/s (median {median * 1000:.0f} ms)")
            without = (pct(clients(url, one, 1, args.requests)[0], 50),
                       statistics.median(clients(url, batch, 1, 10)[0]))
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    with tempfile.TemporaryDirectory() as folder:  # the same, with every priced row logged
        server, url = start(uri, args.workers, "--inference-log", folder)
        try:
            clients(url, one, 1, 10)
            logged = (pct(clients(url, one, 1, args.requests)[0], 50), statistics.median(clients(url, batch, 1, 10)[0]))
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        logged_rows = len(inference_log.read_log(folder))
    print(f"with the inference log on ({logged_rows:,} rows logged): 1 row p50 {logged[0]:.1f} ms against "
          f"{without[0]:.1f} ms ({logged[0] / without[0]:.2f}x); 1,000-row batch median {logged[1] * 1000:.0f} ms "
          f"against {without[1] * 1000:.0f} ms ({logged[1] / without[1]:.2f}x)")


def slow_clients(url: str, one: dict, count: int) -> float:
    """Seconds a 1-row request takes while `count` connections hold a request whose body never comes."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    held = []
    try:
        for _ in range(count):
            client = socket.create_connection((host, int(port)), timeout=60)
            client.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{")
            held.append(client)
        started = time.perf_counter()
        requests.post(url, json=one, timeout=60).raise_for_status()
        return time.perf_counter() - started
    finally:
        for client in held:
            client.close()


def start(uri: str, workers: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "components.serve", "--model", uri, "--port", str(port),
                               "--workers", str(workers), *extra], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(20):  # each worker loads its own model: ready when 20 answers in a row say so
            wait_until(f"http://127.0.0.1:{port}/ping", process=server, timeout=180)
    except Exception:
        os.killpg(server.pid, 15)
        raise
    return server, f"http://127.0.0.1:{port}/invocations"


if __name__ == "__main__":
    main()
