"""What every pipeline shares: its parameters, derived from the groups that declare them; the settings each task
gets on the cluster; which steps are never cached; and the record of a pipeline that the registry holds."""

from __future__ import annotations

import functools
import inspect
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kfp import dsl, kubernetes
from kfp.dsl import pipeline_context

from components import cities, names, params, sources, steps

ROOT = Path(__file__).resolve().parent.parent
# KFP's own bucket on the MinIO of manifests/minio/ (the kfp-launcher ConfigMap holds its endpoint).
CLUSTER_PIPELINE_ROOT = "minio://mlpipeline/v2/artifacts"
# Parameter defaults that differ on the cluster: the default data enters through MinIO (`make deploy` puts it there).
CLUSTER_DEFAULTS = {"source": sources.CLUSTER_SOURCE}
# What the cluster gives each step (names match manifests/): env from the ConfigMap, the run id from the pod's
# label, per-step resources. No task retries: a retry cannot tell bad input from a passing fault, so transient
# failures are retried inside the step (MLflow's client: tracking.CLIENT_LIMITS; downloads: sources.fetch) and bad
# input fails once, at once, here as locally.
PIPELINE_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "S3_ENDPOINT_URL")
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
# Steps that read the registry (prod, its data) must see it as it is now, never from a cache.
READS_REGISTRY = {"check", "evaluate", "register", "score", "monitor", "retrain"}
# Steps that read the source: never cached in a pipeline that takes new listings behind the same source.
READS_SOURCE = {"download", "clean"}


# ---------------------------------------------------------------- parameter groups every pipeline may take

@dataclass(frozen=True)
class Source:
    """Where the listings come from, and the sha256 they must have (empty: any; `run` and `submit` pin it). A source
    that is a folder (a local directory, an s3:// prefix ending in /) is a model server's inference log, read for
    its last `log_hours` (0: all)."""

    source: str = sources.DEFAULT_SOURCE
    source_sha256: str = ""
    log_hours: float = 24.0


@dataclass(frozen=True)
class Subject:
    """The registered model a run is about, and the city whose listings these are (its whole profile, as JSON)."""

    model_name: str = names.MODEL_NAME
    city: str = cities.city().as_param()


class Params:
    """A pipeline's parameters as its wiring sees them (KFP pipeline channels), by name."""

    def __init__(self, values: dict):
        self.__dict__.update(values)

    def group(self, group) -> dict:
        """A whole group as one step input (components/params.py)."""
        return {name: getattr(self, name) for name in params.fields(group)}


# ---------------------------------------------------------------- a pipeline

@dataclass(frozen=True)
class Pipeline:
    """One pipeline: its wiring and what the runner needs to know of it. `wiring(p, cluster)` adds the steps with
    the parameters `p` and returns the outputs; `cluster` says whether the DAG is compiled for Kubernetes."""

    key: str  # its name on the command line
    name: str  # its name in KFP
    description: str
    groups: tuple  # parameter groups (dataclasses), in the order the dashboard lists them
    wiring: Callable
    outputs: type  # a NamedTuple
    spec: str  # the file `compile` writes
    fresh_data: bool = False  # new listings arrive behind the same source: download and clean run every time
    # After a local run: print what it did; return the next pipeline to run and its parameters, if any.
    finish: Callable[[dict, dict], tuple[str, dict] | None] = lambda outputs, run_params: None
    # The last line of a failed local run and its exit status, from the step's own error (`why`) and whether the
    # data was at fault.
    failed: Callable[[str, bool], tuple[str, int]] = lambda why, invalid_data: (why, 1)

    def parameters(self, cluster: bool = True) -> dict[str, inspect.Parameter]:
        """The pipeline's signature: every field of its groups, with its default (the cluster's where it differs)."""
        found = {}
        for group in self.groups:
            defaults = group()
            for name, kind in params.fields(group).items():
                if name in found:
                    raise ValueError(f"pipeline {self.key}: parameter {name} is declared by two of its groups")
                default = getattr(defaults, name)
                if cluster:
                    default = CLUSTER_DEFAULTS.get(name, default)
                found[name] = inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                                annotation=kind)
        return found

    def build(self, cluster: bool = True):
        """The KFP pipeline (a GraphComponent), built once per process for each target."""
        return _build(self, cluster)[0]

    def steps(self, cluster: bool = False) -> list[str]:
        """The pipeline's steps, in the order its wiring adds them."""
        return _build(self, cluster)[1]


@functools.cache  # building runs git and hashes the images' inputs: once per process is enough
def _build(pipeline: Pipeline, cluster: bool):
    """The pipeline's GraphComponent and its steps: the wiring, then what every task of every pipeline gets."""
    signature = inspect.Signature(list(pipeline.parameters(cluster).values()), return_annotation=pipeline.outputs)
    steps_added = []

    def dag(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        outputs = pipeline.wiring(Params(bound.arguments), cluster)
        tasks = list(pipeline_context.Pipeline.get_default_pipeline().tasks.values())
        for task in tasks:
            step = task.component_spec.name
            if step in READS_REGISTRY or (pipeline.fresh_data and step in READS_SOURCE):
                task.set_caching_options(False)
            if cluster:
                for_cluster(step, task)
        steps_added.extend(task.component_spec.name for task in tasks)
        return outputs

    dag.__signature__ = signature
    dag.__name__ = pipeline.name.replace("-", "_")
    built = dsl.pipeline(name=pipeline.name, description=pipeline.description,
                         pipeline_root=CLUSTER_PIPELINE_ROOT if cluster else None)(dag)  # runs dag once
    return built, steps_added


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


def images(step_names) -> str:
    """The image of each step, as the version records them."""
    return json.dumps({step: steps.IMAGES[step] for step in step_names}, sort_keys=True)


@functools.cache
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
