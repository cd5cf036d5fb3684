"""Drift from prod's data (components/drift.py): real halves of the sample pass, real shifts are named."""

import numpy as np
import pandas as pd
import pytest

from components import checks, cities, drift, listings, monitoring

NYC = cities.city()

LIMITS = drift.DriftLimits()


@pytest.fixture(scope="module")
def halves(sample):
    df, _ = listings.clean_listings(sample, NYC)
    return listings.split_listings(df, 0.5, seed=7)


def test_drift_checks_pass_between_disjoint_halves_of_real_data(halves):
    first, second = halves
    found, figures = drift.drift_checks(first, second, LIMITS)
    assert {c.status for c in found} == {checks.PASS} and len(found) == 10
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
    found, _ = drift.drift_checks(shift(first), second, LIMITS)
    failures, warnings = checks.failed(found), checks.warned(found)
    assert [f for f in failures if f.startswith(fails)] if fails else failures == []
    assert [w for w in warnings if w.startswith(warns)] if warns else warnings == []


@pytest.mark.parametrize("mae_now, rows, failed, warned", [
    (33.4, 8000, False, False), (38.5, 8000, False, True), (50.9, 8000, True, False), (69.0, 8000, True, False),
    (39.2, 200, False, False),  # 1.18 x on 200 rows: its interval reaches below 1.1, no evidence
])
def test_error_check_fails_when_prod_no_longer_fits_the_data_with_evidence(mae_now, rows, failed, warned):
    """Figures of prod (33.2 at registration) on the other half, +15 %, +30 % and shuffled prices (README): the
    whole bootstrap interval of the ratio must lie past a limit."""
    errors = np.random.default_rng(0).exponential(1.0, rows)
    errors *= mae_now / errors.mean()  # absolute errors as real ones spread, with this mean
    check, figures = drift.error_check(errors, 33.2, "3", LIMITS)
    failures, warnings = checks.failed([check]), checks.warned([check])
    assert bool(failures) is failed and bool(warnings) is warned
    assert figures["prod_error_ratio"] == pytest.approx(mae_now / 33.2)
    assert figures["prod_error_ratio_low"] < figures["prod_error_ratio"] < figures["prod_error_ratio_high"]
    width = figures["prod_error_ratio_high"] - figures["prod_error_ratio_low"]
    assert width < 0.1 if rows == 8000 else width > 0.2  # the interval narrows with rows
    if failed:
        assert failures[0].startswith(f"price: prod version 3's MAE on 8000 rows new to it is {mae_now:.2f}, "
                                      f"{mae_now / 33.2:.2f} x its 33.20 at registration (95% interval ")


def test_psi_is_zero_for_equal_distributions_and_large_for_a_missing_category():
    same = pd.Series(["a", "b", "b"])
    assert drift.category_psi(same, same) == pytest.approx(0, abs=1e-12)
    # a: 0 vs 1/3 (floored at 1e-4), b: 1 vs 2/3: (1e-4 - 1/3) ln(1e-4 * 3) + (1/3) ln(1.5) = 2.84
    assert drift.category_psi(pd.Series(["b", "b"]), same) == pytest.approx(2.8379, abs=1e-3)
    numbers = pd.Series(range(1000), dtype=float)
    assert drift.numeric_psi(numbers, numbers) == pytest.approx(0, abs=1e-12)
    assert drift.numeric_psi(numbers + 500, numbers) > 1


@pytest.mark.parametrize("rows, inside, warned", [(1000, 780, False), (1000, 700, True), (1000, 900, True),
                                                  (200, 140, False)])
def test_coverage_check_warns_only_when_its_whole_interval_is_more_than_5_points_off(rows, inside, warned):
    """70 % of 1,000 prices inside 80 % ranges is evidence; 70 % of 200 is not (its interval reaches 75 %)."""
    prices = pd.Series(np.arange(rows, dtype=float))
    held = np.arange(rows) < inside
    ranges = pd.DataFrame({"low": np.where(held, prices - 1, prices + 1), "high": prices + 2})
    ranges.attrs["coverage"] = 0.8
    check, figures = drift.coverage_check(prices, ranges, "3")
    assert figures["prod_coverage"] == inside / rows
    assert figures["prod_coverage_low"] < inside / rows < figures["prod_coverage_high"]
    assert (check.status == checks.WARN) == warned
    if warned:
        assert check.message.startswith(f"price: prod version 3's ranges hold {inside / rows:.1%} of {rows} new prices")
        verdict, reason = monitoring.verdict_of([], [check])
        assert verdict == monitoring.DEGRADED and reason == check.message.removeprefix("price: ")
