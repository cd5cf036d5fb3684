"""Any city's listings: city profiles, both of Inside Airbnb's summary formats, and a whole run on a city file in
today's format built from the shared sample."""

import dataclasses
import json
import re
import tomllib

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import frame, listing, run_pipeline

from pipelines import cli
from components import checks, cities, drift, listings, model, prod, saved_model
from components.errors import StepError

NYC = cities.city()
# Where the test city's listings are: the sample moved by this many degrees (NYC to Austin, TX).
SHIFT = {"latitude": 30.27 - 40.73, "longitude": -97.74 + 73.95}
PROFILE = """\
name = "testville"
min_longitude = -98.1
max_longitude = -97.3
min_latitude = 30.0
max_latitude = 30.8
min_price = 10.0
max_price = 350.0
min_rows = 1000
max_rows = 1_000_000
area_groups = []
date_formats = ["%m/%d/%y"]
"""


def todays_format(sample: pd.DataFrame) -> pd.DataFrame:
    """The sample as a city exports it today: 18 columns and one the pipeline does not know, no area groups,
    dates as M/D/YY, zip codes for neighbourhoods, somewhere else."""
    rng = np.random.default_rng(0)
    df = sample.copy()
    df["number_of_reviews_ltm"] = (df["number_of_reviews"] * rng.uniform(0, 0.6, len(df))).round().astype(int)
    df["license"] = np.where(rng.uniform(size=len(df)) < 0.3, "STR-" + df["id"].astype(str), None)
    df["calendar_last_scraped"] = "2024-06-30"
    df["neighbourhood_group"] = None
    df["id"] = df["id"] + 1_200_000_000_000_000_000  # ids are 19 digits today
    codes = {name: 78701 + i for i, name in enumerate(sorted(df["neighbourhood"].unique()))}
    df["neighbourhood"] = df["neighbourhood"].map(codes)
    dates = pd.to_datetime(df["last_review"])
    df["last_review"] = [f"{d.month}/{d.day}/{d:%y}" if pd.notna(d) else None for d in dates]
    for column, shift in SHIFT.items():
        df[column] += shift
    return df


def profile() -> cities.City:
    return cities.City.from_dict(tomllib.loads(PROFILE), "test")


# ---------------------------------------------------------------- profiles

def test_the_shipped_nyc_profile_holds_what_was_nyc_specific():
    assert NYC.box == cities.Box(-74.25, -73.50, 40.5, 41.2)
    assert (NYC.min_price, NYC.max_price, NYC.min_rows, NYC.max_rows) == (10, 350, 1000, 1_000_000)
    assert NYC.area_groups == ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")
    assert cities.City.from_dict(NYC.as_dict(), "check") == NYC
    # KFP hands whole numbers back as floats: still the same profile.
    assert cities.City.from_dict({**NYC.as_dict(), "min_rows": 1000.0}, "check") == NYC


def test_a_run_names_a_shipped_city_or_holds_its_profile_as_json():
    """As a person types it in the KFP dashboard: nyc, or {"name": "nyc", "max_price": 500} (the rest from nyc)."""
    assert cities.City.from_param("nyc", "clean") == NYC == cities.City.from_param(NYC.as_param(), "clean")
    assert cities.City.from_param('{"name": "nyc", "max_price": 500}', "clean") == dataclasses.replace(NYC, max_price=500)
    assert NYC.as_param() == json.dumps(NYC.as_dict(), sort_keys=True)  # one text per profile: one cache key
    with pytest.raises(StepError, match="clean: city: not a profile in JSON"):
        cities.City.from_param('{"name": nyc}', "clean")


