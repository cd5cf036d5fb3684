"""Where listings come from: the shipped sample, http(s), s3:// (MinIO) and local files; and the download step."""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow

from components import inference_log, listings, tracking
from components.errors import StepError

# The default data: 20,000 real NYC listings of 2019, shipped gzipped in components/sample/ so that the pipeline
# runs with no network. `sample://NAME` names a file there, inside any image or checkout of the project.
SAMPLE_SCHEME = "sample://"
SAMPLE_FILE = "nyc_airbnb_sample1.csv.gz"
DEFAULT_SOURCE = SAMPLE_SCHEME + SAMPLE_FILE
# Where that sample was first published (the same bytes, uncompressed): one DATA_URL= away.
PUBLIC_SOURCE = (
    "https://raw.githubusercontent.com/udacity/build-ml-pipeline-for-short-term-rental-prices/"
    "main/components/get_data/data/sample1.csv"
)
# In the cluster the default data enters through MinIO: `make deploy` puts the sample there.
CLUSTER_SOURCE = "s3://data/" + SAMPLE_FILE


def shown_source(source: str) -> str:
    """`source` as it may be logged, tagged and printed: without a user, password, query or fragment (the query of a
    presigned URL is a credential)."""
    parts = urllib.parse.urlsplit(source)
    if not parts.scheme or not (parts.netloc or parts.query or parts.fragment):
        return source
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def fetch(source: str, log_hours: float = 0.0) -> bytes:
    """The CSV bytes at `source` (sample://, http(s)://, s3://bucket/key, file:// or a local path), gunzipped
    when the file is gzip. A folder (a local directory, an s3:// prefix ending in /) is a model server's inference
    log: its rows of the last `log_hours` (0: all) as listings."""
    if inference_log.is_log(source):
        return read_inference_log(source, log_hours)
    raw = read_source(source)
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise StepError("download", "source", f"{shown_source(source)!r} is a broken gzip file: {exc}") from exc


def read_inference_log(source: str, hours: float) -> bytes:
    try:
        rows = inference_log.read_log(source, hours)
    except Exception as exc:  # every transport has its own error types; the message is what matters
        raise StepError("download", "source", f"cannot read the inference log at {shown_source(source)!r}: "
                                              f"{exc}") from exc
    if rows.empty:
        period = f" in the last {hours:g} hours" if hours > 0 else ""
        raise StepError("download", "source", f"the inference log at {shown_source(source)!r} has no rows{period} "
                                              "(is the model server writing it? serve --inference-log)")
    return inference_log.as_listings(rows)


def read_source(source: str) -> bytes:
    """The bytes at `source` as stored."""
    if not source:
        raise StepError("download", "source", "no source given")
    scheme = urllib.parse.urlparse(source).scheme
    try:
        if source.startswith(SAMPLE_SCHEME):
            return _sample_path(source).read_bytes()
        if scheme in ("http", "https"):
            return _fetch_http(source)
        if scheme == "s3":
            bucket, key = _s3_location(source)
            return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        path = urllib.parse.urlparse(source).path if scheme == "file" else source
        return Path(path).read_bytes()
    except StepError:
        raise
    except Exception as exc:  # every transport has its own error types; the message is what matters
        raise StepError("download", "source", f"cannot read {shown_source(source)!r}: {exc}") from exc


def _fetch_http(url: str, tries: int = 3) -> bytes:
    """GET with a retry for what may pass (no answer, 5xx, 429); any other answer (404, 403) fails at once."""
    for attempt in range(1, tries + 1):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if attempt == tries or (exc.code < 500 and exc.code != 429):
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == tries:
                raise
        time.sleep(2 ** attempt)
    raise AssertionError("unreachable")


def _sample_path(source: str) -> Path:
    from importlib import resources

    folder = resources.files("components") / "sample"
    name = source.removeprefix(SAMPLE_SCHEME)
    shipped = sorted(p.name for p in folder.iterdir() if p.name.endswith((".csv", ".csv.gz")))
    if name not in shipped:
        raise StepError("download", "source", f"no shipped sample {name!r} (shipped: {shipped})")
    return Path(str(folder / name))


def _s3_location(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _s3_client():
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    # botocore's defaults (60 s to connect, 5 attempts) kept a step a minute or more on an object store that does not
    # answer: 3 attempts of 5 s to connect cover a restart, and a read that stalls 30 s will not pass by waiting.
    limits = Config(connect_timeout=5, read_timeout=30, retries={"mode": "standard", "max_attempts": 3})
    return boto3.client("s3", endpoint_url=endpoint or None, config=limits)


def upload_s3(raw: bytes, uri: str, step: str = "upload", field: str = "destination") -> None:
    """Put `raw` at s3://bucket/key (MinIO: S3_ENDPOINT_URL); the bucket must exist. Errors name the caller's `step`
    and `field`."""
    bucket, key = _s3_location(uri)
    if urllib.parse.urlparse(uri).scheme != "s3" or not bucket or not key:
        raise StepError(step, field, f"expected s3://bucket/key, got {uri!r}")
    try:
        _s3_client().put_object(Bucket=bucket, Key=key, Body=raw)
    except Exception as exc:  # botocore's many error types; the message is what matters
        raise StepError(step, field, f"cannot write {uri}: {exc}") from exc


def describe_download(source: str, raw: bytes, rows: int) -> dict:
    return {"source": shown_source(source), "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw), "rows": rows}


# ---------------------------------------------------------------- the download step

def download(source: str, out_path: str, expected_sha256: str = "", log_hours: float = 0.0) -> dict:
    """Fetch and parse the data; keep its bytes in MLflow once per sha256 (MinIO in the cluster), so that every
    model's lineage points at the exact data it came from."""
    with tracking.step_run("download", params={"source": shown_source(source), **(
            {"log_hours": log_hours} if inference_log.is_log(source) else {})}) as run:
        raw = fetch(source, log_hours)
        meta = describe_download(source, raw, len(listings.parse_csv(raw)))
        if expected_sha256 and meta["sha256"] != expected_sha256:
            raise StepError("download", "source", f"the data at {meta['source']!r} changed since this run started (sha256 "
                                                  f"{expected_sha256[:12]} then, {meta['sha256'][:12]} now): run again")
        Path(out_path).write_bytes(raw)
        mlflow.log_metrics({"rows": meta["rows"], "bytes": meta["bytes"]})
        mlflow.set_tag("sha256", meta["sha256"])
        meta["data_uri"] = tracking.raw_data_uri(meta["sha256"]) or keep_raw_data(raw, meta["sha256"], run.info.run_id)
        print(f"download: {meta['rows']} rows, sha256 {meta['sha256'][:12]}")
        return meta


def keep_raw_data(raw: bytes, sha256: str, run_id: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, f"{sha256}.csv.gz")
        path.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))  # level 9: 1.7x the time, 1 % smaller
        mlflow.log_artifact(str(path), "raw")
    mlflow.set_tag(tracking.RAW_DATA_TAG, sha256)
    return f"runs:/{run_id}/raw/{path.name}"
