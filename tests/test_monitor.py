"""Monitoring: `pipeline.py run --pipeline monitor` (kfp.local) against a real MLflow server and a prod trained by the
training pipeline on one half of the sample; the monitor step's logic called directly; scheduling and the retrain
step against a stand-in for KFP's API server (tests/kfp_standin.py), as no cluster runs here."""

import hashlib
import json
import subprocess
import sys
import uuid

import mlflow
import pandas as pd
import pytest
from conftest import ROOT, run_pipeline
from kfp_standin import KfpStandIn

from pipelines import cluster
from components import checks, cities, drift, kfp_api, listings, monitoring, names, report, steps
from components.errors import StepError

LIMITS = drift.DriftLimits()


def run(mlflow_uri: str, experiment: str, root, *params: str, pipeline_name: str = "monitor"):
    return run_pipeline(mlflow_uri, experiment, root, pipeline_name, *params)


@pytest.fixture(scope="module")
def halves(sample) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two disjoint random halves of the real sample, raw as published."""
    first = sample.sample(frac=0.5, random_state=7)
    return first, sample.drop(first.index)


@pytest.fixture(scope="module")
def prod(mlflow_server, halves, tmp_path_factory) -> dict:
    """A prod registered by the training pipeline on the first half: its model name and experiment."""
    home = tmp_path_factory.mktemp("monitor")
    names = {"model": f"monitor-{uuid.uuid4().hex[:6]}", "experiment": f"monitor-{uuid.uuid4().hex[:6]}",
             "home": home}
    halves[0].to_csv(home / "first.csv", index=False)
    result = run(mlflow_server, names["experiment"], home / "out", f"source={home / 'first.csv'}",
                 f"model_name={names['model']}", pipeline_name="training")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return names


def monitor_run(prod: dict, verdict: str) -> mlflow.entities.Run:
    experiment = mlflow.get_experiment_by_name(prod["experiment"])
    (found,) = mlflow.search_runs([experiment.experiment_id], output_format="list", max_results=1,
                                  filter_string=f"tags.verdict = '{verdict}'", order_by=["start_time DESC"])
    return found


def test_a_disjoint_half_of_the_same_listings_is_ok(prod, mlflow_server, halves, tmp_path):
    source = tmp_path / "second.csv"
    halves[1].to_csv(source, index=False)
    result = run(mlflow_server, prod["experiment"], tmp_path / "out", f"source={source}", f"model_name={prod['model']}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("verdict: ok: nothing moved that matters; prod's error is "
                                                             "not worse with evidence: ")
    # prod's error on rows it never saw, against its own at registration: about the same.
    assert "prod's MAE on the new priced rows:" in result.stdout
    mlflow.set_tracking_uri(mlflow_server)
    found = monitor_run(prod, "ok")
    assert 0.9 < found.data.metrics["prod_error_ratio"] < LIMITS.warn_error_ratio
    assert found.data.metrics["drift"] == 0 and found.data.tags["drifted"] == ""
    report_file = (tmp_path / "out" / "latest").resolve() / "drift_report.html"
    assert "Verdict: ok: nothing moved that matters" in report.as_text(report_file.read_text())
    assert f"  drift report  {report_file}\n{'':16}{mlflow_server}/#/experiments/" in result.stdout


def test_a_shifted_copy_is_shifted_naming_the_columns_and_retrain_on_shift_trains_on_it(prod, mlflow_server, halves,
                                                                                         tmp_path):
    shifted = halves[1].assign(minimum_nights=halves[1]["minimum_nights"] * 3,
                               availability_365=(halves[1]["availability_365"] + 120).clip(upper=365))
    source = tmp_path / "shifted.csv"
    shifted.to_csv(source, index=False)
    result = run(mlflow_server, prod["experiment"], tmp_path / "out", f"source={source}",
                 f"model_name={prod['model']}", "retrain=true", "retrain_on_shift=true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server)
    found = monitor_run(prod, "shifted")
    assert found.data.tags["drifted"] == "minimum_nights, availability_365"
    assert found.data.metrics["ks_minimum_nights"] > LIMITS.warn_ks and found.data.metrics["drift"] == 1
    verdict = next(line for line in result.stdout.splitlines() if line.startswith("verdict: "))
    assert verdict.startswith("verdict: shifted: minimum_nights PSI ") and "; availability_365 PSI " in verdict
    assert "prod's error is not worse with evidence" in verdict
    # retrain_on_shift=true: the training pipeline ran on the same bytes and registered a version from them.
    assert "retrain=true: running the training pipeline on the same data (the verdict is shifted: " in result.stdout
    assert f"registered model {prod['model']!r} version 2" in result.stdout
    client = mlflow.MlflowClient()
    version = client.get_model_version(prod["model"], "2")
    assert version.tags["data_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert version.tags["trigger"] == f"monitoring run {found.info.run_id}: {verdict.removeprefix('verdict: ')}"
    client.set_registered_model_alias(prod["model"], "prod", "1")  # the other tests compare with the first half's


@pytest.mark.parametrize("case, last_line", [
    ("no latitude", "verdict: invalid: FAILED at clean: clean: latitude: 1 column(s) missing from the data"),
    # Not the data's fault: a plain failure, no verdict.
    ("no prod", "FAILED at monitor: monitor: model_name: model 'nobody' has no 'prod' version"),
])
def test_a_broken_file_is_invalid_at_the_step_that_cannot_read_it(prod, mlflow_server, halves, tmp_path, case,
                                                                  last_line):
    source = tmp_path / "new.csv"
    (halves[1].drop(columns=["latitude"]) if case == "no latitude" else halves[1]).to_csv(source, index=False)
    model = prod["model"] if case == "no latitude" else "nobody"
    result = run(mlflow_server, prod["experiment"], tmp_path / "out", f"source={source}", f"model_name={model}",
                 "retrain=true")
    assert result.returncode == (2 if case == "no latitude" else 1)  # invalid has an exit status of its own
    assert result.stderr.strip().splitlines()[-1].startswith(last_line), result.stderr[-2000:]
    assert "retrain" not in result.stdout.split("steps (full log")[1]  # nothing trained on it


def clean_file(rows: pd.DataFrame, path) -> tuple[str, dict]:
    """Clean as the monitoring pipeline does: the file and clean's counts (its metadata)."""
    df, dropped = listings.clean_listings(rows, cities.city(), keep_unpriced=True)
    listings.write_listings(df, str(path))
    return str(path), listings.clean_counts(df, dropped)


