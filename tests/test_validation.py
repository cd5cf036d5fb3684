"""The check step against a real prod (trained on one half of the shared sample) and a real MLflow server: the
other half passes; a realistic shift fails, naming the column and the figure; a moderate one only warns."""

import re
import uuid
from pathlib import Path

import mlflow
import pytest

from components import checks, cities, drift, listings, promotion, report, training, validation
from components.errors import StepError

LIMITS = drift.DriftLimits()
CITY = cities.city().as_dict()


@pytest.fixture(scope="module")
def prod(mlflow_server, sample, tmp_path_factory) -> dict:
    """Prod version 1 of a fresh model, trained on half A; half B is new data of the same city."""
    folder = tmp_path_factory.mktemp("checks")
    names = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": f"checks-{uuid.uuid4().hex[:6]}",
             "KFP_RUN_ID": f"run-{uuid.uuid4().hex[:6]}"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in names.items():
            patch.setenv(key, value)
        mlflow.set_tracking_uri(mlflow_server)
        half_a, half_b = listings.split_listings(sample, 0.5, seed=7)
        half_a.to_csv(folder / "a.csv", index=False)
        clean_meta = listings.clean(str(folder / "a.csv"), str(folder / "a-clean.csv"), CITY)
        trainval, test = listings.split_listings(listings.read_listings(str(folder / "a-clean.csv")), 0.2, 42)
        listings.write_listings(trainval, str(folder / "trainval.csv"))
        listings.write_listings(test, str(folder / "test.csv"))
        name = f"checks-{uuid.uuid4().hex[:6]}"
        meta = training.train(str(folder / "trainval.csv"), str(folder / "model"),
                           dict(learner="random_forest", n_estimators=30, seed=1), 0.2)
        scores, comparison, importance = training.evaluate(str(folder / "model"), str(folder / "test.csv"), name)
        promotion.register(str(folder / "model"), meta, scores, comparison, str(folder / "test.csv"), name, 0.1,
                       {"source": "a.csv", "sha256": "a"}, clean_meta, "abc", "{}", importance,
                       str(folder / "card.html"))
        clean_b, _ = listings.clean_listings(half_b, cities.city())
        yield {"name": name, "new": clean_b, "folder": folder, "env": names, "report": str(folder / "data_report.html")}


def check(prod, df, monkeypatch) -> tuple[list[checks.Check], str]:
    """The check step on `df`: its checks and the words of its data report."""
    for key, value in prod["env"].items():
        monkeypatch.setenv(key, value)
    path = prod["folder"] / f"{uuid.uuid4().hex[:6]}.csv"
    listings.write_listings(df, str(path))
    found = validation.check(str(path), prod["report"], prod["name"], CITY | {"min_rows": 100}, LIMITS)
    return found, report.as_text(Path(prod["report"]).read_text())


def test_new_listings_of_the_same_city_pass(prod, monkeypatch, capsys):
    found, words = check(prod, prod["new"], monkeypatch)
    assert {c.status for c in found} == {checks.PASS} and len(found) == 39
    assert "All 39 checks passed: the data goes on to training" in words
    assert "Drift is measured against the data of prod version 1" in words
    assert "prod version 1's error is measured on the " in words


@pytest.mark.parametrize("shift, message, failed", [
    (lambda d: d.assign(price=(d["price"] * 1.3).clip(upper=350)),
     r"check: price: 1 check\(s\) failed \(data report: http://.*/artifacts/reports/data_report.html\):\n  - price: "
     r"prod version 1's MAE on \d+ rows new to it is [\d.]+, 1\.[3-9]\d x its [\d.]+ at registration \(95% interval .*\): all above 1.25",
     "prod's error on new rows fail 1."),
    (lambda d: d.assign(price=d["price"].sample(frac=1, random_state=1).to_numpy()),
     r"check: price: 1 check\(s\) failed .*:\n  - price: prod version 1's MAE .* [2-9]\.\d\d x its",
     "prod's error on new rows fail "),
    (lambda d: d[d["neighbourhood_group"] != "Queens"],
     r"check: neighbourhood_group: 1 check\(s\) failed .*:\n  - neighbourhood_group: distribution shifted from "
     r"prod's data \(PSI 0\.\d+ > 0.25; no rows of \['Queens'\]\)",
     "neighbourhood_group drift fail PSI 0."),
])
def test_a_realistic_shift_fails_naming_the_column_and_figure(prod, monkeypatch, shift, message, failed):
    Path(prod["report"]).unlink(missing_ok=True)
    with pytest.raises(StepError, match=message):
        check(prod, shift(prod["new"]), monkeypatch)
    # The report is left all the same, with the failed check and the charts behind it.
    words = report.as_text(Path(prod["report"]).read_text())
    assert "1 of 39 checks failed" in words and failed in words
    assert Path(prod["report"]).read_text().count("<svg") == 10


def test_a_moderate_shift_warns_and_the_run_goes_on(prod, monkeypatch, capsys):
    found, words = check(prod, prod["new"].assign(price=(prod["new"]["price"] * 1.15).clip(upper=350)), monkeypatch)
    assert checks.failed(found) == [] and checks.warned(found)[-1].startswith("price: prod version 1's MAE on")
    assert re.search(r"All 39 checks passed, [12] with a warning", words)
    assert "check: warning: price: prod version 1's MAE" in capsys.readouterr().out
