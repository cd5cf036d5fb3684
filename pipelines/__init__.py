"""The pipelines: each a file of wiring (which steps run, in what order, with which parameters), and the one
registry that the command line, compile, submit and schedule read. A new pipeline is a new file and a line here."""

from pipelines import batch, monitor, training
from pipelines.dag import Pipeline

PIPELINES: dict[str, Pipeline] = {p.key: p for p in (training.PIPELINE, batch.PIPELINE, monitor.PIPELINE)}
