"""The pipelines: each a file of wiring (which steps run, in what order, with which parameters), and the one
registry that the command line, compile, submit and schedule read. A new pipeline is a new file and a line here.

The registry is built on first use (a module __getattr__), so that pipeline.py can start pipelines.warm before the
imports the pipelines make."""

from __future__ import annotations


def __getattr__(name: str):
    if name != "PIPELINES":
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    from pipelines import batch, monitor, training

    global PIPELINES
    PIPELINES = {p.key: p for p in (training.PIPELINE, batch.PIPELINE, monitor.PIPELINE)}
    return PIPELINES
