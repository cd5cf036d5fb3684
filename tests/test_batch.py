"""Batch scoring: `pipeline.py run --pipeline batch` (kfp.local) against a real MLflow server and a registered model,
and the score step's logic called directly."""

import json
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import listing, run_pipeline

from components import model, saved_model, scoring
from components.errors import StepError


def run_batch(mlflow_uri: str, tmp_path, *params: str) -> subprocess.CompletedProcess:
    return run_pipeline(mlflow_uri, "batch", tmp_path / "outputs", "batch", *params, timeout=600)


def outputs(tmp_path):
    """The last run's folder, where its files are under names that say what they are."""
    return (tmp_path / "outputs" / "latest").resolve()


@pytest.fixture(scope="module")
def held_back(sample) -> pd.DataFrame:
    """Real listings the registered model (fitted on the first 5,000 clean rows) never saw, raw as published."""
    return sample.iloc[12000:15000]


def in_process(name: str, version: str, rows: pd.DataFrame, column: str = "price") -> np.ndarray:
    """The version's prices (or the `low` or `high` end of their ranges) for `rows`, in this process."""
    fitted, _ = saved_model.load_model(f"models:/{name}/{version}", "test")
    return model.price_ranges(fitted, rows.assign(last_review=pd.to_datetime(rows["last_review"])))[column].to_numpy()


def test_batch_prices_held_back_rows_exactly_as_the_version_does_in_process(
        registered_model, mlflow_server, held_back, tmp_path):
    source = tmp_path / "new.csv"
    held_back.to_csv(source, index=False)
    result = run_batch(mlflow_server, tmp_path, f"source={source}", f"model=models:/{registered_model}@prod",
                       "max_rejected=0.5")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = outputs(tmp_path)
    for name in ("predictions.parquet", "predictions.csv", "rejected_rows.csv"):
        assert re.search(rf"^  (predictions|rejected rows) +{re.escape(str(out / name))}$", result.stdout, re.M)
    predictions = pd.read_parquet(out / "predictions.parquet")
    csv = pd.read_csv(out / "predictions.csv")
    assert predictions.drop(columns="flags").equals(csv.drop(columns="flags"))  # the same rows in both formats
    assert predictions["flags"].isna().all() and csv["flags"].isna().all()  # unfamiliar rows are refused, not flagged
    rejected = pd.read_csv(out / "rejected_rows.csv")
    # Every row is either priced or listed with why; none is dropped silently.
    assert len(predictions) + rejected["row"].nunique() == len(held_back)
    assert set(rejected["field"]) <= set(model.FEATURES) and rejected["problem"].str.len().min() > 10
    assert (predictions["model_version"] == 1).all()  # prod, resolved once
    priced = held_back.set_index("id").loc[predictions["id"]].reset_index()
    assert np.array_equal(predictions["predicted_price"].to_numpy(), in_process(registered_model, "1", priced))
    for end in ("low", "high"):  # each price's range beside it, as the version gives it (and the server: test_serve)
        assert np.array_equal(predictions[f"price_{end}"].to_numpy(), in_process(registered_model, "1", priced, end))
    assert (predictions["price_low"] <= predictions["predicted_price"]).all()
    assert (predictions["predicted_price"] <= predictions["price_high"]).all()
    summary = json.loads((out / "score" / "metrics").read_text())
    assert summary["rows"] == len(held_back) and summary["scored"] == len(predictions)
    assert summary["p10_price"] < summary["p50_price"] < summary["p90_price"]
    assert f"priced {len(predictions)} of {len(held_back)} listings with {registered_model!r} version 1" in result.stdout


def broken_rows(sample) -> pd.DataFrame:
    rows = sample.iloc[:20].copy()
    rows["minimum_nights"] = rows["minimum_nights"].astype(object)
    rows.loc[rows.index[3], "minimum_nights"] = "two"
    rows.loc[rows.index[7], "room_type"] = None
    return rows


