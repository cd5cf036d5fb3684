"""Do these rows look like real listings? Data-quality signals that real exports pass and generated, duplicated or
corrupted files fail. A failed signal makes a monitored file `suspect` and stops a training run, naming it.

Calibrated on the shared sample (README, Monitoring): its whole, its halves, random subsets of 200 to 5,000 rows and
single boroughs score at the real end of every signal (repeated rows and coordinates 0.000, names 0.99 distinct or
more, consecutive ids 0.001 at most, reviews inconsistent 0.000, area agreement 0.93 or more); columns drawn
independently from the sample's own values, uniform values in the profile's ranges, a file repeated twice and
coordinates shuffled across listings each fail at least one by a wide margin. The limits sit between the two.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from components.checks import FAIL, PASS, SKIP, UNKNOWN, Check

# Fewer rows than this and the signals are not measured (a handful of listings can look like anything).
MIN_ROWS = 200
# Area agreement is measured on at most this many rows (a k-nearest-neighbours fit, cross-validated).
AREA_ROWS = 20_000
LIMITS = {  # signal: (the limit, which side fails, what it measures)
    "repeated rows": (0.05, "above", "share of rows that repeat another in every column but the id"),
    "repeated coordinates": (0.10, "above", "share of rows whose latitude and longitude repeat another row's exactly"),
    "name variety": (0.5, "below", "distinct listing names per row"),
    "consecutive ids": (0.5, "above", "share of ids (sorted) that follow the one before by 1"),
    "reviews inconsistent": (0.05, "above", "share of rows with reviews but no last review date, or none and a date"),
    "coordinates match the area group": (0.8, "below", "share of rows whose area group their 5 nearest listings "
                                                        "predict, cross-validated"),
}
NAMES = [f"looks real: {signal}" for signal in LIMITS]


def quality_checks(df: pd.DataFrame) -> list[Check]:
    """Each signal as a check: failed when past its limit (the data looks generated, duplicated or corrupted)."""
    if len(df) < MIN_ROWS:
        return [Check(name, SKIP, UNKNOWN, f"{MIN_ROWS} rows at least", "") for name in NAMES]
    return [_check(signal, value) for signal, value in signals(df).items()]


def signals(df: pd.DataFrame) -> dict[str, float | None]:
    """Each signal's value on the rows (None: not measurable on these columns)."""
    others = [c for c in df.columns if c != "id"]
    ids = np.sort(pd.to_numeric(df["id"], errors="coerce").dropna().to_numpy())
    has_reviews = df["number_of_reviews"].fillna(0) > 0
    found = {
        "repeated rows": float(df.duplicated(subset=others).mean()),
        "repeated coordinates": float(df.duplicated(subset=["latitude", "longitude"], keep=False).mean()),
        "name variety": float(df["name"].nunique() / len(df)),
        "consecutive ids": float((np.diff(ids) == 1).mean()) if len(ids) > 1 else None,
        "reviews inconsistent": float((has_reviews == df["last_review"].isna()).mean()),
        "coordinates match the area group": area_agreement(df),
    }
    return found


def area_agreement(df: pd.DataFrame, seed: int = 0) -> float | None:
    """How well a listing's coordinates tell its area group (real listings: nearly always); None for a city without
    area groups, or with one."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rows = df.dropna(subset=["neighbourhood_group", "latitude", "longitude"])
    if rows["neighbourhood_group"].nunique() < 2 or len(rows) < MIN_ROWS:
        return None
    rows = rows.sample(min(len(rows), AREA_ROWS), random_state=seed)
    counts = rows["neighbourhood_group"].value_counts()
    rows = rows[rows["neighbourhood_group"].isin(counts[counts >= 3].index)]  # a group in each of the 3 folds
    if rows["neighbourhood_group"].nunique() < 2:
        return None
    return float(cross_val_score(KNeighborsClassifier(5), rows[["latitude", "longitude"]].to_numpy(),
                                 rows["neighbourhood_group"].astype(str), cv=3).mean())


def _check(signal: str, value: float | None) -> Check:
    limit, side, what = LIMITS[signal]
    name, threshold = f"looks real: {signal}", f"fail {side} {limit}"
    if value is None:
        return Check(name, SKIP, UNKNOWN, threshold, "")
    bad = value > limit if side == "above" else value < limit
    if not bad:
        return Check(name, PASS, f"{value:.3f}", threshold)
    return Check(name, FAIL, f"{value:.3f}", threshold,
                 f"rows: {signal}: {what} is {value:.3f}, {side} {limit}: the data looks generated, duplicated or "
                 "corrupted, not like real listings")


def suspect(checks: list[Check]) -> list[str]:
    """The failed data-quality signals' messages."""
    return [c.message for c in checks if c.check in NAMES and c.status == FAIL]


def is_quality(check: Check) -> bool:
    return check.check in NAMES
