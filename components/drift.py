"""Drift: how far new listings are from prod's data (PSI, KS), what clean dropped of each, and prod's error on them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from components.checks import FAIL, PASS, SKIP, UNKNOWN, WARN, Check

# Numeric columns whose distribution is compared with prod's data (those the data has).
DRIFT_COLUMNS = [
    "price", "latitude", "longitude", "minimum_nights", "number_of_reviews",
    "reviews_per_month", "calculated_host_listings_count", "availability_365", "number_of_reviews_ltm",
]


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


# prod's error interval: a bootstrap over the new rows, as the promotion gate's (components/gate.py).
CONFIDENCE, RESAMPLES, BATCH = 0.95, 2000, 50
CATEGORY_COLUMNS = ["neighbourhood_group", "room_type"]
ERROR_CHECK = "prod's error on new rows"
COVERAGE_CHECK = "prod's price ranges on new rows"
# prod's ranges count as degrading when their coverage on new priced rows is further than this from nominal, with
# evidence (the promotion gate refuses a candidate past the same gap).
MAX_COVERAGE_GAP = 0.05
# Fewer values than this in a numeric column and its drift is not measured: KS between two samples of one
# distribution exceeds warn_ks by chance at 30 values, and stays under it from about 100.
MIN_DRIFT_VALUES = 200
# How clean sorts the rows it reads (its `dropped` counts, and the rows kept).
CLEAN_OUTCOMES = ["rows", "dropped_no_price", "dropped_price_range", "dropped_outside_box", "dropped_duplicate_id",
                  "dropped_unreadable"]
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
    checks, figures = [], {}
    fail, warn = limits.max_category_psi, limits.warn_psi
    limit = f"fail > {fail}, warn > {warn}"
    for column in CATEGORY_COLUMNS:
        psi = figures[f"psi_{column}"] = category_psi(df[column], reference[column])
        gone = sorted(set(reference[column].dropna()) - set(df[column].dropna()))
        missing = f"; no rows of {gone}" if gone else ""
        observed = f"PSI {psi:.3f}{missing}"
        if psi > fail:
            checks.append(Check(f"{column} drift", FAIL, observed, limit, f"{column}: distribution shifted from "
                                f"prod's data (PSI {psi:.3f} > {fail}{missing})"))
        elif psi > warn:
            checks.append(Check(f"{column} drift", WARN, observed, limit,
                                f"{column}: distribution moved (PSI {psi:.3f} > {warn}{missing})"))
        else:
            checks.append(Check(f"{column} drift", PASS, observed, limit))
    for column in DRIFT_COLUMNS:
        if (column in df.columns) != (column in reference.columns):  # e.g. today's format against 2019's
            side = "the new data" if column in df.columns else "prod's data"
            checks.append(Check(f"{column} drift", SKIP, f"only in {side}", "in both"))
            continue
        if column not in df.columns:
            continue
        check, found = numeric_check(column, df[column], reference[column], limits)
        checks.append(check)
        figures |= found
    return checks, figures


def numeric_check(column: str, current: pd.Series, reference: pd.Series, limits: DriftLimits
                  ) -> tuple[Check, dict[str, float]]:
    """A numeric column's shift from prod's data (PSI over its deciles and KS): warns past the limits."""
    from scipy.stats import ks_2samp

    values, warn = int(current.notna().sum()), limits.warn_psi
    if values < MIN_DRIFT_VALUES:  # listings with no price yet, say: too few to tell a shift from chance
        return Check(f"{column} drift", SKIP, f"{values} value(s) in the new data",
                     f"at least {MIN_DRIFT_VALUES} values"), {}
    key = column.replace(" ", "_")
    psi, ks = numeric_psi(current, reference), float(ks_2samp(current.dropna(), reference.dropna()).statistic)
    moved = psi > warn or ks > limits.warn_ks
    return Check(f"{column} drift", WARN if moved else PASS, f"PSI {psi:.3f}, KS {ks:.3f}",
                 f"warn > {warn} / {limits.warn_ks}", moved and (
                     f"{column}: distribution moved (PSI {psi:.3f}, KS statistic {ks:.3f}; warn above "
                     f"{warn} / {limits.warn_ks})") or ""), {f"psi_{key}": psi, f"ks_{key}": ks}


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
    warn = limits.warn_psi
    return (Check(name, WARN if psi > warn else PASS, observed, f"warn > {warn}",
                  f"rows clean drops: {observed}" if psi > warn else ""), {"psi_clean_drops": psi})


def error_check(errors: np.ndarray, mae_registered: float, version: str,
                limits: DriftLimits) -> tuple[Check, dict[str, float]]:
    """prod's absolute errors on the new rows (rows it was not trained on) against its test MAE at registration:
    worse only with evidence, i.e. when the whole bootstrap interval of the ratio lies past a limit (the data the
    model will learn from no longer relates price to the listing as before)."""
    from scipy import stats  # here: only check and monitor measure prod's error

    errors = np.asarray(errors, dtype=float)
    mae_now = float(errors.mean())
    interval = stats.bootstrap((errors,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, batch=BATCH,
                               method="percentile", random_state=0).confidence_interval
    ratio, low, high = mae_now / mae_registered, interval.low / mae_registered, interval.high / mae_registered
    figures = {"prod_mae_now": mae_now, "prod_mae_registered": mae_registered, "prod_error_ratio": ratio,
               "prod_error_ratio_low": float(low), "prod_error_ratio_high": float(high), "prod_error_rows": len(errors)}
    text = (f"prod version {version}'s MAE on {len(errors)} rows new to it is {mae_now:.2f}, {ratio:.2f} x its "
            f"{mae_registered:.2f} at registration ({CONFIDENCE:.0%} interval {low:.2f} to {high:.2f} x)")
    name = ERROR_CHECK
    observed = f"{ratio:.2f} x ({low:.2f} to {high:.2f}; MAE {mae_now:.2f} vs {mae_registered:.2f}, {len(errors)} rows)"
    limit = f"fail if all > {limits.max_error_ratio} x, warn if all > {limits.warn_error_ratio} x"
    if low > limits.max_error_ratio:
        return Check(name, FAIL, observed, limit, f"price: {text}: all above {limits.max_error_ratio}: prices no "
                     "longer follow the listings as they did"), figures
    if low > limits.warn_error_ratio:
        return Check(name, WARN, observed, limit, f"price: {text}: all above {limits.warn_error_ratio}"), figures
    return Check(name, PASS, observed, limit), figures


def coverage_check(prices: pd.Series, ranges: pd.DataFrame, version: str) -> tuple[Check, dict[str, float]]:
    """The share of new prices inside prod's ranges against its nominal share: off only with evidence, i.e. when the
    whole exact binomial interval of the share lies more than MAX_COVERAGE_GAP from nominal."""
    from scipy import stats

    inside = int(prices.between(ranges["low"], ranges["high"]).sum())
    rows, nominal = len(prices), ranges.attrs["coverage"]
    interval = stats.binomtest(inside, rows).proportion_ci(CONFIDENCE, method="exact")
    share, low, high = inside / rows, float(interval.low), float(interval.high)
    figures = {"prod_coverage": share, "prod_coverage_low": low, "prod_coverage_high": high}
    observed = f"{share:.1%} ({low:.1%} to {high:.1%}; nominal {nominal:.0%}, {rows} rows)"
    limit = f"warn if all beyond {nominal:.0%} ± {MAX_COVERAGE_GAP * 100:.0f} points"
    if high < nominal - MAX_COVERAGE_GAP or low > nominal + MAX_COVERAGE_GAP:
        return Check(COVERAGE_CHECK, WARN, observed, limit,
                     f"price: prod version {version}'s ranges hold {share:.1%} of {rows} new prices ({CONFIDENCE:.0%} "
                     f"interval {low:.1%} to {high:.1%}), not the nominal {nominal:.0%}: its ranges no longer hold "
                     "as promised"), figures
    return Check(COVERAGE_CHECK, PASS, observed, limit), figures


def drifted(checks: list[Check]) -> dict[str, str]:
    """What moved, as a monitor names it: each drift check (by column) and prod's error check that warned or
    failed, with its figure. A check that could not measure says nothing either way."""
    return {c.check.removesuffix(" drift"): c.observed for c in checks
            if c.status in (WARN, FAIL) and c.observed != UNKNOWN
            and (c.check.endswith(" drift") or c.check == ERROR_CHECK)}


