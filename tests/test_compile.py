"""The compiled specs: training's eight steps (train inside the sweep's loop), batch scoring's two, monitoring's
three and its retrain step, their dependencies and images, and a golden file of each that shows any DAG change.

After an intended change to the DAG: UPDATE_GOLDEN=1 pytest tests/test_compile.py
"""

import os
import re
from pathlib import Path

import pytest
import yaml

from pipelines import PIPELINES, training
from pipelines.cluster import compile_pipeline
from images import catalog

GOLDENS = Path(__file__).parent / "golden"  # each pipeline's spec, under the name compile gives it
GOLDEN = GOLDENS / PIPELINES["training"].spec
DEPENDENCIES = {
    "download": set(),
    "clean": {"download"},
    "check": {"clean"},
    "split": {"clean", "check"},
    "for-loop-1": {"split"},  # the sweep: one train task per trial
    "select": {"for-loop-1"},
    "evaluate": {"select", "split"},
    "register": {"select", "evaluate", "split", "download", "clean"},
}


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, str]:
    """Each pipeline's compiled spec, by pipeline name."""
    home = tmp_path_factory.mktemp("spec")
    for name, found in PIPELINES.items():
        compile_pipeline(str(home / found.spec), name)
    return {name: (home / found.spec).read_text() for name, found in PIPELINES.items()}


@pytest.fixture(scope="module")
def spec(texts) -> dict:
    """The pipeline spec, with the platform (Kubernetes) spec that follows it in a second YAML document."""
    pipeline_spec, platform_spec = yaml.safe_load_all(texts["training"])
    return {**pipeline_spec, **platform_spec}


