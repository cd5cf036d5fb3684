"""Where listings come from: local files, http (with its retries), S3 (moto's server standing in for MinIO), the
shipped sample; parsing what may not be a listings CSV; sources shown without credentials."""

import functools
import http.server
import threading

import boto3
import pytest
from conftest import ROOT

from components import listings, sources
from components.errors import StepError


def test_fetch_reads_local_path_and_file_uri(tmp_path):
    path = tmp_path / "listings.csv"
    path.write_bytes(b"a,b\n1,2\n")
    assert sources.fetch(str(path)) == b"a,b\n1,2\n"
    assert sources.fetch(path.as_uri()) == b"a,b\n1,2\n"


def test_fetch_reads_http(tmp_path):
    (tmp_path / "listings.csv").write_bytes(b"a,b\n1,2\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert sources.fetch(f"http://127.0.0.1:{server.server_port}/listings.csv") == b"a,b\n1,2\n"
        with pytest.raises(StepError, match="download: source: cannot read .*404"):
            sources.fetch(f"http://127.0.0.1:{server.server_port}/missing.csv")
    finally:
        server.shutdown()


def test_fetch_retries_what_may_pass_and_fails_at_once_on_what_will_not(monkeypatch):
    """503 twice, then the file: read. 404: one request, then the error."""
    monkeypatch.setattr(sources.time, "sleep", lambda seconds: None)
    seen = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            code = 404 if self.path == "/gone.csv" else (503 if len(seen) < 3 else 200)
            self.send_response(code)
            self.end_headers()
            if code == 200:
                self.wfile.write(b"a,b\n1,2\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert sources.fetch(f"http://127.0.0.1:{server.server_port}/x.csv") == b"a,b\n1,2\n"
        assert seen == ["/x.csv"] * 3
        seen.clear()
        with pytest.raises(StepError, match="download: source: cannot read .*HTTP Error 404"):
            sources.fetch(f"http://127.0.0.1:{server.server_port}/gone.csv")
        assert seen == ["/gone.csv"]
    finally:
        server.shutdown()


@pytest.fixture
def s3_endpoint(monkeypatch):
    """moto's S3 server, standing in for MinIO (both speak the S3 API), with the environment pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    for name, value in {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    yield endpoint
    server.stop()


def test_fetch_reads_s3_from_an_s3_compatible_endpoint(s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="raw")
    s3.put_object(Bucket="raw", Key="nyc/listings.csv", Body=b"a,b\n1,2\n")
    assert sources.fetch("s3://raw/nyc/listings.csv") == b"a,b\n1,2\n"
    with pytest.raises(StepError, match="download: source: cannot read 's3://raw/nope.csv'"):
        sources.fetch("s3://raw/nope.csv")


def test_the_default_source_is_the_shipped_sample_byte_for_byte(sample_path):
    """The offline default: the shared sample's exact bytes, gzipped inside the package."""
    assert sources.DEFAULT_SOURCE == "sample://nyc_airbnb_sample1.csv.gz"
    assert sources.fetch(sources.DEFAULT_SOURCE) == sample_path.read_bytes()
    assert sources.read_source(sources.DEFAULT_SOURCE)[:2] == b"\x1f\x8b"  # shipped compressed
    assert sources.PUBLIC_SOURCE in (ROOT / "README.md").read_text()  # where it came from, one DATA_URL= away


def test_fetch_gunzips_any_gzip_source_and_names_a_broken_one(tmp_path):
    import gzip

    (tmp_path / "l.csv.gz").write_bytes(gzip.compress(b"a,b\n1,2\n"))
    assert sources.fetch(str(tmp_path / "l.csv.gz")) == b"a,b\n1,2\n"
    whole = gzip.compress("".join(f"{i},{i * i}\n" for i in range(1000)).encode())
    (tmp_path / "broken.csv.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StepError, match="download: source: .*broken.csv.gz' is a broken gzip file"):
        sources.fetch(str(tmp_path / "broken.csv.gz"))


def test_an_unknown_sample_is_named_with_the_shipped_ones():
    with pytest.raises(StepError, match=r"download: source: no shipped sample 'paris.csv' \(shipped: "
                                        r"\['nyc_airbnb_sample1.csv.gz'\]\)"):
        sources.fetch("sample://paris.csv")


def test_seed_data_copies_the_sample_to_s3_as_stored(s3_endpoint, capsys):
    import pipeline

    with pytest.raises(SystemExit, match="seed-data: --to: cannot write s3://data/nyc_airbnb_sample1.csv.gz: "
                                         ".*NoSuchBucket"):
        pipeline.main(["seed-data"])
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data")
    assert pipeline.main(["seed-data"]) == 0
    assert "copied sample://nyc_airbnb_sample1.csv.gz to s3://data/nyc_airbnb_sample1.csv.gz" in \
        capsys.readouterr().out
    assert sources.read_source(sources.CLUSTER_SOURCE) == sources.read_source(sources.DEFAULT_SOURCE)
    assert sources.fetch(sources.CLUSTER_SOURCE) == sources.fetch(sources.DEFAULT_SOURCE)
    with pytest.raises(SystemExit, match="seed-data: --to: expected s3://bucket/key, got 'data/x.csv'"):
        pipeline.main(["seed-data", "--to", "data/x.csv"])


def test_fetch_names_a_missing_source(tmp_path):
    with pytest.raises(StepError, match="download: source: cannot read .*nope.csv.*No such file"):
        sources.fetch(str(tmp_path / "nope.csv"))
    with pytest.raises(StepError, match="download: source: no source given"):
        sources.fetch("")


@pytest.mark.parametrize("raw, problem", [
    (b"", "the file is empty"),
    (b"  \n\n", "the file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a readable CSV file"),
    (b"just one column\n1\n2\n", "not a CSV table: found 1 column"),
    (",".join(listings.REQUIRED).encode() + b"\n", "the CSV has a header but no rows"),
])
def test_parse_csv_rejects_what_is_not_a_listings_csv(raw, problem):
    with pytest.raises(StepError, match=f"download: source: {problem}"):
        listings.parse_csv(raw)


def test_describe_download_on_the_real_sample(sample_path):
    raw = sample_path.read_bytes()
    meta = sources.describe_download(str(sample_path), raw, len(listings.parse_csv(raw)))
    assert meta["rows"] == 20_000
    assert meta["sha256"] == "5c92c8f30e288f2c696c00882c169d9e1dc8ebbf1cf83d17bd7ee903a7148b4d"
    assert meta["bytes"] == len(raw)


@pytest.mark.parametrize("source, shown", [
    ("https://bucket.s3.amazonaws.com/l.csv?X-Amz-Credential=AKIA&X-Amz-Signature=abc#x",
     "https://bucket.s3.amazonaws.com/l.csv"),
    ("https://ann:s3cret@example.org:8443/data/l.csv.gz", "https://example.org:8443/data/l.csv.gz"),
    ("s3://data/listings.csv", "s3://data/listings.csv"),
    ("sample://nyc_airbnb_sample1.csv.gz", "sample://nyc_airbnb_sample1.csv.gz"),
    ("/data/listings.csv", "/data/listings.csv"),
])
def test_sources_are_shown_without_credentials(source, shown):
    assert sources.shown_source(source) == shown
