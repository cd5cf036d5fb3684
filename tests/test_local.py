"""End to end on the embedded default: `pipeline.py run` (kfp.local SubprocessRunner) against a real MLflow server.

The tests in this module share one registered model and run in order: a good run makes `prod`, a worse run
must not move it, and every bad input must end at its step without registering anything.
"""

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import readme
from components import report
from conftest import ROOT, free_port, listing, wait_until
from mlflow.tracking import MlflowClient

MODEL = f"rental-e2e-{uuid.uuid4().hex[:6]}"


def run_pipeline(mlflow_uri: str, tmp_path, *params: str, experiment: str = "e2e") -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    command = [sys.executable, "pipeline.py", "run", "--pipeline-root", str(tmp_path / "outputs"),
               "--param", f"model_name={MODEL}"]
    for param in params:
        command += ["--param", param]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def versions(client: MlflowClient) -> list[str]:
    return sorted(v.version for v in client.search_model_versions(f"name = '{MODEL}'"))


@pytest.fixture(scope="module")
def client(mlflow_server) -> MlflowClient:
    mlflow.set_tracking_uri(mlflow_server)
    return MlflowClient(mlflow_server)


@pytest.fixture(scope="module")
def first_run(mlflow_server, tmp_path_factory) -> subprocess.CompletedProcess:
    """A run with no source given: the default, the sample shipped with the project (no network needed)."""
    folder = tmp_path_factory.mktemp("first")
    result = run_pipeline(mlflow_server, folder)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    result.outputs = folder / "outputs"
    return result


def outputs_of(result: subprocess.CompletedProcess) -> Path:
    """A run's folder, named by the run id it printed: <pipeline root>/<run id>/<task>/<output>."""
    root = Path(result.args[result.args.index("--pipeline-root") + 1])
    return root / re.search(r"^pipeline run (local-[0-9a-f]{12}) ", result.stdout, re.M).group(1)


def test_first_run_registers_a_prod_model_with_lineage(first_run, client):
    prod = client.get_model_version_by_alias(MODEL, "prod")
    assert prod.version == "1"
    assert float(prod.tags["test_mae"]) <= 30.5  # the default learner (the reference forest: 32.86)
    # The hash of the CSV itself (the shared sample's), not of its gzipped copy.
    assert prod.tags["data_sha256"] == "5c92c8f30e288f2c696c00882c169d9e1dc8ebbf1cf83d17bd7ee903a7148b4d"
    assert prod.tags["data_source"] == "sample://nyc_airbnb_sample1.csv.gz"
    assert prod.tags["kfp_run_id"].startswith("local-")
    assert prod.tags["git_commit"]
    parameters = json.loads(prod.tags["parameters"])
    assert (parameters["learner"], parameters["learning_rate"]) == ("hist_gbm", "0.05")
    assert "n_estimators" not in parameters  # the forest's, which this learner does not read
    assert set(json.loads(prod.tags["images"])) == {"download", "clean", "check", "split", "train", "select",
                                                    "evaluate", "register"}
    assert prod.tags["sweep_choice"].startswith("trial 1 of 1 {}: lowest validation MAE")
    assert prod.tags["reference_data"].startswith("runs:/")
    assert f"version 1: now prod; test MAE {float(prod.tags['test_mae']):.2f}" in first_run.stdout
    # A line per step with its time and key figure; kfp.local's own output only in the log file.
    for step in ("download", "clean", "check", "split", "train", "select", "evaluate", "register"):
        assert re.search(rf"^  {step} +done in +[0-9.]+ s  {step}: ", first_run.stdout, re.M), first_run.stdout
    assert "Executing task" not in first_run.stdout and len(first_run.stdout.splitlines()) < 28, first_run.stdout


def test_the_readme_check_lets_a_model_figure_round_differently_and_nothing_else(monkeypatch):
    """Another CPU's kernels give a slightly different model: its MAE and prices, within 10 %; the rest exactly."""
    shown = "train: hist_gbm: validation MAE 29.918\nregister: version 1, now prod\n  $  69.99  $45 to $78    Queens"
    monkeypatch.setattr(readme, "block", lambda name: shown)
    readme.assert_shows("x", "train: hist_gbm: validation MAE 29.892\nregister: version 1, now prod\n"
                             "  $  70.41  $46 to $77    Queens\n")
    for wrong in [shown.replace("29.918", "33.918"), shown.replace("$45", "$52"),  # beyond 10 %
                  shown.replace("version 1", "version 2"), shown.replace("hist_gbm", "random_forest"),
                  shown.replace("Queens", "Bronx"), shown.replace("MAE 29.918", "MAE 29.918 (29.5 to 30.1)")]:
        with pytest.raises(AssertionError, match="is stale|is not"):
            readme.assert_shows("x", wrong)


