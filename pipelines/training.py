"""Training: listings to a registered model version, promoted to `prod` only on evidence against the current one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple

from kfp import dsl

from components import names, steps
from components.drift import DriftLimits
from components.model import ModelParams
from pipelines.dag import Pipeline, Source, Subject, git_commit, images

# Sweep trials at once on the cluster (kfp.local runs two at a time whatever this says).
SWEEP_PARALLELISM = 4
STEPS = ("download", "clean", "check", "split", "train", "select", "evaluate", "register")


@dataclass(frozen=True)
class Training:
    """The training pipeline's own parameters."""

    test_size: float = 0.2  # the share of the clean rows kept for the test
    val_size: float = 0.2  # the share of the rest every sweep trial is scored on (the same rows for each)
    sweep: list = field(default_factory=lambda: [{}])  # each item changes the model's parameters for one trial
    margin: float = 0.1  # the promotion gate's: how much lower prod's MAE the candidate's must be
    trigger: str = ""  # why the run started when monitoring started it (its verdict and evidence): on the version


Outputs = NamedTuple("Outputs", version=int, promoted=bool, test_mae=float, reason=str)


def wiring(p, cluster: bool) -> Outputs:
    download = steps.download(source=p.source, expected_sha256=p.source_sha256, log_hours=p.log_hours)
    clean = steps.clean(raw_data=download.outputs["raw_data"], city=p.city)
    check = steps.check(clean_data=clean.outputs["clean_data"], model_name=p.model_name, city=p.city,
                        limits=p.group(DriftLimits))
    split = steps.split(clean_data=clean.outputs["clean_data"], test_size=p.test_size, seed=p.seed).after(check)
    with dsl.ParallelFor(p.sweep, parallelism=SWEEP_PARALLELISM) as trial:  # {} changes nothing
        train = steps.train(trainval_data=split.outputs["trainval_data"], trial=trial, params=p.group(ModelParams),
                            val_size=p.val_size)
    select = steps.select(trials=dsl.Collected(train.outputs["model"]))
    evaluate = steps.evaluate(model=select.outputs["model"], test_data=split.outputs["test_data"],
                              model_name=p.model_name)
    register = steps.register(
        model=select.outputs["model"], evaluation=evaluate.outputs["metrics"], test_data=split.outputs["test_data"],
        raw_data=download.outputs["raw_data"], clean_data=clean.outputs["clean_data"],
        comparison=evaluate.outputs["comparison"], importance=evaluate.outputs["importance"],
        model_name=p.model_name, margin=p.margin, git_commit=git_commit(), images=images(STEPS), trigger=p.trigger)
    return Outputs(**{name: register.outputs[name] for name in Outputs._fields})


def finish(outputs: dict, run_params: dict) -> None:
    print(f"\nregistered model {run_params.get('model_name', names.MODEL_NAME)!r} version {outputs['version']}: "
          f"{'now prod' if outputs['promoted'] else 'prod unchanged'}; test MAE {outputs['test_mae']:.2f}")
    print(f"why: {outputs['reason']}")
    print(f"MLflow UI: {os.environ.get('MLFLOW_TRACKING_URI', '')}")


PIPELINE = Pipeline(
    key="training", name=names.TRAINING_PIPELINE, spec="pipeline.yaml",
    description="NYC short-term rental price: data to a registered, promoted model.",
    groups=(Source, Subject, DriftLimits, Training, ModelParams), wiring=wiring, outputs=Outputs, finish=finish)
