"""MLflow side of the steps: one parent run per pipeline run, a child run per step, the model registry.

Endpoints come from the environment (MLFLOW_TRACKING_URI, KFP_RUN_ID), never from code, so tests and
every runner point the same code at their own server.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator
from unittest import mock
from urllib.parse import urlsplit

import mlflow
import requests
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.errors import StepError
from components.names import EXPERIMENT, PREVIOUS_ALIAS, PROD_ALIAS, parse_model_uri

RUN_ID_TAG = "kfp_run_id"
STEP_TAG = "pipeline_step"
# On a model version: who last moved `prod` to it ("hand", or "pipeline run <id>") and when (epoch seconds).
PROMOTED_BY_TAG = "promoted_by"
PROMOTED_AT_TAG = "promoted_at"
HAND = "hand"
# The promotion lock of model X is a registered model of this name: MLflow creates one atomically or refuses.
LOCK_SUFFIX = ".promotion-lock"
LOCK_LEASE_SECONDS = 120
# On a download run: the sha256 of the raw data it keeps under raw/<sha256>.csv.gz.
RAW_DATA_TAG = "raw_data_sha256"
# Who runs a local pipeline run: "host:pid" of `pipeline.py run`, so that a later run can close what it left.
OWNER_ENV = "PIPELINE_OWNER"
OWNER_TAG = "pipeline_owner"
# The owner renews this tag (unix seconds) on its RUNNING runs while it lives (heartbeat()); a run whose heartbeat
# is older than the lease had an owner that died, on whatever host: any later run closes it FAILED.
HEARTBEAT_TAG = "heartbeat"
LEASE_ENV, LEASE_SECONDS = "PIPELINE_LEASE_SECONDS", 60.0
# MLflow's own defaults (7 retries, 120 s timeouts) kept a step waiting ~17 minutes for a server that went away:
# with these a call gives up within about 110 s (5 tries of at most 20 s), in about 15 s on a closed port: long
# enough to ride out a restart of MLflow (8-9 s here; with 4 tries, 7 s, every restart failed the running step).
CLIENT_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)


def require_server(step: str) -> str:
    """Fail fast, naming the step, when the tracking server does not answer (MLflow's own retries take minutes)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            raise StepError(
                step, "MLFLOW_TRACKING_URI",
                f"the MLflow tracking server at {uri} is not reachable ({type(exc).__name__}); "
                "start it (make mlflow) or point MLFLOW_TRACKING_URI at a running one",
            ) from exc
    return uri


def _pipeline_parent(client: MlflowClient, experiment_id: str, tags: dict) -> str | None:
    """The parent run of this pipeline run (by KFP_RUN_ID), created by whichever step comes first."""
    pipeline_run = os.environ.get("KFP_RUN_ID")
    if not pipeline_run:
        return None
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{RUN_ID_TAG} = '{pipeline_run}' and tags.{STEP_TAG} = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {pipeline_run}", tags={**tags, STEP_TAG: "pipeline"})
    return run.info.run_id


@contextmanager
def quick_calls(timeout: int = 5) -> Iterator[None]:
    """MLflow calls that give up at once: for bookkeeping after a failure, which must never hang the step."""
    saved = {key: os.environ.get(key) for key in CLIENT_LIMITS}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout))
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def answers(uri: str) -> bool:
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=5).ok
    except requests.RequestException:
        return False


# What this step's process changed in the registry (register, set_prod), for the message of a failure after it.
changed: dict[str, str] = {}


def server_gone(step: str, uri: str, exc: Exception) -> StepError:
    done = "; ".join(changed.values()) or "nothing was registered and prod did not move"
    return StepError(step, "MLFLOW_TRACKING_URI",
                     f"the MLflow server at {uri} stopped answering during this step ({type(exc).__name__}: "
                     f"{str(exc)[:200]}); before it did: {done}. Start it again and re-run")


