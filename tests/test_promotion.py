"""Evaluate and register against a real MLflow server: the gate on fair rows, the promotion lock, hand promotions,
prod moving during a run, retries and identical re-runs that add no version."""

import json
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from components import listings, model, promotion, saved_model, training
from components import tracking as registry
from components.errors import StepError
from components.listings import split_listings, write_listings
from components.prod import TRAINING_IDS_TAG, compare_with_prod

WEAK = model.ModelParams(learner="random_forest", n_estimators=2, max_depth=2, criterion="squared_error", seed=1)
GOOD = model.ModelParams(learner="random_forest", n_estimators=15, max_depth=12, criterion="squared_error", seed=1)


@pytest.fixture(scope="module")
def splits(listings, tmp_path_factory) -> dict:
    """Two splits of the sample: `a` (seed 42) and `b` (seed 7), whose test rows overlap a's training rows."""
    folder = tmp_path_factory.mktemp("splits")
    out = {}
    for name, seed in (("a", 42), ("b", 7)):
        trainval, test = split_listings(listings, 0.2, seed)
        out[name] = {"trainval": str(folder / f"{name}-trainval.csv"), "test": str(folder / f"{name}-test.csv")}
        write_listings(trainval, out[name]["trainval"])
        write_listings(test, out[name]["test"])
    return out


TRAINED = {}  # (trainval path, params) -> (model path, train metadata): each model is trained once per session


def trained(split: dict, params: model.ModelParams, tmp_path) -> tuple[str, dict]:
    key = (split["trainval"], params)
    if key not in TRAINED:
        path = str(tmp_path / f"model-{len(TRAINED)}")
        TRAINED[key] = path, training.train(split["trainval"], path, vars(params), 0.2)
    return TRAINED[key]


def pipeline_run(tracking, monkeypatch, tmp_path, split: dict, params: model.ModelParams, run: str,
                 source_sha: str = "h") -> dict:
    """train, evaluate and register as the pipeline runs them, under pipeline run id `run`."""
    monkeypatch.setenv("KFP_RUN_ID", run)
    model_path, meta = trained(split, params, tmp_path)
    scores, comparison, _ = training.evaluate(model_path, split["test"], tracking["model"])
    return register(tracking, model_path, meta, scores, comparison, split["test"], source_sha)


def register(tracking, model_path, meta, scores, comparison, test_path, source_sha="h", margin=0.1) -> dict:
    card = Path(model_path).parent / f"card-{uuid.uuid4().hex[:8]}.html"
    return promotion.register(model_path, meta, scores, comparison, test_path, tracking["model"], margin,
                          {"source": "s", "sha256": source_sha}, {"reference_uri": "runs:/x/data/clean"}, "abc123",
                          "{}", {}, str(card))


def versions(name: str) -> list[str]:
    return sorted((v.version for v in MlflowClient().search_model_versions(f"name = '{name}'")), key=int)


def prod(name: str) -> str:
    return MlflowClient().get_model_version_by_alias(name, "prod").version


def test_first_version_becomes_prod_with_its_lineage(tracking, monkeypatch, tmp_path, splits):
    first = pipeline_run(tracking, monkeypatch, tmp_path, splits["a"], WEAK, "run-1")
    assert (first["version"], first["promoted"], first["reason"]) == (1, True, "no prod model yet")
    version = MlflowClient().get_model_version(tracking["model"], "1")
    assert version.tags[registry.RUN_ID_TAG] == "run-1" and version.tags["promotion"] == "no prod model yet"
    assert version.tags[registry.PROMOTED_BY_TAG] == "pipeline run run-1"
    assert version.tags["data_sha256"] == "h" and version.tags["git_commit"] == "abc123"
    assert version.tags[TRAINING_IDS_TAG].endswith("/data/training_ids.csv.gz")


