"""Warm processes for local runs: `pipeline.py run` with the subprocess runner, and each of kfp.local's tasks, runs
in a process of its own forked from a step server that has already imported what they use (kfp, MLflow, pandas,
scikit-learn, skops, the components).

A step started cold spends about 2 s importing before its work (MLflow alone about 1.5 s), eight or more times a
run, and a server per run still cost about 4.5 s of CPU, and the run's own process about 2. So one server is kept per
key (this Python and its flags, its import path, the host name, and the environment variables imports read: see
IMPORT_ENV), at an abstract Unix socket that only this user's processes may use; it ends after IDLE_SECONDS with
nothing running. It only imports: no pipeline code, no connection, no thread, so nothing passes from one run or task
to the next. Before each fork, and every CHECK_SECONDS when idle, it checks that every file it imported is unchanged
(size, mtime, inode): once one changed (an edited component, a reinstalled package) it forks nothing more, and ends
when what it runs has ended; the next request starts a new server.

A run's fork gets the caller's standard streams, environment, directory and arguments; the caller forwards it the
signals a terminal sends and ends with its status. A task's fork gets the task's environment and writes to a pipe
that kfp.local reads. When a fork's caller goes away, the server interrupts the fork's process group (SIGINT, as
Ctrl-C would), and kills it GRACE_SECONDS later; a fork dies with the server. A caller only talks to a server of its
own user (the abstract name is anyone's to take). The task's command is kfp's own (kfp 2.17.0, pinned in pyproject.toml):
    sh -ec 'program_path=$(mktemp -d); printf "%s" "$0" > "$program_path/ephemeral_component.py";
            _KFP_RUNTIME=true python3 -m kfp.dsl.executor_main --component_module_path ... "$@"' SOURCE ARGS...
and the fork does what that script does. A command of another shape runs as kfp.local runs it; when no server can
be had, the run and its tasks run as they would without one.

This module imports nothing heavy: `pipeline.py` imports it first.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import importlib
import json
import os
import pickle
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
GRACE_SECONDS = 10  # a fork whose caller went away gets SIGINT (as Ctrl-C), then SIGKILL after this
# The environment variables an import may read (the interpreter's; OpenMP's, the numeric libraries' and the
# allocator's; locale, time zone and home; matplotlib's, scikit-learn's, joblib's, MLflow's and kfp's settings): a
# server is kept per value of these, less the ones a run sets for its steps. Every other variable (a make variable,
# the terminal's) reaches each task in its own environment. The server imports with MLflow's telemetry off, whose
# threads a fork would cut.
IMPORT_ENV = ("PYTHON", "OMP_", "GOMP_", "KMP_", "OPENBLAS_", "MKL_", "BLIS_", "NPY_", "NUMEXPR_", "ARROW_",
              "MALLOC_", "LD_", "LC_", "LANG", "TZ", "HOME", "PATH", "TMPDIR", "XDG_", "MPL", "SKLEARN_", "JOBLIB_",
              "LOKY_", "MLFLOW_", "KFP_")
PER_RUN = {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
           "MLFLOW_DISABLE_TELEMETRY", "KFP_RUN_ID"}
_HEADER = struct.Struct("!Q")
_FLAGS = subprocess._args_from_interpreter_flags()  # -W, -X, -O...: the server runs with the caller's
_cold = None  # kfp.local's own run_local_subprocess


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
    if found is None:
        return _cold(full_command, env_vars)
    reader, writer = os.pipe()
    asked = _ask("task", found, {**os.environ, **(env_vars or {})}, [writer])
    os.close(writer)
    if asked is None:
        os.close(reader)
        return _cold(full_command, env_vars)
    with asked[0] as server, open(reader, encoding="utf-8", errors="replace") as output:
        for line in output:
            print(line, end="")
        print("\n")  # as kfp.local does after a task's output
        status = _status(server)
        return 1 if status is None else status


def run(argv: list[str]) -> int | None:
    """`pipeline.py run` with the subprocess runner, in a fork of the server with this process's standard streams,
    environment and directory: its exit status, or None (run it here) for another command or when no server takes
    it. The signals a terminal sends reach the fork; if this process dies, the server interrupts, then kills it."""
    if not local_run(argv[1:]):
        return None
    asked = _ask("run", argv, dict(os.environ), [0, 1, 2])
    if asked is None:
        return None
    server, pid = asked

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    with server:
        status = _status(server)
    if status is None:
        print(f"pipeline.py run: the step server ended (killed?) while the run (pid {pid}) went on, which ended with "
              "it; run it again", file=sys.stderr)
        return 1
    if status < 0:  # ended by a signal: end so too
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's cannot be set, nor need be
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


def local_run(argv: list[str]) -> bool:
    """Whether the command is `run` with the subprocess runner (kfp.local's tasks as local processes)."""
    runner = next((a.split("=", 1)[1] for a in argv if a.startswith("--runner=")), None)
    if "--runner" in argv[:-1]:
        runner = argv[argv.index("--runner") + 1]
    return argv[:1] == ["run"] and runner in (None, "subprocess")


def _ask(kind: str, payload, env: dict[str, str], fds: list[int]) -> tuple[socket.socket, int] | None:
    """Have the server fork a process for a request: (the connection its exit status comes on, its pid), or None
    when no server takes it."""
    request = pickle.dumps((kind, payload, env, os.getcwd()))
    for _ in range(3):  # a server that just ended (stale or idle) is replaced
        server = None
        try:
            server = _connect()
            socket.send_fds(server, [_HEADER.pack(len(request))], fds)
            server.sendall(request)
            reply = _line(server).split()
            if reply[:1] == ["started"]:
                return server, int(reply[1])
        except OSError:
            pass
        if server:
            server.close()
    return None


def _status(server: socket.socket) -> int | None:
    """The exit status of what the server forked (negative: the signal that ended it), or None if the server went
    away first."""
    with contextlib.suppress(OSError):
        ended = _line(server)
        return int(ended) if ended.lstrip("-").isdigit() else None
    return None


def address() -> bytes:
    """The abstract socket of the server for this process's Python, import path, host and IMPORT_ENV."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(IMPORT_ENV) and k not in PER_RUN)
    key = json.dumps([os.path.realpath(sys.executable), _FLAGS, sys.path, socket.gethostname(), PRELOAD, env])
    return f"\0rental-price-steps-{os.getuid()}-{hashlib.sha256(key.encode()).hexdigest()[:16]}".encode()


def _connect() -> socket.socket:
    """A connection to the server, started first if none listens (OSError when none can be had)."""
    name = address()
    for _ in range(5):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(name)
        except ConnectionRefusedError:
            server.close()
        else:  # the name is anyone's to take: only a server of this user's gets a run's environment and streams
            if _peer_uid(server) == os.getuid():
                return server
            server.close()
            raise OSError(f"the step server's name {name!r} is held by another user")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(name)  # the name is the lock: of two that start one at once, the other connects again
        except OSError:
            listener.close()
            continue
        listener.listen(64)
        with listener, open(os.path.join(tempfile.gettempdir(), f"rental-price-steps-{os.getuid()}.log"), "a") as log:
            subprocess.Popen([sys.executable, *_FLAGS, "-c", "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
                              "from pipelines import warm; warm.serve(int(sys.argv[2]), json.loads(sys.argv[3]))",
                              json.dumps(sys.path), str(listener.fileno()), json.dumps(PRELOAD)],
                             pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, cwd="/", env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    raise OSError("no step server could be started")


def _line(connection: socket.socket) -> str:
    """One line the server sent ("" if it closed first); a byte at a time, so as to leave the next line unread."""
    data = b""
    while not data.endswith(b"\n"):
        byte = connection.recv(1)
        if not byte:
            return ""
        data += byte
    return data.decode().strip()


def _peer_uid(connection: socket.socket) -> int:
    return struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]


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
    tasks: dict[int, list] = {}  # pidfd: [pid, its caller's connection, when to SIGKILL it (its caller gone)]
    last = time.monotonic()
    while listener or tasks:
        callers = [caller for _, caller, kill_at in tasks.values() if kill_at is None]
        kill_at = min((entry[2] for entry in tasks.values() if entry[2] is not None), default=None)
        wait = CHECK_SECONDS if kill_at is None else max(0.0, min(CHECK_SECONDS, kill_at - time.monotonic()))
        ready, _, _ = select.select([*tasks, *callers, *([listener] if listener else [])], [], [], wait)
        for entry in tasks.values():
            if entry[2] is not None and time.monotonic() >= entry[2]:
                entry[2] = float("inf")  # once: its pidfd says when it is gone
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(entry[0], signal.SIGKILL)
        if listener and not ready and (time.monotonic() - last > IDLE_SECONDS and not tasks
                                       or _stat(imported) != imported):  # idle, or an edit: stop taking tasks
            listener.close()
            listener = None
        for item in ready:
            last = time.monotonic()
            try:
                if item is listener:
                    caller, _ = listener.accept()
                    if _stat(imported) != imported:  # it would run code no longer on disk: a new server will
                        listener.close()
                        listener = None
                        with contextlib.suppress(OSError):
                            caller.sendall(b"stale\n")
                        caller.close()
                        continue
                    started = _fork(caller, [listener, *tasks, *(entry[1] for entry in tasks.values())])
                    if started:
                        tasks[started[0]] = [started[1], caller, None]
                    else:
                        caller.close()
                elif isinstance(item, int):  # a fork ended: its status to its caller
                    pid, caller, _ = tasks.pop(item)
                    os.close(item)
                    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                    with contextlib.suppress(OSError):
                        caller.sendall(f"{status}\n".encode())
                    caller.close()
                else:  # its caller went away (it never writes after its request): as Ctrl-C, then SIGKILL
                    entry = next((entry for entry in tasks.values() if entry[1] is item), None)
                    if entry and entry[2] is None:
                        entry[2] = time.monotonic() + GRACE_SECONDS
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(entry[0], signal.SIGINT)
            except Exception:  # noqa: BLE001 - one bad request or caller must not end the others' runs
                traceback.print_exc()


def _fork(run: socket.socket, held: list) -> tuple[int, int] | None:
    """Read a request from `run` and fork its process (which closes what the server holds): (its pidfd, its pid),
    or None for what was not a request of this user's."""
    fds = []
    try:
        run.settimeout(10)
        header, fds, _, _ = socket.recv_fds(run, _HEADER.size, 3)
        if not header and not fds:  # a run that only made sure the server was there
            return None
        uid = _peer_uid(run)
        if uid != os.getuid():
            raise PermissionError(f"a request from uid {uid}")
        header += _read(run, _HEADER.size - len(header))
        kind, payload, env, cwd = pickle.loads(_read(run, _HEADER.unpack(header)[0]))
        if (kind, len(fds)) not in (("task", 1), ("run", 3)):
            raise ValueError(f"a request {kind!r} with {len(fds)} descriptors")
        run.settimeout(None)
    except Exception as exc:  # noqa: BLE001 - whatever it was, it is refused
        print(f"step server {os.getpid()}: refused a request: {exc}", file=sys.stderr, flush=True)
        for fd in fds:
            os.close(fd)
        return None
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(server, kind, payload, env, cwd, fds, [*held, run])
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # as the child does: its own group, whichever of the two runs first
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
        run.sendall(f"started {pid}\n".encode())
        return pidfd, pid
    except OSError:  # no pidfd, or the caller went away: not started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if pidfd is not None:
            os.close(pidfd)
        return None


def _read(connection: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes of a request (EOFError if the caller closed first)."""
    data = bytearray()
    while len(data) < size:
        chunk = connection.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise EOFError("the caller closed before its request was read")
        data += chunk
    return bytes(data)


def _child(server: int, kind: str, payload, env: dict[str, str], cwd: str, fds: list[int], held: list) -> None:
    """In the fork, then exit as Python would. A task does what kfp's shell script does, its stdout and stderr on
    its one descriptor, and is named by its step (`ps -o comm`: kfp:train), as its command line is the server's; a
    run is `pipeline.py` with the run's own standard streams."""
    code, signum = 1, 0
    try:
        os.setpgid(0, 0)  # its own group, which the server interrupts, then kills, if its caller goes away
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: and which ends if the server does
        if os.getppid() != server:  # it already has
            os._exit(1)
        for item in held:
            os.close(item) if isinstance(item, int) else item.close()
        if kind == "task":
            source, args = payload
            name, streams = f"kfp:{args[args.index('--function_to_execute') + 1]}", [None, fds[0], fds[0]]
        else:
            name, streams = "pipeline.py", fds
        with contextlib.suppress(OSError):
            Path("/proc/self/comm").write_text(name[:15])
        for number, fd in enumerate(streams):
            if fd is not None:
                os.dup2(fd, number)
        for fd in set(fds):
            os.close(fd)
        sys.stdout.reconfigure(line_buffering=kind == "task" or os.isatty(1))
        sys.stderr.reconfigure(line_buffering=True)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        if kind == "task":
            os.environ["_KFP_RUNTIME"] = "true"
            path = os.path.join(tempfile.mkdtemp(), "ephemeral_component.py")
            with open(path, "w") as file:
                file.write(source)
            sys.argv = [EXECUTOR, "--component_module_path", path, *args]
            importlib.import_module(EXECUTOR).executor_main()  # what `python -m` runs of it
            code = 0
        else:
            from pipelines.cli import main

            sys.argv = payload
            raise SystemExit(main())
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        signum = signal.SIGINT  # as Python ends on an uncaught Ctrl-C
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        if signum:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        os._exit(code & 0xFF)  # as the C library's exit: sys.exit(-1) is 255
