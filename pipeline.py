"""The NYC rental-price pipelines as KFP v2 DAGs (training, batch scoring, monitoring), and their command line.

    python pipeline.py compile [--output pipeline.yaml]
    python pipeline.py run [--param key=value ...] [--no-cache] [--verbose]   # kfp.local, no cluster, no Docker
    python pipeline.py run --runner docker ...                       # kfp.local, each task in its image
    python pipeline.py run --pipeline batch --param source=... [--param model=models:/rental-price/3]
    python pipeline.py run --pipeline monitor --param source=... [--param retrain=true]
    python pipeline.py submit [--host URL] [--wait]                  # upload pipeline.yaml to KFP and start a run
    python pipeline.py schedule [--cron "0 6 * * *"] | unschedule     # monitoring as a KFP recurring run
    python pipeline.py promote --version N | rollback                # move the `prod` alias by hand
    python pipeline.py seed-data --to s3://data/KEY                  # put the shipped sample into S3/MinIO
"""

import argparse
import contextlib
import functools
import hashlib
import inspect
import io
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from typing import NamedTuple

import mlflow
from kfp import compiler, dsl, kubernetes, local

from components import data, kfp_api, rollout, steps, tracking
from components.errors import StepError
from components.progress import ANSI, Progress
from components.model import ModelParams
from images import catalog

ROOT = Path(__file__).resolve().parent
PIPELINE_NAME = kfp_api.TRAINING
MODEL_NAME = "rental-price"  # the registered model, unless model_name says otherwise


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# What the cluster gives each step (names match manifests/): env from the ConfigMap, the run id from the pod's
# label, per-step resources. No task retries: a retry cannot tell bad input from a passing fault, so transient
# failures are retried inside the step (MLflow's client: tracking.CLIENT_LIMITS; downloads: data.fetch) and bad
# input fails once, at once, here as locally.
PIPELINE_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "S3_ENDPOINT_URL")
TRAINING_STEPS = ["download", "clean", "check", "split", "train", "select", "evaluate", "register"]
RESOURCES = {  # step: (cpu request, cpu limit, memory request, memory limit)
    "download": ("250m", "1", "512M", "1G"),
    "clean": ("250m", "1", "512M", "1G"),
    "check": ("250m", "1", "512M", "1G"),
    "split": ("250m", "1", "512M", "1G"),
    "train": ("1", "2", "2G", "4G"),
    "select": ("250m", "1", "512M", "1G"),
    "evaluate": ("500m", "1", "1G", "3G"),
    "register": ("250m", "1", "512M", "1G"),
    "score": ("500m", "1", "1G", "2G"),
    "monitor": ("250m", "1", "512M", "1G"),
    "retrain": ("100m", "500m", "256M", "512M"),
}
# Defaults of the city, the model and the drift limits live with the code that uses them.
CITY, MODEL, DRIFT = data.city(), ModelParams(), data.DriftLimits()
# Sweep trials at once on the cluster (kfp.local runs two at a time whatever this says).
SWEEP_PARALLELISM = 4
# KFP's own bucket on the MinIO of manifests/minio/ (the kfp-launcher ConfigMap holds its endpoint).
CLUSTER_PIPELINE_ROOT = "minio://mlpipeline/v2/artifacts"


def for_cluster(step: str, task: dsl.PipelineTask) -> None:
    kubernetes.use_config_map_as_env(task, "pipeline-env", {name: name for name in PIPELINE_ENV})
    kubernetes.use_field_path_as_env(task, "KFP_RUN_ID", "metadata.labels['pipeline/runid']")
    kubernetes.set_image_pull_policy(task, "IfNotPresent")  # images are loaded into kind, never pulled
    if step == "download":  # credentials for s3:// sources; optional, as most sources need none
        kubernetes.use_secret_as_env(task, "pipeline-s3", {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                                     optional=True)
    cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[step]
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory_request).set_memory_limit(memory_limit)


Outputs = NamedTuple("Outputs", version=int, promoted=bool, test_mae=float, reason=str)