@pytest.mark.parametrize("given, problem", [
    ({**NYC.as_dict(), "max_prise": 500}, r"clean: city: unknown field\(s\) \['max_prise'\]"),
    ({**NYC.as_dict(), "min_rows": 10.5}, r"clean: city.min_rows: expected a whole number, got 10.5"),
    ({**NYC.as_dict(), "max_price": "cheap"}, r"clean: city.max_price: expected a number, got 'cheap'"),
    ({**NYC.as_dict(), "min_latitude": 42.0}, r"clean: city.min_latitude: 42.0 is not below max_latitude 41.2"),
    ({**NYC.as_dict(), "date_formats": "%m/%d/%y"}, r"clean: city.date_formats: expected a list of non-empty strings"),
    ({**NYC.as_dict(), "date_formats": ["MM/DD/YY"]}, r"clean: city.date_formats: 'MM/DD/YY' is not a strptime"),
    ({**NYC.as_dict(), "name": "New York"}, r"clean: city.name: expected the city's name in lower case"),
    ({"name": "atlantis"}, r"clean: city: atlantis's profile lacks \['area_groups', 'date_formats', 'max_latitude'"),
    ({**NYC.as_dict(), "max_rows": float("inf")}, r"clean: city.max_rows: expected a whole number, got inf"),
])
def test_a_bad_profile_is_refused_naming_the_field(given, problem):
    with pytest.raises(StepError, match=problem):
        cities.City.from_dict(given, "clean")


def test_the_command_line_takes_a_city_by_name_or_file_and_a_field_of_it_by_its_own_name(tmp_path):
    path = tmp_path / "testville.toml"
    path.write_text(PROFILE)
    assert cli.parse_params(["city=nyc"]) == {"city": NYC.as_param()}
    params = cli.parse_params([f"city={path}", "max_price=500", "date_formats=%d.%m.%Y,%m/%d/%y"])
    assert json.loads(params["city"]) == {**profile().as_dict(), "max_price": 500.0,
                                          "date_formats": ["%d.%m.%Y", "%m/%d/%y"]}
    assert params["model_name"] == "rental-price-testville"  # its own model: never compared with NYC's prod
    assert cli.parse_params([f"city={path}", "model_name=mine"])["model_name"] == "mine"
    assert cli.parse_params(["min_rows=10"]) == {"city": dataclasses.replace(NYC, min_rows=10).as_param()}
    assert cli.parse_params(['city={"name": "nyc", "max_rows": 5000}'])["city"] == dataclasses.replace(
        NYC, max_rows=5000).as_param()
    monitor = cli.parse_params([f"city={path}"], "monitor")
    assert json.loads(monitor["city"])["name"] == "testville" and monitor["model_name"] == "rental-price-testville"
    with pytest.raises(SystemExit, match=r"pipeline.py: city.max_price: expected a number, got 'lots'"):
        cli.parse_params(["max_price=lots"])
    with pytest.raises(SystemExit, match=r"no city profile 'atlantis': shipped ones are \['nyc'\]"):
        cli.parse_params(["city=atlantis"])
    with pytest.raises(SystemExit, match=r"no profile file '.*/nope.toml' \(no such file\)"):
        cli.parse_params([f"city={tmp_path / 'nope.toml'}"])
    with pytest.raises(SystemExit, match=r"pipeline.py: --param city: not a profile in JSON"):
        cli.parse_params(['city={"name": nyc}'])
    assert json.loads(cli.parse_params(["area_groups="])["city"])["area_groups"] == []


# ---------------------------------------------------------------- formats and parsing

def test_todays_format_is_read_kept_and_its_unknown_columns_named(sample):
    city_file = todays_format(sample.head(50))
    raw = city_file.to_csv(index=False).encode()
    df, ignored = listings.known_columns(listings.parse_csv(raw, "clean"), "clean")
    assert ignored == ["calendar_last_scraped"]
    assert list(df.columns) == list(listings.SCHEMA)
    assert listings.listing_format(df.columns) == "the current format (18 columns)"
    assert listings.listing_format(sample.columns) == "the 2019 format (16 columns)"
    clean, _ = listings.clean_listings(df, profile())
    assert clean["neighbourhood"].tolist()[:3] == city_file["neighbourhood"].astype(str).tolist()[:3]  # zip codes
    assert clean["neighbourhood_group"].isna().all() and pd.api.types.is_string_dtype(clean["neighbourhood_group"])
    assert clean["last_review"].iloc[0] == pd.Timestamp(sample["last_review"].iloc[0])
    found = checks.deterministic_checks(clean, dataclasses.replace(profile(), min_rows=1), ignored)
    assert checks.failed(found) == []
    assert checks.warned(found) == ["columns: ignored 1 unknown column(s): ['calendar_last_scraped']"]