@contextmanager
def artifact_errors_named(step: str) -> Iterator[None]:
    """Artifact transfers whose server error ends the step at once, saying so.

    MLflow's client retries a 500 as if it were a restart (its list of retried statuses cannot be set): against a
    read-only or full artifact store a step waited a minute and then named only "too many 500 error responses".
    Here MLflow's artifact client retries what can pass (a closed port, 502 to 504 from a proxy, timeouts) and a
    500 comes back with its response, to be named. The server's body says only "Internal Server Error": the cause
    is in its log (in the cluster, behind it, MinIO's)."""
    from mlflow.store.artifact import http_artifact_repo
    from mlflow.utils.request_utils import _TRANSIENT_FAILURE_RESPONSE_CODES

    retried = frozenset(_TRANSIENT_FAILURE_RESPONSE_CODES) - {500}
    plain = http_artifact_repo.http_request
    with mock.patch.object(http_artifact_repo, "http_request", functools.partial(plain, retry_codes=retried)):
        try:
            yield
        except requests.HTTPError as exc:
            if exc.response is None or exc.response.status_code < 500:
                raise
            raise artifact_error(step, exc.response) from exc


def artifact_error(step: str, response: requests.Response) -> StepError:
    url = urlsplit(response.url)
    found = re.search(r"/mlflow-artifacts/artifacts/(?:[^/]+/[^/]+/artifacts/)?(.+)$", url.path)
    what = found.group(1) if found else url.path
    verb = "read" if response.request is not None and response.request.method == "GET" else "store"
    body = (response.text or "").strip()
    said = "" if body in ("", response.reason, "Internal Server Error") else f" ({body[:300]})"
    cause = server_log_cause()
    where = (f"the MLflow server's log says: {cause}" if cause else "the cause (a read-only or full disk, the object "
             "store refusing) is in the MLflow server's log (in the cluster: MinIO's too)")
    return StepError(step, "MLflow artifact store", f"MLflow could not {verb} {what}: HTTP {response.status_code} "
                                                    f"from {url.scheme}://{url.netloc}{said}; {where}")