@functools.cache  # building the DAG runs git and hashes the image inputs: once per process is enough
def build(cluster: bool = True):
    """The DAG. `cluster` adds what only Kubernetes uses (for_cluster)."""

    @dsl.pipeline(name=PIPELINE_NAME, description="NYC short-term rental price: data to a registered, promoted model.",
                  pipeline_root=CLUSTER_PIPELINE_ROOT if cluster else None)
    def rental_price_pipeline(
        source: str = data.CLUSTER_SOURCE if cluster else data.DEFAULT_SOURCE,
        source_sha256: str = "",
        model_name: str = MODEL_NAME,
        city: str = CITY.as_param(),
        max_category_psi: float = DRIFT.max_category_psi,
        max_error_ratio: float = DRIFT.max_error_ratio,
        warn_psi: float = DRIFT.warn_psi,
        warn_ks: float = DRIFT.warn_ks,
        warn_error_ratio: float = DRIFT.warn_error_ratio,
        test_size: float = 0.2,
        val_size: float = 0.2,
        seed: int = MODEL.seed,
        learner: str = MODEL.learner,
        sweep: list = [{}],
        n_estimators: int = MODEL.n_estimators,
        max_depth: int = MODEL.max_depth,
        min_samples_split: int = MODEL.min_samples_split,
        min_samples_leaf: int = MODEL.min_samples_leaf,
        max_features: float = MODEL.max_features,
        criterion: str = MODEL.criterion,
        tfidf_max_features: int = MODEL.tfidf_max_features,
        learning_rate: float = MODEL.learning_rate,
        max_iter: int = MODEL.max_iter,
        max_leaf_nodes: int = MODEL.max_leaf_nodes,
        l2_regularization: float = MODEL.l2_regularization,
        ridge_alpha: float = MODEL.ridge_alpha,
        bins: int = MODEL.bins,
        margin: float = 0.1,
    ) -> Outputs:
        download = steps.download(source=source, expected_sha256=source_sha256)
        clean = steps.clean(raw_data=download.outputs["raw_data"], city=city)
        check = steps.check(
            clean_data=clean.outputs["clean_data"], model_name=model_name, city=city,
            max_category_psi=max_category_psi, max_error_ratio=max_error_ratio, warn_psi=warn_psi, warn_ks=warn_ks,
            warn_error_ratio=warn_error_ratio)
        split = steps.split(clean_data=clean.outputs["clean_data"], test_size=test_size, seed=seed).after(check)
        # The sweep: each item of `sweep` changes the parameters above for one trial ({} changes nothing).
        with dsl.ParallelFor(sweep, parallelism=SWEEP_PARALLELISM) as trial:
            train = steps.train(
                trainval_data=split.outputs["trainval_data"], trial=trial, learner=learner,
                n_estimators=n_estimators, max_depth=max_depth, min_samples_split=min_samples_split,
                min_samples_leaf=min_samples_leaf, max_features=max_features, criterion=criterion,
                tfidf_max_features=tfidf_max_features, learning_rate=learning_rate, max_iter=max_iter,
                max_leaf_nodes=max_leaf_nodes, l2_regularization=l2_regularization, ridge_alpha=ridge_alpha,
                bins=bins, val_size=val_size, seed=seed)
        select = steps.select(trials=dsl.Collected(train.outputs["model"]))
        evaluate = steps.evaluate(model=select.outputs["model"], test_data=split.outputs["test_data"],
                                  model_name=model_name)
        register = steps.register(
            model=select.outputs["model"], evaluation=evaluate.outputs["metrics"], test_data=split.outputs["test_data"],
            raw_data=download.outputs["raw_data"], clean_data=clean.outputs["clean_data"],
            comparison=evaluate.outputs["comparison"], importance=evaluate.outputs["importance"], model_name=model_name,
            margin=margin,
            git_commit=git_commit(), images=json.dumps({s: steps.IMAGES[s] for s in TRAINING_STEPS}, sort_keys=True))
        # Steps that read the registry (prod model, its data) must see it as it is now, never from a cache.
        for task in (check, evaluate, register):
            task.set_caching_options(False)
        if cluster:
            tasks = dict(download=download, clean=clean, check=check, split=split, train=train, select=select,
                         evaluate=evaluate, register=register)
            for step, task in tasks.items():
                for_cluster(step, task)
        return Outputs(**{name: register.outputs[name] for name in Outputs._fields})

    return rental_price_pipeline


BATCH_NAME = "rental-price-batch"
BatchOutputs = NamedTuple("BatchOutputs", summary=str)


