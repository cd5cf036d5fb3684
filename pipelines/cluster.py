"""The cluster side of the command line: compile a pipeline's spec, submit it to KFP, schedule monitoring, and
put data into MinIO. KFP's client does the talking (components/kfp_api.py for what the retrain step shares)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from kfp import compiler

from components import inference_log, kfp_api, names, sources
from components.errors import StepError
from pipelines import PIPELINES


def compile_pipeline(output: str, pipeline: str = "training") -> None:
    compiler.Compiler().compile(PIPELINES[pipeline].build(cluster=True), package_path=output)
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
    """A run's params with the sha256 of its source when this machine can read it: the cluster reuses a cached
    download only for the same source *and* hash, so new bytes behind the same key are read."""
    source = params.get("source", sources.CLUSTER_SOURCE)
    if "source_sha256" in params or inference_log.is_log(source):  # a log grows: nothing to pin
        return params
    if source.startswith("s3://") and not os.environ.get("S3_ENDPOINT_URL"):
        print(f"note: {source} cannot be read from here (no S3_ENDPOINT_URL) to pin its sha256: the cluster reuses a "
              "cached download of the same source; after replacing the file, submit with NO_CACHE=1")
        return params
    try:
        return {**params, "source_sha256": hashlib.sha256(sources.fetch(source)).hexdigest()}
    except StepError as exc:
        sys.exit(f"pipeline.py submit: {exc}")


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
    print(f"scheduled {names.MONITOR_PIPELINE} at {kfp_api.cron_schedule(cron)!r} (KFP cron: seconds first), one run "
          f"at a time: {host.rstrip('/')}/#/recurringrun/details/{made}")
    return 0


def unschedule(host: str) -> int:
    try:
        removed = kfp_api.unschedule(host)
    except StepError as exc:
        sys.exit(f"pipeline.py {exc}")
    except Exception as exc:
        sys.exit(f"pipeline.py unschedule: KFP at {host} refused ({type(exc).__name__}: {str(exc)[:300]})")
    print(f"removed the recurring run(s) of {names.MONITOR_PIPELINE}: {', '.join(removed)}" if removed
          else f"nothing to remove: {names.MONITOR_PIPELINE} is not scheduled")
    return 0


def seed_data(source: str, to: str) -> int:
    """Copy the bytes of `source` as stored (the sample stays gzipped) to an s3:// location."""
    try:
        raw = sources.read_source(source)
        sources.upload_s3(raw, to, "seed-data", "--to")
    except StepError as exc:
        sys.exit(str(exc))
    print(f"copied {source} to {to} ({len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()[:16]}...)")
    return 0
