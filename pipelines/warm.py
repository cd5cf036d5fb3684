"""Warm step processes for kfp.local's SubprocessRunner: each task still runs in a process of its own, forked from a
step server that has already imported what steps use (kfp's executor, MLflow, pandas, scikit-learn, skops, the
components).

A step started cold spends about 2 s importing before its work (MLflow alone about 1.5 s), eight or more times a
run, and a server of its own per run still costs about 4.5 s of CPU. So one server is kept per machine and key (this
Python, its import path, the host name and the environment, less the variables that a run sets for its steps), at
an abstract Unix socket that only this user's processes may use, and it ends after IDLE_SECONDS without a task. It
only imports: no step code, no connection, no thread, so nothing passes from one task to the next. Before each fork
it checks that every file it imported is unchanged (size, mtime, inode); if one changed (an edited component, a
reinstalled package) it forks nothing more, says so and ends, and the task starts a new server. A task's process is
killed when the run that asked for it goes away.

The task's command is kfp's own (kfp 2.17.0, pinned in pyproject.toml):
    sh -ec 'program_path=$(mktemp -d); printf "%s" "$0" > "$program_path/ephemeral_component.py";
            _KFP_RUNTIME=true python3 -m kfp.dsl.executor_main --component_module_path ... "$@"' SOURCE ARGS...
and the fork does what that script does. A command of another shape runs as kfp.local runs it, and so does every
task when no server can be had.

This module imports nothing heavy at the top: `pipeline.py run` starts the server before its own imports.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib
import json
import os
import pickle
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

EXECUTOR = "kfp.dsl.executor_main"
PRELOAD = [EXECUTOR, "kfp.local", "mlflow", "mlflow.sklearn", "pandas", "sklearn", "sklearn.ensemble",
           "sklearn.inspection", "skops.io", "matplotlib.figure", "pipelines.cli", "pipelines.warm",
           "components.sources", "components.validation", "components.training", "components.promotion",
           "components.scoring", "components.monitoring"]
IDLE_SECONDS = 600
CHECK_SECONDS = 5  # how often an idle server looks for edits to what it imported
# What a run sets for its steps, which each task gets anyway: not part of a server's key (every other variable is,
# as an import might read it). The server imports with MLflow's telemetry off, whose threads a fork would cut.
PER_RUN = {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
           "MLFLOW_DISABLE_TELEMETRY", "KFP_RUN_ID", "PIPELINE_OWNER", "PWD", "OLDPWD", "SHLVL", "_"}
PER_RUN_PREFIXES = ("PYTEST_", "MAKE", "MFLAGS", "COV_CORE_", "_MLFLOW_")  # the last: set by MLflow's import
_HEADER = struct.Struct("!Q")
_cold = None  # kfp.local's own run_local_subprocess


def start_early(argv: list[str]) -> None:
    """From the entry point, before its imports: start the server for `run` with the subprocess runner, so that
    its imports and this process's own go on side by side."""
    runner = next((a.split("=", 1)[1] for a in argv if a.startswith("--runner=")), None)
    if "--runner" in argv[:-1]:
        runner = argv[argv.index("--runner") + 1]
    if argv[:1] == ["run"] and runner in (None, "subprocess"):
        with contextlib.suppress(OSError):
            _connect().close()


def start() -> None:
    """Route kfp.local's tasks through the server (started now unless it runs)."""
    global _cold
    from kfp.local import subprocess_task_handler

    with contextlib.suppress(OSError):
        _connect().close()
    if _cold is None:
        _cold = subprocess_task_handler.run_local_subprocess
        subprocess_task_handler.run_local_subprocess = run_task


def task(full_command: list[str]) -> tuple[str, list[str]] | None:
    """(the component's source, the executor's arguments) of kfp's command, or None for any other command."""
    if len(full_command) < 4 or full_command[:2] != ["sh", "-ec"] or f"-m {EXECUTOR}" not in full_command[2]:
        return None
    return full_command[3], full_command[4:]