def monitor(prod, rows, tmp_path, **limits) -> dict:
    path, counts = clean_file(rows, tmp_path / "clean.csv")
    return monitoring.monitor(path, str(tmp_path / "report.html"), prod["model"], cities.city().as_dict(),
                         drift.DriftLimits(**limits), counts)


def test_prices_up_by_a_third_is_degraded_with_its_interval_which_training_would_refuse(prod, tracking, halves,
                                                                                       tmp_path):
    rows = halves[1].assign(price=halves[1]["price"] * 1.3)
    summary = monitor(prod, rows, tmp_path)
    assert summary["verdict"] == "degraded"
    assert set(summary["drifted"]) == {"price", drift.ERROR_CHECK}
    assert summary["prod_error_ratio_low"] > LIMITS.max_error_ratio
    assert summary["reason"].startswith("prod version 1's MAE on ") and "(95% interval " in summary["reason"]
    # prod's price ranges no longer hold as promised either, with evidence.
    assert summary["prod_coverage_high"] < 0.75 and "prod version 1's ranges hold " in summary["reason"]
    # So retrain=true would not start training: its check step fails on exactly this.
    assert not summary["trainable"] and summary["not_trainable_because"][0].startswith("price: prod version 1's MAE")
    assert monitoring.retrain_decision(summary, on_shift=False)[0] is False
    assert "Verdict: degraded: prod version 1's MAE" in report.as_text((tmp_path / "report.html").read_text())


