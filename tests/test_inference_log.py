"""The model server's inference log: written off the request path, rotated, bounded, to a folder or S3 (moto's
server standing in for MinIO), read back for a period; and end to end, `make serve-local` with the log on, a few
hundred requests, then `make monitor` on the log."""

import datetime
import gzip
import json
import os
import re
import signal
import subprocess
import threading
import time

import boto3
import pandas as pd
import pytest
import requests
from conftest import ROOT, free_port, run_pipeline, wait_until
from test_sources import s3_endpoint  # noqa: F401  (a fixture)

from components import inference_log, listings, predict, sources
from components.cities import city
from components.errors import StepError
from components.inference_log import InferenceLog


def typed(sample: pd.DataFrame) -> pd.DataFrame:
    """Rows as check_inputs types them: numbers as floats, dates as datetimes."""
    rows = sample.drop(columns=["price", "host_name"]).reset_index(drop=True)
    return rows.assign(last_review=pd.to_datetime(rows["last_review"]))


def parts(folder) -> list:
    return sorted(folder.glob(inference_log.PART_GLOB))


def test_rows_are_logged_as_sent_with_price_version_and_time_and_read_back_as_listings(tmp_path, sample):
    rows = sample.head(5).reset_index(drop=True)
    log = InferenceLog(str(tmp_path))
    log.record(rows, typed(rows), [100.0, 101.0, 102.0, 103.0, 104.0], "7")
    log.close()
    [part] = parts(tmp_path)
    lines = [json.loads(line) for line in gzip.decompress(part.read_bytes()).splitlines()]
    assert [line["predicted_price"] for line in lines] == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert {line["model_version"] for line in lines} == {"7"} and len({line["request_id"] for line in lines}) == 1
    assert [line["id"] for line in lines] == rows["id"].astype(int).tolist()  # exact, not via a float
    assert lines[0]["last_review"] == str(rows["last_review"][0])[:10]
    # As listings: clean reads them (no prices: questions, not listings), nothing dropped as unreadable.
    raw = sources.fetch(str(tmp_path), log_hours=1)
    df, dropped = listings.clean_listings(listings.parse_csv(raw), city(), keep_unpriced=True)
    assert len(df) == 5 and dropped["unreadable"] == 0 and df["price"].isna().all()
    assert df["name"].tolist() == rows["name"].tolist()


def test_parts_rotate_by_size_and_the_oldest_go_past_the_bound(tmp_path, sample):
    rows = sample.head(50).reset_index(drop=True)
    log = InferenceLog(str(tmp_path), part_bytes=20_000, keep_bytes=30_000)
    for _ in range(12):
        log.record(rows, typed(rows), [1.0] * 50, "1")
    log.close()
    kept = parts(tmp_path)
    assert 1 < len(kept) < 12 and sum(p.stat().st_size for p in kept) <= 30_000  # one part per request, oldest gone
    assert not list(tmp_path.glob(".writing-*"))  # every part closed
    assert len(inference_log.read_log(str(tmp_path))) == 50 * len(kept)


def test_a_period_reads_only_its_rows(tmp_path, sample):
    rows = sample.head(3).reset_index(drop=True)
    log = InferenceLog(str(tmp_path))
    log.record(rows, typed(rows), [1.0, 2.0, 3.0], "1")
    log.close()
    now = datetime.datetime.now(datetime.timezone.utc)
    assert len(inference_log.read_log(str(tmp_path), hours=1, now=now)) == 3
    assert inference_log.read_log(str(tmp_path), hours=1, now=now + datetime.timedelta(hours=2)).empty
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepError, match="download: source: the inference log at .* has no rows in the last 1 hours"):
        sources.fetch(str(tmp_path / "empty"), 1)


def test_recording_never_waits_for_the_writer(tmp_path, sample, monkeypatch):
    rows = sample.head(2).reset_index(drop=True)
    stuck = threading.Event()
    log = InferenceLog(str(tmp_path), queue_requests=2)
    monkeypatch.setattr(log, "_write", lambda *item: stuck.wait(30))  # a writer that has stalled (a slow disk)
    started = time.monotonic()
    for _ in range(50):
        log.record(rows, typed(rows), [1.0, 2.0], "1")
    assert time.monotonic() - started < 5  # 50 calls against a stalled writer return: none waited for it
    assert log.dropped >= 2 * (50 - 3)  # the queue holds 2, the writer holds 1: the rest were counted, not kept
    stuck.set()
    log.close()


