"""Listings cleaned as a city's profile says (each rule counted, each bad value named) and split, on small frames."""


import pandas as pd
import pytest
from conftest import clean_frame, frame, listing, nyc

from components import checks, cities, listings
from components.errors import StepError

NYC = cities.city()


def test_clean_counts_what_each_rule_drops():
    df, dropped = listings.clean_listings(frame(
        listing(id=1, price=5), listing(id=2, price=351), listing(id=3, price=10), listing(id=4, price=350),
        listing(id=5, longitude=-75.0), listing(id=6, latitude=41.5), listing(id=3, price=99), listing(id=7, price=None),
    ), NYC)
    assert dropped == {"unreadable": 0, "no_price": 1, "price_range": 2, "outside_box": 2, "duplicate_id": 1}
    assert df["id"].tolist() == [3, 4]
    assert pd.api.types.is_datetime64_any_dtype(df["last_review"])


@pytest.mark.parametrize("column, written", [("id", "4.98554E+17"), ("price", "call me"), ("last_review", "soon")])
def test_a_minority_of_unreadable_values_is_dropped_and_counted_and_a_majority_fails_naming_the_column(
        sample, column, written):
    """As a real file comes: a spreadsheet rounded some long ids, a price or a date someone typed in."""
    raw = sample.astype({"id": "str", "price": "object"})
    some = raw.sample(frac=0.17, random_state=0).index
    df, dropped = listings.clean_listings(raw.assign(**{column: raw[column].where(~raw.index.isin(some), written)}), NYC)
    assert dropped["unreadable"] == len(some) and len(df) == 19001 - int(raw.loc[some, "price"].between(10, 350).sum())
    found = df.attrs["unreadable"][column]
    assert found["rows"] == len(some) and f"e.g. [{written!r}" in found["problem"]
    most = raw.sample(frac=0.6, random_state=1).index
    with pytest.raises(StepError, match=rf"clean: {column}: {len(most)} value\(s\) .* \({len(most)} of 20000 rows, "
                                        r"60.0%: more than the city profile's max_unreadable 25%\)"):
        listings.clean_listings(raw.assign(**{column: raw[column].where(~raw.index.isin(most), written)}), NYC)


def test_clean_box_and_price_are_parameters():
    df, dropped = listings.clean_listings(frame(listing(price=500), listing(id=2, price=20)), nyc(
        min_price=100, max_price=600, min_longitude=-80, max_longitude=-70, min_latitude=40, max_latitude=42))
    assert df["id"].tolist() == [1] and dropped["price_range"] == 1


def test_clean_keeps_missing_last_review():
    df = clean_frame(listing(last_review=None, reviews_per_month=None))
    assert len(df) == 1 and pd.isna(df["last_review"][0])


def test_clean_names_a_non_numeric_price():
    with pytest.raises(StepError, match=r"clean: price: 1 value\(s\) are not numbers, e.g. \['eighty'\]"):
        clean_frame(listing(), listing(id=2, price="eighty"))


def test_clean_names_a_bad_date():
    with pytest.raises(StepError, match="clean: last_review: 1 value.* not dates"):
        clean_frame(listing(last_review="yesterday"))


def test_clean_names_a_missing_column():
    df = frame(listing()).rename(columns={"price": "cost"})
    with pytest.raises(StepError, match=r"clean: price: 1 column\(s\) missing from the data: \['price'\]"):
        listings.clean_listings(df, NYC)


def test_clean_names_every_missing_column_at_once():
    df = frame(listing()).drop(columns=["price", "room_type", "last_review"])
    with pytest.raises(StepError, match=r"clean: room_type, price, last_review: 3 column\(s\) missing from the data: "
                                        r"\['room_type', 'price', 'last_review'\]"):
        listings.clean_listings(df, NYC)


def test_clean_fails_when_every_row_is_filtered_out():
    with pytest.raises(StepError, match="clean: .*every row was filtered out.*'price_range': 2"):
        clean_frame(listing(price=1), listing(id=2, price=1000))


def test_write_and_read_keep_the_schema(tmp_path):
    df = clean_frame(listing(), listing(id=2, last_review=None))
    listings.write_listings(df, tmp_path / "clean.csv")
    back = listings.read_listings(tmp_path / "clean.csv")
    assert checks.failed(checks.deterministic_checks(back, nyc(min_rows=1, max_rows=10))) == []
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_split_is_stratified_and_seeded(sample):
    df, _ = listings.clean_listings(sample, NYC)
    trainval, test = listings.split_listings(df, 0.2, seed=42)
    again, _ = listings.split_listings(df, 0.2, seed=42)
    assert len(test) == 3801 and len(trainval) + len(test) == len(df)  # ceil(0.2 * 19,001)
    pd.testing.assert_frame_equal(trainval, again)
    share = df["neighbourhood_group"].value_counts(normalize=True)
    test_share = test["neighbourhood_group"].value_counts(normalize=True)
    assert (share - test_share).abs().max() < 0.002
    assert set(trainval["id"]).isdisjoint(test["id"])


def test_split_rejects_a_bad_test_size():
    with pytest.raises(StepError, match="split: test_size: must be between 0 and 1"):
        listings.split_listings(clean_frame(listing()), 1.5, 1)


def test_a_quoted_name_that_spans_lines_is_one_row():
    raw = frame(listing(id=1, name="Loft\nwith a view, \"quoted\""), listing(id=2)).to_csv(index=False).encode()
    assert raw.count(b"\n") == 4  # header, two rows, one of them over two lines
    df, _ = listings.clean_listings(listings.parse_csv(raw, "clean"), NYC)
    assert df["id"].tolist() == [1, 2] and df["name"][0] == "Loft\nwith a view, \"quoted\""
