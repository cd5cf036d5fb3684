"""Monitoring: new listings against prod's data with the check step's checks: ok, shifted, degraded, suspect or
invalid (components/monitoring.py); when asked, the training pipeline on the same listings if the verdict calls for
it (on the cluster a retrain step starts it; locally the runner)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

from kfp import dsl

from components import kfp_api, monitoring, names, sources, steps
from components.drift import DriftLimits
from pipelines.dag import Pipeline, Source, Subject


@dataclass(frozen=True)
class Retrain:
    """Whether a degraded verdict (and a shifted one, with retrain_on_shift) starts training on the new listings,
    and where (the cluster's KFP API and pipeline version)."""

    retrain: bool = False
    retrain_on_shift: bool = False
    kfp_host: str = kfp_api.IN_CLUSTER_HOST
    training_version: str = ""  # empty: the newest version `make schedule` uploaded


Outputs = NamedTuple("Outputs", verdict=str, summary=str)


def wiring(p, cluster: bool) -> Outputs:
    download = steps.download(source=p.source, expected_sha256=p.source_sha256, log_hours=p.log_hours)
    clean = steps.clean(raw_data=download.outputs["raw_data"], city=p.city, keep_unpriced=True)
    monitor = steps.monitor(clean_data=clean.outputs["clean_data"], model_name=p.model_name, city=p.city,
                            limits=p.group(DriftLimits))
    if cluster:  # locally, finish() hands the runner the training run instead
        with dsl.If(p.retrain == True, "retrain"):  # noqa: E712  (the step decides on the verdict, saying why)
            steps.retrain(raw_data=download.outputs["raw_data"], source=p.source, model_name=p.model_name,
                          kfp_host=p.kfp_host, training_version=p.training_version, drift=monitor.outputs["summary"],
                          on_shift=p.retrain_on_shift)
    return Outputs(verdict=monitor.outputs["verdict"], summary=monitor.outputs["summary"])


def finish(outputs: dict, run_params: dict) -> tuple[str, dict] | int:
    """What the run found, the verdict and its reason last; then the training run to start on the same bytes when
    retrain=true and the verdict calls for it, else the verdict's exit status."""
    summary = json.loads(outputs["summary"])
    print(f"\nnew listings against prod version {summary['prod_version']} of {summary['model_name']!r}: "
          f"{summary['rows']} rows ({summary['priced_rows']} with a price), {summary['checks']} checks")
    if "prod_error_ratio" in summary:
        print(f"prod's MAE on the new priced rows: {summary['prod_mae_now']:.2f}, {summary['prod_error_ratio']:.2f} x "
              f"its {summary['prod_mae_registered']:.2f} at registration ({monitoring.CONFIDENCE:.0%} interval "
              f"{summary['prod_error_ratio_low']:.2f} to {summary['prod_error_ratio_high']:.2f} x, "
              f"{summary['prod_error_rows']} rows)")
        if "prod_coverage" in summary:
            print(f"prod's price ranges hold {summary['prod_coverage']:.1%} of those prices ({monitoring.CONFIDENCE:.0%} "
                  f"interval {summary['prod_coverage_low']:.1%} to {summary['prod_coverage_high']:.1%})")
    elif "prod_error_unknown" in summary:
        print(f"prod's error on the new rows is not measured: {summary['prod_error_unknown']}")
    if run_params.get("retrain"):
        start, why = monitoring.retrain_decision(summary, bool(run_params.get("retrain_on_shift")))
        if start:
            print(f"verdict: {summary['verdict']}: {summary['reason']}")
            print(f"\nretrain=true: running the training pipeline on the same data ({why})")
            return "training", {**summary["training_params"], "source": run_params.get("source", sources.DEFAULT_SOURCE),
                                "source_sha256": run_params["source_sha256"]}
        print(f"retrain=true, but training was not started: {why}")
    print(f"verdict: {summary['verdict']}: {summary['reason']}")
    return monitoring.EXIT_CODES[summary["verdict"]]


def failed(why: str, invalid_data: bool) -> tuple[str, int]:
    """A file that cannot be read as listings or fails their checks is the verdict invalid; a fault of MLflow, the
    registry or the parameters is not the data's."""
    return (f"verdict: invalid: {why}", monitoring.EXIT_CODES[monitoring.INVALID]) if invalid_data else (why, 1)


PIPELINE = Pipeline(
    key="monitor", name=names.MONITOR_PIPELINE, spec="pipeline-monitor.yaml",
    description="New listings against prod's data: ok, shifted, degraded, suspect or invalid.",
    groups=(Source, Subject, DriftLimits, Retrain), wiring=wiring, outputs=Outputs, fresh_data=True, finish=finish,
    failed=failed)
