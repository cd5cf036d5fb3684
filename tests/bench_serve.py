"""Serving benchmark (`make bench-serve`): prints figures, asserts nothing.

Starts `python -m components.serve` on the production model, then measures on 127.0.0.1 only:
single-row latency p50/p99, requests per second and the share refused (429) with 1, 8 and 32 concurrent clients;
how fast refusals come; what 30 clients that give up after 1 s cost the next request; rows per second for
1,000-row batches; and beside them the same model's in-process `predict` (the floor), as ratios; then the
same requests with the inference log on, against it off.
"""

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time

import mlflow
import requests

from components import cities, inference_log, listings, model, names, predict, saved_model, sources
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
    parser.add_argument("--requests", type=int, default=200, help="single-row requests per client")
    args = parser.parse_args()

    name, alias, version = names.parse_model_uri(args.model)
    if alias:
        version = mlflow.tracking.MlflowClient().get_model_version_by_alias(name, alias).version
    uri = f"models:/{name}/{version}" if name else args.model
    rows, _ = listings.clean_listings(listings.parse_csv(sources.fetch(args.data)), cities.city())
    one, batch = predict.payload(rows.head(1)), predict.payload(rows.head(1000))

    # The floor: the same model in this process.
    sk_model, _ = saved_model.load_model(uri, "bench-serve")
    learner, estimator = sk_model.steps[-1]
    estimator = getattr(estimator, "point_", estimator)  # the price model inside its price range
    # A forest's n_jobs as saved, then the alternatives for comparison; the booster has no such setting.
    settings = dict.fromkeys([estimator.n_jobs, -1, 1]) if learner == "random_forest" else [None]
    saved = next(iter(settings))
    print(f"model {uri} (version {version}, {learner})" + (f"; n_jobs as saved: {saved}" if saved else ""))
    floor = {}
    for n_jobs in settings:
        if n_jobs is not None:
            estimator.n_jobs = n_jobs
        floor[n_jobs] = (statistics.median(timed(lambda: sk_model.predict(rows.head(1)[model.features_of(sk_model)]), 50)),
                         statistics.median(timed(lambda: sk_model.predict(rows.head(1000)[model.features_of(sk_model)]), 5)))
        print(f"in-process predict{f', n_jobs={n_jobs}' if n_jobs is not None else ''}: 1 row "
              f"{floor[n_jobs][0] * 1000:.1f} ms; 1,000 rows {floor[n_jobs][1] * 1000:.0f} ms "
              f"({1000 / floor[n_jobs][1]:,.0f} rows/s)")

    server, url = start(uri, args.workers)
    try:
        clients(url, one, 1, 10)  # warm-up
        floor_single, floor_batch = floor[saved]  # what the server runs
        print(f"server: {args.workers} worker(s)")
        for concurrency in (1, 8, 32):
            latencies, refused, rps = clients(url, one, concurrency, max(10, args.requests // concurrency))
            share = len(refused) / (len(refused) + len(latencies))
            print(f"  1 row, {concurrency} client(s): p50 {pct(latencies, 50):.1f} ms, p99 {pct(latencies, 99):.1f} ms, "
                  f"{rps:.0f} req/s, {share:.0%} refused (429)"
                  + (f" in p50 {pct(refused, 50):.1f} ms, p99 {pct(refused, 99):.1f} ms" if refused else "")
                  + f"; p50 / in-process = {pct(latencies, 50) / 1000 / floor_single:.1f}x")
        print(f"  after 30 clients sent 1,000 rows each and gave up after 1 s, the next 1-row request took "
              f"{abandoned(url, batch, 30, one) * 1000:.0f} ms (one batch takes {floor[saved][1] * 1000:.0f} ms)")
        latencies, _, _ = clients(url, batch, 1, 10)
        median = statistics.median(latencies)
        print(f"  1,000-row batches: {1000 / median:,.0f} rows/s (median {median * 1000:.0f} ms); "
              f"server / in-process time = {median / floor_batch:.2f}x")
        without = (pct(clients(url, one, 1, args.requests)[0], 50), statistics.median(clients(url, batch, 1, 10)[0]))
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
        rows = len(inference_log.read_log(folder))
    print(f"with the inference log on ({rows:,} rows logged): 1 row p50 {logged[0]:.1f} ms against {without[0]:.1f} ms "
          f"({logged[0] / without[0]:.2f}x); 1,000-row batch median {logged[1] * 1000:.0f} ms against "
          f"{without[1] * 1000:.0f} ms ({logged[1] / without[1]:.2f}x)")


def start(uri: str, workers: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "components.serve", "--model", uri, "--port", str(port),
                               "--workers", str(workers), *extra], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(f"http://127.0.0.1:{port}/ping", process=server, timeout=180)
    except Exception:
        os.killpg(server.pid, 15)
        raise
    return server, f"http://127.0.0.1:{port}/invocations"


if __name__ == "__main__":
    main()
