"""Warm step processes for kfp.local's SubprocessRunner: each task still runs in a process of its own, forked from
one that has already imported what steps use (kfp's executor, MLflow, pandas, scikit-learn, skops, the components).

A step started cold spends about 2 s importing before its work (MLflow alone about 1.5 s), eight or more times a
run. Python's forkserver pays that once per `pipeline.py run`: the server process only imports (no step code, no
connection, no thread of Python's), and each task is a fresh fork of it, so nothing passes from one step to the next.
The task's command is kfp's own (kfp 2.17.0, pinned in pyproject.toml):
    sh -ec 'program_path=$(mktemp -d); printf "%s" "$0" > "$program_path/ephemeral_component.py";
            _KFP_RUNTIME=true python3 -m kfp.dsl.executor_main --component_module_path ... "$@"' SOURCE ARGS...
and the fork does what that script does. A command of another shape runs as kfp.local runs it.

This module imports nothing heavy at the top: `pipeline.py run` starts the server before its own imports.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import runpy
import sys
import tempfile
from multiprocessing import connection, forkserver, resource_tracker
from pathlib import Path

EXECUTOR = "kfp.dsl.executor_main"
PRELOAD = [EXECUTOR, "kfp.local", "mlflow", "mlflow.sklearn", "pandas", "sklearn", "sklearn.ensemble",
           "sklearn.inspection", "skops.io", "matplotlib.figure", "pipelines.cli", "pipelines.warm",
           "components.sources", "components.validation", "components.training", "components.promotion",
           "components.scoring", "components.monitoring"]
CONTEXT = multiprocessing.get_context("forkserver")
_cold = None  # kfp.local's own run_local_subprocess


def start_early(argv: list[str]) -> None:
    """From the entry point, before its imports: start the server for `run` with the subprocess runner, so that
    its imports and this process's own go on side by side."""
    runner = next((a.split("=", 1)[1] for a in argv if a.startswith("--runner=")), None)
    if "--runner" in argv[:-1]:
        runner = argv[argv.index("--runner") + 1]
    if argv[:1] == ["run"] and runner in (None, "subprocess"):
        _serve()


def start() -> None:
    """Route kfp.local's tasks through the server (started now unless start_early did)."""
    global _cold
    from kfp.local import subprocess_task_handler

    _serve()
    if _cold is None:
        _cold = subprocess_task_handler.run_local_subprocess
        subprocess_task_handler.run_local_subprocess = run_task


def _serve() -> None:
    """The forkserver with PRELOAD, started unless it runs."""
    CONTEXT.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def task(full_command: list[str]) -> tuple[str, list[str]] | None:
    """(the component's source, the executor's arguments) of kfp's command, or None for any other command."""
    if len(full_command) < 4 or full_command[:2] != ["sh", "-ec"] or f"-m {EXECUTOR}" not in full_command[2]:
        return None
    return full_command[3], full_command[4:]


def run_task(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
    """kfp.local's run_local_subprocess, in a fork of the warm process: prints the task's output as it comes and
    returns its exit status (negative: the signal that ended it)."""
    found = task(full_command)
    if found is None:
        return _cold(full_command, env_vars)
    source, args = found
    reader, writer = os.pipe()
    out = connection.Connection(writer, readable=False)  # multiprocessing hands its fd to the fork
    process = CONTEXT.Process(target=_run_step, args=(source, args, {**os.environ, **(env_vars or {})},
                                                       os.getcwd(), out))
    process.start()
    out.close()
    with open(reader, encoding="utf-8", errors="replace") as output:
        for line in output:
            print(line, end="")
    print("\n")  # as kfp.local does after a task's output
    process.join()
    return process.exitcode


def _run_step(source: str, args: list[str], env: dict[str, str], cwd: str, out: connection.Connection) -> None:
    """In the fork: what kfp's shell script does, with stdout and stderr on the pipe to the parent. The process is
    named by its step (`ps -o comm`: kfp:train), as its command line is the server's."""
    with contextlib.suppress(OSError, ValueError):
        Path("/proc/self/comm").write_text(f"kfp:{args[args.index('--function_to_execute') + 1]}"[:15])
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    # The fork would share the run's resource tracker, which outlives a killed step and then warns about the step's
    # semaphores after the run's last line: a step gets one of its own, as a process started cold does.
    tracker = resource_tracker._resource_tracker = resource_tracker.ResourceTracker()
    resource_tracker.ensure_running, resource_tracker.register, resource_tracker.unregister = (
        tracker.ensure_running, tracker.register, tracker.unregister)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env, _KFP_RUNTIME="true")
    path = os.path.join(tempfile.mkdtemp(), "ephemeral_component.py")
    with open(path, "w") as file:
        file.write(source)
    sys.argv = [EXECUTOR, "--component_module_path", path, *args]
    runpy.run_module(EXECUTOR, run_name="__main__", alter_sys=True)
