"""Do the rows look like real listings? Real subsets of the shared sample pass every signal; files generated,
duplicated or corrupted from it fail at least one. And the verdicts and retrain decisions monitoring makes of them."""

import numpy as np
import pandas as pd
import pytest
from components import checks, cities, drift, listings, monitoring, quality
from components.checks import FAIL, PASS, UNKNOWN, WARN, Check


@pytest.fixture(scope="module")
def clean(sample) -> pd.DataFrame:
    df, _ = listings.clean_listings(sample, cities.city())
    return df


def failing(df: pd.DataFrame) -> list[str]:
    return [c.check.removeprefix("looks real: ") for c in quality.quality_checks(df) if c.status == FAIL]


@pytest.mark.parametrize("rows, seed", [(200, 0), (200, 1), (1000, 2), (5000, 3), (None, 4)])
def test_real_listings_pass_every_signal(clean, rows, seed):
    """Random subsets of the real sample, and its halves."""
    subset = clean.sample(rows or len(clean) // 2, random_state=seed)
    assert failing(subset) == []


def test_one_borough_alone_passes_and_a_city_without_area_groups_is_not_measured_on_them(clean):
    assert failing(clean[clean["neighbourhood_group"] == "Queens"]) == []
    found = {c.check: c for c in quality.quality_checks(clean.head(3000).assign(neighbourhood_group=None))}
    assert found["looks real: coordinates match the area group"].status == checks.SKIP
    assert [c for c in found.values() if c.status == FAIL] == []


def generated(clean: pd.DataFrame, n: int = 8500, seed: int = 0) -> pd.DataFrame:
    """A file made up in the sample's format: uniform numbers in its ranges, categories at random, names from a
    template, consecutive ids."""
    rng = np.random.default_rng(seed)
    pick = lambda column: rng.choice(clean[column].dropna().unique(), n)  # noqa: E731
    return pd.DataFrame({
        "id": np.arange(100_000, 100_000 + n), "host_id": rng.integers(1, 10**8, n), "host_name": pick("host_name"),
        "name": [f"Cozy {kind} near the park" for kind in rng.choice(["room", "apartment", "loft"], n)],
        "neighbourhood_group": pick("neighbourhood_group"), "neighbourhood": pick("neighbourhood"),
        "latitude": rng.uniform(40.55, 40.9, n), "longitude": rng.uniform(-74.1, -73.75, n),
        "room_type": pick("room_type"), "price": rng.integers(20, 340, n), "minimum_nights": rng.integers(1, 30, n),
        "number_of_reviews": rng.integers(0, 200, n),
        "last_review": pd.Timestamp("2019-01-01") + pd.to_timedelta(rng.integers(0, 365, n), "D"),
        "reviews_per_month": rng.uniform(0, 5, n).round(2), "calculated_host_listings_count": rng.integers(1, 10, n),
        "availability_365": rng.integers(0, 365, n)})


def test_generated_duplicated_and_corrupted_files_fail_naming_the_signal(clean):
    assert set(failing(generated(clean))) >= {"name variety", "consecutive ids", "coordinates match the area group"}
    # Each column drawn on its own from the real sample's values: real values, no real listing.
    independent = pd.DataFrame({c: clean[c].sample(8500, replace=True, random_state=i).to_numpy()
                                for i, c in enumerate(clean.columns)})
    assert set(failing(independent)) >= {"reviews inconsistent", "coordinates match the area group"}
    half = clean.sample(3000, random_state=5)
    twice = pd.concat([half, half.assign(id=half["id"] + 10**9)])  # the same listings again under new ids
    assert set(failing(twice)) >= {"repeated rows", "repeated coordinates"}
    shuffled = clean.assign(**{c: clean[c].sample(frac=1, random_state=6).to_numpy() for c in ("latitude", "longitude")})
    assert failing(shuffled) == ["coordinates match the area group"]
    message = quality.suspect(quality.quality_checks(twice))[0]
    assert message.startswith("rows: repeated rows: share of rows that repeat another in every column but the id is "
                              "0.500, above 0.05: the data looks generated")


def test_too_few_rows_are_not_measured(clean):
    assert {c.status for c in quality.quality_checks(generated(clean, n=150))} == {checks.SKIP}


ERROR = drift.ERROR_CHECK


@pytest.mark.parametrize("own, against, verdict, reason", [
    ([Check("columns", FAIL, "", "", "price: missing")], [], "invalid", "price: missing"),
    ([Check("looks real: name variety", FAIL, "0.1", "", "rows: name variety: ...")], [], "suspect",
     "rows: name variety: ..."),
    ([], [Check(ERROR, WARN, "1.31 x (1.22 to 1.40; ...)", "", "price: prod version 1's MAE ... all above 1.1"),
          Check("price drift", WARN, "PSI 0.2", "")], "degraded", "prod version 1's MAE ... all above 1.1"),
    ([], [Check(ERROR, PASS, "1.18 x (0.95 to 1.41; ...)", ""), Check("price drift", WARN, "PSI 0.2", "")], "shifted",
     "price PSI 0.2; prod's error is not worse with evidence: 1.18 x (0.95 to 1.41; ...)"),
    ([], [Check(ERROR, WARN, UNKNOWN, "", "price: prod's error on this data is unknown: no prices"),
          Check("room_type drift", FAIL, "PSI 0.4", "")], "shifted",
     "room_type PSI 0.4; prod's error on them is not measured (no prices)"),
    ([], [Check(ERROR, PASS, "0.98 x (0.95 to 1.01; ...)", ""), Check("price drift", PASS, "PSI 0.0", "")], "ok",
     "nothing moved that matters; prod's error is not worse with evidence: 0.98 x (0.95 to 1.01; ...)"),
])
def test_the_verdict_and_its_reason(own, against, verdict, reason):
    assert monitoring.verdict_of(own, against) == (verdict, reason)


@pytest.mark.parametrize("verdict, on_shift, trainable, start", [
    ("degraded", False, True, True), ("shifted", False, True, False), ("shifted", True, True, True),
    ("ok", True, True, False), ("suspect", True, True, False), ("degraded", False, False, False),
])
def test_retraining_starts_only_where_it_helps(verdict, on_shift, trainable, start):
    summary = {"verdict": verdict, "reason": "why", "trainable": trainable, "not_trainable_because": ["price: x"]}
    started, why = monitoring.retrain_decision(summary, on_shift)
    assert started is start
    assert why.startswith(f"the verdict is {verdict}" if trainable else "training's checks would refuse this data")