def test_a_retry_reuses_its_version_and_an_identical_run_adds_none(tracking, monkeypatch, tmp_path, splits):
    name = tracking["model"]
    monkeypatch.setenv("KFP_RUN_ID", "run-1")
    path, meta = trained(splits["a"], WEAK, tmp_path)
    scores, comparison, _ = training.evaluate(path, splits["a"]["test"], name)
    first = register(tracking, path, meta, scores, comparison, splits["a"]["test"])
    again = register(tracking, path, meta, scores, comparison, splits["a"]["test"])  # the step retried
    assert first["version"] == again["version"] == 1 and again["promoted"]
    # A new pipeline run on the same data, parameters and code.
    same = pipeline_run(tracking, monkeypatch, tmp_path, splits["a"], WEAK, "run-2")
    assert (same["version"], same["promoted"]) == (1, False)
    assert same["reason"] == ("identical to version 1 (same training rows, parameters and code; data sha256 h): "
                              "nothing registered, prod unchanged")
    # Other bytes that clean and split to the same training rows make the same model: still nothing new.
    assert pipeline_run(tracking, monkeypatch, tmp_path, splits["a"], WEAK, "run-3", "h2")["version"] == 1
    assert versions(name) == ["1"]
    # Other training rows: a new version, compared with prod.
    other = pipeline_run(tracking, monkeypatch, tmp_path, splits["b"], WEAK, "run-4", source_sha="h3")
    assert other["version"] == 2 and versions(name) == ["1", "2"]


def test_a_register_that_dies_before_deciding_leaves_no_half_registered_version(tracking, monkeypatch, tmp_path,
                                                                               splits, capsys):
    """Register dies between making the version and deciding on it (the soak found it: MLflow killed then). With
    MLflow still answering, the version goes; with MLflow away it cannot, and the next identical run finishes it."""
    from components import gate

    name = tracking["model"]
    monkeypatch.setenv("KFP_RUN_ID", "run-1")
    path, meta = trained(splits["a"], WEAK, tmp_path)
    scores, comparison, _ = training.evaluate(path, splits["a"]["test"], name)

    def killed(*args, **kwargs):
        raise ConnectionError("MLflow killed")

    with monkeypatch.context() as patched:
        patched.setattr(gate, "decide_promotion", killed)
        with pytest.raises(ConnectionError):
            register(tracking, path, meta, scores, comparison, splits["a"]["test"])
        assert versions(name) == []  # made, then deleted
        patched.setattr(registry, "delete_unfinished_version", lambda *args: None)  # MLflow away: it stays
        with pytest.raises(ConnectionError):
            register(tracking, path, meta, scores, comparison, splits["a"]["test"])
        # Another model's run dies the same way (or is SIGKILLed there).
        monkeypatch.setenv("KFP_RUN_ID", "run-other")
        other_path, other_meta = trained(splits["b"], WEAK, tmp_path)
        other_scores, other_comparison, _ = training.evaluate(other_path, splits["b"]["test"], name)
        with pytest.raises(ConnectionError):
            register(tracking, other_path, other_meta, other_scores, other_comparison, splits["b"]["test"], "h3")
    left, other = versions(name)
    assert "comparison" not in MlflowClient().get_model_version(name, left).tags
    # The next run of the model finishes its own and removes the other (prod never named it).
    again = pipeline_run(tracking, monkeypatch, tmp_path, splits["a"], WEAK, "run-2")
    assert (str(again["version"]), again["promoted"]) == (left, True) and versions(name) == [left]
    said = capsys.readouterr().out
    assert f"register: version {left} is this model and its register did not finish: finishing it" in said
    assert f"register: removed version {other}: its register (pipeline run run-other) died before deciding" in said
    finished = MlflowClient().get_model_version(name, left)
    assert "comparison" in finished.tags and finished.description and prod(name) == left


