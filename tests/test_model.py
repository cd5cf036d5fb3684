"""Model tests: features, the skops trust list, a model that loads without project code, behaviour."""

import copy
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import skops.io

from components import cities, features, listings, model, saved_model, tracking
from components.errors import StepError

FAST = model.ModelParams(learner="random_forest", n_estimators=20, criterion="squared_error", seed=1)
GBM = model.ModelParams()  # the default learner, as the pipeline trains it


@pytest.fixture(scope="module")
def splits(sample):
    df, _ = listings.clean_listings(sample, cities.city())
    return listings.split_listings(df, 0.2, seed=42)


@pytest.fixture(scope="module")
def fitted(splits):
    return model.fit(splits[0], FAST)


@pytest.fixture(scope="module")
def boosted(splits):
    return model.fit(splits[0], GBM)


def test_days_since_uses_a_fixed_reference_date():
    dates = pd.DataFrame({"last_review": pd.to_datetime(["2019-07-01", None, "2019-07-08"])})
    assert features.days_since(dates, "2019-07-08").ravel().tolist() == [7, -1, 0]
    # One row alone gets the same value as inside a batch.
    assert features.days_since(dates.iloc[:1], "2019-07-08").ravel().tolist() == [7]


def test_as_text_flattens_and_fills():
    assert features.as_text(pd.DataFrame({"name": ["a b", None]})).tolist() == ["a b", ""]


@pytest.mark.parametrize("learner", ["random_forest", "hist_gbm"])
def test_trusted_types_are_exactly_what_the_model_holds(learner, request):
    fitted = request.getfixturevalue({"random_forest": "fitted", "hist_gbm": "boosted"}[learner])
    held = saved_model.feature_module_of(fitted)
    assert held.__name__ == f"rental_features_{hashlib.sha256(open(features.__file__, 'rb').read()).hexdigest()[:12]}"
    assert sorted(skops.io.get_untrusted_types(data=skops.io.dumps(fitted))) == \
        sorted(saved_model.skops_trusted_types(held, learner))


@pytest.mark.slow  # fits the reference forest on the whole sample
def test_the_boosted_model_beats_the_reference_forest_on_validation(boosted, splits):
    """The default learner against the reference forest with its own parameters, on the same rows."""
    forest = model.fit(splits[0], model.ModelParams(learner="random_forest"))
    gbm, reference = model.score(boosted, splits[1]), model.score(forest, splits[1])
    print(f"validation MAE: hist_gbm {gbm['mae']:.2f}, random_forest {reference['mae']:.2f}")
    assert gbm["mae"] < reference["mae"] - 0.5 and gbm["r2"] > reference["r2"]


def test_the_stacked_prices_are_out_of_fold_on_training_rows(boosted, splits):
    """On the rows it learned from, the stacked ridge model's price is each row's out-of-fold prediction, so it is
    no more accurate there than on rows it never saw: the trees downstream are not taught to trust an overfit."""
    train, val = splits[0], splits[1]
    rows, columns = boosted.named_steps["listing_features"], boosted.named_steps["columns"]
    stacked = columns.named_transformers_["stacked"]
    [inputs] = [used for name, _, used in columns.transformers_ if name == "stacked"]
    refit = saved_model.shipped_features().OutOfFold(stacked.named_steps["ridge"].estimator, seed=3)
    encoded = stacked.named_steps["inputs"]
    on_train = refit.fit_transform(encoded.transform(rows.transform(train)[inputs]), train["price"])[:, 1]
    in_sample = refit.transform(encoded.transform(rows.transform(train)[inputs]))[:, 1]
    on_val = refit.transform(encoded.transform(rows.transform(val)[inputs]))[:, 1]
    error = lambda predicted, df: np.mean(np.abs(predicted - df["price"]))  # noqa: E731
    assert error(on_train, train) > error(in_sample, train) * 1.1  # in-sample predictions would flatter it
    assert error(on_train, train) == pytest.approx(error(on_val, val), rel=0.1)


