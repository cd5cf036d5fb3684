"""Data logic of the download, clean, check and split steps: plain functions on bytes and DataFrames."""

from __future__ import annotations

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
# The public sample of 20,000 NYC listings that the pipeline downloads by default.
DEFAULT_SOURCE = (
    "https://raw.githubusercontent.com/udacity/build-ml-pipeline-for-short-term-rental-prices/"
    "main/components/get_data/data/sample1.csv"
)
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
    """Return the bytes at `source`: http(s)://, s3://bucket/key, file:// or a local path."""
    if not source:
        raise StepError("download", "source", "no source given")
    scheme = urllib.parse.urlparse(source).scheme
    try:
        if scheme in ("http", "https"):
            with urllib.request.urlopen(source, timeout=60) as response:
                return response.read()
        if scheme == "s3":
            return _fetch_s3(source)
        path = urllib.parse.urlparse(source).path if scheme == "file" else source
        return Path(path).read_bytes()
    except StepError:
        raise
    except Exception as exc:  # every transport has its own error types; the message is what matters
        raise StepError("download", "source", f"cannot read {source!r}: {exc}") from exc


def _fetch_s3(source: str) -> bytes:
    import boto3

    parsed = urllib.parse.urlparse(source)
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    client = boto3.client("s3", endpoint_url=endpoint or None)
    return client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read()


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
