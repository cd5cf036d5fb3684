"""Running a pipeline on this machine with kfp.local: each step a subprocess of this interpreter, or a container of
its image (--runner docker), against the MLflow server at MLFLOW_TRACKING_URI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import sys
import uuid
import warnings
from pathlib import Path
from unittest import mock

import mlflow
from kfp import local
from kfp.local import executor_input_utils

from components import inference_log, sources, tracking
from components.errors import StepError
from images import catalog
from pipelines import PIPELINES, warm
from pipelines.progress import ANSI, Progress

# What a person opens after a run, by the step output that holds it (kfp.local's files have no extension): its name
# in the run's folder, and what it is.
OPENABLE = {"data_report": ("data_report.html", "data report"), "model_card": ("model_card.html", "model card"),
            "drift_report": ("drift_report.html", "drift report"),
            "predictions": ("predictions.parquet", "predictions"), "predictions_csv": ("predictions.csv", "predictions"),
            "rejected_rows": ("rejected_rows.csv", "rejected rows")}


def run(pipeline: str, params: dict, pipeline_root: str, cache: bool, runner: str = "subprocess",
        verbose: bool = False) -> int:
    """Run the pipeline, then whatever its finish names next (monitoring's retrain); the exit status."""
    while True:
        found = run_once(PIPELINES[pipeline], params, pipeline_root, cache, runner, verbose)
        if not isinstance(found, tuple):
            return found
        pipeline, params = found


def close_abandoned() -> None:
    """Close the runs whose owner died (tracking.close_abandoned_runs), saying so."""
    with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a link for each run it ends
        closed = tracking.close_abandoned_runs(socket.gethostname())
    for pipeline_run in closed:
        print(f"closed the MLflow runs that pipeline run {pipeline_run} left RUNNING when its owner died")


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
    close_abandoned()
    params = {**params, "source_sha256": source_sha256(params)}
    # Cached outputs name MLflow runs: one cache per server and experiment; a reset server makes a new experiment.
    logging.getLogger("mlflow.tracking.fluent").setLevel(logging.WARNING)  # not "Creating a new experiment"
    experiment = mlflow.set_experiment(env["MLFLOW_EXPERIMENT_NAME"])
    scope = f"{tracking_uri} {experiment.experiment_id} {experiment.creation_time}"
    cache_root = os.path.join(pipeline_root, ".kfp_cache", hashlib.sha256(scope.encode()).hexdigest()[:12])
    if runner == "docker":
        env |= {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k.endswith("S3_ENDPOINT_URL")}
        chosen = docker_runner(pipeline_root, kfp_run, env)
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
    # The run's folder is named by its run id (kfp.local would name it by the time).
    run_dir = Path(pipeline_root, kfp_run)
    log_path = run_dir / "run.log"
    progress = contextlib.nullcontext() if verbose else Progress(log_path)
    if not verbose:
        print(f"steps (full log: {log_path}):")
    failed = None
    try:
        with progress, tracking.heartbeat(kfp_run), mock.patch.object(
                executor_input_utils, "get_local_pipeline_resource_name", lambda pipeline_name: kfp_run):
            outputs = pipeline.build(cluster=False)(**params).outputs
    except RuntimeError as exc:
        failed = ANSI.sub("", str(exc))  # kfp.local colours task names
    finally:
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a link for each run it ends
            tracking.close_runs(kfp_run, "FAILED")  # whatever a killed step left RUNNING
        close_abandoned()  # and what others left meanwhile, so that a run leaves none RUNNING
    if failed is not None:
        show_outputs(run_dir, tracking.report_links(kfp_run))  # a failed check's report says why
        if verbose:
            print(f"\nFAILED: {failed} (its error is printed above)", file=sys.stderr)
            return 1
        last, status = pipeline.failed(*progress.failure())
        print(last, file=sys.stderr)
        return status
    reused = [step for step in dict.fromkeys(pipeline.steps()) if step not in tracking.steps_run(kfp_run)]
    if reused:
        print(f"reused from the cache: {', '.join(sorted(reused))} (same data sha256 {params['source_sha256'][:12]}, "
              "parameters and code)")
    show_outputs(run_dir, tracking.report_links(kfp_run))
    return pipeline.finish(outputs, params) or 0


def show_outputs(run_dir: Path, links: dict[str, str]) -> None:
    """Print where the run's reports and result files are, under names that open (in the run's folder, which
    `latest` beside it points at) and, for a report, its page in the MLflow UI."""
    found = named_outputs(run_dir)
    if not found:
        return
    print(f"\noutputs (in {run_dir}/, also {run_dir.parent / 'latest'}/):")
    for path, what in found:
        print(f"  {what:<13} {path}" + (f"\n  {'':<13} {links[path.name]}" if path.name in links else ""))


def named_outputs(run_dir: Path) -> list[tuple[Path, str]]:
    """Each openable output of the run (a report, predictions) linked into the run's folder under a name with its
    extension, and `latest` pointed at the run's folder: [(the file, what it is)]."""
    made = []
    for output, (name, what) in OPENABLE.items():
        for found in sorted(run_dir.glob(f"*/{output}"))[-1:]:  # the step's own file, also when the step failed
            target = run_dir / name
            target.unlink(missing_ok=True)
            try:
                os.link(found, target)  # the same bytes, no copy
            except OSError:
                shutil.copyfile(found, target)
            made.append((target, what))
    if run_dir.is_dir():
        latest, link = run_dir.parent / "latest", run_dir.parent / f".latest-{run_dir.name}"
        link.unlink(missing_ok=True)
        link.symlink_to(run_dir.name)
        with contextlib.suppress(OSError):  # `latest` made by hand as a folder stays as it is
            os.replace(link, latest)
        link.unlink(missing_ok=True)
    return made


def source_sha256(params: dict) -> str:
    """The data's content drives the cache: download is cached on the source and its sha256, read here first (unless
    given: monitoring hands training the sha256 of the bytes it judged). A source that cannot be read is left to
    download, which says why."""
    source = params.get("source", sources.DEFAULT_SOURCE)
    if inference_log.is_log(source):
        return ""  # a log grows while the run reads it; its steps are never cached (fresh_data)
    try:
        return params.get("source_sha256") or hashlib.sha256(sources.fetch(source)).hexdigest()
    except StepError:
        return ""


def docker_runner(pipeline_root: str, kfp_run: str, env: dict[str, str]) -> local.DockerRunner:
    """Every task in its own image, as in the cluster (run_once checked the daemon and the images)."""
    # Containers run as the image's user (uid 10001) or, for a non-root caller, as the caller, so the
    # outputs they write into the mounted pipeline root stay the caller's own.
    # The run's folder is made here (named by its run id), so the containers' user must be able to write in it too.
    folders = (Path(pipeline_root), Path(pipeline_root, kfp_run))
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    user = {}
    if os.getuid() == 0:
        for folder in folders:
            os.chmod(folder, 0o1777)
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
