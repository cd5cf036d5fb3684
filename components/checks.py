"""The data's own checks: its columns, their types and ranges as its city's profile says (drift.py compares it with
prod's data; validation.py is the step that runs both)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from components.cities import City
from components.listings import REQUIRED, SCHEMA, listing_format


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


def _check(check: str, bad: bool, observed: str, threshold: str, message: str) -> Check:
    return Check(check, FAIL if bad else PASS, observed, threshold, message if bad else "")


def deterministic_checks(df: pd.DataFrame, city: City, ignored: list[str] = (), training: bool = True) -> list[Check]:
    """Every check of the data on its own against its city's profile, passed or failed (failed() lists the
    failures' messages); `ignored` names the unknown columns clean left out (a warning). Fewer rows than the
    profile's min_rows fail `training` data; monitored data is judged on them all the same (a warning)."""
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
    if len(df) < low and not training:
        checks.append(Check("row count", WARN, str(len(df)), f"[{low}, {high}]",
                            f"row count: {len(df)}, fewer than the {low} training needs"))
    else:
        checks.append(_check("row count", not low <= len(df) <= high, str(len(df)), f"[{low}, {high}]",
                             f"row count: {len(df)} not within [{low}, {high}]"))
    if "price" in df.columns:
        low, high = city.min_price, city.max_price
        outside = int((df["price"].notna() & ~df["price"].between(low, high)).sum())
        checks.append(_check("price range", outside > 0, f"{outside} row(s) outside", f"[{low}, {high}]",
                             f"price: {outside} row(s) outside [{low}, {high}]"))
    return checks
