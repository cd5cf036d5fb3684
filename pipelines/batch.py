"""Batch scoring: a file of listings priced by one registered model version."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

from components import names, steps
from pipelines.dag import Pipeline, Source


@dataclass(frozen=True)
class Scoring:
    """Which version prices the file (resolved once, at the start), and which rows it may refuse."""

    model: str = names.PROD_MODEL_URI
    price_unfamiliar: bool = False  # price rows unlike the training data too (flagged), rather than refuse them
    max_rejected: float = 0.05  # the run fails when a larger share of the rows cannot be priced


Outputs = NamedTuple("Outputs", summary=str)


def wiring(p, cluster: bool) -> Outputs:
    download = steps.download(source=p.source, expected_sha256=p.source_sha256, log_hours=p.log_hours)
    score = steps.score(raw_data=download.outputs["raw_data"], model=p.model, price_unfamiliar=p.price_unfamiliar,
                        max_rejected=p.max_rejected)
    return Outputs(summary=score.outputs["summary"])


def finish(outputs: dict, run_params: dict) -> None:
    summary = json.loads(outputs["summary"])
    print(f"\npriced {summary['scored']} of {summary['rows']} listings with {summary['model_name']!r} version "
          f"{summary['model_version']} ({summary['model']}); {summary['rejected']} rejected "
          "(rejected_rows.csv says why for each)")


PIPELINE = Pipeline(
    key="batch", name=names.BATCH_PIPELINE, spec="pipeline-batch.yaml",
    description="Price a file of listings with a registered model version.",
    groups=(Source, Scoring), wiring=wiring, outputs=Outputs, fresh_data=True, finish=finish)
