"""What `pipeline.py run` shows a person: one line per step as it ends, and on failure the step's own error.

kfp.local prints every task's executor input, logs and tracebacks (about 130 lines for a failed run, the line that
matters buried in them): all of that goes to a log file instead, whole. The lines are told apart by task through
kfp.local's `execute_single_task` (kfp 2.17.0; the pin is in pyproject.toml), which runs each task in one thread.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import re
import sys
import threading
import time
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A step's own error (components/errors.py): InvalidData when the data itself is at fault.
STEP_ERROR = re.compile(r"(StepError|InvalidData): (.*)$")
ANY_ERROR = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$")


class Progress:
    """Context manager around a kfp.local run: the full output to `log_path`, a line per finished step to `out`."""

    def __init__(self, log_path: Path, out=None):
        self.log_path, self.out = Path(log_path), out or sys.stdout
        self.current = threading.local()
        self.lines: dict[tuple, list[str]] = {}  # the output of each running task
        self.failed: list[tuple[str, str, bool]] = []  # (step, its error line, whether the data was at fault)
        self.lock = threading.Lock()

    # ---------------------------------------------------------- the file object standing in for stdout/stderr

    def write(self, text: str) -> int:
        with self.lock:
            self.log.write(text)
        # print() writes a line's text and its newline apart: each thread keeps its own unfinished line.
        *complete, self.current.buffer = (getattr(self.current, "buffer", "") + text).split("\n")
        key = getattr(self.current, "key", None)
        if key is not None:
            self.lines[key].extend(ANSI.sub("", line).strip() for line in complete)
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    # ---------------------------------------------------------- the run

    def __enter__(self) -> "Progress":
        from kfp.local.orchestrator import task_executor

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w", buffering=1)
        # kfp.local swaps print and the root logger's handlers per task from two threads, and can leave them swapped.
        root = logging.getLogger()
        self.saved = (builtins.print, root.handlers[:], root.level, task_executor.execute_single_task)
        original = task_executor.execute_single_task

        def execute_single_task(task_name, *args, **kwargs):
            # A sweep runs several tasks of one step at once, each in its own thread.
            step, started = task_name.removeprefix("comp-"), time.perf_counter()
            self.current.key = key = (step, threading.get_ident(), started)
            self.lines[key] = []
            try:
                outputs, status = original(task_name, *args, **kwargs)
            finally:
                self.current.key = None
            self.report(step, self.lines.pop(key), status.name == "SUCCESS", time.perf_counter() - started)
            return outputs, status

        task_executor.execute_single_task = execute_single_task
        self.redirects = contextlib.ExitStack()
        self.redirects.enter_context(contextlib.redirect_stdout(self))
        self.redirects.enter_context(contextlib.redirect_stderr(self))
        return self

    def __exit__(self, *exc) -> None:
        from kfp.local.orchestrator import task_executor

        self.redirects.close()
        root = logging.getLogger()
        builtins.print, root.handlers[:], level, task_executor.execute_single_task = self.saved
        root.setLevel(level)
        self.log.close()

    def report(self, step: str, lines: list[str], ok: bool, seconds: float) -> None:
        lines = [line for line in lines if line]
        if not lines:  # nothing ran: kfp.local took the outputs from its cache
            return self.say(f"  {step:<10} reused (cache)")
        if ok:
            said = [line for line in lines if line.startswith(f"{step}: ")]
            return self.say(f"  {step:<10} done in {seconds:5.1f} s" + (f"  {said[-1]}" if said else ""))
        error, invalid_data = error_line(lines)
        self.failed.append((step, error, invalid_data))
        self.say(f"  {step:<10} FAILED after {seconds:.1f} s")

    def say(self, text: str) -> None:
        # Not print(): another task's thread may have kfp.local's indenting print in place.
        self.out.write(text + "\n")
        self.out.flush()

    def failure(self) -> tuple[str, bool]:
        """The line a failed run ends with (the first failed step's own error, and where the whole log is), and
        whether that error is the data's (InvalidData)."""
        step, error, invalid_data = self.failed[0] if self.failed else ("?", "see the log", False)
        return f"FAILED at {step}: {error} (full log: {self.log_path})", invalid_data


def error_line(lines: list[str]) -> tuple[str, bool]:
    """The step's own error from its output (a StepError's message, else the last exception line), and whether it
    is InvalidData."""
    for i in range(len(lines) - 1, -1, -1):
        if match := STEP_ERROR.search(lines[i]):
            kind, message = match.groups()
            details = []  # a message of several lines (check lists each failed check as "- ...")
            for line in lines[i + 1:]:
                if not line.startswith("- "):
                    break
                details.append(line[2:])
            return ("; ".join([message.rstrip(":")] + details) if details else message), kind == "InvalidData"
    for line in reversed(lines):
        if match := ANY_ERROR.match(line):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}", False
    return "its process ended without an error message (killed, or out of memory?)", False