def test_the_readme_shows_the_first_run_and_an_identical_rerun_as_they_are(first_run, client, mlflow_server):
    readme.assert_shows("first run", first_run.stdout[first_run.stdout.index("steps ("):], MODEL)
    again = run_pipeline(mlflow_server, first_run.outputs.parent)  # the same pipeline root: its cache
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    readme.assert_shows("rerun", again.stdout[again.stdout.index("steps ("):], MODEL)
    assert (first_run.outputs / "latest").resolve() == outputs_of(again)  # the last run's folder
    assert versions(client) == ["1"]


def test_the_readme_shows_a_failed_run_as_it_is(first_run, client, mlflow_server, sample, tmp_path):
    """Dates written as 5/26/19: the clean step's one line says which format to name in the city profile."""
    dates = pd.to_datetime(sample["last_review"])
    odd = sample.assign(last_review=[f"{d.month}/{d.day}/{d:%y}" if pd.notna(d) else "" for d in dates])
    result = run_pipeline(mlflow_server, tmp_path, f"source={write(tmp_path / 'dates.csv', odd.to_csv(index=False))}")
    assert result.returncode == 1
    shown = [line for line in result.stdout.splitlines() if "FAILED" in line] + result.stderr.strip().splitlines()[-1:]
    readme.assert_shows("failed run", "\n".join(shown), MODEL)
    assert versions(client) == ["1"]


def test_the_reports_open_in_a_browser_from_the_paths_the_run_prints(first_run, browser):
    """Each report under a name that opens (.html) in the run's folder, which `latest` points at; a page with
    charts, also on a first run (no prod to compare with)."""
    run = outputs_of(first_run)
    shown = re.findall(r"^  (data report|model card) +(\S+)$", first_run.stdout, re.M)
    assert [(what, Path(path)) for what, path in shown] == [("data report", run / "data_report.html"),
                                                           ("model card", run / "model_card.html")]
    assert (run / "data_report.html").read_text() == (run / "check" / "data_report").read_text()
    for _, path in shown:
        browser.open(Path(path).as_uri())
        page = browser.evaluate("({title: document.title, charts: document.querySelectorAll('figure svg rect').length})")
        assert page["title"].startswith(("Data report", "Model card")) and page["charts"] > 10, page
    links = re.findall(r"^ {16}(http://\S+)$", first_run.stdout, re.M)
    assert len(links) == 2 and all(link.endswith(("reports/data_report.html", "reports/model_card.html"))
                                   for link in links)


def test_the_readme_s_predict_and_curl_examples_are_what_the_model_server_answers(first_run, mlflow_server,
                                                                                  sample_path, tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "components.serve", "--model", f"models:/{MODEL}@prod", "--port",
                               str(port), "--cache", str(tmp_path / "cache")], cwd=ROOT,
                              env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(f"{url}/ping", process=server)
        predicted = subprocess.run([sys.executable, "-m", "components.predict", "--url", url, "--data", str(sample_path)],
                                   cwd=ROOT, capture_output=True, text=True, timeout=120)
        readme.assert_shows("predict", predicted.stdout, MODEL)
        curl = subprocess.run(["bash", "-c", readme.block("curl").replace("127.0.0.1:8080", f"127.0.0.1:{port}")],
                              capture_output=True, text=True, timeout=60)
        readme.assert_shows("curl answer", curl.stdout)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_first_run_is_one_parent_run_with_a_child_per_step(first_run, client):
    kfp_run = client.get_model_version_by_alias(MODEL, "prod").tags["kfp_run_id"]
    runs = mlflow.search_runs(experiment_names=["e2e"], filter_string=f"tags.kfp_run_id = '{kfp_run}'")
    parent = runs[runs["tags.pipeline_step"] == "pipeline"]
    assert len(parent) == 1 and parent["status"].item() == "FINISHED"
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].item()]
    assert sorted(children["tags.pipeline_step"]) == sorted(
        ["download", "clean", "check", "split", "train", "select", "evaluate", "register"])
    assert (children["metrics.step_seconds"] > 0).all() and (children["metrics.startup_seconds"] > 0).all()
    assert (children["metrics.peak_memory_mb"] > 50).all()
    train = client.get_run(children[children["tags.pipeline_step"] == "train"]["run_id"].item())
    assert {"val_mae", "val_r2", "fit_seconds"} <= set(train.data.metrics)
    assert "model/MLmodel" in [a.path for a in client.list_artifacts(train.info.run_id, "model")]
    evaluate = children[children["tags.pipeline_step"] == "evaluate"]["run_id"].item()
    assert "feature_importance.png" in [a.path for a in client.list_artifacts(evaluate)]