def server_log_cause(wait: float = 2.0) -> str:
    """The last OS error in the local MLflow server's log (MLFLOW_SERVER_LOG, which `make` sets for the server it
    starts), when the log was written in the last minute; else ''. The server may log it just after answering."""
    deadline = time.monotonic() + wait
    while True:
        try:
            log = Path(os.environ["MLFLOW_SERVER_LOG"])
            size, written = log.stat().st_size, log.stat().st_mtime
            with log.open("rb") as f:
                f.seek(max(0, size - 65536))
                tail = f.read().decode(errors="replace")
        except (KeyError, OSError):
            return ""
        found = re.findall(r"^\w*Error: \[Errno \d+\] .*$", tail, re.M) if time.time() - written < 60 else []
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return found[-1][:300] if found else ""


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: its start in clock ticks since boot), or None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def cost_figures(started: float, entered: float | None) -> dict[str, float]:
    """What a step cost its process: compute inside the step, the start-up (imports) before it, peak memory."""
    import resource

    figures = {"step_seconds": time.perf_counter() - started,
               "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if entered is not None:
        figures["startup_seconds"] = entered
    return figures


@contextmanager
def step_run(step: str, params: dict | None = None, last: bool = False, tags: dict | None = None,
             name: str = "") -> Iterator[mlflow.ActiveRun]:
    """The step's MLflow run, nested under the pipeline run's parent; logs what the step cost (cost_figures).

    In a cluster with KFP's MLflow plugin, KFP creates the parent run and a nested run per task and hands it to the
    step as MLFLOW_RUN_ID: the step logs into that one, and KFP ends both. Otherwise the step makes its own child
    run under one parent per KFP_RUN_ID; a failure marks the parent FAILED and the last step marks it FINISHED.
    A server that stops answering ends the step within about 110 s (CLIENT_LIMITS), with a StepError.
    """
    entered = process_seconds()
    for key, value in CLIENT_LIMITS.items():
        os.environ.setdefault(key, value)
    uri = require_server(step)
    client = MlflowClient()
    tags = {**(tags or {}), STEP_TAG: step, RUN_ID_TAG: os.environ.get("KFP_RUN_ID", "")}
    if os.environ.get(OWNER_ENV):
        tags |= {OWNER_TAG: os.environ[OWNER_ENV], HEARTBEAT_TAG: str(int(time.time()))}
    given = os.environ.get("MLFLOW_RUN_ID")
    try:
        if given:
            parent, owned = client.get_run(given).data.tags.get("mlflow.parentRunId"), False
            run = mlflow.start_run(run_id=given, tags=tags)
        else:
            experiment_id = mlflow.set_experiment(experiment_name()).experiment_id
            parent, owned = _pipeline_parent(client, experiment_id, tags), True
            run = mlflow.start_run(run_name=name or step, parent_run_id=parent, tags=tags)
    except (MlflowException, requests.RequestException) as exc:
        raise (server_gone(step, uri, exc) if not answers(uri) else exc)
    started = time.perf_counter()
    try:
        with artifact_errors_named(step):
            if params:
                mlflow.log_params(params)
            yield run
        mlflow.log_metrics(cost_figures(started, entered))
        mlflow.end_run()
        if last and parent and owned:
            client.set_terminated(parent, "FINISHED")
    except Exception as exc:
        gone = isinstance(exc, (MlflowException, requests.RequestException)) and not answers(uri)
        with quick_calls(), suppress(MlflowException, requests.RequestException):
            if not gone:  # tell the server what failed; with the server gone, only end the run here
                mlflow.set_tag("error", str(exc)[:5000])
                mlflow.log_metrics(cost_figures(started, entered))
                if parent:
                    client.set_tag(parent, "error", f"{step}: {exc}"[:5000])
                    if owned:
                        client.set_terminated(parent, "FAILED")
            mlflow.end_run("FAILED")
        if gone:
            raise server_gone(step, uri, exc) from exc
        raise


def artifact_link(run: mlflow.ActiveRun, path: str) -> str:
    """Where a person opens a run's artifact: its page in the MLflow UI of an http server, else its runs:/ URI."""
    uri = mlflow.get_tracking_uri().rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return f"runs:/{run.info.run_id}/{path}"
    return f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/{path}"


def raw_data_uri(sha256: str) -> str | None:
    """Where the data with this sha256 is kept (a download run's artifact), if any run of this experiment kept it."""
    experiment = mlflow.get_experiment_by_name(experiment_name())
    if experiment is None:
        return None
    for run in MlflowClient().search_runs([experiment.experiment_id], filter_string=f"tags.{RAW_DATA_TAG} = '{sha256}'",
                                          max_results=5):
        return f"runs:/{run.info.run_id}/raw/{sha256}.csv.gz"
    return None


def steps_run(pipeline_run: str) -> set[str]:
    """The steps that ran (not reused from a cache) in a pipeline run: those with an MLflow run of their own."""
    with quick_calls(), suppress(MlflowException, requests.RequestException):
        experiment = mlflow.get_experiment_by_name(experiment_name())
        runs = MlflowClient().search_runs([experiment.experiment_id], max_results=100,
                                          filter_string=f"tags.{RUN_ID_TAG} = '{pipeline_run}'")
        return {r.data.tags.get(STEP_TAG) for r in runs} - {"pipeline"}
    return set()


def report_links(pipeline_run: str) -> dict[str, str]:
    """The MLflow UI page of each report (a step run's `reports/` artifact) of a pipeline run, by file name; quick
    calls only, and nothing raised (an unreachable server: none)."""
    links = {}
    with quick_calls(), suppress(MlflowException, requests.RequestException):
        experiment = mlflow.get_experiment_by_name(experiment_name())
        if experiment is None:
            return links
        client = MlflowClient()
        for run in client.search_runs([experiment.experiment_id], max_results=100,
                                      filter_string=f"tags.{RUN_ID_TAG} = '{pipeline_run}'"):
            for artifact in client.list_artifacts(run.info.run_id, "reports"):
                links[artifact.path.rsplit("/", 1)[-1]] = artifact_link(run, artifact.path)
    return links


def close_runs(pipeline_run: str, status: str) -> int:
    """End the MLflow runs of a pipeline run that are still RUNNING (a step killed, the server gone for a while):
    quick calls only, and nothing raised. Returns how many were closed."""
    with quick_calls(), suppress(MlflowException, requests.RequestException):
        experiment = mlflow.get_experiment_by_name(experiment_name())
        if experiment is None:
            return 0
        client = MlflowClient()
        left = client.search_runs([experiment.experiment_id], max_results=1000,
                                  filter_string=f"tags.{RUN_ID_TAG} = '{pipeline_run}' and attributes.status = 'RUNNING'")
        for run in left:
            client.set_terminated(run.info.run_id, status)
        return len(left)
    return 0


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, LEASE_SECONDS))


