"""Listings: Inside Airbnb's summary columns, parsed and cleaned as a city's profile says, and split; the clean step."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from components import tracking
from components.cities import City
from components.errors import InvalidData, StepError

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


def parse_csv(raw: bytes, step: str = "download") -> pd.DataFrame:
    """Parse raw bytes as a listings CSV, with an error that says what is wrong with the file. Text columns and ids
    stay text (a zip code is not a number; an id is checked digit by digit in clean)."""
    if not raw.strip():
        raise InvalidData(step, "source", "the file is empty")
    try:
        df = pd.read_csv(io.BytesIO(raw), encoding="utf-8", dtype={c: "str" for c in TEXT_COLUMNS + IDS})
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InvalidData(step, "source", f"not a readable CSV file: {exc}") from exc
    if df.shape[1] < 2:
        raise InvalidData(step, "source", f"not a CSV table: found {df.shape[1]} column(s), expected {len(REQUIRED)}")
    if df.empty:
        raise InvalidData(step, "source", "the CSV has a header but no rows")
    return df


# ---------------------------------------------------------------- clean

def require_columns(df: pd.DataFrame, columns: list[str], step: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InvalidData(step, ", ".join(missing), f"{len(missing)} column(s) missing from the data: {missing} "
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


def parse_column(df: pd.DataFrame, column: str, step: str, kind: str, date_formats=()) -> tuple[pd.Series, str]:
    """The column as numbers or dates (NaN/NaT where a value does not parse), and what a value that is present but
    does not parse is said to be not ("" when every one parses)."""
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
    return values, (f"{len(bad)} value(s) are not {expected}, e.g. {bad.head(3).tolist()}" if len(bad) else "")


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


def parse_ids(df: pd.DataFrame, column: str) -> tuple[pd.Series, str]:
    """Ids as exact integers (missing where not): a spreadsheet writes a long id as 7.13172E+17, and two listings
    then share it. And what the ones that are not exact are ("" when all are)."""
    ids = exact_ids(df[column])
    bad = df[column][ids.isna()]
    return ids, (f"{len(bad)} value(s) are empty or not whole numbers as written, e.g. "
                 f"{bad.head(3).fillna('').tolist()}: ids must be exact (a spreadsheet rounds long ids to forms like "
                 "7.13172E+17); take the file as downloaded, not as a spreadsheet saved it" if len(bad) else "")


def drop_unreadable(df: pd.DataFrame, unreadable: dict[str, tuple[pd.Series, str]], city: City,
                    ) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Rows with a value that cannot be read (`unreadable`: per column, which rows and what they are), dropped when
    each column's share is within the city's max_unreadable; past it, clean fails naming the column. Returns the
    rows kept and, per column, how many were dropped and examples."""
    found, drop = {}, pd.Series(False, index=df.index)
    for column, (bad, message) in unreadable.items():
        if not bad.any():
            continue
        share = bad.mean()
        if share > city.max_unreadable:
            raise InvalidData("clean", column, f"{message} ({int(bad.sum())} of {len(df)} rows, {share:.1%}: more than "
                                               f"the city profile's max_unreadable {city.max_unreadable:.0%})")
        found[column] = {"rows": int(bad.sum()), "problem": message}
        drop |= bad
    return df[~drop], found


def clean_listings(
    df: pd.DataFrame, city: City, keep_unpriced: bool = False
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Type the known columns and apply the cleaning rules; return the clean frame and how many rows each rule
    dropped. `keep_unpriced` keeps listings with no price (monitoring looks at them too; training cannot learn
    from them)."""
    df, _ = known_columns(df, "clean")
    df = df.copy()
    unreadable = {}  # column: (its rows that cannot be read, what they are)
    for column in IDS:
        df[column], problem = parse_ids(df, column)
        unreadable[column] = (df[column].isna(), problem)
    for column in NUMBER_COLUMNS:
        if column in df.columns:
            values, problem = parse_column(df, column, "clean", "number")
            unreadable[column] = (values.isna() & df[column].notna(), problem)
            df[column] = values
    for column in TEXT_COLUMNS:
        if column in df.columns:  # a zip code read as a number, or a column empty in every row, is still text
            df[column] = df[column].astype("str")
    values, problem = parse_column(df, "last_review", "clean", "date", city.date_formats)
    unreadable["last_review"] = (values.isna() & df["last_review"].notna(), problem)
    df["last_review"] = values
    rows_read = len(df)
    kept, found = drop_unreadable(df, unreadable, city)
    df = kept.astype({column: "int64" for column in IDS})

    dropped = {"unreadable": rows_read - len(df)}
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
        raise InvalidData("clean", "price/latitude/longitude", f"every row was filtered out (dropped: {dropped}; "
                        f"city {city.name}: price [{city.min_price}, {city.max_price}], box {city.box})")
    df.attrs["unreadable"] = found  # per column: rows dropped and what they were (clean's metadata names them)
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


def clean(raw_path: str, out_path: str, city: str | dict, keep_unpriced: bool = False) -> dict:
    """Clean the listings as the city's profile (`city`, a run's parameter) says. Its metadata carries the profile
    as used, and the unknown columns clean ignored."""
    profile = City.from_param(city, "clean")
    params = {**{"city" if k == "name" else k: json.dumps(v) if isinstance(v, list) else v
                 for k, v in profile.as_dict().items()}, "keep_unpriced": keep_unpriced}
    with tracking.step_run("clean", params=params) as run:
        df, ignored = known_columns(parse_csv(Path(raw_path).read_bytes(), "clean"), "clean")
        shape = listing_format(df.columns)
        df, dropped = clean_listings(df, profile, keep_unpriced)
        write_listings(df, out_path)
        counts, unreadable = clean_counts(df, dropped), df.attrs.get("unreadable", {})
        mlflow.log_metrics(counts)
        mlflow.set_tags({"city": profile.name, "format": shape, "ignored_columns": ", ".join(ignored)})
        # The clean data is the reference for later statistical checks, so it is kept in MLflow too.
        mlflow.log_artifact(out_path, "data")
        reference = f"runs:/{run.info.run_id}/data/{Path(out_path).name}"
        for column, found in unreadable.items():
            print(f"clean: dropped {found['rows']} row(s) whose {column} cannot be read: {found['problem']}")
        ignoring = f", ignoring {len(ignored)} unknown column(s) ({', '.join(ignored)})" if ignored else ""
        print(f"clean: {profile.name} listings in {shape}{ignoring}: {len(df)} rows kept; dropped "  # its last line
              f"{', '.join(f'{n} ({rule})' for rule, n in dropped.items())}")
        return {**counts, "mlflow_run_id": run.info.run_id, "reference_uri": reference, "city": profile.as_dict(),
                "format": shape, "ignored_columns": ignored, "unreadable": unreadable}


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
