"""Data logic of the download, clean, check and split steps: plain functions on bytes and DataFrames."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.errors import StepError

# The listings columns Inside Airbnb's summary listings.csv has had, column -> kind, in the order clean writes them.
# The 2019 format has the first 16 (REQUIRED); today's adds OPTIONAL, used when present.
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
    "number_of_reviews_ltm": "int",
    "license": "str",
}
OPTIONAL = ["number_of_reviews_ltm", "license"]
REQUIRED = [c for c in SCHEMA if c not in OPTIONAL]
IDS = ["id", "host_id"]
TEXT_COLUMNS = [c for c, kind in SCHEMA.items() if kind == "str"]
NUMBER_COLUMNS = [c for c, kind in SCHEMA.items() if kind in ("int", "float") and c not in IDS]
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
# Numeric columns whose distribution is compared with prod's data (those the data has).
DRIFT_COLUMNS = [
    "price", "latitude", "longitude", "minimum_nights", "number_of_reviews",
    "reviews_per_month", "calculated_host_listings_count", "availability_365", "number_of_reviews_ltm",
]


@dataclass(frozen=True)
class Box:
    """Geographic bounding box."""

    min_lon: float
    max_lon: float
    min_lat: float
    max_lat: float

    def contains(self, df: pd.DataFrame) -> pd.Series:
        return df["longitude"].between(self.min_lon, self.max_lon) & df["latitude"].between(
            self.min_lat, self.max_lat
        )


# ---------------------------------------------------------------- city profiles

# Shipped profiles: components/cities/<name>.toml. A run carries its whole profile as the `city` parameter.
CITIES = "cities"
DEFAULT_CITY = "nyc"


@dataclass(frozen=True)
class City:
    """What is particular to one city's listings: where they are, which prices and how many rows are plausible,
    its area groups (neighbourhood_group; none in most cities) and how its export writes dates (besides ISO)."""

    name: str
    min_longitude: float
    max_longitude: float
    min_latitude: float
    max_latitude: float
    min_price: float
    max_price: float
    min_rows: int
    max_rows: int
    area_groups: tuple[str, ...] = ()
    date_formats: tuple[str, ...] = ()

    @property
    def box(self) -> Box:
        return Box(self.min_longitude, self.max_longitude, self.min_latitude, self.max_latitude)

    def as_dict(self) -> dict:
        return {f: list(v) if isinstance(v, tuple) else v for f, v in vars(self).items()}

    def as_param(self) -> str:
        """The profile as a run's `city` parameter: JSON with sorted keys, so that the same profile is the same
        text (and cache key) every time."""
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_param(cls, given: str | dict, step: str) -> "City":
        """A run's `city` parameter: the profile as JSON (or a dict), or a shipped profile's name."""
        if isinstance(given, dict):
            return cls.from_dict(given, step)
        if not given.strip().startswith("{"):
            return cls.from_dict(city_profile(given.strip(), step), step)
        try:
            found = json.loads(given)
        except ValueError as exc:
            raise StepError(step, "city", f"not a profile in JSON: {exc}") from exc
        if not isinstance(found, dict):
            raise StepError(step, "city", f"expected a JSON object, got {given[:100]!r}")
        return cls.from_dict(found, step)

    @classmethod
    def from_dict(cls, given: dict, step: str) -> "City":
        """The profile a run's `city` parameter holds, checked field by field. {"name": N, ...} with only some
        fields takes the others from the shipped profile N."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise StepError(step, "city", f"unknown field(s) {unknown} (a profile has {list(fields)})")
        name = given.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
            raise StepError(step, "city.name", f"expected the city's name in lower case letters, digits, - and _ "
                                               f"(it names its model: rental-price-NAME), got {name!r}")
        values = dict(given)
        missing = set(fields) - set(given)
        if missing and name in shipped_cities():  # {"name": "nyc", "max_price": 500}: the rest is nyc's
            values = {**city_profile(name, step), **given}
        elif missing - {"area_groups", "date_formats"}:
            raise StepError(step, "city", f"{name}'s profile lacks {sorted(missing)} (and {name!r} is not a shipped "
                                          f"profile to take them from: {shipped_cities()})")
        typed = {}
        for field, kind in fields.items():
            value, where = values.get(field), f"city.{field}"
            if field in ("area_groups", "date_formats"):
                value = [] if value is None else value
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise StepError(step, where, f"expected a list of non-empty strings, got {value!r}")
                typed[field] = tuple(value)
            elif field != "name":
                number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
                if number is None or not math.isfinite(number) or (kind == "int" and number != int(number)):
                    raise StepError(step, where, f"expected {'a whole number' if kind == 'int' else 'a number'}, "
                                                 f"got {value!r}")
                typed[field] = int(number) if kind == "int" else float(number)
        for low, high in (("min_longitude", "max_longitude"), ("min_latitude", "max_latitude"),
                          ("min_price", "max_price"), ("min_rows", "max_rows")):
            if typed[low] >= typed[high]:
                raise StepError(step, f"city.{low}", f"{typed[low]} is not below {high} {typed[high]}")
        for code in typed["date_formats"]:
            if "%" not in code:
                raise StepError(step, "city.date_formats", f"{code!r} is not a strptime format such as '%m/%d/%y'")
        return cls(name=name, **typed)