def test_first_run_leaves_a_data_report_a_model_card_and_named_metrics(first_run, client, mlflow_server):
    """What the KFP dashboard would show of the run (its output artifacts), and the same reports in MLflow."""
    run = outputs_of(first_run)
    words = report.as_text((run / "check" / "data_report").read_text())
    assert words.startswith("Data report: 19001 rows") and "All 27 checks passed" in words
    assert "has no 'prod' version yet" in words
    card = report.as_text((run / "register" / "model_card").read_text())
    assert card.startswith(f"Model card: {MODEL} version 1") and "Promoted to prod: no prod model yet" in card
    assert "No comparison with prod: no prod model yet." in card
    evaluation = json.loads((run / "evaluate" / "metrics").read_text())
    assert list(evaluation) == ["test_mae", "test_r2", "test_coverage", "test_interval_width"]  # nothing to compare with
    (train,) = run.glob("**/train/metrics")
    assert list(json.loads(train.read_text())) == ["val_mae", "val_r2"]
    version = client.get_model_version(MODEL, "1")
    assert version.description.startswith("**Promoted to prod**: no prod model yet")
    link = re.search(r"Model card: (\S+)", version.description).group(1)
    assert link.startswith(f"{mlflow_server}/#/experiments/") and link.endswith("/artifacts/reports/model_card.html")
    register_run = link.split("/runs/")[1].split("/")[0]
    kept = Path(client.download_artifacts(register_run, "reports/model_card.html")).read_text()
    assert report.as_text(kept) == card


def test_a_two_trial_sweep_registers_its_best_trial_which_being_worse_leaves_prod(
        first_run, client, mlflow_server, sample_path, tmp_path):
    """Two weak forests as a sweep: each trial trains in its own task and MLflow run, select keeps the one with
    the lower validation MAE, and the version registered from it records the whole sweep. Worse than prod, it
    does not take prod."""
    sweep = [{"n_estimators": 2, "max_depth": 2}, {"n_estimators": 3, "max_depth": 4}]
    result = run_pipeline(mlflow_server, tmp_path, f"source={sample_path}", "learner=random_forest",
                          f"sweep={json.dumps(sweep)}")
    assert result.returncode == 0, result.stdout[-4000:]
    assert versions(client) == ["1", "2"]
    assert client.get_model_version_by_alias(MODEL, "prod").version == "1"
    worse = client.get_model_version(MODEL, "2")
    board = json.loads(worse.tags["sweep"])
    assert [trial["trial"] for trial in board] == sweep and board[0]["val_mae"] != board[1]["val_mae"]
    best = min(range(2), key=lambda i: board[i]["val_mae"])
    assert worse.run_id == board[best]["mlflow_run_id"]  # the registered model is the winning trial's own
    assert worse.tags["sweep_choice"].startswith(
        f"trial {best + 1} of 2 {json.dumps(sweep[best], sort_keys=True)}: lowest validation MAE")
    assert json.loads(worse.tags["parameters"])["max_depth"] == str(sweep[best]["max_depth"])
    trials = mlflow.search_runs(experiment_names=["e2e"], filter_string=f"tags.kfp_run_id = '{worse.tags['kfp_run_id']}'"
                                " and tags.pipeline_step = 'train'")
    assert sorted(trials["tags.trial"]) == sorted(json.dumps(t, sort_keys=True) for t in sweep)
    assert float(worse.tags["test_mae"]) > float(client.get_model_version(MODEL, "1").tags["test_mae"])
    assert worse.tags["promotion"].startswith("worse than prod on 3801 rows neither model was trained on")
    assert "version 2: prod unchanged" in result.stdout
    assert f"why: {worse.tags['promotion']}" in result.stdout
    # Candidate and prod side by side, in the KFP metrics and the model card.
    run = outputs_of(result)
    evaluation = json.loads((run / "evaluate" / "metrics").read_text())
    assert evaluation["prod_version"] == 1 and evaluation["compared_rows"] == 3801
    assert evaluation["compared_candidate_mae"] > evaluation["compared_prod_mae"]
    assert evaluation["compared_candidate_r2"] < evaluation["compared_prod_r2"]
    assert len(list(run.glob("**/train/metrics"))) == 2  # one per trial
    card = report.as_text((run / "register" / "model_card").read_text())
    assert f"Not promoted, prod unchanged: {worse.tags['promotion']}" in card
    assert "prod (version 1)" in card and "Sweep: 2 trials" in card


