"""Model tests: features, the skops trust list, a model that loads without project code, behaviour."""

import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import skops.io

from components import data, features, model, tracking

FAST = model.ForestParams(n_estimators=20, criterion="squared_error", seed=1)


@pytest.fixture(scope="module")
def splits(sample):
    df, _ = data.clean_listings(sample, 10, 350, data.Box())
    return data.split_listings(df, 0.2, seed=42)


@pytest.fixture(scope="module")
def fitted(splits):
    return model.fit(splits[0], FAST)


def test_days_since_uses_a_fixed_reference_date():
    dates = pd.DataFrame({"last_review": pd.to_datetime(["2019-07-01", None, "2019-07-08"])})
    assert features.days_since(dates, "2019-07-08").ravel().tolist() == [7, -1, 0]
    # One row alone gets the same value as inside a batch.
    assert features.days_since(dates.iloc[:1], "2019-07-08").ravel().tolist() == [7]


def test_as_text_flattens_and_fills():
    assert features.as_text(pd.DataFrame({"name": ["a b", None]})).tolist() == ["a b", ""]


def test_trusted_types_are_exactly_what_the_model_holds(fitted):
    assert sorted(skops.io.get_untrusted_types(data=skops.io.dumps(fitted))) == sorted(model.SKOPS_TRUSTED_TYPES)


def test_model_scores_near_the_reference_and_predicts_one_row_like_a_batch(fitted, splits):
    scores = model.score(fitted, splits[1])
    assert scores["mae"] < 36 and scores["r2"] > 0.5
    batch = fitted.predict(splits[1][model.FEATURES].head(50))
    assert fitted.predict(splits[1][model.FEATURES].iloc[[7]])[0] == pytest.approx(batch[7])


def test_feature_importances_are_per_input_column(fitted):
    importances = model.feature_importances(fitted)
    assert set(importances.index) == set(model.FEATURES)
    assert importances.sum() == pytest.approx(1.0)
    assert importances.idxmax() == "room_type"


@pytest.mark.parametrize("change, cheaper, dearer, factor", [
    ("room_type", "Private room", "Entire home/apt", 1.5),
    # Latitude and longitude carry most of the location, so the group label alone moves less.
    ("neighbourhood_group", "Bronx", "Manhattan", 1.05),
])
def test_behaviour_price_moves_the_expected_way(fitted, splits, change, cheaper, dearer, factor):
    rows = splits[1][model.FEATURES].head(200)
    low = fitted.predict(rows.assign(**{change: cheaper}))
    high = fitted.predict(rows.assign(**{change: dearer}))
    assert np.mean(high) > np.mean(low) * factor


def test_saved_model_loads_without_any_other_project_code(fitted, splits, tmp_path):
    example = model.input_example(splits[1])
    with tracking.feature_code() as code:
        mlflow.sklearn.save_model(fitted, tmp_path / "m", code_paths=[code], **tracking.model_kwargs(fitted, example))
    example.to_json(tmp_path / "example.json", orient="split", date_format="iso")
    # Hide the project's own install of `components` from the loading process.
    script = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path = [p for p in sys.path if p not in ("", {str(tracking.__file__).rsplit('/components/', 1)[0]!r})]
import mlflow, pandas as pd
m = mlflow.pyfunc.load_model({str(tmp_path / 'm')!r})
import components.features
assert components.features.__file__.startswith({str(tmp_path / 'm')!r}), components.features.__file__
try:
    import components.data
    raise SystemExit("project code leaked into the model")
except ImportError:
    pass
x = pd.read_json({str(tmp_path / 'example.json')!r}, orient="split", convert_dates=["last_review"])
print(len(m.predict(x)))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("5")