def test_a_few_bad_rows_are_listed_and_the_rest_priced_with_the_version_named(registered_model, mlflow_server, sample,
                                                                              tmp_path):
    source = tmp_path / "some-bad.csv"
    broken_rows(sample).to_csv(source, index=False)
    result = run_batch(mlflow_server, tmp_path, f"source={source}", f"model=models:/{registered_model}/2",
                       "max_rejected=0.2", "price_unfamiliar=true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rejected = pd.read_csv(outputs(tmp_path) / "rejected_rows.csv")
    assert rejected[["row", "field"]].values.tolist() == [[3, "minimum_nights"], [7, "room_type"]]
    assert rejected["problem"].tolist() == ["'two' is not a finite number",
                                            "is null; the model was trained on no nulls here"]
    predictions = pd.read_parquet(outputs(tmp_path) / "predictions.parquet")
    assert len(predictions) == 18 and (predictions["model_version"] == 2).all()


@pytest.mark.parametrize("params, message", [
    (["max_rejected=0.05"], "FAILED at score: score: rows: 2 of 20 rows (10.0%) cannot be priced, more than "
                            "max_rejected 5.0% (1 minimum_nights: broken, 1 room_type: broken)"),
    (["model=models:/no-such-model@prod"], "FAILED at score: score: model: models:/no-such-model@prod: no such model "
                                           "version on http://"),
    (["model=rental-price"], "FAILED at score: score: model: 'rental-price' is not models:/NAME@ALIAS or "
                             "models:/NAME/VERSION"),
])
def test_a_batch_that_cannot_be_priced_fails_at_score_saying_why(registered_model, mlflow_server, sample, tmp_path,
                                                                 params, message):
    source = tmp_path / "some-bad.csv"
    broken_rows(sample).to_csv(source, index=False)
    result = run_batch(mlflow_server, tmp_path, f"source={source}", f"model=models:/{registered_model}@prod", *params)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message), result.stderr[-2000:]


def test_scoring_in_chunks_gives_what_one_chunk_gives(registered_model, tracking, held_back, tmp_path, monkeypatch,
                                                     capsys):
    """Memory stays bounded: the file is read, checked and priced a chunk at a time, with the same result; by the
    model's fast path, checked once on the first rows (the exact figures: the test above)."""
    source = tmp_path / "new.csv"
    pd.concat([held_back, pd.DataFrame([listing(id=1, room_type="Castle")])]).to_csv(source, index=False)
    found = {}
    for chunk in (1000, 100_000):
        monkeypatch.setattr(scoring, "SCORE_CHUNK", chunk)
        paths = [str(tmp_path / f"{name}-{chunk}") for name in ("p", "c", "r")]
        summary = scoring.score(str(source), f"models:/{registered_model}/1", *paths, True, 1.0)
        found[chunk] = pd.read_parquet(paths[0]), pd.read_csv(paths[2]), summary
    assert capsys.readouterr().out.count("score: fast path: the model's own figures on ") == 2  # once a file
    (small, small_rejected, small_summary), (whole, whole_rejected, whole_summary) = found[1000], found[100_000]
    assert small.equals(whole) and small_rejected.equals(whole_rejected) and small_summary == whole_summary
    # An unfamiliar room type, priced as asked and flagged.
    castle = whole[whole["id"] == 1]
    assert castle["flags"].item().startswith("room_type: 'Castle' is not among the values the model was trained on")


def test_a_missing_column_fails_the_batch_naming_it(registered_model, tracking, sample, tmp_path):
    source = tmp_path / "no-room.csv"
    sample.head(50).drop(columns=["room_type"]).to_csv(source, index=False)
    paths = [str(tmp_path / name) for name in ("p", "c", "r")]
    with pytest.raises(StepError, match=r"score: room_type: column missing from the data \(missing: \['room_type'\]\)"):
        scoring.score(str(source), f"models:/{registered_model}/1", *paths, False, 0.05)