def test_trial_overrides_are_typed_and_checked():
    changed = model.ModelParams().with_overrides({"max_iter": 50.0, "learning_rate": 0.05, "learner": "random_forest"})
    assert (changed.max_iter, type(changed.max_iter), changed.learning_rate, changed.learner) == \
        (50, int, 0.05, "random_forest")
    for bad, message in [({"seed": 1}, "seed: not a parameter a trial can change"),
                         ({"max_iter": 2.5}, "max_iter: 2.5 is not a whole number"),
                         ({"learner": "svm"}, "learner: 'svm' is not one of")]:
        with pytest.raises(ValueError, match=message):
            model.ModelParams().with_overrides(bad)
    assert set(model.ModelParams().used()) == {"learner", "seed", "coverage", *model.GBM_FIELDS}
    with pytest.raises(ValueError, match="coverage: 1.5 is not a share between 0.5 and 1"):
        model.ModelParams(coverage=1.5)


@pytest.mark.parametrize("learner", ["random_forest", "hist_gbm"])
def test_model_scores_near_the_reference_and_predicts_one_row_like_a_batch(learner, request, splits):
    fitted = request.getfixturevalue({"random_forest": "fitted", "hist_gbm": "boosted"}[learner])
    scores = model.score(fitted, splits[1])
    assert scores["mae"] < 36 and scores["r2"] > 0.5
    batch = fitted.predict(splits[1][model.FEATURES].head(50))
    assert fitted.predict(splits[1][model.FEATURES].iloc[[7]])[0] == pytest.approx(batch[7])


@pytest.fixture(scope="module")
def ranged(splits):
    """The default model as train fits it: on train rows, its range calibrated on validation rows it never saw."""
    train, validation = listings.split_listings(splits[0], 0.2, seed=42)
    return model.calibrate(model.fit(train, GBM), validation), train, validation


def test_price_ranges_hold_the_nominal_share_of_unseen_prices_overall_and_by_group(ranged, splits):
    fitted, train, _ = ranged
    test = splits[1]
    ranges = model.price_ranges(fitted, test)
    found = model.range_scores(test["price"], ranges)
    assert abs(found["coverage"] - GBM.coverage) <= 0.025 and 50 < found["interval_width"] < 150
    assert (ranges["low"] <= ranges["price"]).all() and (ranges["price"] <= ranges["high"]).all()
    assert (ranges["low"] >= 0).all() and ranges["price"].equals(model.predictions(fitted, test))
    inside = test["price"].between(ranges["low"], ranges["high"])
    for column in ("neighbourhood_group", "room_type"):
        groups = test.assign(inside=inside).groupby(column)["inside"].agg(["mean", "size"])
        assert (abs(groups["mean"] - GBM.coverage)[groups["size"] >= 200] <= 0.05).all(), groups
    # One row alone gets the range it gets in a batch (server, batch and evaluate price rows alike).
    assert model.price_ranges(fitted, test.iloc[[7]]).iloc[0].tolist() == pytest.approx(ranges.iloc[7].tolist())


def test_the_range_is_calibrated_on_rows_the_model_did_not_fit(ranged):
    """On the rows it was fitted on the quantile boosters look better than they are: a margin from those would be
    too narrow. train calibrates on the validation rows."""
    fitted, train, validation = ranged
    assert fitted[-1].calibration_rows_ == len(validation) and not set(train["id"]) & set(validation["id"])
    out_of_sample = fitted[-1].margin_
    in_sample = model.calibrate(copy.deepcopy(fitted), train)[-1].margin_
    assert in_sample < out_of_sample
    with pytest.raises(ValueError, match="3 calibration rows cannot give a 80% range: at least 4 are needed"):
        model.calibrate(copy.deepcopy(fitted), validation.head(3))


@pytest.mark.parametrize("learner", ["random_forest", "hist_gbm"])
def test_feature_importances_are_per_input_column(learner, request, splits):
    fitted = request.getfixturevalue({"random_forest": "fitted", "hist_gbm": "boosted"}[learner])
    importances = model.feature_importances(fitted, splits[1])
    assert set(importances.index) == set(model.FEATURES)
    assert importances.idxmax() == "room_type" and importances["room_type"] > 10  # dollars of MAE


def test_importances_through_the_fast_path_are_the_models_own(ranged, splits, monkeypatch):
    from components import fast_path

    fitted = ranged[0]
    assert fast_path.compile_model(fitted) is not None  # else this test compares the model with itself
    fast = model.feature_importances(fitted, splits[1], rows=500)
    monkeypatch.setattr(fast_path, "checked", lambda *_: (None, "no fast path"))
    assert fast.to_dict() == model.feature_importances(fitted, splits[1], rows=500).to_dict()