def shipped_cities() -> list[str]:
    from importlib import resources

    return sorted(p.name.removesuffix(".toml") for p in (resources.files("components") / CITIES).iterdir()
                  if p.name.endswith(".toml"))


def city_profile(name: str, step: str = "city") -> dict:
    """A shipped profile (components/cities/NAME.toml) or the profile file at the path NAME, as a dict."""
    import tomllib
    from importlib import resources

    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise StepError(step, "city", f"no profile file {name!r} (no such file)")
    elif name in shipped_cities():
        path = Path(str(resources.files("components") / CITIES / f"{name}.toml"))
    else:
        raise StepError(step, "city", f"no city profile {name!r}: shipped ones are {shipped_cities()}; or give the "
                                      "path to a .toml file written like components/cities/nyc.toml")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StepError(step, "city", f"{path} is not a readable TOML file: {exc}") from exc


@functools.cache
def city(name: str = DEFAULT_CITY) -> City:
    """A shipped city's profile as a City."""
    return City.from_dict(city_profile(name), "city")


# ---------------------------------------------------------------- download

def shown_source(source: str) -> str:
    """`source` as it may be logged, tagged and printed: without a user, password, query or fragment (the query of a
    presigned URL is a credential)."""
    parts = urllib.parse.urlsplit(source)
    if not parts.scheme or not (parts.netloc or parts.query or parts.fragment):
        return source
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def fetch(source: str) -> bytes:
    """The CSV bytes at `source` (sample://, http(s)://, s3://bucket/key, file:// or a local path), gunzipped
    when the file is gzip."""
    raw = read_source(source)
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise StepError("download", "source", f"{shown_source(source)!r} is a broken gzip file: {exc}") from exc


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
    """Parse raw bytes as a listings CSV, with an error that says what is wrong with the file. Text columns and ids
    stay text (a zip code is not a number; an id is checked digit by digit in clean)."""
    if not raw.strip():
        raise StepError(step, "source", "the file is empty")
    try:
        df = pd.read_csv(io.BytesIO(raw), encoding="utf-8", dtype={c: "str" for c in TEXT_COLUMNS + IDS})
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise StepError(step, "source", f"not a readable CSV file: {exc}") from exc
    if df.shape[1] < 2:
        raise StepError(step, "source", f"not a CSV table: found {df.shape[1]} column(s), expected {len(REQUIRED)}")
    if df.empty:
        raise StepError(step, "source", "the CSV has a header but no rows")
    return df


