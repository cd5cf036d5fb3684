"""What every pipeline shares (pipelines/dag.py): a signature made of its parameter groups, the cluster's settings
and caching policy applied to every task, and a registry that is the one place a pipeline is named."""

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import yaml
from kfp.dsl import Dataset

import pipeline
from components import params, sources, steps
from images import catalog
from pipelines import PIPELINES, dag

Outputs = NamedTuple("Outputs", raw=str)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_a_pipelines_parameters_are_the_fields_of_its_groups_each_once(name):
    found = PIPELINES[name]
    local, cluster = found.parameters(cluster=False), found.parameters(cluster=True)
    declared = {field: kind for group in found.groups for field, kind in params.fields(group).items()}
    assert list(local) == list(declared) and {p.annotation for p in local.values()} <= set(params.KINDS.values())
    assert all(local[field].annotation is kind for field, kind in declared.items())
    assert local["source"].default == sources.DEFAULT_SOURCE and cluster["source"].default == sources.CLUSTER_SOURCE
    signature = inspect.signature(found.build(cluster=False).pipeline_func)
    assert list(signature.parameters) == list(local)


def test_a_parameter_declared_by_two_groups_is_refused():
    twice = dag.Pipeline(key="twice", name="twice", description="", groups=(dag.Source, dag.Source),
                         wiring=lambda p, cluster: None, outputs=Outputs, spec="twice.yaml")
    with pytest.raises(ValueError, match="parameter source is declared by two of its groups"):
        twice.parameters()


@dataclass(frozen=True)
class Fetch:
    """A toy pipeline's own parameter."""

    note: str = "hello"


ToyOutputs = NamedTuple("ToyOutputs", raw_data=Dataset)


def fetch_only(p, cluster: bool) -> ToyOutputs:
    return ToyOutputs(raw_data=steps.download(source=p.source, expected_sha256=p.source_sha256).outputs["raw_data"])


def test_a_new_pipeline_is_its_record_in_the_registry_and_nothing_else(monkeypatch, tmp_path):
    """A fourth pipeline, added to the registry only: the command line offers it, compile writes it with the
    cluster's settings on its task, and its download, taking new listings, is never cached."""
    toy = dag.Pipeline(key="toy", name="rental-price-toy", description="Download only.", groups=(dag.Source, Fetch),
                       wiring=fetch_only, outputs=ToyOutputs, spec=str(tmp_path / "toy.yaml"), fresh_data=True)
    monkeypatch.setitem(PIPELINES, "toy", toy)
    assert pipeline.main(["compile", "--pipeline", "toy"]) == 0
    spec, platform = yaml.safe_load_all((tmp_path / "toy.yaml").read_text())
    assert spec["pipelineInfo"]["name"] == "rental-price-toy"
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"source", "source_sha256", "log_hours", "note"}
    assert spec["root"]["dag"]["tasks"]["download"]["cachingOptions"] == {}  # not cached
    executor = spec["deploymentSpec"]["executors"]["exec-download"]["container"]
    assert executor["resources"]["cpuLimit"] == 1.0 and executor["image"] == steps.IMAGES["download"]
    config = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-download"]
    assert config["imagePullPolicy"] == "IfNotPresent" and config["secretAsEnv"][0]["secretName"] == "pipeline-s3"
    assert toy.steps() == ["download"]


def test_steps_that_read_the_registry_are_never_cached_and_the_others_are():
    caching = {name: task.caching_options.enable_cache
               for name, task in PIPELINES["training"].build(cluster=True).pipeline_spec.root.dag.tasks.items()
               if name in dag.RESOURCES}  # the steps, not the sweep's loop
    assert {name for name, cached in caching.items() if not cached} == {"check", "evaluate", "register"}


def test_the_command_line_and_the_pipelines_are_in_no_image():
    """Editing pipeline.py or pipelines/ changes no image's content tag: neither is among what the images are built
    from, nor copied into them."""
    assert not {"pipeline.py", "pipelines"} & set(catalog.INPUTS)
    assert "COPY components /app/components" in (dag.ROOT / "images" / "Dockerfile").read_text()
    assert "!pipelines" not in (dag.ROOT / ".dockerignore").read_text()
