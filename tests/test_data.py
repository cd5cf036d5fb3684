"""Code tests of the download, clean, check and split logic, on small frames built here."""

import dataclasses
import functools
import http.server
import threading

import boto3
import pandas as pd
import pytest
from conftest import ROOT, frame, listing

from components import data
from components.errors import StepError

NYC = data.city()


def nyc(**changes) -> data.City:
    return dataclasses.replace(NYC, **changes)


def clean_frame(*rows):
    df, _ = data.clean_listings(frame(*rows), NYC)
    return df


# ---------------------------------------------------------------- download

def test_fetch_reads_local_path_and_file_uri(tmp_path):
    path = tmp_path / "listings.csv"
    path.write_bytes(b"a,b\n1,2\n")
    assert data.fetch(str(path)) == b"a,b\n1,2\n"
    assert data.fetch(path.as_uri()) == b"a,b\n1,2\n"


def test_fetch_reads_http(tmp_path):
    (tmp_path / "listings.csv").write_bytes(b"a,b\n1,2\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert data.fetch(f"http://127.0.0.1:{server.server_port}/listings.csv") == b"a,b\n1,2\n"
        with pytest.raises(StepError, match="download: source: cannot read .*404"):
            data.fetch(f"http://127.0.0.1:{server.server_port}/missing.csv")
    finally:
        server.shutdown()


def test_fetch_retries_what_may_pass_and_fails_at_once_on_what_will_not(monkeypatch):
    """503 twice, then the file: read. 404: one request, then the error."""
    monkeypatch.setattr(data.time, "sleep", lambda seconds: None)
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
        assert data.fetch(f"http://127.0.0.1:{server.server_port}/x.csv") == b"a,b\n1,2\n"
        assert seen == ["/x.csv"] * 3
        seen.clear()
        with pytest.raises(StepError, match="download: source: cannot read .*HTTP Error 404"):
            data.fetch(f"http://127.0.0.1:{server.server_port}/gone.csv")
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
    assert data.fetch("s3://raw/nyc/listings.csv") == b"a,b\n1,2\n"
    with pytest.raises(StepError, match="download: source: cannot read 's3://raw/nope.csv'"):
        data.fetch("s3://raw/nope.csv")


def test_the_default_source_is_the_shipped_sample_byte_for_byte(sample_path):
    """The offline default: the shared sample's exact bytes, gzipped inside the package."""
    assert data.DEFAULT_SOURCE == "sample://nyc_airbnb_sample1.csv.gz"
    assert data.fetch(data.DEFAULT_SOURCE) == sample_path.read_bytes()
    assert data.read_source(data.DEFAULT_SOURCE)[:2] == b"\x1f\x8b"  # shipped compressed
    assert data.PUBLIC_SOURCE in (ROOT / "README.md").read_text()  # where it came from, one DATA_URL= away


def test_fetch_gunzips_any_gzip_source_and_names_a_broken_one(tmp_path):
    import gzip

    (tmp_path / "l.csv.gz").write_bytes(gzip.compress(b"a,b\n1,2\n"))
    assert data.fetch(str(tmp_path / "l.csv.gz")) == b"a,b\n1,2\n"
    whole = gzip.compress("".join(f"{i},{i * i}\n" for i in range(1000)).encode())
    (tmp_path / "broken.csv.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StepError, match="download: source: .*broken.csv.gz' is a broken gzip file"):
        data.fetch(str(tmp_path / "broken.csv.gz"))


def test_an_unknown_sample_is_named_with_the_shipped_ones():
    with pytest.raises(StepError, match=r"download: source: no shipped sample 'paris.csv' \(shipped: "
                                        r"\['nyc_airbnb_sample1.csv.gz'\]\)"):
        data.fetch("sample://paris.csv")


def test_seed_data_copies_the_sample_to_s3_as_stored(s3_endpoint, capsys):
    import pipeline

    with pytest.raises(SystemExit, match="seed-data: --to: cannot write s3://data/nyc_airbnb_sample1.csv.gz: "
                                         ".*NoSuchBucket"):
        pipeline.main(["seed-data"])
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data")
    assert pipeline.main(["seed-data"]) == 0
    assert "copied sample://nyc_airbnb_sample1.csv.gz to s3://data/nyc_airbnb_sample1.csv.gz" in \
        capsys.readouterr().out
    assert data.read_source(data.CLUSTER_SOURCE) == data.read_source(data.DEFAULT_SOURCE)
    assert data.fetch(data.CLUSTER_SOURCE) == data.fetch(data.DEFAULT_SOURCE)
    with pytest.raises(SystemExit, match="seed-data: --to: expected s3://bucket/key, got 'data/x.csv'"):
        pipeline.main(["seed-data", "--to", "data/x.csv"])


def test_fetch_names_a_missing_source(tmp_path):
    with pytest.raises(StepError, match="download: source: cannot read .*nope.csv.*No such file"):
        data.fetch(str(tmp_path / "nope.csv"))
    with pytest.raises(StepError, match="download: source: no source given"):
        data.fetch("")


@pytest.mark.parametrize("raw, problem", [
    (b"", "the file is empty"),
    (b"  \n\n", "the file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a readable CSV file"),
    (b"just one column\n1\n2\n", "not a CSV table: found 1 column"),
    (",".join(data.REQUIRED).encode() + b"\n", "the CSV has a header but no rows"),
])
def test_parse_csv_rejects_what_is_not_a_listings_csv(raw, problem):
    with pytest.raises(StepError, match=f"download: source: {problem}"):
        data.parse_csv(raw)


def test_describe_download_on_the_real_sample(sample_path):
    raw = sample_path.read_bytes()
    meta = data.describe_download(str(sample_path), raw, data.parse_csv(raw))
    assert meta["rows"] == 20_000
    assert meta["sha256"] == "5c92c8f30e288f2c696c00882c169d9e1dc8ebbf1cf83d17bd7ee903a7148b4d"
    assert meta["bytes"] == len(raw)


# ---------------------------------------------------------------- clean

def test_clean_counts_what_each_rule_drops():
    df, dropped = data.clean_listings(frame(
        listing(id=1, price=5), listing(id=2, price=351), listing(id=3, price=10), listing(id=4, price=350),
        listing(id=5, longitude=-75.0), listing(id=6, latitude=41.5), listing(id=3, price=99), listing(id=7, price=None),
    ), NYC)
    assert dropped == {"no_price": 1, "price_range": 2, "outside_box": 2, "duplicate_id": 1}
    assert df["id"].tolist() == [3, 4]
    assert pd.api.types.is_datetime64_any_dtype(df["last_review"])


def test_clean_box_and_price_are_parameters():
    df, dropped = data.clean_listings(frame(listing(price=500), listing(id=2, price=20)), nyc(
        min_price=100, max_price=600, min_longitude=-80, max_longitude=-70, min_latitude=40, max_latitude=42))
    assert df["id"].tolist() == [1] and dropped["price_range"] == 1


def test_clean_keeps_missing_last_review():
    df = clean_frame(listing(last_review=None, reviews_per_month=None))
    assert len(df) == 1 and pd.isna(df["last_review"][0])


def test_clean_names_a_non_numeric_price():
    with pytest.raises(StepError, match=r"clean: price: 1 value\(s\) are not numbers, e.g. \['eighty'\]"):
        clean_frame(listing(), listing(id=2, price="eighty"))


def test_clean_names_a_bad_date():
    with pytest.raises(StepError, match="clean: last_review: 1 value.* not dates"):
        clean_frame(listing(last_review="yesterday"))


def test_clean_names_a_missing_column():
    df = frame(listing()).rename(columns={"price": "cost"})
    with pytest.raises(StepError, match=r"clean: price: 1 column\(s\) missing from the data: \['price'\]"):
        data.clean_listings(df, NYC)


def test_clean_names_every_missing_column_at_once():
    df = frame(listing()).drop(columns=["price", "room_type", "last_review"])
    with pytest.raises(StepError, match=r"clean: room_type, price, last_review: 3 column\(s\) missing from the data: "
                                        r"\['room_type', 'price', 'last_review'\]"):
        data.clean_listings(df, NYC)


def test_clean_fails_when_every_row_is_filtered_out():
    with pytest.raises(StepError, match="clean: .*every row was filtered out.*'price_range': 2"):
        clean_frame(listing(price=1), listing(id=2, price=1000))


def test_write_and_read_keep_the_schema(tmp_path):
    df = clean_frame(listing(), listing(id=2, last_review=None))
    data.write_listings(df, tmp_path / "clean.csv")
    back = data.read_listings(tmp_path / "clean.csv")
    assert data.failed(data.deterministic_checks(back, nyc(min_rows=1, max_rows=10))) == []
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


# ---------------------------------------------------------------- check

def test_deterministic_checks_pass_on_clean_real_data(sample):
    df, _ = data.clean_listings(sample, NYC)
    assert data.failed(data.deterministic_checks(df, NYC)) == []


def test_deterministic_checks_list_every_failure():
    df = clean_frame(listing(), listing(id=2))
    df.loc[1, "neighbourhood_group"] = "Atlantis"
    df.loc[0, "latitude"] = 45.0
    df.loc[0, "price"] = 999
    df = df.rename(columns={"name": "title"})
    failures = data.failed(data.deterministic_checks(df, nyc(min_rows=5, max_rows=100)))
    subjects = [f.split(":")[0] for f in failures]
    assert subjects == ["columns", "neighbourhood_group", "latitude/longitude", "row count", "price"]
    assert "unknown values ['Atlantis']" in failures[1]


def test_deterministic_checks_catch_wrong_dtypes():
    df = clean_frame(listing(), listing(id=2))
    df["minimum_nights"] = ["two", "three"]
    assert data.failed(data.deterministic_checks(df, nyc(min_rows=1, max_rows=10))) == [
        "dtype of minimum_nights: expected int, got str"]


LIMITS = data.DriftLimits()


@pytest.fixture(scope="module")
def halves(sample):
    df, _ = data.clean_listings(sample, NYC)
    return data.split_listings(df, 0.5, seed=7)


def test_drift_checks_pass_between_disjoint_halves_of_real_data(halves):
    first, second = halves
    checks, figures = data.drift_checks(first, second, LIMITS)
    assert {c.status for c in checks} == {data.PASS} and len(checks) == 10
    assert max(figures.values()) < 0.03


@pytest.mark.parametrize("shift, fails, warns", [
    # A borough gone: the failure names the column, its PSI and what is missing.
    (lambda d: d[d["neighbourhood_group"] != "Queens"], "neighbourhood_group: distribution shifted from prod's "
                                                        "data (PSI 0.888 > 0.25; no rows of ['Queens'])",
     "longitude: distribution moved"),
    # Prices up 30 %: the price distribution moves (a warning); prod's error on it fails the run (below).
    (lambda d: d.assign(price=d["price"] * 1.3), None, "price: distribution moved (PSI 0.1"),
    # Prices shuffled across listings: every distribution is as before; only prod's error can tell (below).
    (lambda d: d.assign(price=d["price"].sample(frac=1, random_state=1).to_numpy()), None, None),
])
def test_drift_checks_name_the_column_and_figure_of_a_real_shift(halves, shift, fails, warns):
    first, second = halves
    checks, _ = data.drift_checks(shift(first), second, LIMITS)
    failures, warnings = data.failed(checks), data.warned(checks)
    assert [f for f in failures if f.startswith(fails)] if fails else failures == []
    assert [w for w in warnings if w.startswith(warns)] if warns else warnings == []


@pytest.mark.parametrize("mae_now, failed, warned", [(33.4, False, False), (37.0, False, True), (50.9, True, False),
                                                     (69.0, True, False)])
def test_error_check_fails_when_prod_no_longer_fits_the_data(mae_now, failed, warned):
    """Figures of prod (33.2 at registration) on the other half, +10 %, +30 % and shuffled prices (README)."""
    check, figures = data.error_check(mae_now, 33.2, 8000, "3", LIMITS)
    failures, warnings = data.failed([check]), data.warned([check])
    assert bool(failures) is failed and bool(warnings) is warned
    assert figures["prod_error_ratio"] == pytest.approx(mae_now / 33.2)
    if failed:
        assert failures[0].startswith(f"price: prod version 3's MAE on 8000 rows new to it is {mae_now:.2f}, "
                                      f"{mae_now / 33.2:.2f} x its 33.20 at registration (> 1.25)")


def test_psi_is_zero_for_equal_distributions_and_large_for_a_missing_category():
    same = pd.Series(["a", "b", "b"])
    assert data.category_psi(same, same) == pytest.approx(0, abs=1e-12)
    # a: 0 vs 1/3 (floored at 1e-4), b: 1 vs 2/3: (1e-4 - 1/3) ln(1e-4 * 3) + (1/3) ln(1.5) = 2.84
    assert data.category_psi(pd.Series(["b", "b"]), same) == pytest.approx(2.8379, abs=1e-3)
    numbers = pd.Series(range(1000), dtype=float)
    assert data.numeric_psi(numbers, numbers) == pytest.approx(0, abs=1e-12)
    assert data.numeric_psi(numbers + 500, numbers) > 1


# ---------------------------------------------------------------- split

def test_split_is_stratified_and_seeded(sample):
    df, _ = data.clean_listings(sample, NYC)
    trainval, test = data.split_listings(df, 0.2, seed=42)
    again, _ = data.split_listings(df, 0.2, seed=42)
    assert len(test) == 3801 and len(trainval) + len(test) == len(df)  # ceil(0.2 * 19,001)
    pd.testing.assert_frame_equal(trainval, again)
    share = df["neighbourhood_group"].value_counts(normalize=True)
    test_share = test["neighbourhood_group"].value_counts(normalize=True)
    assert (share - test_share).abs().max() < 0.002
    assert set(trainval["id"]).isdisjoint(test["id"])


def test_split_rejects_a_bad_test_size():
    with pytest.raises(StepError, match="split: test_size: must be between 0 and 1"):
        data.split_listings(clean_frame(listing()), 1.5, 1)


@pytest.mark.parametrize("source, shown", [
    ("https://bucket.s3.amazonaws.com/l.csv?X-Amz-Credential=AKIA&X-Amz-Signature=abc#x",
     "https://bucket.s3.amazonaws.com/l.csv"),
    ("https://ann:s3cret@example.org:8443/data/l.csv.gz", "https://example.org:8443/data/l.csv.gz"),
    ("s3://data/listings.csv", "s3://data/listings.csv"),
    ("sample://nyc_airbnb_sample1.csv.gz", "sample://nyc_airbnb_sample1.csv.gz"),
    ("/data/listings.csv", "/data/listings.csv"),
])
def test_sources_are_shown_without_credentials(source, shown):
    assert data.shown_source(source) == shown