def describe_download(source: str, raw: bytes, df: pd.DataFrame) -> dict:
    return {"source": shown_source(source), "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw), "rows": len(df)}


# ---------------------------------------------------------------- clean

def require_columns(df: pd.DataFrame, columns: list[str], step: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StepError(step, ", ".join(missing), f"{len(missing)} column(s) missing from the data: {missing} "
                                                  f"(found: {list(df.columns)})")


def listing_format(columns) -> str:
    """Which of Inside Airbnb's summary formats the columns are."""
    extra = [c for c in OPTIONAL if c in columns]
    return ("the current format (18 columns)" if extra == OPTIONAL else
            "the 2019 format (16 columns)" + (f" with {', '.join(extra)}" if extra else ""))


def known_columns(df: pd.DataFrame, step: str) -> tuple[pd.DataFrame, list[str]]:
    """The listings' known columns in schema order, and the names of the others (ignored). Every missing required
    column is named at once."""
    require_columns(df, REQUIRED, step)
    ignored = [c for c in df.columns if c not in SCHEMA]
    return df[[c for c in SCHEMA if c in df.columns]], ignored


def parse_column(df: pd.DataFrame, column: str, step: str, kind: str, date_formats=()) -> pd.Series:
    """The column as numbers or dates; a value that is present but does not parse is an error naming it."""
    text = df[column]
    if kind == "number":
        if column == "price" and not pd.api.types.is_numeric_dtype(text):  # "$1,250.00", as in detailed listings
            text = text.map(lambda v: v.strip().removeprefix("$").replace(",", "") if isinstance(v, str) else v)
        values, expected = pd.to_numeric(text, errors="coerce"), "numbers"
    else:
        values = read_dates(text, date_formats, step)
        expected = f"dates as {' or '.join(['YYYY-MM-DD', *date_formats])}"
        if not date_formats:
            expected += " (name the file's own format in the city profile's date_formats, e.g. '%m/%d/%y')"
    bad = df[column][values.isna() & df[column].notna()]
    if len(bad):
        raise StepError(step, column, f"{len(bad)} value(s) are not {expected}, e.g. {bad.head(3).tolist()}")
    return values


def read_dates(text: pd.Series, date_formats=(), step: str = "clean") -> pd.Series:
    """Dates in ISO or one of `date_formats`, each value in the first that reads it; NaT for any other."""
    values = pd.to_datetime(text, format="%Y-%m-%d", errors="coerce")
    for code in date_formats:
        rest = values.isna() & text.notna()
        if rest.any():
            try:
                values[rest] = pd.to_datetime(text[rest], format=code, errors="coerce")
            except ValueError as exc:  # e.g. %z and mixed offsets
                raise StepError(step, "last_review", f"the date format {code!r} cannot be used: {exc}") from exc
    return values


def exact_ids(values: pd.Series) -> pd.Series:
    """Ids as exact integers (Int64), missing where a value is not a whole number as written or is past int64."""
    if pd.api.types.is_integer_dtype(values):
        return values.astype("Int64")
    text = values.astype("str").str.strip()
    whole = text.str.fullmatch(r"[0-9]{1,19}").fillna(False).astype(bool)
    whole &= text.str.len().fillna(0).lt(19) | text.fillna("").le(str(np.iinfo("int64").max))
    return text.where(whole).astype("Int64")


def parse_ids(df: pd.DataFrame, column: str, step: str) -> pd.Series:
    """Ids as exact integers: a spreadsheet writes a long id as 7.13172E+17, and two listings then share it."""
    ids = exact_ids(df[column])
    bad = df[column][ids.isna()]
    if len(bad):
        raise StepError(step, column, f"{len(bad)} value(s) are empty or not whole numbers as written, e.g. "
                        f"{bad.head(3).fillna('').tolist()}: ids must be exact (a spreadsheet rounds long ids to forms "
                        "like 7.13172E+17); take the file as downloaded, not as a spreadsheet saved it")
    return ids.astype("int64")


def clean_listings(
    df: pd.DataFrame, city: City, keep_unpriced: bool = False
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Type the known columns and apply the cleaning rules; return the clean frame and how many rows each rule
    dropped. `keep_unpriced` keeps listings with no price (monitoring looks at them too; training cannot learn
    from them)."""
    df, _ = known_columns(df, "clean")
    df = df.copy()
    for column in IDS:
        df[column] = parse_ids(df, column, "clean")
    for column in NUMBER_COLUMNS:
        if column in df.columns:
            df[column] = parse_column(df, column, "clean", "number")
    for column in TEXT_COLUMNS:
        if column in df.columns:  # a zip code read as a number, or a column empty in every row, is still text
            df[column] = df[column].astype("str")
    df["last_review"] = parse_column(df, "last_review", "clean", "date", city.date_formats)

    dropped = {}
    keep = df["price"].notna() | keep_unpriced  # today's files list many with no price
    dropped["no_price"] = int((~keep).sum())
    df = df[keep]
    keep = df["price"].between(city.min_price, city.max_price) | df["price"].isna()
    dropped["price_range"] = int((~keep).sum())
    df = df[keep]
    keep = city.box.contains(df)
    dropped["outside_box"] = int((~keep).sum())
    df = df[keep]
    keep = ~df["id"].duplicated()
    dropped["duplicate_id"] = int((~keep).sum())
    df = df[keep].reset_index(drop=True)
    if df.empty:
        raise StepError("clean", "price/latitude/longitude", f"every row was filtered out (dropped: {dropped}; "
                        f"city {city.name}: price [{city.min_price}, {city.max_price}], box {city.box})")
    return df, dropped


def clean_counts(df: pd.DataFrame, dropped: dict[str, int]) -> dict[str, int]:
    """What clean kept and dropped by each rule, as its step logs them (and the monitor compares them)."""
    return {"rows": len(df), **{f"dropped_{rule}": n for rule, n in dropped.items()},
            "kept_unpriced": int(df["price"].isna().sum())}


def write_listings(df: pd.DataFrame, path: str) -> None:
    df.to_csv(path, index=False, date_format="%Y-%m-%d")


def read_listings(path: str) -> pd.DataFrame:
    """Read a CSV written by `write_listings`, restoring the text and date columns."""
    df = pd.read_csv(path, dtype={c: "str" for c in TEXT_COLUMNS})
    if "last_review" in df.columns:
        df["last_review"] = pd.to_datetime(df["last_review"], format="%Y-%m-%d")
    return df


# ---------------------------------------------------------------- check

def _whole_numbers(s: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(s) or (pd.api.types.is_numeric_dtype(s) and bool(
        (s.dropna() % 1 == 0).all()))


_KIND_TEST = {
    "int": _whole_numbers,  # a column with empty cells reads as floats
    "float": pd.api.types.is_numeric_dtype,
    "str": lambda s: pd.api.types.is_string_dtype(s) or pd.api.types.is_object_dtype(s),
    "datetime": pd.api.types.is_datetime64_any_dtype,
}


PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skipped"
# The observed value of a check that could not be measured (a warning, but no evidence of drift).
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Check:
    """One check as the data report shows it; `message` (for warn and fail) names the column and the figure."""

    check: str
    status: str
    observed: str
    threshold: str
    message: str = ""


def failed(checks: list[Check]) -> list[str]:
    return [c.message for c in checks if c.status == FAIL]


def warned(checks: list[Check]) -> list[str]:
    return [c.message for c in checks if c.status == WARN]


def drifted(checks: list[Check]) -> dict[str, str]:
    """What moved, as a monitor names it: each drift check (by column) and prod's error check that warned or
    failed, with its figure. A check that could not measure says nothing either way."""
    return {c.check.removesuffix(" drift"): c.observed for c in checks
            if c.status in (WARN, FAIL) and c.observed != UNKNOWN
            and (c.check.endswith(" drift") or c.check == ERROR_CHECK)}


def _check(check: str, bad: bool, observed: str, threshold: str, message: str) -> Check:
    return Check(check, FAIL if bad else PASS, observed, threshold, message if bad else "")


def deterministic_checks(df: pd.DataFrame, city: City, ignored: list[str] = ()) -> list[Check]:
    """Every check of the data on its own against its city's profile, passed or failed (data.failed lists the
    failures' messages); `ignored` names the unknown columns clean left out (a warning)."""
    missing = [c for c in REQUIRED if c not in df.columns]
    checks = [_check("columns", bool(missing), listing_format(df.columns) if not missing else f"missing {missing}",
                     f"the {len(REQUIRED)} columns of the 2019 format, or the {len(SCHEMA)} of today's",
                     f"columns: {len(missing)} missing: {missing}")]
    if ignored:
        checks.append(Check("unknown columns", WARN, ", ".join(ignored), "none",
                            f"columns: ignored {len(ignored)} unknown column(s): {list(ignored)}"))
    for column, kind in SCHEMA.items():
        if column in df.columns:
            dtype = str(df[column].dtype)
            checks.append(_check(f"dtype of {column}", not _KIND_TEST[kind](df[column]), dtype, kind,
                                 f"dtype of {column}: expected {kind}, got {dtype}"))
    if "neighbourhood_group" in df.columns:
        present = set(df["neighbourhood_group"].dropna())
        if city.area_groups and not present:
            checks.append(Check("neighbourhood_group values", FAIL, "empty in every row", ", ".join(city.area_groups),
                                f"neighbourhood_group: empty in every row, but city {city.name}'s profile names area "
                                f"groups {list(city.area_groups)} (area_groups = [] if this city has none)"))
        elif city.area_groups:
            unknown = sorted(present - set(city.area_groups))
            checks.append(_check("neighbourhood_group values", bool(unknown), f"unknown: {unknown}" if unknown else
                                 "all known", ", ".join(city.area_groups),
                                 f"neighbourhood_group: unknown values {unknown} (city {city.name}'s area groups: "
                                 f"{list(city.area_groups)})"))
        else:
            checks.append(Check("neighbourhood_group values", PASS, f"{len(present)} value(s)" if present else
                                "empty: no area groups", f"any (city {city.name} names no area groups)"))
    if {"latitude", "longitude"} <= set(df.columns):
        outside = int((~city.box.contains(df)).sum())
        checks.append(_check("latitude/longitude in the box", outside > 0, f"{outside} row(s) outside",
                             str(city.box), f"latitude/longitude: {outside} row(s) outside the box {city.box}"))
    low, high = city.min_rows, city.max_rows
    checks.append(_check("row count", not low <= len(df) <= high, str(len(df)), f"[{low}, {high}]",
                         f"row count: {len(df)} not within [{low}, {high}]"))
    if "price" in df.columns:
        low, high = city.min_price, city.max_price
        outside = int((df["price"].notna() & ~df["price"].between(low, high)).sum())
        checks.append(_check("price range", outside > 0, f"{outside} row(s) outside", f"[{low}, {high}]",
                             f"price: {outside} row(s) outside [{low}, {high}]"))
    return checks


@dataclass(frozen=True)
class DriftLimits:
    """When new data differs from prod's too much to train on (fail) or enough to say so (warn).

    Calibrated on the shared sample (README): two random halves differ by PSI <= 0.005 and KS <= 0.016, and prod's
    MAE on the other half is 1.01 x its own; a borough removed gives PSI 0.83 on neighbourhood_group, prices +30 %
    an error ratio of 1.53, prices shuffled across listings 2.08. Real new listings of the same city move numeric
    columns by KS up to 0.37 and stay fit to train on, so numeric shifts only warn: prod's error decides.
    """

    max_category_psi: float = 0.25
    max_error_ratio: float = 1.25
    warn_psi: float = 0.1
    warn_ks: float = 0.1
    warn_error_ratio: float = 1.1


CATEGORY_COLUMNS = ["neighbourhood_group", "room_type"]
ERROR_CHECK = "prod's error on new rows"
# Fewer values than this in a numeric column and its drift is not measured: KS between two samples of one
# distribution exceeds warn_ks by chance at 30 values, and stays under it from about 100.
MIN_DRIFT_VALUES = 200
# How clean sorts the rows it reads (its `dropped` counts, and the rows kept).
CLEAN_OUTCOMES = ["rows", "dropped_no_price", "dropped_price_range", "dropped_outside_box", "dropped_duplicate_id"]
# A share below this counts as this, so that a category or bin missing on one side gives a large, finite PSI.
PSI_FLOOR = 1e-4


def _psi(current: np.ndarray, reference: np.ndarray) -> float:
    current, reference = np.clip(current, PSI_FLOOR, None), np.clip(reference, PSI_FLOOR, None)
    return float(np.sum((current - reference) * np.log(current / reference)))


def category_shares(current: pd.Series, reference: pd.Series) -> tuple[list, np.ndarray, np.ndarray]:
    """Each category's share of rows (missing ones included) in the current and the reference data."""
    categories = sorted(set(current.dropna()) | set(reference.dropna()))
    share = lambda s: s.value_counts(normalize=True).reindex(categories, fill_value=0).to_numpy()  # noqa: E731
    return categories, share(current), share(reference)


def category_psi(current: pd.Series, reference: pd.Series) -> float:
    """Population stability index of a categorical column (shares of each value, missing ones included)."""
    return _psi(*category_shares(current, reference)[1:])


def numeric_shares(current: pd.Series, reference: pd.Series, bins: int = 10) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """The reference's deciles (inner edges) and each side's share of rows between them."""
    edges = np.unique(np.quantile(reference.dropna(), np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    share = lambda s: np.histogram(s.dropna(), edges)[0] / max(s.notna().sum(), 1)  # noqa: E731
    return edges[1:-1], share(current), share(reference)


def numeric_psi(current: pd.Series, reference: pd.Series, bins: int = 10) -> float:
    """Population stability index of a numeric column over the reference's deciles."""
    return _psi(*numeric_shares(current, reference, bins)[1:])


def drift_columns(df: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    """The numeric columns compared: those both the new data and prod's have."""
    return [c for c in DRIFT_COLUMNS if c in df.columns and c in reference.columns]


def drift_checks(df: pd.DataFrame, reference: pd.DataFrame, limits: DriftLimits) -> tuple[list[Check], dict]:
    """Distribution shift of each column against prod's data: (every check, its figures)."""
    from scipy.stats import ks_2samp  # here, not at the top: every step imports this module, only check needs it

    checks, figures = [], {}
    limit = f"fail > {limits.max_category_psi}, warn > {limits.warn_psi}"
    for column in CATEGORY_COLUMNS:
        psi = figures[f"psi_{column}"] = category_psi(df[column], reference[column])
        gone = sorted(set(reference[column].dropna()) - set(df[column].dropna()))
        missing = f"; no rows of {gone}" if gone else ""
        observed = f"PSI {psi:.3f}{missing}"
        if psi > limits.max_category_psi:
            checks.append(Check(f"{column} drift", FAIL, observed, limit, f"{column}: distribution shifted from "
                                f"prod's data (PSI {psi:.3f} > {limits.max_category_psi}{missing})"))
        elif psi > limits.warn_psi:
            checks.append(Check(f"{column} drift", WARN, observed, limit,
                                f"{column}: distribution moved (PSI {psi:.3f} > {limits.warn_psi}{missing})"))
        else:
            checks.append(Check(f"{column} drift", PASS, observed, limit))
    for column in DRIFT_COLUMNS:
        if (column in df.columns) != (column in reference.columns):  # e.g. today's format against 2019's
            side = "the new data" if column in df.columns else "prod's data"
            checks.append(Check(f"{column} drift", SKIP, f"only in {side}", "in both"))
            continue
        if column not in df.columns:
            continue
        values = int(df[column].notna().sum())
        if values < MIN_DRIFT_VALUES:  # listings with no price yet, say: too few to tell a shift from chance
            checks.append(Check(f"{column} drift", SKIP, f"{values} value(s) in the new data",
                                f"at least {MIN_DRIFT_VALUES} values"))
            continue
        psi = figures[f"psi_{column}"] = numeric_psi(df[column], reference[column])
        ks = figures[f"ks_{column}"] = float(ks_2samp(df[column].dropna(), reference[column].dropna()).statistic)
        moved = psi > limits.warn_psi or ks > limits.warn_ks
        checks.append(Check(f"{column} drift", WARN if moved else PASS, f"PSI {psi:.3f}, KS {ks:.3f}",
                            f"warn > {limits.warn_psi} / {limits.warn_ks}", moved and (
                                f"{column}: distribution moved (PSI {psi:.3f}, KS statistic {ks:.3f}; warn above "
                                f"{limits.warn_psi} / {limits.warn_ks})") or ""))
    return checks, figures


def cleaning_check(counts: dict, reference: dict, limits: DriftLimits) -> tuple[Check, dict[str, float]]:
    """The shares of rows clean kept and dropped by each rule, against those of prod's data (PSI): new listings
    priced or placed out of range never reach the other checks, so a rise in what clean drops is drift too."""
    name = "rows clean drops drift"
    # Listings kept with no price could not be dropped for their price: they are left out of the shares.
    counts = {**counts, "rows": counts["rows"] - counts.get("kept_unpriced", 0)}
    if counts["rows"] < MIN_DRIFT_VALUES:
        return Check(name, SKIP, f"{counts['rows']} priced row(s) kept", f"at least {MIN_DRIFT_VALUES}"), {}
    share = lambda c: np.array([float(c.get(k, 0)) for k in CLEAN_OUTCOMES]) / max(sum(  # noqa: E731
        float(c.get(k, 0)) for k in CLEAN_OUTCOMES), 1)
    now, before = share(counts), share(reference)
    psi = _psi(now, before)
    observed = (f"PSI {psi:.3f}: {1 - now[0]:.1%} dropped (" + ", ".join(
        f"{k.removeprefix('dropped_')} {v:.1%}" for k, v in zip(CLEAN_OUTCOMES[1:], now[1:]))
        + f"); prod's data {1 - before[0]:.1%}")
    moved = psi > limits.warn_psi
    return (Check(name, WARN if moved else PASS, observed, f"warn > {limits.warn_psi}",
                  f"rows clean drops: {observed}" if moved else ""), {"psi_clean_drops": psi})


def error_check(mae_now: float, mae_registered: float, rows: int, version: str,
                limits: DriftLimits) -> tuple[Check, dict[str, float]]:
    """prod's MAE on the new data (rows it was not trained on) against its test MAE at registration: the data
    the model will learn from no longer relates price to the listing as before when this grows."""
    ratio = mae_now / mae_registered
    figures = {"prod_mae_now": mae_now, "prod_mae_registered": mae_registered, "prod_error_ratio": ratio}
    text = (f"prod version {version}'s MAE on {rows} rows new to it is {mae_now:.2f}, {ratio:.2f} x its "
            f"{mae_registered:.2f} at registration")
    name, observed = ERROR_CHECK, f"{ratio:.2f} x (MAE {mae_now:.2f} vs {mae_registered:.2f})"
    limit = f"fail > {limits.max_error_ratio} x, warn > {limits.warn_error_ratio} x"
    if ratio > limits.max_error_ratio:
        return Check(name, FAIL, observed, limit, f"price: {text} (> {limits.max_error_ratio}): prices no longer "
                     "follow the listings as they did"), figures
    if ratio > limits.warn_error_ratio:
        return Check(name, WARN, observed, limit, f"price: {text} (> {limits.warn_error_ratio})"), figures
    return Check(name, PASS, observed, limit), figures


# ---------------------------------------------------------------- split

def strata(df: pd.DataFrame) -> pd.Series | None:
    """What a split is stratified by: the area groups, when the city has them (groups of under 10 rows together,
    as too few to spread), else nothing."""
    groups = df["neighbourhood_group"]
    if groups.isna().all():
        return None
    groups = groups.fillna("(none)")
    sizes = groups.map(groups.value_counts())
    strata = groups.where(sizes >= 10, "(small groups)")
    if (strata == "(small groups)").sum() == 1:  # one row alone cannot be spread: it goes with the largest group
        strata = strata.replace("(small groups)", strata.mode()[0])
    return strata


def split_listings(
    df: pd.DataFrame, size: float, seed: int, step: str = "split", field: str = "test_size"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off a `size` fraction, stratified by area group when there are groups (train+validation / test,
    train / validation)."""
    from sklearn.model_selection import train_test_split

    if not 0 < size < 1:
        raise StepError(step, field, f"must be between 0 and 1, got {size}")
    try:
        rest, part = train_test_split(df, test_size=size, random_state=seed, stratify=strata(df))
    except ValueError as exc:  # too few rows to split, or in a group to stratify
        raise StepError(step, "neighbourhood_group", f"cannot split: {exc}") from exc
    return rest.reset_index(drop=True), part.reset_index(drop=True)