def place(df: pd.DataFrame, group: str) -> dict:
    """The busiest neighbourhood of `group` in `df`: its name, group and median coordinates."""
    rows = df[df["neighbourhood_group"] == group]
    name = rows["neighbourhood"].mode()[0]
    here = rows[rows["neighbourhood"] == name]
    return {"neighbourhood_group": group, "neighbourhood": name, "latitude": here["latitude"].median(),
            "longitude": here["longitude"].median()}


@pytest.mark.parametrize("change, factor", [
    (lambda df: ({"room_type": "Private room"}, {"room_type": "Entire home/apt"}), 1.5),
    # The whole location moves (group, neighbourhood, coordinates), not a label alone: Kingsbridge to Harlem, whose
    # median prices in the sample differ by 1.3x for listings of every kind.
    (lambda df: (place(df, "Bronx"), place(df, "Manhattan")), 1.1),
], ids=["room_type", "location"])
@pytest.mark.parametrize("learner", ["random_forest", "hist_gbm"])
def test_behaviour_price_moves_the_expected_way(learner, request, splits, change, factor):
    fitted = request.getfixturevalue({"random_forest": "fitted", "hist_gbm": "boosted"}[learner])
    rows = splits[1][model.FEATURES].head(200)
    cheaper, dearer = change(splits[0])
    low, high = fitted.predict(rows.assign(**cheaper)), fitted.predict(rows.assign(**dearer))
    assert np.mean(high) > np.mean(low) * factor


def test_saved_model_loads_without_any_other_project_code(fitted, splits, tmp_path):
    example = model.input_example(fitted, splits[1])
    with saved_model.feature_code(fitted) as code:
        mlflow.sklearn.save_model(fitted, tmp_path / "m", code_paths=[code], **saved_model.model_kwargs(fitted, example))
    example.to_json(tmp_path / "example.json", orient="split", date_format="iso")
    # Hide the project's own install of `components` from the loading process.
    script = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path = [p for p in sys.path if p not in ("", {str(tracking.__file__).rsplit('/components/', 1)[0]!r})]
import mlflow, pandas as pd
m = mlflow.pyfunc.load_model({str(tmp_path / 'm')!r})
try:
    import components
    raise SystemExit("project code leaked into the model")
except ImportError:
    pass
x = pd.read_json({str(tmp_path / 'example.json')!r}, orient="split", convert_dates=["last_review"])
print(len(m.predict(x)))
"""
    # Plain MLflow, as anyone who trusts the model may load it (the project's own loader refuses MLflow's).
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("5")


def test_a_model_scores_with_its_own_feature_code_beside_a_newer_one(splits, tmp_path):
    """Model A is trained with today's features.py, model B with a changed one (days_since computes days modulo 97). Then,
    in one process whose components.features is newer still (as_text renamed: the old name no longer exists),
    each model scores exactly as when it was saved."""
    changed = tmp_path / "features.py"
    changed.write_text(open(features.__file__).read().replace("return days.fillna(-1)", "return (days % 97).fillna(-1)"))
    train, test = splits[0].head(3000), splits[1].head(50)
    small = model.ModelParams(learner="random_forest", n_estimators=5, criterion="squared_error", seed=1)
    saved = {}
    for name, feats in (("a", saved_model.shipped_features()), ("b", saved_model.shipped_features(str(changed)))):
        fitted = model.fit(train, small, feats)
        example = model.input_example(fitted, test)
        with saved_model.feature_code(fitted) as code:
            mlflow.sklearn.save_model(fitted, tmp_path / name, code_paths=[code],
                                      **saved_model.model_kwargs(fitted, example))
        saved[name] = fitted.predict(test[model.FEATURES]).tolist()
    assert saved["a"] != saved["b"]
    test[model.FEATURES].to_json(tmp_path / "rows.json", orient="split", date_format="iso")
    script = f"""
import json, sys, types
import pandas as pd
from components import saved_model
renamed = types.ModuleType("components.features")
renamed.text_of = lambda column: column
sys.modules["components.features"] = renamed
rows = pd.read_json({str(tmp_path / 'rows.json')!r}, orient="split", convert_dates=["last_review"])
out = {{name: saved_model.read_model({str(tmp_path)!r} + "/" + name, "test")[0].predict(rows).tolist() for name in "ab"}}
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["a"] == pytest.approx(saved["a"]) and loaded["b"] == pytest.approx(saved["b"])