@functools.cache
def build_batch(cluster: bool = True):
    """Batch scoring: a file of listings priced by a registered version, with the download step of training."""

    @dsl.pipeline(name=BATCH_NAME, description="Price a file of listings with a registered model version.",
                  pipeline_root=CLUSTER_PIPELINE_ROOT if cluster else None)
    def rental_price_batch(
        source: str = data.CLUSTER_SOURCE if cluster else data.DEFAULT_SOURCE,
        source_sha256: str = "",
        model: str = f"models:/{MODEL_NAME}@{tracking.PROD_ALIAS}",
        price_unfamiliar: bool = False,
        max_rejected: float = 0.05,
    ) -> BatchOutputs:
        download = steps.download(source=source, expected_sha256=source_sha256)
        score = steps.score(raw_data=download.outputs["raw_data"], model=model, price_unfamiliar=price_unfamiliar,
                            max_rejected=max_rejected)
        # New listings arrive behind the same source: read it every time. An alias names a new version when it moves.
        for task in (download, score):
            task.set_caching_options(False)
        if cluster:
            for step, task in (("download", download), ("score", score)):
                for_cluster(step, task)
        return BatchOutputs(summary=score.outputs["summary"])

    return rental_price_batch


MONITOR_NAME = kfp_api.MONITOR
MonitorOutputs = NamedTuple("MonitorOutputs", verdict=str, summary=str)


@functools.cache
def build_monitor(cluster: bool = True):
    """Monitoring: new listings against prod's data with the check step's checks, then (on the cluster, when asked)
    the training pipeline started on them if they drifted. Locally, `run` starts training itself."""

    @dsl.pipeline(name=MONITOR_NAME, description="New listings against prod's data: ok, drift or invalid.",
                  pipeline_root=CLUSTER_PIPELINE_ROOT if cluster else None)
    def rental_price_monitor(
        source: str = data.CLUSTER_SOURCE if cluster else data.DEFAULT_SOURCE,
        source_sha256: str = "",
        model_name: str = MODEL_NAME,
        city: str = CITY.as_param(),
        max_category_psi: float = DRIFT.max_category_psi,
        max_error_ratio: float = DRIFT.max_error_ratio,
        warn_psi: float = DRIFT.warn_psi,
        warn_ks: float = DRIFT.warn_ks,
        warn_error_ratio: float = DRIFT.warn_error_ratio,
        retrain: bool = False,
        kfp_host: str = kfp_api.IN_CLUSTER_HOST,
        training_version: str = "",
    ) -> MonitorOutputs:
        download = steps.download(source=source, expected_sha256=source_sha256)
        clean = steps.clean(raw_data=download.outputs["raw_data"], city=city, keep_unpriced=True)
        monitor = steps.monitor(
            clean_data=clean.outputs["clean_data"], model_name=model_name, city=city,
            max_category_psi=max_category_psi, max_error_ratio=max_error_ratio, warn_psi=warn_psi, warn_ks=warn_ks,
            warn_error_ratio=warn_error_ratio)
        # New listings arrive behind the same source, and prod may have moved: every run reads both afresh.
        for task in (download, clean, monitor):
            task.set_caching_options(False)
        if cluster:
            tasks = dict(download=download, clean=clean, monitor=monitor)
            with dsl.If(monitor.outputs["verdict"] == "drift", "drifted"), dsl.If(retrain == True, "retrain"):  # noqa: E712
                tasks["retrain"] = steps.retrain(
                    raw_data=download.outputs["raw_data"], source=source, model_name=model_name, kfp_host=kfp_host,
                    training_version=training_version, drift=monitor.outputs["summary"])
                tasks["retrain"].set_caching_options(False)
            for step, task in tasks.items():
                for_cluster(step, task)
        return MonitorOutputs(verdict=monitor.outputs["verdict"], summary=monitor.outputs["summary"])

    return rental_price_monitor


# Each pipeline: how it is built, its steps and its spec file by default.
PIPELINES = {"training": (build, TRAINING_STEPS, "pipeline.yaml"),
             "batch": (build_batch, ["download", "score"], "pipeline-batch.yaml"),
             "monitor": (build_monitor, ["download", "clean", "monitor"], "pipeline-monitor.yaml")}


# ---------------------------------------------------------------- command line

def pipeline_parameters(pipeline: str = "training") -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(PIPELINES[pipeline][0](cluster=False).pipeline_func).parameters)