def test_a_clearly_better_candidate_takes_prod_on_fair_rows(tracking, monkeypatch, tmp_path, splits):
    """prod trained on split a; the candidate's test split (b) shares rows with a's training rows: those are left
    out of the comparison."""
    name = tracking["model"]
    pipeline_run(tracking, monkeypatch, tmp_path, splits["a"], WEAK, "run-1")
    better = pipeline_run(tracking, monkeypatch, tmp_path, splits["b"], GOOD, "run-2", source_sha="h2")
    assert (better["version"], better["promoted"]) == (2, True)
    assert better["reason"].startswith("better than prod on ")
    client = MlflowClient()
    assert prod(name) == "2" and client.get_model_version_by_alias(name, "previous-prod").version == "1"
    recorded = client.get_model_version(name, "2")
    comparison = json.loads(recorded.tags["comparison"])
    test_b = listings.read_listings(splits["b"]["test"])
    trained_a = set(listings.read_listings(splits["a"]["trainval"])["id"])
    assert comparison["rows"] == int((~test_b["id"].isin(trained_a)).sum()) < len(test_b)
    assert comparison["gain_low"] > 0.1 and recorded.tags["promotion"] == better["reason"]


def test_a_worse_candidate_is_registered_and_told_why_prod_stays(tracking, monkeypatch, tmp_path, splits):
    pipeline_run(tracking, monkeypatch, tmp_path, splits["a"], GOOD, "run-1")
    worse = pipeline_run(tracking, monkeypatch, tmp_path, splits["b"], WEAK, "run-2", source_sha="h2")
    assert (worse["version"], worse["promoted"]) == (2, False)
    assert worse["reason"].startswith("worse than prod on ") and prod(tracking["model"]) == "1"


def versions_1_and_2_then_run_3(tracking, monkeypatch, tmp_path, splits) -> tuple[str, str, dict]:
    """Two weak versions registered, then pipeline run 3 with a good model trained: (model name, path, metadata)."""
    pipeline_run(tracking, monkeypatch, tmp_path, splits["a"], WEAK, "run-1")
    pipeline_run(tracking, monkeypatch, tmp_path, splits["b"], WEAK, "run-2", source_sha="h2")
    monkeypatch.setenv("KFP_RUN_ID", "run-3")
    return tracking["model"], *trained(splits["b"], GOOD, tmp_path)


def test_a_hand_promotion_during_the_run_stands(tracking, monkeypatch, tmp_path, splits):
    """`promote` after the run started (here: after evaluate, as register begins) wins over the run's decision."""
    name, path, meta = versions_1_and_2_then_run_3(tracking, monkeypatch, tmp_path, splits)
    scores, comparison, _ = training.evaluate(path, splits["b"]["test"], name)
    assert registry.promote(name, "2") == f"{name}: prod 1 -> 2"
    result = register(tracking, path, meta, scores, comparison, splits["b"]["test"], "h3")
    assert (result["version"], result["promoted"]) == (3, False)
    assert result["reason"] == ("prod was set by hand to version 2 after this run started: a person's choice "
                                "stands (run again to compare with it)")
    assert prod(name) == "2"


def test_a_hand_promotion_before_evaluate_but_after_the_run_started_stands(tracking, monkeypatch, tmp_path, splits):
    """Evaluate then compares with the hand-chosen version, and register still leaves the person's choice alone."""
    name, path, meta = versions_1_and_2_then_run_3(tracking, monkeypatch, tmp_path, splits)
    with registry.step_run("split"):  # the run's first step: its parent run starts now
        pass
    promoted = registry.promote(name, "1" if prod(name) == "2" else "2")
    scores, comparison, _ = training.evaluate(path, splits["b"]["test"], name)
    assert comparison["prod_version"] == int(prod(name))
    result = register(tracking, path, meta, scores, comparison, splits["b"]["test"], "h3")
    assert not result["promoted"] and result["reason"].startswith("prod was set by hand to version ")
    assert promoted.endswith(f"-> {prod(name)}")