def test_inputs_are_checked_against_what_the_model_was_trained_on(splits):
    train, test = splits
    profile = model.input_profile(train)
    assert profile["categories"]["neighbourhood_group"] == sorted(cities.city().area_groups)
    assert "room_type" in profile["required"] and "reviews_per_month" not in profile["required"]
    rows = test[model.FEATURES].head(5).astype(object).reset_index(drop=True)
    typed, problems = model.check_inputs(rows, profile)
    assert problems == [] and typed.shape == (5, len(model.FEATURES))
    rows.at[1, "room_type"], rows.at[2, "latitude"], rows.at[3, "name"] = "Castle", -90.0, ["a"]
    rows.at[3, "host_id"], rows.at[4, "reviews_per_month"] = None, None  # host_id is never null in training
    _, problems = model.check_inputs(rows, profile)
    assert [(p.row, p.field, p.broken) for p in problems] == [
        (1, "room_type", False), (2, "latitude", False), (3, "name", True), (3, "host_id", True)]
    assert [p.row for p in model.refused(problems, flag=True)] == [3, 3]
    assert len(model.refused(problems, flag=False)) == 4
    # Without a profile (a model saved before them) only fields and types are checked.
    assert [(p.row, p.field) for p in model.check_inputs(rows, None)[1]] == [(3, "name")]
    # A number just past its bound is shown with the digits that tell it from the bound.
    low = profile["ranges"]["latitude"][0]
    rows = test[model.FEATURES].head(1).astype(object).reset_index(drop=True)
    rows.at[0, "latitude"] = low - 4e-5
    (problem,) = model.check_inputs(rows, profile)[1]
    shown, bound = re.match(r"(\S+) is outside the range the model was trained on \((\S+) to ", problem.problem).groups()
    assert shown != bound and float(shown) == pytest.approx(low - 4e-5, abs=1e-6) and float(bound) == pytest.approx(low)


@pytest.mark.parametrize("dates", [["2019-05-21"], ["2019-05-21", None], ["0001-01-01", "9999-12-31", "1500-06-30"],
                                   ["2020-02-29"], ["2019-02-29"], ["2019-5-1"], [None], ["2019-05-21T10:00"],
                                   ["\uff11\uff19\uff19\uff19-01-01"], ["2019-05-21", datetime.date(2019, 5, 1)]])
def test_dates_are_read_as_pandas_reads_them(dates):
    """Plain YYYY-MM-DD dates skip pandas (the server's one-row requests): the same values and unit either way."""
    found = model._dates(dates)
    expected = pd.to_datetime(pd.Series(dates, dtype=object), format="ISO8601", errors="coerce").to_numpy()
    assert found.dtype == expected.dtype and np.array_equal(found, expected, equal_nan=True)


def test_checked_rows_price_as_the_raw_frame_does(boosted, splits):
    rows = splits[1].head(300)
    typed, problems = model.check_inputs(rows[model.FEATURES], None)
    assert not problems
    assert boosted.predict(typed) == pytest.approx(boosted.predict(rows[model.FEATURES]))


def test_the_loader_refuses_changed_feature_code_and_unknown_types(fitted, splits, tmp_path):
    with saved_model.feature_code(fitted) as code:
        mlflow.sklearn.save_model(fitted, tmp_path / "m", code_paths=[code],
                                  **saved_model.model_kwargs(fitted, model.input_example(fitted, splits[1])))
    loaded, profile = saved_model.read_model(str(tmp_path / "m"), "serve")
    assert profile is None and loaded.predict(splits[1][model.FEATURES].head(3)).shape == (3,)
    # A file that calls out to the shell, with MLflow's MLmodel trusting it: the project's list does not.
    from sklearn.preprocessing import FunctionTransformer

    skops.io.dump(FunctionTransformer(func=subprocess.getoutput), tmp_path / "m" / "model.skops")
    mlmodel = tmp_path / "m" / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace("skops_trusted_types:\n", "skops_trusted_types:\n    - subprocess.getoutput\n"))
    with pytest.raises(StepError, match="does not load with the project's trusted types .*getoutput"):
        saved_model.read_model(str(tmp_path / "m"), "serve")
    [shipped] = (tmp_path / "m" / "code").glob("*.py")
    shipped.write_text(shipped.read_text() + "\nimport os  # added later\n")
    with pytest.raises(StepError, match="does not match its name"):
        saved_model.read_model(str(tmp_path / "m"), "serve")