def parse_params(pairs: list[str], pipeline: str = "training") -> dict:
    """`key=value` pairs, typed by the pipeline's own signature. `city=NAME` (a shipped profile), `city=PATH.toml`
    or `city={...}` gives the city's whole profile; a profile's field (`max_price=500`) changes it for this run. A
    city other than the default gets its own model, rental-price-CITY, unless model_name says otherwise."""
    params, changes = {}, {}
    known = pipeline_parameters(pipeline) if pairs else {}
    city_fields = [f for f in CITY.as_dict() if f != "name"] if "city" in known else []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if sep and key in city_fields:
            changes[key] = profile_value(key, value)
            continue
        if not sep or key not in known:
            sys.exit(f"pipeline.py: --param {pair!r}: expected key=value with key one of {sorted(known) + city_fields}")
        kind = known[key].annotation
        try:
            params[key] = (sweep_trials(json.loads(value)) if kind is list else boolean(value) if kind is bool
                           else city_param(value) if key == "city" else kind(value))
        except ValueError as exc:
            sys.exit(f"pipeline.py: --param {key}: {value!r} is not a valid {kind.__name__}"
                     + (f" of trials: {exc}" if kind is list else ""))
    try:
        ModelParams(**{k: v for k, v in params.items() if k in ModelParams.__dataclass_fields__})
    except ValueError as exc:
        sys.exit(f"pipeline.py: --param {exc}")
    if "city" in params or changes:
        try:
            city = data.City.from_dict({**params.get("city", CITY.as_dict()), **changes}, "pipeline.py")
        except StepError as exc:
            sys.exit(str(exc))
        params["city"], name = city.as_param(), city.name
        if name != data.DEFAULT_CITY and "model_name" in known and "model_name" not in params:
            params["model_name"] = f"{MODEL_NAME}-{name}"
    return params


def city_param(value: str) -> dict:
    """A city's whole profile from `city=`: a shipped profile's name, a .toml file, or the profile as JSON."""
    if value.lstrip().startswith("{"):
        try:
            found = json.loads(value)
        except ValueError as exc:
            sys.exit(f"pipeline.py: --param city: not a profile in JSON: {exc}")
        if not isinstance(found, dict):
            sys.exit(f"pipeline.py: --param city: expected a JSON object, got {value[:100]!r}")
        return found
    try:
        return data.city_profile(value, "pipeline.py")
    except StepError as exc:
        sys.exit(str(exc))


def profile_value(key: str, value: str):
    """A profile field from the command line: a number, a JSON list, or for a list field its items by commas."""
    try:
        return json.loads(value)
    except ValueError:
        return [v for v in value.split(",") if v] if key in ("area_groups", "date_formats") else value