def test_dates_in_the_profiles_formats_and_iso_always():
    city = dataclasses.replace(NYC, date_formats=("%d.%m.%Y", "%m/%d/%y"))
    df, _ = listings.clean_listings(frame(listing(id=1, last_review="2019-07-08"), listing(id=2, last_review="08.07.2019"),
                                      listing(id=3, last_review="7/8/19"), listing(id=4, last_review=None)), city)
    assert df["last_review"].tolist()[:3] == [pd.Timestamp("2019-07-08")] * 3 and pd.isna(df["last_review"][3])
    with pytest.raises(StepError, match=r"clean: last_review: 1 value\(s\) are not dates as YYYY-MM-DD or %d.%m.%Y or "
                                        r"%m/%d/%y, e.g. \['July 8'\]"):
        listings.clean_listings(frame(listing(last_review="July 8")), city)


@pytest.mark.parametrize("column, written", [("id", "7.13172E+17"), ("host_id", "1e1"), ("id", None),
                                             ("host_id", "12.0")])
def test_ids_that_are_not_exact_integers_are_an_error_not_a_duplicate(column, written):
    """A spreadsheet writes 713172000000000000 and 713172999999999999 both as 7.13172E+17: clean would have kept one
    of two listings as a "duplicate"."""
    raw = frame(listing(id="713172000000000000"), {**listing(id="2"), column: written}).to_csv(index=False).encode()
    with pytest.raises(StepError, match=rf"clean: {column}: 1 value\(s\) are empty or not whole numbers as written, "
                                        r"e.g. \[" + re.escape(repr(written or "")) + r"\]"):
        listings.clean_listings(listings.parse_csv(raw, "clean"), NYC)


def test_long_ids_of_today_stay_exact(sample):
    """Ids are 19 digits now: no float can hold them."""
    ids = [1_234_567_890_123_456_789, 1_234_567_890_123_456_788]
    raw = frame(listing(id=ids[0]), listing(id=ids[1])).to_csv(index=False).encode()
    df, dropped = listings.clean_listings(listings.parse_csv(raw, "clean"), NYC)
    assert df["id"].tolist() == ids and dropped["duplicate_id"] == 0
    with pytest.raises(StepError, match="clean: id: 1 value"):  # past int64
        listings.clean_listings(listings.parse_csv(raw.replace(b"1234567890123456789", b"9999999999999999999"), "clean"), NYC)


def test_a_price_written_as_money_is_a_number():
    df, _ = listings.clean_listings(frame(listing(price="$1,250.00"), listing(id=2, price=" $80")),
                                dataclasses.replace(NYC, max_price=2000))
    assert df["price"].tolist() == [1250.0, 80.0]


def test_a_city_without_area_groups_splits_unstratified_and_models_without_them(sample):
    df, _ = listings.clean_listings(todays_format(sample), profile())
    assert listings.strata(df) is None
    trainval, test = listings.split_listings(df, 0.2, 42)
    assert len(test) == 3801
    cols = model.Columns.of(trainval)
    assert "neighbourhood_group" not in cols.features and "number_of_reviews_ltm" in cols.features
    assert model.Columns.of(listings.clean_listings(sample, NYC)[0]).features == model.FEATURES


def test_small_area_groups_are_stratified_together():
    groups = pd.Series(["A"] * 50 + ["B"] * 30 + ["C"] * 3 + [None] * 2, dtype="str")
    strata = listings.strata(pd.DataFrame({"neighbourhood_group": groups}))
    assert strata.value_counts().to_dict() == {"A": 50, "B": 30, "(small groups)": 5}
    alone = listings.strata(pd.DataFrame({"neighbourhood_group": pd.Series(["A"] * 50 + ["B"] * 30 + ["C"])}))
    assert alone.value_counts().to_dict() == {"A": 51, "B": 30}  # one row cannot be spread


def test_area_groups_are_checked_against_the_citys_own():
    df, _ = listings.clean_listings(frame(listing(), listing(id=2, neighbourhood_group="Atlantis")), NYC)
    ok = checks.deterministic_checks(df, dataclasses.replace(NYC, area_groups=(), min_rows=1))
    assert checks.failed(ok) == []
    failed = checks.failed(checks.deterministic_checks(df, dataclasses.replace(NYC, min_rows=1)))
    assert failed == ["neighbourhood_group: unknown values ['Atlantis'] (city nyc's area groups: ['Bronx', 'Brooklyn', "
                      "'Manhattan', 'Queens', 'Staten Island'])"]
    # NYC's listings with the boroughs left out: not a city without area groups, a file that lost them.
    empty = checks.failed(checks.deterministic_checks(df.assign(neighbourhood_group=None), dataclasses.replace(
        NYC, min_rows=1)))
    assert empty == ["neighbourhood_group: empty in every row, but city nyc's profile names area groups ['Bronx', "
                     "'Brooklyn', 'Manhattan', 'Queens', 'Staten Island'] (area_groups = [] if this city has none)"]