def test_a_generated_file_is_suspect_and_never_trained_on(prod, tracking, halves, tmp_path):
    """Each column drawn on its own from real values: nothing real about the rows, though each value is."""
    new = halves[1]
    rows = pd.DataFrame({c: new[c].sample(len(new), replace=True, random_state=i).to_numpy()
                         for i, c in enumerate(new.columns)}).assign(id=new["id"].to_numpy())
    summary = monitor(prod, rows, tmp_path)
    assert summary["verdict"] == "suspect" and "the data looks generated" in summary["reason"]
    assert monitoring.EXIT_CODES["suspect"] != 0 and not summary["trainable"]
    assert monitoring.retrain_decision(summary, on_shift=True) == (
        False, "the verdict is suspect: training starts on degraded or shifted")
    assert "Verdict: suspect: rows: " in report.as_text((tmp_path / "report.html").read_text())


def test_listings_priced_out_of_range_are_drift_though_clean_drops_them(prod, tracking, halves, tmp_path):
    """What clean drops never reaches the other checks: its share is compared with what it dropped of prod's data."""
    rows = halves[1].copy()
    moved = rows.sample(frac=0.2, random_state=1).index
    rows.loc[moved, "price"] += 400
    summary = monitor(prod, rows, tmp_path)
    assert summary["verdict"] == "shifted" and set(summary["drifted"]) == {"rows clean drops"}
    assert summary["drifted"]["rows clean drops"].endswith("prod's data 4.9%")
    assert summary["trainable"]  # training would drop those rows and learn from the rest


def test_listings_with_few_or_no_prices_are_compared_on_the_rest_and_say_what_was_not_measured(prod, tracking, halves,
                                                                                              tmp_path):
    for priced in (0, 30):
        rows = halves[1].copy()
        rows.loc[rows.index[priced:], "price"] = None
        summary = monitor(prod, rows, tmp_path)
        assert summary["verdict"] == "ok" and summary["priced_rows"] == priced and summary["rows"] > 9000
        assert "prod_error_ratio" not in summary
        assert summary["prod_error_unknown"].startswith(f"only {priced} of " if priced else "none of the ")
        text = report.as_text((tmp_path / "report.html").read_text())
        assert f"price drift skipped {priced} value(s) in the new data" in text
        assert "Verdict: ok: nothing moved that matters; prod's error on them is not measured" in text
        assert "(not measured: price drift, prod's error on new rows, rows clean drops drift)" in text


def test_values_the_checks_refuse_make_the_monitor_step_fail_as_invalid_after_keeping_its_report(prod, tracking, halves,
                                                                                                tmp_path):
    rows = halves[1].copy()
    rows.loc[rows.index[:30], "neighbourhood_group"] = "Atlantis"
    with pytest.raises(StepError, match=r"monitor: neighbourhood_group: the new listings are invalid: 1 check\(s\) "
                                        r"failed \(drift report: http://.*drift_report.html\):\n  - neighbourhood_group: "
                                        r"unknown values \['Atlantis'\]"):
        monitor(prod, rows, tmp_path)
    assert "Verdict: invalid: neighbourhood_group: unknown values" in report.as_text((tmp_path / "report.html").read_text())
    assert monitor_run(prod | {"experiment": tracking["experiment"]}, "invalid").info.status == "FAILED"


def test_with_no_prod_to_compare_with_the_monitor_refuses(tracking, halves, tmp_path):
    with pytest.raises(StepError, match=r"monitor: model_name: model 'nobody' has no 'prod' version: there is nothing "
                                        "to compare the new listings with"):
        monitoring.monitor(clean_file(halves[1], tmp_path / "c.csv")[0], str(tmp_path / "r.html"), "nobody",
                      cities.city().as_dict(), LIMITS)