def run_task(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
    """kfp.local's run_local_subprocess, in a fork of the step server: prints the task's output as it comes and
    returns its exit status (negative: the signal that ended it)."""
    found = task(full_command)
    request = pickle.dumps((*found, {**os.environ, **(env_vars or {})}, os.getcwd())) if found else None
    for _ in range(3 if found else 0):  # a server that just ended (stale or idle) is replaced
        reader, writer = os.pipe()
        server, started = None, False
        try:
            server = _connect()
            socket.send_fds(server, [_HEADER.pack(len(request))], [writer])
            server.sendall(request)
            started = _line(server) == "started"
        except OSError:
            pass
        finally:
            os.close(writer)
        if not started:
            os.close(reader)
            if server:
                server.close()
            continue
        with server, open(reader, encoding="utf-8", errors="replace") as output:
            for line in output:
                print(line, end="")
            print("\n")  # as kfp.local does after a task's output
            ended = _line(server)
        return int(ended) if ended.lstrip("-").isdigit() else 1
    return _cold(full_command, env_vars)


def address() -> bytes:
    """The abstract socket of the server for this process's Python, import path, host and environment."""
    env = sorted((k, v) for k, v in os.environ.items() if k not in PER_RUN and not k.startswith(PER_RUN_PREFIXES))
    key = json.dumps([os.path.realpath(sys.executable), sys.path, socket.gethostname(), PRELOAD, env])
    return f"\0rental-price-steps-{os.getuid()}-{hashlib.sha256(key.encode()).hexdigest()[:16]}".encode()


def _connect() -> socket.socket:
    """A connection to the server, started first if none listens (OSError when none can be had)."""
    name = address()
    for _ in range(5):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(name)
            return server
        except ConnectionRefusedError:
            server.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(name)  # the name is the lock: of two that start one at once, the other connects again
        except OSError:
            listener.close()
            continue
        listener.listen(64)
        with listener, open(os.path.join(tempfile.gettempdir(), f"rental-price-steps-{os.getuid()}.log"), "a") as log:
            subprocess.Popen([sys.executable, "-c", "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
                              "from pipelines import warm; warm.serve(int(sys.argv[2]), json.loads(sys.argv[3]))",
                              json.dumps(sys.path), str(listener.fileno()), json.dumps(PRELOAD)],
                             pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, cwd="/", env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    raise OSError("no step server could be started")


def _line(connection: socket.socket) -> str:
    """One line the server sent ("" if it closed first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(64)
        if not chunk:
            return ""
        data += chunk
    return data.decode().strip()


def _stat(paths) -> dict[str, tuple[int, int, int]]:
    found = {}
    for path in paths:
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            found[path] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return found


def serve(fd: int, preload: list[str]) -> None:
    """The server, in a session of its own: import `preload`, then fork a process per task until the code it
    imported changes or nobody asks for IDLE_SECONDS, and wait for its last task before it ends."""
    listener = socket.socket(fileno=fd)
    for name in preload:
        with contextlib.suppress(Exception):  # a broken module fails in the task, with its own error
            importlib.import_module(name)
    imported = _stat({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})
    tasks: dict[int, list] = {}  # pidfd: [pid, its run's connection, whether the run is still there]
    last = time.monotonic()
    while listener or tasks:
        runs = [run for _, run, there in tasks.values() if there]
        ready, _, _ = select.select([*tasks, *runs, *([listener] if listener else [])], [], [], CHECK_SECONDS)
        if listener and not ready and (time.monotonic() - last > IDLE_SECONDS and not tasks
                                       or _stat(imported) != imported):  # idle, or an edit: stop taking tasks
            listener.close()
            listener = None
        for item in ready:
            last = time.monotonic()
            if item is listener:
                run, _ = listener.accept()
                if _stat(imported) != imported:  # the task would run code that is no longer on disk: a new server
                    listener.close()
                    listener = None
                    with contextlib.suppress(OSError):
                        run.sendall(b"stale\n")
                    run.close()
                    continue
                started = _fork(run, [listener, *tasks, *(entry[1] for entry in tasks.values())])
                if started:
                    tasks[started[0]] = [started[1], run, True]
                else:
                    run.close()
            elif isinstance(item, int):  # a task ended: its status to its run
                pid, run, _ = tasks.pop(item)
                os.close(item)
                status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                with contextlib.suppress(OSError):
                    run.sendall(f"{status}\n".encode())
                run.close()
            else:  # the run went away (it never writes after its request): its task goes too
                entry = next(entry for entry in tasks.values() if entry[1] is item)
                entry[2] = False
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(entry[0], signal.SIGKILL)


def _fork(run: socket.socket, held: list) -> tuple[int, int] | None:
    """Read a task from `run` and fork its process (which closes what the server holds): (its pidfd, its pid), or
    None for what was not a task of this user's."""
    try:
        run.settimeout(10)
        header, fds, _, _ = socket.recv_fds(run, _HEADER.size, 1)
        if not header and not fds:  # a run that only made sure the server was there
            return None
        _, uid, _ = struct.unpack("3i", run.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid() or len(fds) != 1:
            raise PermissionError(f"a task from uid {uid} with {len(fds)} descriptors")
        while len(header) < _HEADER.size:
            header += run.recv(_HEADER.size - len(header)) or b"\0" * _HEADER.size
        size, = _HEADER.unpack(header)
        data = bytearray()
        while len(data) < size:
            chunk = run.recv(min(size - len(data), 1 << 20))
            if not chunk:
                raise EOFError("the run closed before its task was read")
            data += chunk
        source, args, env, cwd = pickle.loads(data)
        run.settimeout(None)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        print(f"step server {os.getpid()}: refused a request: {exc}", file=sys.stderr, flush=True)
        for fd in locals().get("fds") or []:
            os.close(fd)
        return None
    pid = os.fork()
    if pid == 0:
        _task(fds[0], source, args, env, cwd, [*held, run])
    os.close(fds[0])
    run.sendall(b"started\n")
    return os.pidfd_open(pid), pid


def _task(out: int, source: str, args: list[str], env: dict[str, str], cwd: str, inherited: list) -> None:
    """In the fork: what kfp's shell script does, with stdout and stderr on `out`, then exit as Python would. The
    process is named by its step (`ps -o comm`: kfp:train), as its command line is the server's."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group, which the server kills if the run goes away
        for item in inherited:
            os.close(item) if isinstance(item, int) else item.close()
        with contextlib.suppress(OSError, ValueError):
            Path("/proc/self/comm").write_text(f"kfp:{args[args.index('--function_to_execute') + 1]}"[:15])
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
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
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
