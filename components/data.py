"""Data logic of the download, clean, check and split steps: plain functions on bytes and DataFrames."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy import stats
from sklearn.model_selection import train_test_split

from components.errors import StepError

# The raw listings schema: column -> kind. Order matters (the check step compares it exactly).
SCHEMA: dict[str, str] = {
    "id": "int",
    "name": "str",
    "host_id": "int",
    "host_name": "str",
    "neighbourhood_group": "str",
    "neighbourhood": "str",
    "latitude": "float",
    "longitude": "float",
    "room_type": "str",
    "price": "float",
    "minimum_nights": "int",
    "number_of_reviews": "int",
    "last_review": "datetime",
    "reviews_per_month": "float",
    "calculated_host_listings_count": "int",
    "availability_365": "int",
}
COLUMNS = list(SCHEMA)
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
NEIGHBOURHOOD_GROUPS = ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")
# Columns the KS test compares with the reference data.
KS_COLUMNS = [
    "price", "latitude", "longitude", "minimum_nights", "number_of_reviews",
    "reviews_per_month", "calculated_host_listings_count", "availability_365",
]


@dataclass(frozen=True)
class Box:
    """Geographic bounding box (NYC by default)."""

    min_lon: float = -74.25
    max_lon: float = -73.50
    min_lat: float = 40.5
    max_lat: float = 41.2

    def contains(self, df: pd.DataFrame) -> pd.Series:
        return df["longitude"].between(self.min_lon, self.max_lon) & df["latitude"].between(
            self.min_lat, self.max_lat
        )


# ---------------------------------------------------------------- download

def fetch(source: str) -> bytes:
    """The CSV bytes at `source` (sample://, http(s)://, s3://bucket/key, file:// or a local path), gunzipped
    when the file is gzip."""
    raw = read_source(source)
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise StepError("download", "source", f"{source!r} is a broken gzip file: {exc}") from exc


def read_source(source: str) -> bytes:
    """The bytes at `source` as stored."""
    if not source:
        raise StepError("download", "source", "no source given")
    scheme = urllib.parse.urlparse(source).scheme
    try:
        if source.startswith(SAMPLE_SCHEME):
            return _sample_path(source).read_bytes()
        if scheme in ("http", "https"):
            with urllib.request.urlopen(source, timeout=60) as response:
                return response.read()
        if scheme == "s3":
            bucket, key = _s3_location(source)
            return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        path = urllib.parse.urlparse(source).path if scheme == "file" else source
        return Path(path).read_bytes()
    except StepError:
        raise
    except Exception as exc:  # every transport has its own error types; the message is what matters
        raise StepError("download", "source", f"cannot read {source!r}: {exc}") from exc


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

    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def upload_s3(raw: bytes, uri: str) -> None:
    """Put `raw` at s3://bucket/key (MinIO: S3_ENDPOINT_URL); the bucket must exist."""
    bucket, key = _s3_location(uri)
    if urllib.parse.urlparse(uri).scheme != "s3" or not bucket or not key:
        raise StepError("seed-data", "--to", f"expected s3://bucket/key, got {uri!r}")
    try:
        _s3_client().put_object(Bucket=bucket, Key=key, Body=raw)
    except Exception as exc:  # botocore's many error types; the message is what matters
        raise StepError("seed-data", "--to", f"cannot write {uri}: {exc}") from exc


def parse_csv(raw: bytes, step: str = "download") -> pd.DataFrame:
    """Parse raw bytes as a listings CSV, with an error that says what is wrong with the file."""
    if not raw.strip():
        raise StepError(step, "source", "the file is empty")
    try:
        df = pd.read_csv(io.BytesIO(raw), encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise StepError(step, "source", f"not a readable CSV file: {exc}") from exc
    if df.shape[1] < 2:
        raise StepError(step, "source", f"not a CSV table: found {df.shape[1]} column(s), expected {len(COLUMNS)}")
    if df.empty:
        raise StepError(step, "source", "the CSV has a header but no rows")
    return df


def describe_download(source: str, raw: bytes, df: pd.DataFrame) -> dict:
    return {"source": source, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw), "rows": len(df)}


# ---------------------------------------------------------------- clean

def require_columns(df: pd.DataFrame, columns: list[str], step: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StepError(step, missing[0], f"column missing from the data (missing: {missing}; found: {list(df.columns)})")


def parse_column(df: pd.DataFrame, column: str, step: str, kind: str) -> pd.Series:
    """The column as numbers or dates; a value that is present but does not parse is an error naming it."""
    if kind == "number":
        values, expected = pd.to_numeric(df[column], errors="coerce"), "numbers"
    else:
        values, expected = pd.to_datetime(df[column], format="%Y-%m-%d", errors="coerce"), "dates (YYYY-MM-DD)"
    bad = df[column][values.isna() & df[column].notna()]
    if len(bad):
        raise StepError(step, column, f"{len(bad)} value(s) are not {expected}, e.g. {bad.head(3).tolist()}")
    return values


def clean_listings(
    df: pd.DataFrame, min_price: float, max_price: float, box: Box
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply the cleaning rules; return the clean frame and how many rows each rule dropped."""
    require_columns(df, ["id", "price", "latitude", "longitude", "last_review"], "clean")
    df = df.copy()
    for column in ("price", "latitude", "longitude"):
        df[column] = parse_column(df, column, "clean", "number")
    df["last_review"] = parse_column(df, "last_review", "clean", "date")

    dropped = {}
    keep = df["price"].between(min_price, max_price)
    dropped["price_range"] = int((~keep).sum())
    df = df[keep]
    keep = box.contains(df)
    dropped["outside_box"] = int((~keep).sum())
    df = df[keep]
    keep = ~df["id"].duplicated()
    dropped["duplicate_id"] = int((~keep).sum())
    df = df[keep].reset_index(drop=True)
    if df.empty:
        raise StepError("clean", "price/latitude/longitude", f"every row was filtered out (dropped: {dropped})")
    return df, dropped


def write_listings(df: pd.DataFrame, path: str) -> None:
    df.to_csv(path, index=False, date_format="%Y-%m-%d")


def read_listings(path: str) -> pd.DataFrame:
    """Read a CSV written by `write_listings`, restoring the date column."""
    df = pd.read_csv(path)
    if "last_review" in df.columns:
        df["last_review"] = pd.to_datetime(df["last_review"], format="%Y-%m-%d")
    return df


# ---------------------------------------------------------------- check

_KIND_TEST = {
    "int": pd.api.types.is_integer_dtype,
    "float": pd.api.types.is_numeric_dtype,
    "str": lambda s: pd.api.types.is_string_dtype(s) or pd.api.types.is_object_dtype(s),
    "datetime": pd.api.types.is_datetime64_any_dtype,
}


def deterministic_checks(
    df: pd.DataFrame, min_price: float, max_price: float, box: Box, min_rows: int, max_rows: int
) -> list[str]:
    """Return one message per failed check (empty when all pass)."""
    failures = []
    if list(df.columns) != COLUMNS:
        failures.append(f"columns: expected {COLUMNS}, got {list(df.columns)}")
    for column, kind in SCHEMA.items():
        if column in df.columns and not _KIND_TEST[kind](df[column]):
            failures.append(f"dtype of {column}: expected {kind}, got {df[column].dtype}")
    if "neighbourhood_group" in df.columns:
        unknown = sorted(set(df["neighbourhood_group"].dropna()) - set(NEIGHBOURHOOD_GROUPS))
        if unknown:
            failures.append(f"neighbourhood_group: unknown values {unknown}")
    if {"latitude", "longitude"} <= set(df.columns):
        outside = int((~box.contains(df)).sum())
        if outside:
            failures.append(f"latitude/longitude: {outside} row(s) outside the box {box}")
    if not min_rows <= len(df) <= max_rows:
        failures.append(f"row count: {len(df)} not within [{min_rows}, {max_rows}]")
    if "price" in df.columns:
        outside = int((~df["price"].between(min_price, max_price)).sum())
        if outside:
            failures.append(f"price: {outside} row(s) outside [{min_price}, {max_price}]")
    return failures


def kl_divergence(sample: pd.Series, reference: pd.Series) -> float:
    """KL(sample || reference) of two categorical columns, in bits; unseen categories get a small mass."""
    categories = sorted(set(sample.dropna()) | set(reference.dropna()))
    p = sample.value_counts().reindex(categories, fill_value=0).to_numpy(float) + 1e-6
    q = reference.value_counts().reindex(categories, fill_value=0).to_numpy(float) + 1e-6
    return float(stats.entropy(p, q, base=2))


def statistical_checks(
    df: pd.DataFrame, reference: pd.DataFrame, kl_threshold: float, ks_alpha: float
) -> tuple[list[str], dict[str, float]]:
    """KL divergence of neighbourhood_group and a KS test per numeric column against the reference.

    The KS p-values are Bonferroni-corrected over the columns tested. Returns (failures, figures).
    """
    failures = []
    kl = kl_divergence(df["neighbourhood_group"], reference["neighbourhood_group"])
    figures = {"kl_neighbourhood_group": kl}
    if kl > kl_threshold:
        failures.append(f"neighbourhood_group: KL divergence {kl:.3f} > threshold {kl_threshold}")
    alpha = ks_alpha / len(KS_COLUMNS)
    for column in KS_COLUMNS:
        result = stats.ks_2samp(df[column].dropna(), reference[column].dropna())
        figures[f"ks_pvalue_{column}"] = float(result.pvalue)
        if result.pvalue < alpha:
            failures.append(
                f"{column}: KS test p-value {result.pvalue:.2e} < {alpha:.2e} (statistic {result.statistic:.3f})"
            )
    return failures, figures


# ---------------------------------------------------------------- split

def split_listings(
    df: pd.DataFrame, size: float, seed: int, step: str = "split", field: str = "test_size"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off a `size` fraction, stratified by neighbourhood_group (train+validation / test, train / validation)."""
    if not 0 < size < 1:
        raise StepError(step, field, f"must be between 0 and 1, got {size}")
    try:
        rest, part = train_test_split(df, test_size=size, random_state=seed, stratify=df["neighbourhood_group"])
    except ValueError as exc:  # too few rows in a group to stratify
        raise StepError(step, "neighbourhood_group", f"cannot stratify: {exc}") from exc
    return rest.reset_index(drop=True), part.reset_index(drop=True)