def test_prod_moved_by_another_run_is_compared_with_instead(tracking, monkeypatch, tmp_path, splits):
    name = tracking["model"]
    monkeypatch.setenv("KFP_RUN_ID", "run-weak")
    weak_path, weak_meta = trained(splits["a"], WEAK, tmp_path)
    weak_scores, weak_comparison, _ = training.evaluate(weak_path, splits["a"]["test"], name)
    # Meanwhile a good run registers and takes prod (no prod when the weak one evaluated).
    good = pipeline_run(tracking, monkeypatch, tmp_path, splits["b"], GOOD, "run-good", source_sha="h2")
    assert good["promoted"] and weak_comparison["prod_version"] is None
    monkeypatch.setenv("KFP_RUN_ID", "run-weak")
    weak = register(tracking, weak_path, weak_meta, weak_scores, weak_comparison, splits["a"]["test"])
    assert not weak["promoted"] and prod(name) == str(good["version"])
    assert weak["reason"].startswith(f"prod moved to version {good['version']} during this run; compared with it "
                                     "instead: ")


def test_a_prod_without_lineage_or_that_cannot_score_is_not_replaced_automatically(tracking, monkeypatch, tmp_path,
                                                                                     splits):
    name = tracking["model"]
    pipeline_run(tracking, monkeypatch, tmp_path, splits["a"], WEAK, "run-1")
    client = MlflowClient()
    ids = client.get_model_version(name, "1").tags[TRAINING_IDS_TAG]
    client.delete_model_version_tag(name, "1", TRAINING_IDS_TAG)
    result = pipeline_run(tracking, monkeypatch, tmp_path, splits["b"], GOOD, "run-2", source_sha="h2")
    assert not result["promoted"] and result["reason"] == (
        "not promoted automatically: prod version 1 has no record of the rows it was trained on (tag training_ids), "
        "so no rows are known to be new to it")
    client.set_model_version_tag(name, "1", TRAINING_IDS_TAG, ids)
    # A prod whose signature the new data does not fit (here: the data lacks a column prod needs).
    test = listings.read_listings(splits["b"]["test"]).drop(columns=["availability_365"])
    candidate, _ = saved_model.load_model(trained(splits["b"], GOOD, tmp_path)[0], "test")
    predicted = model.predictions(candidate, listings.read_listings(splits["b"]["test"]))
    found = compare_with_prod(name, registry.prod_version(name), predicted, test)
    assert not found["comparable"] and found["why"].startswith("prod version 1 cannot score this data")
    assert prod(name) == "1"


def test_the_promotion_lock_admits_one_holder_at_a_time(tracking, monkeypatch):
    """Deterministic: the second holder is refused, again and again, for as long as the first holds the lock (told
    by its refusals, not by the clock), and enters once the first has let go."""
    name, entered, refusals, refused_twice = tracking["model"], threading.Event(), [], threading.Event()
    create = MlflowClient.create_registered_model

    def counted(self, model_name, tags=None, description=None, **kwargs):
        try:
            return create(self, model_name, tags=tags, description=description, **kwargs)
        except mlflow.exceptions.MlflowException:
            if (tags or {}).get("holder") == "second":
                refusals.append(1)
                if len(refusals) >= 2:
                    refused_twice.set()
            raise

    monkeypatch.setattr(MlflowClient, "create_registered_model", counted)

    def second():
        with registry.promotion_lock(name, "second", "register"):
            entered.set()

    with registry.promotion_lock(name, "first", "register"):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert refused_twice.wait(timeout=60), "the second holder never tried the lock"
        assert not entered.is_set()
    waiter.join(timeout=60)
    assert entered.is_set() and len(refusals) >= 2
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient().get_registered_model(name + registry.LOCK_SUFFIX)  # released by the second too