def boolean(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(value)
    return value.lower() == "true"


def sweep_trials(trials) -> list[dict]:
    """A sweep as the pipeline takes it: a non-empty list of trials, each a dict of parameters to change, checked
    here so that a typo fails before anything runs."""
    if not isinstance(trials, list) or not trials or not all(isinstance(t, dict) for t in trials):
        raise ValueError("expected a non-empty JSON list of objects, e.g. [{}, {\"learning_rate\": 0.05}]")
    for trial in trials:
        ModelParams().with_overrides(trial)
    return trials


def sweep_grid(spec: str) -> list[dict]:
    """`learning_rate=0.05,0.1 max_leaf_nodes=31,63` -> every combination, in order, as a list of trials."""
    axes = []
    for part in spec.split():
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise ValueError(f"{part!r}: expected name=value[,value...]")
        axes.append([(key, number_or_text(value)) for value in values.split(",")])
    return sweep_trials([dict(combo) for combo in itertools.product(*axes)])


def number_or_text(value: str):
    try:
        return json.loads(value) if re.fullmatch(r"[-+\d.eE]+", value) else value
    except ValueError:
        return value


def compile_pipeline(output: str, pipeline: str = "training") -> None:
    compiler.Compiler().compile(PIPELINES[pipeline][0](cluster=True), package_path=output)
    print(f"wrote {output}")


def submit(spec: str, host: str, params: dict, experiment: str, wait: bool, timeout: int, cache: bool = True) -> int:
    """Upload the compiled spec to KFP and start a run; with `wait`, fail unless the run succeeds."""
    import kfp

    if not Path(spec).is_file():
        sys.exit(f"pipeline.py submit: no pipeline spec at {spec}: run `make compile` first")
    try:
        client = kfp.Client(host=host)
        run = client.create_run_from_pipeline_package(spec, arguments=params, experiment_name=experiment,
                                                      enable_caching=cache)
    except Exception as exc:  # kfp raises transport, API and auth errors of several libraries
        sys.exit(f"pipeline.py submit: KFP at {host} refused or did not answer ({type(exc).__name__}: "
                 f"{str(exc)[:300]}); is `make ui` or a port-forward to ml-pipeline-ui running?")
    print(f"started run {run.run_id}: {host.rstrip('/')}/#/runs/details/{run.run_id}")
    if not wait:
        return 0
    state = client.wait_for_run_completion(run.run_id, timeout=timeout).state
    print(f"run {run.run_id} finished: {state}")
    return 0 if state == "SUCCEEDED" else 1


def pin_source(params: dict) -> dict:
    """Training's params with the sha256 of its source when this machine can read it: the cluster reuses a cached
    download only for the same source *and* hash, so new bytes behind the same key are read."""
    source = params.get("source", data.CLUSTER_SOURCE)
    if "source_sha256" in params:
        return params
    if source.startswith("s3://") and not os.environ.get("S3_ENDPOINT_URL"):
        print(f"note: {source} cannot be read from here (no S3_ENDPOINT_URL) to pin its sha256: the cluster reuses a "
              "cached download of the same source; after replacing the file, submit with NO_CACHE=1")
        return params
    try:
        return {**params, "source_sha256": hashlib.sha256(data.fetch(source)).hexdigest()}
    except StepError as exc:
        sys.exit(f"pipeline.py submit: {exc}")


def seed_data(source: str, to: str) -> int:
    """Copy the bytes of `source` as stored (the sample stays gzipped) to an s3:// location."""
    try:
        raw = data.read_source(source)
        data.upload_s3(raw, to)
    except StepError as exc:
        sys.exit(str(exc))
    print(f"copied {source} to {to} ({len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()[:16]}...)")
    return 0


def docker_runner(pipeline_root: str, env: dict[str, str]) -> local.DockerRunner:
    """Every task in its own image, as in the cluster (run_local checked the daemon and the images)."""
    # Containers run as the image's user (uid 10001) or, for a non-root caller, as the caller, so the
    # outputs they write into the mounted pipeline root stay the caller's own.
    Path(pipeline_root).mkdir(parents=True, exist_ok=True)
    user = {}
    if os.getuid() == 0:
        os.chmod(pipeline_root, 0o1777)
    else:
        user = {"user": f"{os.getuid()}:{os.getgid()}"}
    # Host networking: the containers reach the MLflow server on 127.0.0.1 like the local steps do.
    return local.DockerRunner(network_mode="host", environment=env, **user)


def local_source(source: str, pipeline_root: str) -> str:
    """A local data file, copied under the pipeline root (the only host folder the containers see), named by
    its content so that the download step's cache key changes with the data."""
    path = Path(source.removeprefix("file://"))
    if "://" in source.replace("file://", "", 1) or not path.is_file():
        return source
    raw = path.read_bytes()
    inputs = Path(pipeline_root, "inputs", hashlib.sha256(raw).hexdigest()[:16])
    inputs.mkdir(parents=True, exist_ok=True)
    copy = inputs / path.name
    copy.write_bytes(raw)
    for made in (inputs.parent, inputs, copy):  # readable by the containers' user
        made.chmod(0o755 if made.is_dir() else 0o644)
    return str(copy)


def run_local(params: dict, pipeline_root: str, cache: bool, runner: str = "subprocess", verbose: bool = False,
              pipeline: str = "training") -> int:
    """Run a whole DAG with kfp.local: each task a subprocess of this interpreter, or a container of its image."""
    builder, step_names, _ = PIPELINES[pipeline]
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking_uri:
        sys.exit("pipeline.py run: MLFLOW_TRACKING_URI is not set; `make run` starts a local MLflow server and sets it")
    pipeline_root = os.path.abspath(pipeline_root)
    if runner == "docker":
        try:
            catalog.check(sorted(set(catalog.config()["steps"].values())))
        except catalog.ImageError as exc:
            sys.exit(f"pipeline.py run --runner docker: {exc}")
    try:
        tracking.require_server("pipeline.py run")
    except StepError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    kfp_run = f"local-{uuid.uuid4().hex[:12]}"
    # Steps group their MLflow runs by KFP_RUN_ID (in a cluster, KFP's own run id takes its place) and note who
    # runs them, so that a later run can close what a killed one left RUNNING.
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "KFP_RUN_ID": kfp_run, "MLFLOW_EXPERIMENT_NAME": tracking.experiment_name(),
           tracking.OWNER_ENV: f"{socket.gethostname()}:{os.getpid()}",
           # MLflow's usage telemetry would call a public endpoint from every step.
           "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")}
    for closed in tracking.close_abandoned_runs(socket.gethostname()):
        print(f"closed the MLflow runs that pipeline run {closed} left RUNNING when its process ended")
    # The data's content drives the cache: download is cached on the source and its sha256, read here first. A
    # source that cannot be read is left to download, which says why.
    try:  # unless given: monitoring hands training the sha256 of the bytes it judged
        params["source_sha256"] = params.get("source_sha256") or hashlib.sha256(
            data.fetch(params.get("source", data.DEFAULT_SOURCE))).hexdigest()
    except StepError:
        params["source_sha256"] = ""
    # Cached outputs name MLflow runs: one cache per server and experiment; a reset server makes a new experiment.
    experiment = mlflow.set_experiment(env["MLFLOW_EXPERIMENT_NAME"])
    scope = f"{tracking_uri} {experiment.experiment_id} {experiment.creation_time}"
    cache_root = os.path.join(pipeline_root, ".kfp_cache", hashlib.sha256(scope.encode()).hexdigest()[:12])
    if runner == "docker":
        env |= {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k.endswith("S3_ENDPOINT_URL")}
        chosen = docker_runner(pipeline_root, env)
        if "source" in params:
            params["source"] = local_source(params["source"], pipeline_root)
    else:
        os.environ.update(env)  # subprocesses inherit it; the cache key does not include it
        # kfp.local warns when an image name lacks "python"; under SubprocessRunner the image is not used.
        warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
        chosen = local.SubprocessRunner(use_venv=False)
    local.init(runner=chosen, pipeline_root=pipeline_root, enable_caching=cache, cache_root=cache_root,
               raise_on_error=True)
    shown = {**params, **({"source": data.shown_source(params["source"])} if "source" in params else {}),
             **({"city": json.loads(params["city"])} if "city" in params else {})}  # not JSON inside JSON
    print(f"pipeline run {kfp_run} ({runner}): {json.dumps(shown, sort_keys=True)}")
    print("cache: " + ("on: a step is reused when its inputs (the data by its sha256), parameters and code are "
                       "unchanged" if cache else "off (--no-cache)"))
    # One line per step; kfp.local's own output (every task's input, logs, tracebacks) goes to the log file.
    log_path = Path(pipeline_root, f"{kfp_run}.log")
    progress = contextlib.nullcontext() if verbose else Progress(log_path)
    if not verbose:
        print(f"steps (full log: {log_path}):")
    failed = None
    try:
        with progress:
            outputs = builder(cluster=False)(**params).outputs
    except RuntimeError as exc:
        failed = ANSI.sub("", str(exc))  # kfp.local colours task names
    finally:
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a link for each run it ends
            tracking.close_runs(kfp_run, "FAILED")  # whatever a killed step left RUNNING
    if failed is not None:
        why = f"\nFAILED: {failed} (its error is printed above)" if verbose else progress.failure()
        # A monitored file that cannot be read or fails the data's own checks is the third verdict; a fault of
        # MLflow, the registry or the parameters is not the data's.
        print(f"\nverdict: invalid: {why.strip()}" if pipeline == "monitor" and INVALID_DATA.search(why) else why,
              file=sys.stderr)
        return 1
    reused = sorted(set(step_names) - tracking.steps_run(kfp_run))
    if reused:
        print(f"reused from the cache: {', '.join(reused)} (same data sha256 {params['source_sha256'][:12]}, "
              "parameters and code)")
    if pipeline == "batch":
        summary = json.loads(outputs["summary"])
        print(f"\npriced {summary['scored']} of {summary['rows']} listings with {summary['model_name']!r} version "
              f"{summary['model_version']} ({summary['model']}); {summary['rejected']} rejected")
        print(f"predictions: {summary['predictions']} (Parquet), {summary['predictions_csv']} (CSV)")
        print(f"rejected rows, each with why: {summary['rejected_rows']}")
        return 0
    if pipeline == "monitor":
        return monitored(json.loads(outputs["summary"]), params, pipeline_root, cache, runner, verbose)
    print(f"\nregistered model {params.get('model_name', 'rental-price')!r} version {outputs['version']}: "
          f"{'now prod' if outputs['promoted'] else 'prod unchanged'}; test MAE {outputs['test_mae']:.2f}")
    print(f"why: {outputs['reason']}")
    print(f"MLflow UI: {tracking_uri}")
    return 0