def test_a_column_only_one_side_has_is_named_not_compared(sample):
    df, _ = listings.clean_listings(todays_format(sample), profile())
    reference = df.drop(columns=["number_of_reviews_ltm"])
    found, _ = drift.drift_checks(df, reference, drift.DriftLimits())
    [ltm] = [c for c in found if c.check == "number_of_reviews_ltm drift"]
    assert (ltm.status, ltm.observed) == (checks.SKIP, "only in the new data")


def test_a_prod_model_of_another_city_is_never_compared_with_or_replaced():
    class Prod:
        version, tags = "3", {"city": "nyc"}

    class Before:  # registered before cities had profiles: NYC's
        version, tags = "2", {}

    assert prod.same_city(Prod, "rental-price", NYC, "check") is Prod
    assert prod.same_city(Before, "rental-price", NYC, "check") is Before
    with pytest.raises(StepError, match=r"check: model_name: prod version 2 of 'rental-price' is a model of nyc's"):
        prod.same_city(Before, "rental-price", profile(), "check")
    assert prod.same_city(None, "rental-price", profile(), "check") is None
    with pytest.raises(StepError, match=r"check: model_name: prod version 3 of 'rental-price' is a model of nyc's "
                                        r"listings, these are testville's: .*model_name=rental-price-testville"):
        prod.same_city(Prod, "rental-price", profile(), "check")


# ---------------------------------------------------------------- end to end

def test_a_city_file_in_todays_format_trains_and_registers_its_own_model(sample, mlflow_server, tmp_path):
    source, city = tmp_path / "listings.csv", tmp_path / "testville.toml"
    todays_format(sample).to_csv(source, index=False)
    city.write_text(PROFILE)
    experiment = f"city-{tmp_path.name}"
    result = run_pipeline(mlflow_server, experiment, tmp_path / "root", "training", f"source={source}",
                          f"city={city}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("clean: testville listings in the current format (18 columns), ignoring 1 unknown column(s) "
            "(calendar_last_scraped): 19001 rows kept" in result.stdout)
    log = re.search(r"full log: (\S+)\)", result.stdout)[1]
    assert "check: warning: columns: ignored 1 unknown column(s): ['calendar_last_scraped']" in open(log).read()
    assert "registered model 'rental-price-testville' version 1: now prod" in result.stdout

    mlflow.set_tracking_uri(mlflow_server)
    version = mlflow.tracking.MlflowClient().get_model_version("rental-price-testville", "1")
    assert version.tags["city"] == "testville"
    assert json.loads(version.tags["city_profile"]) == profile().as_dict()
    assert float(version.tags["test_mae"]) < 32  # as good as NYC's own (29.5 on the same listings)
    fitted, inputs = saved_model.load_model("models:/rental-price-testville/1", "test")
    assert inputs["features"] == model.features_of(fitted)
    assert "number_of_reviews_ltm" in inputs["features"] and "neighbourhood_group" not in inputs["features"]
    signature = mlflow.models.get_model_info("models:/rental-price-testville/1").signature
    assert signature.inputs.input_names() == inputs["features"]  # the serving signature is the model's own

    # Batch scoring reads the city's file as training did: its dates, and zip codes as text.
    scored = run_pipeline(mlflow_server, experiment, tmp_path / "root", "batch", f"source={source}",
                          "model=models:/rental-price-testville@prod", "max_rejected=0.5")
    assert scored.returncode == 0, scored.stderr[-3000:]
    said = re.search(r"score: (\d+) of 20000 rows priced.*", scored.stdout)
    assert said and int(said[1]) > 15_000, scored.stdout[-2000:]
    assert "last_review: broken" not in said[0] and "neighbourhood: broken" not in said[0]
    priced = pd.read_parquet(tmp_path / "root" / "latest" / "predictions.parquet")
    assert set(priced["id"]) <= set(pd.read_csv(source)["id"])  # all 19 digits exact
