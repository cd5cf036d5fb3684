"""The data's own checks (components/checks.py), on the real sample and on small frames built here."""


from conftest import clean_frame, listing, nyc

from components import checks, cities, listings

NYC = cities.city()


def test_deterministic_checks_pass_on_clean_real_data(sample):
    df, _ = listings.clean_listings(sample, NYC)
    assert checks.failed(checks.deterministic_checks(df, NYC)) == []


def test_deterministic_checks_list_every_failure():
    df = clean_frame(listing(), listing(id=2))
    df.loc[1, "neighbourhood_group"] = "Atlantis"
    df.loc[0, "latitude"] = 45.0
    df.loc[0, "price"] = 999
    df = df.rename(columns={"name": "title"})
    failures = checks.failed(checks.deterministic_checks(df, nyc(min_rows=5, max_rows=100)))
    subjects = [f.split(":")[0] for f in failures]
    assert subjects == ["columns", "neighbourhood_group", "latitude/longitude", "row count", "price"]
    assert "unknown values ['Atlantis']" in failures[1]


def test_deterministic_checks_catch_wrong_dtypes():
    df = clean_frame(listing(), listing(id=2))
    df["minimum_nights"] = ["two", "three"]
    assert checks.failed(checks.deterministic_checks(df, nyc(min_rows=1, max_rows=10))) == [
        "dtype of minimum_nights: expected int, got str"]