def test_drifted_names_what_moved_but_not_what_could_not_be_measured():
    found = [checks.Check("price drift", checks.WARN, "PSI 0.2, KS 0.1", ""),
             checks.Check("room_type drift", checks.FAIL, "PSI 0.4", ""),
             checks.Check("latitude drift", checks.PASS, "PSI 0.0, KS 0.0", ""),
             checks.Check(drift.ERROR_CHECK, checks.WARN, checks.UNKNOWN, ""),
             checks.Check("row count", checks.FAIL, "3", "")]
    assert drift.drifted(found) == {"price": "PSI 0.2, KS 0.1", "room_type": "PSI 0.4"}


# ---------------------------------------------------------------- the cluster's side, against a stand-in KFP API

@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("specs")
    paths = {name: str(home / f"{name}.yaml") for name in ("training", "monitor")}
    for name, path in paths.items():
        cluster.compile_pipeline(path, name)
    return paths


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def schedule(kfp: KfpStandIn, specs: dict, *extra: str) -> subprocess.CompletedProcess:
    return cli("schedule", "--host", kfp.url, "--spec", specs["monitor"], "--training-spec", specs["training"], *extra)


@pytest.mark.slow  # pipeline.py schedule and unschedule against the stand-in KFP API server
def test_schedule_makes_one_recurring_monitoring_run_and_unschedule_removes_it(specs):
    with KfpStandIn() as kfp:
        result = schedule(kfp, specs, "--cron", "30 6 * * 1", "--param", "source=s3://data/new.csv",
                          "--param", "retrain=true")
        assert result.returncode == 0, result.stderr
        (recurring,) = kfp.recurring_runs.values()
        assert recurring["display_name"] == "rental-price-monitor"
        assert recurring["trigger"]["cron_schedule"]["cron"] == "0 30 6 * * 1"  # KFP's cron: seconds first
        assert int(recurring["max_concurrency"]) == 1 and recurring["no_catchup"] is True
        monitor_version = kfp.versions[recurring["pipeline_version_reference"]["pipeline_version_id"]]
        assert monitor_version["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "rental-price-monitor"
        parameters = recurring["runtime_config"]["parameters"]
        # The retrain step will start exactly the training pipeline uploaded beside it.
        training_version = kfp.versions[parameters["training_version"]]
        assert training_version["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "rental-price"
        assert parameters["source"] == "s3://data/new.csv" and parameters["retrain"] is True
        assert "scheduled rental-price-monitor at '0 30 6 * * 1'" in result.stdout

        # Again: the new schedule replaces the old.
        result = schedule(kfp, specs, "--cron", "0 0 7 * * *")
        assert result.returncode == 0, result.stderr
        (recurring,) = kfp.recurring_runs.values()
        assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 7 * * *"
        assert len(kfp.pipelines) == 2
        versions = dict(kfp.versions)  # a version is named by its spec's sha256 (KFP names a first one as its pipeline)

        # A refused create leaves the schedule there was; the same specs are not uploaded again.
        kept = dict(kfp.recurring_runs)
        kfp.fail_next(503, "apiserver is restarting", on="POST /recurringruns")
        result = schedule(kfp, specs)
        assert result.returncode == 1 and kfp.recurring_runs == kept and kfp.versions == versions
        assert result.stderr.strip().startswith("pipeline.py schedule: KFP at http://127.0.0.1:")
        assert "apiserver is restarting" in result.stderr

        result = cli("unschedule", "--host", kfp.url)
        assert result.returncode == 0 and not kfp.recurring_runs
        assert result.stdout.strip().endswith(f"removed the recurring run(s) of rental-price-monitor: {next(iter(kept))}")
        result = cli("unschedule", "--host", kfp.url)
        assert result.stdout.strip() == "nothing to remove: rental-price-monitor is not scheduled"


@pytest.mark.parametrize("cron, expected", [("0 6 * * *", "0 0 6 * * *"), ("15 0 6 * * 1-5", "15 0 6 * * 1-5")])
def test_cron_takes_five_fields_or_kfps_six(cron, expected):
    assert kfp_api.cron_schedule(cron) == expected


def test_a_cron_of_other_lengths_is_refused_naming_the_field(specs):
    with KfpStandIn() as kfp:
        result = schedule(kfp, specs, "--cron", "6 * *")
        assert result.returncode != 0 and not kfp.requests
        assert "schedule: cron: '6 * *' has 3 fields: expected 5" in result.stderr


def test_the_retrain_step_starts_the_named_training_version_on_the_same_bytes(specs):
    with KfpStandIn() as kfp:
        with pytest.raises(StepError, match="retrain: pipeline: KFP has no pipeline named 'rental-price' to start: "
                                            "`make schedule` uploads it"):
            kfp_api.start_training(kfp.url, "s3://data/new.csv", "ab" * 32, "rental-price", "", "price PSI 0.2")
        client = kfp_api.connect(kfp.url, "test")
        _, first = kfp_api.upload(client, specs["training"], names.TRAINING_PIPELINE)
        _, newest = kfp_api.upload(client, specs["monitor"], names.TRAINING_PIPELINE)  # any newer version will do
        for asked, started in (("", newest), (first, first)):
            run_id = kfp_api.start_training(kfp.url, "s3://data/new.csv", "ab" * 32, {"model_name": "m"}, asked,
                                            "price PSI 0.2")
            made = kfp.runs[run_id]
            assert made["pipeline_version_reference"]["pipeline_version_id"] == started
            assert made["runtime_config"]["parameters"] == {"source": "s3://data/new.csv", "source_sha256": "ab" * 32,
                                                            "model_name": "m"}
            assert made["display_name"] == "retrain on price PSI 0.2 (abababababab)"


class Artifact:
    metadata = {"sha256": "cd" * 32}


def test_the_retrain_component_trains_on_the_bytes_monitored_with_the_monitors_parameters_unless_training_would_refuse(
        specs):
    """The component's own body, as the cluster runs it (its Input[Dataset] stood in for)."""
    retrain = steps.retrain.python_func
    training_params = {"model_name": "m", "max_error_ratio": 1.5, "min_rows": 300}
    summary = {"verdict": "degraded", "reason": "prod's MAE 1.3 x", "drifted": {"price": "PSI 0.2, KS 0.1"},
               "trainable": True, "not_trainable_because": [], "training_params": training_params}
    with KfpStandIn() as kfp:
        kfp_api.upload(kfp_api.connect(kfp.url, "test"), specs["training"], names.TRAINING_PIPELINE)
        run_id = retrain(raw_data=Artifact(), source="s3://data/new.csv", model_name="m", kfp_host=kfp.url,
                         training_version="", drift=json.dumps(summary))
        assert kfp.runs[run_id]["runtime_config"]["parameters"] == {
            **training_params, "source": "s3://data/new.csv", "source_sha256": "cd" * 32}
        refused = summary | {"trainable": False, "not_trainable_because": ["price: prod's MAE ... 1.37 x"]}
        assert retrain(raw_data=Artifact(), source="s3://data/new.csv", model_name="m", kfp_host=kfp.url,
                       training_version="", drift=json.dumps(refused)) == ""
        shifted = summary | {"verdict": "shifted"}  # only with on_shift
        assert retrain(raw_data=Artifact(), source="s3://data/new.csv", model_name="m", kfp_host=kfp.url,
                       training_version="", drift=json.dumps(shifted)) == ""
        assert len(kfp.runs) == 1
        assert retrain(raw_data=Artifact(), source="s3://data/new.csv", model_name="m", kfp_host=kfp.url,
                       training_version="", drift=json.dumps(shifted), on_shift=True)
        assert len(kfp.runs) == 2