def write(path, text: str):
    path.write_text(text)
    return str(path)


def csv_of(*rows: dict) -> str:
    import pandas as pd

    return pd.DataFrame(list(rows)).to_csv(index=False)


def shifted_sample(sample, tmp_path):
    # Only Manhattan, prices up by half: clean and deterministic checks pass, statistical ones must not.
    df = sample[sample["neighbourhood_group"] == "Manhattan"].assign(price=lambda d: (d["price"] * 1.5).round())
    return write(tmp_path / "shifted.csv", df.to_csv(index=False))


BAD_INPUTS = {
    "missing source": (lambda s, t: str(t / "nope.csv"), "download", "download: source: cannot read"),
    "non-CSV file": (lambda s, t: write(t / "x.csv", "\x00\x01binary\xff" * 10), "download", "download: source: not a"),
    "empty file": (lambda s, t: write(t / "empty.csv", ""), "download", "download: source: the file is empty"),
    "missing column": (lambda s, t: write(t / "m.csv", s.drop(columns=["price"]).to_csv(index=False)),
                       "clean", "clean: price: 1 column(s) missing from the data"),
    "renamed column": (lambda s, t: write(t / "r.csv", s.rename(columns={"name": "title"}).to_csv(index=False)),
                       "clean", "clean: name: 1 column(s) missing from the data: ['name']"),
    "missing numeric columns": (lambda s, t: write(t / "n.csv", s.drop(columns=["availability_365", "latitude"])
                                                   .to_csv(index=False)),
                                "clean", "clean: latitude, availability_365: 2 column(s) missing from the data"),
    "non-numeric price": (lambda s, t: write(t / "p.csv", csv_of(listing(), listing(id=2, price="cheap"))),
                          "clean", "clean: price: 1 value(s) are not numbers, e.g. ['cheap']"),
    "every row filtered": (lambda s, t: write(t / "f.csv", csv_of(listing(price=5000), listing(id=2, price=1))),
                           "clean", "every row was filtered out"),
    "fails a drift check": (shifted_sample, "check", "neighbourhood_group: distribution shifted from prod's data (PSI"),
    "most ids rounded by a spreadsheet": (lambda s, t: write(t / "ids.csv", rounded_ids(s, 0.6).to_csv(index=False)),
                                          "clean", "clean: id: 12000 value(s) are empty or not whole numbers as written"),
}


def rounded_ids(sample, share: float):
    """The sample as a spreadsheet saves it when some of its ids are long: 4.98554E+17."""
    rounded = sample.sample(frac=share, random_state=0).index
    return sample.astype({"id": "str"}).assign(id=lambda d: d["id"].where(~d.index.isin(rounded), "4.98554E+17"))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_ends_at_its_step_and_changes_nothing(case, first_run, client, mlflow_server, sample, tmp_path):
    make_source, step, message = BAD_INPUTS[case]
    before = versions(client)
    result = run_pipeline(mlflow_server, tmp_path, f"source={make_source(sample, tmp_path)}")
    assert result.returncode == 1
    # The run ends with the step's own error, one line; the whole of kfp.local's output is in the log it names.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"FAILED at {step}: ") and message in last, result.stderr[-3000:]
    log = re.fullmatch(r".* \(full log: (.*\.log)\)", last).group(1)
    assert "Traceback" in Path(log).read_text() and "Traceback" not in result.stdout + result.stderr
    assert f"  {step:<10} FAILED after " in result.stdout
    assert versions(client) == before
    assert client.get_model_version_by_alias(MODEL, "prod").version == "1"
    if step == "check":  # a failed check still leaves its report, which names the failed check
        words = report.as_text((outputs_of(result) / "data_report.html").read_text())
        assert re.search(r"\d+ of \d+ checks failed", words)