def test_a_lock_released_while_the_server_reads_it_back_is_contention_not_an_error(tmp_path, monkeypatch):
    """The race seen once in a full run, reproduced on purpose in MLflow's own store (the server's code): a create
    clashes with the held lock, and the holder releases it before the store reads the clashing row back, so the
    create answers RESOURCE_DOES_NOT_EXIST. The lock treats that as contention and takes the lock next time."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/registry.db")
    name, client, answers = "race", MlflowClient(), []
    client.create_registered_model(name + registry.LOCK_SUFFIX, tags={"holder": "first",
                                                                      "expires": str(time.time() + 60)})
    read_back = SqlAlchemyStore.get_registered_model

    def released_first(self, model_name):
        if not answers:  # the holder lets go between the failed insert and this read
            answers.append("released")
            self.delete_registered_model(model_name)
        return read_back(self, model_name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", released_first)
    with pytest.raises(mlflow.exceptions.MlflowException) as raced:  # the race, as the server meets it
        client.create_registered_model(name + registry.LOCK_SUFFIX, tags={"holder": "probe"})
    assert raced.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    client.create_registered_model(name + registry.LOCK_SUFFIX, tags={"holder": "first",
                                                                      "expires": str(time.time() + 60)})
    answers.clear()
    with registry.promotion_lock(name, "second", "register", wait=30):
        assert client.get_registered_model(name + registry.LOCK_SUFFIX).tags["holder"] == "second"
    assert answers == ["released"]


def test_a_stale_lock_is_taken_over_and_a_live_one_waited_for(tracking, monkeypatch):
    name, client = tracking["model"], MlflowClient()
    client.create_registered_model(name + registry.LOCK_SUFFIX, tags={"holder": "a dead run",
                                                                      "expires": str(time.time() - 1)})
    with registry.promotion_lock(name, "me", "register"):
        held = client.get_registered_model(name + registry.LOCK_SUFFIX)
        assert held.tags["holder"] == "me"
        with pytest.raises(StepError, match=r"register: prod: another promotion of .* \(me\) has held the lock"):
            with registry.promotion_lock(name, "other", "register", wait=0.5):
                pass
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_registered_model(name + registry.LOCK_SUFFIX)  # released


def test_select_keeps_the_trial_with_the_lowest_validation_mae_and_records_the_sweep(tracking, tmp_path, splits):
    """Three trials, the best in the middle; a tie would go to the earlier trial."""
    trials = [({"n_estimators": 2, "max_depth": 2}), ({"n_estimators": 15, "max_depth": 12}), ({"n_estimators": 3})]
    outputs = []
    for i, trial in enumerate(trials):
        path = str(tmp_path / f"trial-{i}")
        outputs.append((path, training.train(splits["a"]["trainval"], path, vars(WEAK), 0.2, trial)))
    chosen = training.select(outputs, str(tmp_path / "chosen"))
    maes = [meta["val_mae"] for _, meta in outputs]
    assert maes.index(min(maes)) == 1 and chosen["mlflow_run_id"] == outputs[1][1]["mlflow_run_id"]
    assert chosen["sweep_choice"].startswith('trial 2 of 3 {"max_depth": 12, "n_estimators": 15}: lowest validation')
    assert [t["trial"] for t in json.loads(chosen["sweep"])] == [json.loads(m["trial"]) for _, m in outputs]
    assert (tmp_path / "chosen" / "MLmodel").read_text() == (tmp_path / "trial-1" / "MLmodel").read_text()
    twice = training.select([outputs[1], (outputs[1][0], outputs[1][1])], str(tmp_path / "tie"))
    assert twice["sweep_choice"].startswith("trial 1 of 2")


@pytest.mark.parametrize("base, trial, message", [
    ({}, {"learning_rate": -1}, "train: sweep trial {\"learning_rate\": -1.0}: The 'learning_rate' parameter"),
    ({"learner": "svm"}, {}, "train: learner: 'svm' is not one of"),
    ({}, {"seed": 3}, "train: sweep {\"seed\": 3}: seed: not a parameter a trial can change"),
])
def test_a_bad_parameter_fails_at_train_naming_it(tracking, tmp_path, splits, base, trial, message):
    with pytest.raises(StepError) as failed:
        training.train(splits["a"]["trainval"], str(tmp_path / "m"), vars(model.ModelParams()) | base, 0.2, trial)
    assert str(failed.value).startswith(message)