def test_parts_go_to_s3_and_are_read_back_from_there(tmp_path, sample, s3_endpoint):  # noqa: F811
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="inference-log")
    rows = sample.head(4).reset_index(drop=True)
    log = InferenceLog("s3://inference-log/serving/")
    log.record(rows, typed(rows), [1.0, 2.0, 3.0, 4.0], "2")
    log.close()
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint)
            .list_objects_v2(Bucket="inference-log")["Contents"]]
    assert len(keys) == 1 and keys[0].startswith("serving/inference-") and not list(log.folder.iterdir())
    assert inference_log.read_log("s3://inference-log/serving/")["predicted_price"].tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="a prefix ending in /"):
        InferenceLog("s3://inference-log/serving")
    # A bucket that is not there: the parts wait here, and the oldest go past the bound.
    waiting = InferenceLog("s3://no-such-bucket/serving/", part_bytes=1, keep_bytes=3_000)
    for _ in range(10):
        waiting.record(rows, typed(rows), [1.0, 2.0, 3.0, 4.0], "2")
    waiting.close()
    kept = parts(waiting.folder)
    assert 0 < len(kept) < 10 and sum(p.stat().st_size for p in kept) <= 3_000


@pytest.mark.server
def test_make_serve_local_logs_requests_and_make_monitor_gives_a_verdict_on_the_log(mlflow_server, tmp_path, sample):
    """A prod trained by the pipeline, served with the log on; then its requests are monitored, ordinary ones and
    ones all of a single kind of listing."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "inference-log",
           "MODEL_NAME": "inference-log", "PARAMS": "model_name=inference-log"}
    trained = run_pipeline(mlflow_server, "inference-log", tmp_path / "runs", "training", "model_name=inference-log")
    assert trained.returncode == 0, trained.stdout + trained.stderr

    def serve_and_ask(folder, asked: pd.DataFrame) -> None:
        port = free_port()
        server = subprocess.Popen(["make", "--no-print-directory", "serve-local", f"PORT={port}",
                                   f"INFERENCE_LOG={folder}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            wait_until(f"http://127.0.0.1:{port}/ping", process=server)
            for start in range(0, len(asked), 4):  # a few hundred rows, a few at a time, as clients ask
                answer = requests.post(f"http://127.0.0.1:{port}/invocations?flag=true",
                                       json=predict.payload(asked.iloc[start:start + 4]), timeout=60)
                assert answer.ok, answer.text
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the server closes its last part as it stops
            output = server.communicate(timeout=60)[0]
        assert parts(folder), output

    asked = sample.sample(frac=1, random_state=5)
    ordinary = asked.head(400)
    serve_and_ask(tmp_path / "log", ordinary)
    assert len(inference_log.read_log(str(tmp_path / "log"))) == 400

    def monitor(folder) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", "monitor", f"DATA_URL={folder}", "LOG_HOURS=1"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    judged = monitor(tmp_path / "log")
    assert judged.returncode == 0, judged.stdout + judged.stderr
    last = judged.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: ok: ") or last.startswith("verdict: shifted: "), judged.stdout
    assert "none of the 400 rows has a price" in judged.stdout
    report = re.search(r"drift report +(\S+)", judged.stdout)[1]
    assert re.search(r"Verdict: (ok|shifted): ", open(report).read()), report

    # Requests for one kind of listing only: the model meets other data than it learned from, and says so.
    pricey = asked[(asked["room_type"] == "Entire home/apt") & (asked["neighbourhood_group"] == "Manhattan")].head(400)
    serve_and_ask(tmp_path / "manhattan", pricey)
    judged = monitor(tmp_path / "manhattan")
    assert judged.returncode == 0, judged.stdout + judged.stderr
    last = judged.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: shifted: ") and "room_type" in last and "predicted price" in last, last