def step_tasks(spec) -> dict:
    """Every task that runs a step, the one inside the sweep's loop included."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    loop = tasks.pop("for-loop-1")
    return tasks | spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]


def test_the_steps_with_their_dependencies(spec):
    tasks = spec["root"]["dag"]["tasks"]
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()} == DEPENDENCIES
    assert set(step_tasks(spec)) == set(training.STEPS) == set(catalog.step_images()) - {"score", "monitor",
                                                                                                   "retrain"}


def test_the_sweep_is_a_parallel_for_over_the_sweep_parameter_gathered_by_select(spec):
    loop = spec["root"]["dag"]["tasks"]["for-loop-1"]
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--sweep"}
    assert loop["iteratorPolicy"] == {"parallelismLimit": training.SWEEP_PARALLELISM}
    assert spec["root"]["inputDefinitions"]["parameters"]["sweep"]["defaultValue"] == [{}]
    trials = spec["root"]["dag"]["tasks"]["select"]["inputs"]["artifacts"]["trials"]
    assert trials == {"taskOutputArtifact": {"outputArtifactKey": "pipelinechannel--train-model",
                                             "producerTask": "for-loop-1"}}
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert inner["trial"] == {"componentInputParameter": "pipelinechannel--sweep-loop-item"}


def test_each_task_runs_in_its_image(spec):
    images = catalog.step_images()
    tasks = step_tasks(spec)
    executors = spec["deploymentSpec"]["executors"]
    for name, task in tasks.items():
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = executors[executor]["container"]
        assert container["image"] == images[name]
        assert re.fullmatch(r"rental-price-(data|train):\d+\.\d+\.\d+-[0-9a-f]{12}", container["image"])
        # kfp comes from the image, never from a pip install at run time.
        assert "pip install" not in " ".join(container["command"])


def test_registry_reading_steps_are_never_cached(spec):
    tasks = step_tasks(spec)
    uncached = {name for name, task in tasks.items() if not task.get("cachingOptions", {}).get("enableCache")}
    assert uncached == {"check", "evaluate", "register"}


def test_cluster_config_of_each_step(spec):
    """Env from the pipeline-env ConfigMap, run id from the pod label, IfNotPresent, resources, retries."""
    executors = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = spec["deploymentSpec"]["executors"]
    tasks = step_tasks(spec)
    assert spec["defaultPipelineRoot"] == "minio://mlpipeline/v2/artifacts"
    for step, task in tasks.items():
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        config = executors[executor]
        env = {e["envVar"] for e in config["configMapAsEnv"][0]["keyToEnv"]}
        assert config["configMapAsEnv"][0]["configMapName"] == "pipeline-env"
        assert env == {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "S3_ENDPOINT_URL"}
        assert config["fieldPathAsEnv"] == [{"fieldPath": "metadata.labels['pipeline/runid']", "name": "KFP_RUN_ID"}]
        assert config["imagePullPolicy"] == "IfNotPresent"
        assert ("secretAsEnv" in config) == (step == "download")
        resources = containers[executor]["container"]["resources"]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(resources)
        assert "retryPolicy" not in task


def test_no_task_is_retried_anywhere():
    """A task retry would run a bad input again; transient faults are retried inside the steps instead."""
    for cluster in (True, False):
        dag = PIPELINES["training"].build(cluster=cluster).pipeline_spec.root.dag.tasks
        assert all(not task.HasField("retry_policy") for task in dag.values())


def normalized(text: str) -> str:
    text = re.sub(r"(rental-price-\w+):[\w.-]+", r"\1:TAG", text)
    return re.sub(r"\b([0-9a-f]{40}(-dirty)?|unknown)\b", "GIT_COMMIT", text)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_spec_matches_the_golden_file(texts, name):
    golden = GOLDENS / PIPELINES[name].spec
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(normalized(texts[name]))
    assert normalized(texts[name]) == golden.read_text(), "DAG changed: review, then UPDATE_GOLDEN=1 to accept"


def test_batch_scoring_is_training_download_then_score_in_the_model_image(texts):
    spec, platform = yaml.safe_load_all(texts["batch"])
    tasks = spec["root"]["dag"]["tasks"]
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()} == {
        "download": set(), "score": {"download"}}
    images = catalog.step_images()
    executors = spec["deploymentSpec"]["executors"]
    for name, task in tasks.items():
        container = executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]]["container"]
        assert container["image"] == images[name]
    assert images["score"] == images["train"]
    # The same download component as training's; it reads the source and score resolves the model every run.
    training = next(yaml.safe_load_all(GOLDEN.read_text()))
    assert spec["components"]["comp-download"] == training["components"]["comp-download"]
    assert not any(tasks[step].get("cachingOptions", {}).get("enableCache") for step in ("download", "score"))
    assert spec["root"]["inputDefinitions"]["parameters"]["model"]["defaultValue"] == "models:/rental-price@prod"
    assert set(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == {"exec-download", "exec-score"}


def test_monitoring_is_training_download_clean_then_monitor_and_retrain_only_when_asked(texts):
    spec, platform = yaml.safe_load_all(texts["monitor"])
    tasks = spec["root"]["dag"]["tasks"]
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()} == {
        "download": set(), "clean": {"download"}, "monitor": {"clean"}, "condition-1": {"monitor", "download"}}
    training = next(yaml.safe_load_all(GOLDEN.read_text()))
    assert spec["components"]["comp-download"] == training["components"]["comp-download"]
    # The same clean component, told to keep listings that have no price yet.
    assert spec["components"]["comp-clean"] == training["components"]["comp-clean"]
    assert tasks["clean"]["inputs"]["parameters"]["keep_unpriced"] == {"runtimeValue": {"constant": True}}
    # New listings arrive behind the same source: no run reuses an earlier run's download.
    assert not any(tasks[step].get("cachingOptions", {}).get("enableCache") for step in ("download", "clean", "monitor"))
    # retrain runs when the run asked for it (default: report only); the step decides on the monitor's verdict.
    asked = tasks["condition-1"]
    assert asked["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--retrain'] == true"
    retrain = spec["components"][asked["componentRef"]["name"]]["dag"]["tasks"]["retrain"]
    assert not retrain.get("cachingOptions", {}).get("enableCache")
    assert retrain["inputs"]["parameters"]["drift"] == {"componentInputParameter": "pipelinechannel--monitor-summary"}
    assert spec["root"]["inputDefinitions"]["parameters"]["retrain_on_shift"]["defaultValue"] is False
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["retrain"]["defaultValue"] is False
    images = catalog.step_images()
    executors = spec["deploymentSpec"]["executors"]
    for step in ("download", "clean", "monitor", "retrain"):
        assert executors[f"exec-{step}"]["container"]["image"] == images[step]
    assert set(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == {
        "exec-download", "exec-clean", "exec-monitor", "exec-retrain"}


def test_monitoring_takes_the_check_steps_parameters_with_the_same_defaults():
    monitor, training = PIPELINES["monitor"].parameters(False), PIPELINES["training"].parameters(False)
    shared = set(monitor) & set(training)
    assert shared >= {"city", "max_error_ratio", "warn_ks", "model_name"}
    assert all(monitor[name].default == training[name].default for name in shared)