# The errors of a monitoring run that mean the data is invalid: download cannot read it as a CSV table, clean
# finds a column missing or unparsable, or the monitor's own data checks fail.
INVALID_DATA = re.compile(r"FAILED(?: at)? (download: download: source: (the file is empty|not a (readable )?CSV|the CSV "
                          r"has a header)|clean: clean: (?!MLFLOW_TRACKING_URI)|monitor: monitor: .*: the new listings "
                          r"are invalid)")


def monitored(summary: dict, params: dict, pipeline_root: str, cache: bool, runner: str, verbose: bool) -> int:
    """What a monitoring run found; on drift with retrain=true, the training pipeline on the same data."""
    print(f"\nnew listings against prod version {summary['prod_version']} of {summary['model_name']!r}: "
          f"{summary['rows']} rows ({summary['priced_rows']} with a price), {summary['checks']} checks")
    if "prod_error_ratio" in summary:
        print(f"prod's MAE on the new priced rows: {summary['prod_mae_now']:.2f}, {summary['prod_error_ratio']:.2f} x "
              f"its {summary['prod_mae_registered']:.2f} at registration")
    elif "prod_error_unknown" in summary:
        print(f"prod's error on the new rows is not measured: {summary['prod_error_unknown']}")
    print(f"drift report: {summary['report']} (MLflow: {summary['report_link']})")
    drifted = "; ".join(f"{name} {figure}" for name, figure in summary["drifted"].items())
    print(f"verdict: {summary['verdict']}" + (f": {drifted}" if drifted else ""))
    if summary["verdict"] != "drift" or not params.get("retrain"):
        return 0
    if not summary["trainable"]:
        print("\nretrain=true, but training's checks would refuse this data, so it was not started: "
              + "; ".join(summary["not_trainable_because"]))
        return 0
    print("\nretrain=true: running the training pipeline on the same data")
    training = {**summary["training_params"], "source": params.get("source", data.DEFAULT_SOURCE),
                "source_sha256": params["source_sha256"]}
    return run_local(training, pipeline_root, cache, runner, verbose)