def test_a_minority_of_unreadable_ids_is_dropped_counted_and_named_and_the_rest_trains(first_run, mlflow_server, sample,
                                                                                     tmp_path):
    source = write(tmp_path / "ids.csv", rounded_ids(sample, 0.17).to_csv(index=False))
    result = run_pipeline(mlflow_server, tmp_path, f"source={source}", f"model_name={MODEL}-ids")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"clean: .*: \d+ rows kept; dropped 3400 \(unreadable\)", result.stdout)
    assert f"registered model '{MODEL}-ids' version 1: now prod" in result.stdout
    words = report.as_text((outputs_of(result) / "data_report.html").read_text())
    assert "clean dropped 3400 row(s) whose id cannot be read: 3400 value(s) are empty or not whole numbers" in words


def test_unreachable_mlflow_stops_the_run_before_any_step(first_run, client, sample_path, tmp_path):
    before = versions(client)
    result = run_pipeline(f"http://127.0.0.1:{free_port()}", tmp_path, f"source={sample_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "FAILED: pipeline.py run: MLFLOW_TRACKING_URI: the MLflow tracking server at http://127.0.0.1:")
    assert "Executing task" not in result.stdout + result.stderr
    assert versions(client) == before


def test_the_mlflow_ui_shows_the_run_its_steps_metrics_reports_and_prod(first_run, client, mlflow_server, browser):
    """The real MLflow UI in headless Chromium: the pipeline's parent run with a child run per step, the metrics,
    both reports rendered, and the registered model with `prod` on version 1. Screenshots in screenshots/."""
    prod = client.get_model_version_by_alias(MODEL, "prod")
    kfp_run, experiment = prod.tags["kfp_run_id"], client.get_experiment_by_name("e2e").experiment_id
    runs = {r.data.tags["pipeline_step"]: r.info.run_id
            for r in client.search_runs([experiment], f"tags.kfp_run_id = '{kfp_run}'")}
    row = f"[...document.querySelectorAll('[role=row]')].find(r => r.innerText.includes('pipeline {kfp_run}'))"
    browser.open(f"{mlflow_server}/#/experiments/{experiment}/runs")
    browser.wait_for(f"!!{row}")
    browser.evaluate("document.querySelector('button[aria-label=Close]')?.click()")  # the assistant's side panel
    browser.evaluate(f"{row}.querySelector('button').click()")  # unfold the step runs
    steps = ["download", "clean", "check", "split", "train", "select", "evaluate", "register"]
    browser.wait_for(f"{json.dumps(steps)}.every(s => [...document.querySelectorAll('[role=row]')]"
                     ".some(r => r.innerText.split('\\n').includes(s)))")
    browser.screenshot("mlflow_runs", full_page=False)

    browser.open(f"{mlflow_server}/#/experiments/{experiment}/runs/{runs['evaluate']}")
    text = browser.wait_for("document.body.innerText.includes('test_mae') && document.body.innerText")
    assert "test_r2" in text and f"{float(prod.tags['test_mae']):.2f}"[:4] in text

    for step, name in (("check", "data_report"), ("register", "model_card")):
        browser.open(f"{mlflow_server}/#/experiments/{experiment}/runs/{runs[step]}/artifacts/reports/{name}.html")
        # MLflow shows an HTML artifact in a sandboxed frame of its own.
        height = browser.wait_for("(f => f && f.getBoundingClientRect().height)(document.querySelector('iframe'))")
        assert height > 300 and f"reports/{name}.html" in browser.text()
        browser.screenshot(f"mlflow_{name}", full_page=False)

    browser.open(f"{mlflow_server}/#/models/{MODEL}")
    browser.wait_for("document.body.innerText.includes('Version 1')")
    aliases = browser.evaluate("[...document.querySelectorAll('[title=prod]')].map(a => a.closest('[role=row], tr')"
                               "?.innerText || '')")
    assert len(aliases) == 1 and "Version 1" in aliases[0]
    browser.open(f"{mlflow_server}/#/models/{MODEL}/versions/1")
    text = browser.wait_for("document.body.innerText.includes('Promoted to prod') && document.body.innerText")
    assert "Model card: " in text and "reports/model_card.html" in text
    browser.screenshot("mlflow_model_version", full_page=False)
    assert browser.failures() == []