@contextmanager
def heartbeat(pipeline_run: str) -> Iterator[None]:
    """While the block runs, a thread renews the heartbeat of this pipeline run's RUNNING runs, six times a lease.

    The owner is the process that runs the whole pipeline (pipeline.py run), not a step: it outlives the steps and
    the gaps between them. Plain REST calls with a timeout and no retries: MLflow's client takes its limits from the
    environment, which the steps started meanwhile inherit."""
    stop = threading.Event()
    uri = mlflow.get_tracking_uri().rstrip("/")
    auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) \
        if os.environ.get("MLFLOW_TRACKING_USERNAME") else None

    def renew() -> None:
        with requests.Session() as session, suppress(requests.RequestException, KeyError, ValueError):
            session.auth = auth
            experiment = session.get(f"{uri}/api/2.0/mlflow/experiments/get-by-name",
                                     params={"experiment_name": experiment_name()}, timeout=5).json()
            found = session.post(f"{uri}/api/2.0/mlflow/runs/search", timeout=5, json={
                "experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 1000,
                "filter": f"tags.{RUN_ID_TAG} = '{pipeline_run}' and attributes.status = 'RUNNING'"}).json()
            for run in found.get("runs", []):
                session.post(f"{uri}/api/2.0/mlflow/runs/set-tag", timeout=5, json={
                    "run_id": run["info"]["run_id"], "key": HEARTBEAT_TAG, "value": str(int(time.time()))})

    def beat() -> None:
        while not stop.wait(lease_seconds() / 6):
            renew()

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def close_abandoned_runs(host: str | None = None) -> list[str]:
    """End FAILED the RUNNING runs whose owner has died, so that none looks alive for ever: on this host, when the
    owner's process has ended; on any host, when its heartbeat is older than the lease (the owner was killed, its
    machine stopped, or MLflow was away when it ended). Each gets the reason as its `error` tag. Returns the
    pipeline run ids closed. Hosts' clocks are assumed to agree within a fraction of the lease."""
    host, closed, lease = host or socket.gethostname(), set(), lease_seconds()
    with quick_calls(), suppress(MlflowException, requests.RequestException):
        experiment = mlflow.get_experiment_by_name(experiment_name())
        if experiment is None:
            return []
        client = MlflowClient()
        for run in client.search_runs([experiment.experiment_id], max_results=1000,
                                      filter_string=f"attributes.status = 'RUNNING' and tags.{OWNER_TAG} LIKE '%:%'"):
            owner = run.data.tags[OWNER_TAG]
            owner_host, _, pid = owner.rpartition(":")
            beat = float(run.data.tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
            if owner_host == host and pid.isdigit():  # here, the process itself says
                if _alive(int(pid)):
                    continue
                why = f"its pipeline process {pid} had ended"
            elif time.time() - beat > lease:
                why = (f"its owner {owner} stopped renewing its heartbeat {time.time() - beat:.0f} s before "
                       f"(lease {lease:.0f} s)")
            else:
                continue
            client.set_tag(run.info.run_id, "error", f"closed by a later run on {host}: {why}")
            client.set_terminated(run.info.run_id, "FAILED")
            closed.add(run.data.tags.get(RUN_ID_TAG, ""))
    return sorted(closed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The error codes of an MLflow answer that says a model, version or alias does not exist.
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def prod_version(name: str, alias: str = PROD_ALIAS) -> ModelVersion | None:
    """The version holding `alias`, or None when the model or the alias does not exist yet."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            return None
        raise


def model_version(uri: str, step: str) -> ModelVersion:
    """The version `uri` names (models:/NAME@ALIAS or models:/NAME/VERSION), resolved now, once."""
    name, alias, number = parse_model_uri(uri)
    if not name:
        raise StepError(step, "model", f"{uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            raise StepError(step, "model", f"{uri}: no such model version on {mlflow.get_tracking_uri()} "
                                           f"({exc.error_code})") from exc
        raise


def version_tagged(name: str, tag: str, value: str) -> ModelVersion | None:
    """The oldest version of `name` whose tag `tag` is `value`, if any."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and tags.{tag} = '{value}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def finished(version: ModelVersion) -> bool:
    """Whether register finished the version: its decision (`comparison`) and its card (the description)."""
    return "comparison" in version.tags and bool(version.description)


def delete_unfinished_version(name: str, version: str) -> None:
    """Delete a version whose register step failed before finishing it (no `comparison` tag or no card), unless prod
    names it; quick calls, nothing raised. When MLflow is away, the next run of the model finishes or deletes it."""
    with quick_calls(), suppress(MlflowException, requests.RequestException):
        client = MlflowClient()
        found = client.get_model_version(name, str(version))
        prod = prod_version(name)
        if not finished(found) and (prod is None or prod.version != str(version)):
            client.delete_model_version(name, str(version))
            changed.pop("registered", None)


def pipeline_started(run_id: str) -> float:
    """When the pipeline run of a step's run started (epoch seconds): its parent's start, else its own."""
    client = MlflowClient()
    run = client.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    return (client.get_run(parent) if parent else run).info.start_time / 1000


@contextmanager
def promotion_lock(name: str, holder: str, step: str, wait: float = 300) -> Iterator[None]:
    """One promotion of model `name` at a time, across processes and machines that share the MLflow server.

    The lock is the registered model `<name>.promotion-lock`: MLflow's registry creates a name once or answers
    RESOURCE_ALREADY_EXISTS, so exactly one creator holds it; releasing deletes it. A holder that died leaves it
    behind; once its lease (LOCK_LEASE_SECONDS) has run out, the next one takes it over.
    """
    client, lock = MlflowClient(), name + LOCK_SUFFIX
    deadline, delay = time.monotonic() + wait, 0.1
    while True:
        try:
            client.create_registered_model(
                lock, tags={"holder": holder, "expires": str(time.time() + LOCK_LEASE_SECONDS)},
                description=f"Held while {holder} moves alias {PROD_ALIAS!r} of {name!r}; deleted when it is done.")
            break
        except MlflowException as exc:
            # RESOURCE_DOES_NOT_EXIST: the server's insert clashed with a lock that was released before it could
            # read it back (sqlalchemy_store), so nothing was created: contention like ALREADY_EXISTS.
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
            if time.time() > float(held.tags.get("expires", 0)):
                log_stale = f"took over the promotion lock of {held.tags.get('holder')!r}, whose lease ran out"
                client.delete_registered_model(lock)
                print(log_stale)
                continue
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue  # released meanwhile: try again at once
        if time.monotonic() > deadline:
            raise StepError(step, PROD_ALIAS, f"another promotion of {name!r} ({held.tags.get('holder')}) has held "
                                              f"the lock for over {wait:.0f} s; try again later")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    try:
        yield
    finally:
        with suppress(MlflowException):
            client.delete_registered_model(lock)


def set_prod(name: str, version: str, by: str) -> None:
    """Move `prod` to `version`, keeping the version it leaves under `previous-prod` for rollback, and record on
    the version who moved it and when. Call it holding promotion_lock."""
    client = MlflowClient()
    current = prod_version(name)
    if current is not None and current.version != str(version):
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, current.version)
    client.set_model_version_tag(name, str(version), PROMOTED_BY_TAG, by)
    client.set_model_version_tag(name, str(version), PROMOTED_AT_TAG, f"{time.time():.3f}")
    client.set_registered_model_alias(name, PROD_ALIAS, str(version))
    changed["prod"] = f"prod of {name!r} moved to version {version}, which beat it (its decision and card are on it)"


def promote(name: str, version: str) -> str:
    """Move `prod` to an existing version by hand; refuse a version that does not exist. A pipeline run that
    started before this will not move `prod` over it."""
    try:
        MlflowClient().get_model_version(name, str(version))
    except MlflowException:
        known = sorted((int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")))
        raise StepError("promote", "VERSION", f"model {name!r} has no version {version!r} (versions: {known})")
    with promotion_lock(name, HAND, "promote"):
        before = prod_version(name)
        set_prod(name, version, by=HAND)
    return f"{name}: prod {before.version if before else None} -> {version}"


def rollback(name: str) -> str:
    """Move `prod` back to the version it replaced (`previous-prod`); the two swap, so rollback undoes itself."""
    previous = prod_version(name, PREVIOUS_ALIAS)
    if previous is None:
        raise StepError("rollback", "previous-prod", f"model {name!r} has no previous prod version to go back to")
    return promote(name, previous.version)