def schedule(host: str, cron: str, params: dict, monitor_spec: str, training_spec: str) -> int:
    for spec in (monitor_spec, training_spec):
        if not Path(spec).is_file():
            sys.exit(f"pipeline.py schedule: no pipeline spec at {spec}: run `make compile` first")
    try:
        made = kfp_api.schedule(host, monitor_spec, training_spec, cron, params)
    except StepError as exc:
        sys.exit(f"pipeline.py {exc}")
    except Exception as exc:  # KFP's API errors
        sys.exit(f"pipeline.py schedule: KFP at {host} refused ({type(exc).__name__}: {str(exc)[:300]})")
    print(f"scheduled {MONITOR_NAME} at {kfp_api.cron_schedule(cron)!r} (KFP cron: seconds first), one run at a "
          f"time: {host.rstrip('/')}/#/recurringrun/details/{made}")
    return 0


def unschedule(host: str) -> int:
    try:
        removed = kfp_api.unschedule(host)
    except StepError as exc:
        sys.exit(f"pipeline.py {exc}")
    except Exception as exc:
        sys.exit(f"pipeline.py unschedule: KFP at {host} refused ({type(exc).__name__}: {str(exc)[:300]})")
    print(f"removed the recurring run(s) of {MONITOR_NAME}: {', '.join(removed)}" if removed
          else f"nothing to remove: {MONITOR_NAME} is not scheduled")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compile_cmd = commands.add_parser("compile", help="write the KFP pipeline spec")
    compile_cmd.add_argument("--output", default="", help="default: pipeline.yaml, pipeline-batch.yaml for batch, "
                             "pipeline-monitor.yaml for monitor")
    run_cmd = commands.add_parser("run", help="run the pipeline locally with kfp.local")
    run_cmd.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    run_cmd.add_argument("--sweep", default="", metavar="GRID",
                         help="a grid of trials, e.g. 'learning_rate=0.05,0.1 max_leaf_nodes=31,63'")
    run_cmd.add_argument("--pipeline-root", default=str(ROOT / "local_outputs"))
    run_cmd.add_argument("--no-cache", action="store_true", help="re-run every step")
    run_cmd.add_argument("--verbose", action="store_true", help="print kfp.local's whole output, not a line per step")
    run_cmd.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                         help="subprocess: this interpreter (default); docker: every task in its image")
    submit_cmd = commands.add_parser("submit", help="upload the compiled spec to KFP and start a run")
    submit_cmd.add_argument("--spec", default="", help="default: the pipeline's spec file, as compile writes it")
    submit_cmd.add_argument("--host", default=os.environ.get("KFP_HOST", "http://127.0.0.1:8081"))
    submit_cmd.add_argument("--experiment", default=kfp_api.EXPERIMENT)
    submit_cmd.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    submit_cmd.add_argument("--sweep", default="", metavar="GRID", help="a grid of trials (as for run)")
    submit_cmd.add_argument("--wait", action="store_true", help="wait for the run; fail unless it succeeds")
    submit_cmd.add_argument("--timeout", type=int, default=3600)
    submit_cmd.add_argument("--no-cache", action="store_true", help="re-run every step, reusing nothing")
    schedule_cmd = commands.add_parser("schedule", help="run the monitoring pipeline on KFP on a cron schedule")
    schedule_cmd.add_argument("--cron", default="0 6 * * *", help="5 fields, or KFP's 6 with seconds first")
    schedule_cmd.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    schedule_cmd.add_argument("--spec", default=PIPELINES["monitor"][2])
    schedule_cmd.add_argument("--training-spec", default=PIPELINES["training"][2])
    unschedule_cmd = commands.add_parser("unschedule", help="remove the monitoring pipeline's recurring run")
    for command in (schedule_cmd, unschedule_cmd):
        command.add_argument("--host", default=os.environ.get("KFP_HOST", "http://127.0.0.1:8081"))
    seed_cmd = commands.add_parser("seed-data", help="copy a data source (default: the shipped sample) to s3://")
    seed_cmd.add_argument("--source", default=data.DEFAULT_SOURCE)
    seed_cmd.add_argument("--to", default=data.CLUSTER_SOURCE, help="s3://bucket/key (endpoint: S3_ENDPOINT_URL)")
    for name, text in (("promote", "move alias prod to a version"), ("rollback", "move prod back to previous-prod")):
        registry_cmd = commands.add_parser(name, help=text)
        registry_cmd.add_argument("--model-name", default=MODEL_NAME)
        if name == "promote":
            registry_cmd.add_argument("--version", required=True)
        registry_cmd.add_argument("--kube-context", default="", help="then roll the serving Deployment of this "
                                  "kubeconfig context to the new prod (make promote-cluster / rollback-cluster)")
    for command in (compile_cmd, run_cmd, submit_cmd):
        command.add_argument("--pipeline", choices=list(PIPELINES), default="training",
                             help="training (default): data to a registered model; batch: price a file of "
                             "listings; monitor: new listings against prod's data")
    args = parser.parse_args(argv)
    if getattr(args, "sweep", ""):
        if any(pair.startswith("sweep=") for pair in args.param):
            sys.exit("pipeline.py: give the sweep once: --sweep GRID or --param sweep=JSON, not both")
        try:
            args.param.append("sweep=" + json.dumps(sweep_grid(args.sweep)))
        except ValueError as exc:
            sys.exit(f"pipeline.py: --sweep {args.sweep!r}: {exc}")
    if args.command == "compile":
        compile_pipeline(args.output or PIPELINES[args.pipeline][2], args.pipeline)
        return 0
    if args.command == "submit":
        params = parse_params(args.param, args.pipeline)
        if args.pipeline == "training" and not args.no_cache:
            params = pin_source(params)
        return submit(args.spec or PIPELINES[args.pipeline][2], args.host, params, args.experiment, args.wait,
                      args.timeout, cache=not args.no_cache)
    if args.command == "schedule":
        return schedule(args.host, args.cron, parse_params(args.param, "monitor"), args.spec, args.training_spec)
    if args.command == "unschedule":
        return unschedule(args.host)
    if args.command == "seed-data":
        return seed_data(args.source, args.to)
    if args.command in ("promote", "rollback"):
        try:
            tracking.require_server(args.command)
            print(tracking.promote(args.model_name, args.version) if args.command == "promote"
                  else tracking.rollback(args.model_name))
            if args.kube_context:
                print(rollout.roll_serving(tracking.prod_version(args.model_name).version, context=args.kube_context))
        except StepError as exc:
            sys.exit(str(exc))
        return 0
    return run_local(parse_params(args.param, args.pipeline), args.pipeline_root, cache=not args.no_cache,
                     runner=args.runner, verbose=args.verbose, pipeline=args.pipeline)


if __name__ == "__main__":
    sys.exit(main())
