"""Running a pipeline on this machine with kfp.local: each step a subprocess of this interpreter, or a container of
its image (--runner docker), against the MLflow server at MLFLOW_TRACKING_URI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import sys
import uuid
import warnings
from pathlib import Path

import mlflow
from kfp import local

from components import sources, tracking
from components.errors import StepError
from images import catalog
from pipelines import PIPELINES, warm
from pipelines.progress import ANSI, Progress


def run(pipeline: str, params: dict, pipeline_root: str, cache: bool, runner: str = "subprocess",
        verbose: bool = False) -> int:
    """Run the pipeline, then whatever its finish names next (monitoring's retrain); the exit status."""
    while True:
        found = run_once(PIPELINES[pipeline], params, pipeline_root, cache, runner, verbose)
        if not isinstance(found, tuple):
            return found
        pipeline, params = found


def run_once(pipeline, params: dict, pipeline_root: str, cache: bool, runner: str, verbose: bool):
    """One run of a whole DAG: its exit status, or the next pipeline to run and its parameters."""
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
    if runner == "subprocess":
        warm.start()  # its imports go on while this process reads the data and builds the DAG
    kfp_run = f"local-{uuid.uuid4().hex[:12]}"
    # Steps group their MLflow runs by KFP_RUN_ID (in a cluster, KFP's own run id takes its place) and note who
    # runs them, so that a later run can close what a killed one left RUNNING.
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "KFP_RUN_ID": kfp_run, "MLFLOW_EXPERIMENT_NAME": tracking.experiment_name(),
           tracking.OWNER_ENV: f"{socket.gethostname()}:{os.getpid()}",
           # MLflow's usage telemetry would call a public endpoint from every step.
           "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")}
    for closed in tracking.close_abandoned_runs(socket.gethostname()):
        print(f"closed the MLflow runs that pipeline run {closed} left RUNNING when its process ended")
    params = {**params, "source_sha256": source_sha256(params)}
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
    shown = {**params, **({"source": sources.shown_source(params["source"])} if "source" in params else {}),
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
            outputs = pipeline.build(cluster=False)(**params).outputs
    except RuntimeError as exc:
        failed = ANSI.sub("", str(exc))  # kfp.local colours task names
    finally:
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a link for each run it ends
            tracking.close_runs(kfp_run, "FAILED")  # whatever a killed step left RUNNING
    if failed is not None:
        why, invalid_data = ((f"\nFAILED: {failed} (its error is printed above)", False) if verbose
                             else progress.failure())
        print(pipeline.failed(why.strip(), invalid_data) if not verbose else why, file=sys.stderr)
        return 1
    reused = [step for step in dict.fromkeys(pipeline.steps()) if step not in tracking.steps_run(kfp_run)]
    if reused:
        print(f"reused from the cache: {', '.join(sorted(reused))} (same data sha256 {params['source_sha256'][:12]}, "
              "parameters and code)")
    return pipeline.finish(outputs, params) or 0


def source_sha256(params: dict) -> str:
    """The data's content drives the cache: download is cached on the source and its sha256, read here first (unless
    given: monitoring hands training the sha256 of the bytes it judged). A source that cannot be read is left to
    download, which says why."""
    try:
        return params.get("source_sha256") or hashlib.sha256(
            sources.fetch(params.get("source", sources.DEFAULT_SOURCE))).hexdigest()
    except StepError:
        return ""


def docker_runner(pipeline_root: str, env: dict[str, str]) -> local.DockerRunner:
    """Every task in its own image, as in the cluster (run_once checked the daemon and the images)."""
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
