"""pipelines/warm.py: kfp.local's tasks run in forks of a step server that has imported what steps use, each task in
a process of its own, with kfp.local's own command, output and exit status; one server serves run after run until
what it imported changes, and a task goes when its run does."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from kfp import dsl, local

from pipelines import warm


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)  # as components/steps.py
def probe(word: str) -> str:
    import os
    import sys

    print(f"probe says {word}")
    comm = open("/proc/self/comm").read().strip()
    return f"{word} {os.getpid()} {comm} {'sklearn' in sys.modules} {os.environ.get('WARM_PROBE', '')}"


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)  # as components/steps.py
def version() -> str:
    import os

    import warm_probe_module

    return f"{warm_probe_module.VERSION} {os.getppid()}"


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)  # as components/steps.py
def sleeps(pid_file: str) -> str:
    import os
    import signal
    import time

    # Ctrl-C is noted and ignored: only SIGKILL ends it.
    signal.signal(signal.SIGINT, lambda *_: open(pid_file, "a").write(" SIGINT"))
    open(pid_file, "w").write(str(os.getpid()))
    for _ in range(300):
        time.sleep(1)
    return "woke"


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)  # as components/steps.py
def fails(word: str) -> str:
    raise ValueError(f"no {word}")


@pytest.fixture
def runner(tmp_path):
    warm.start()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), enable_caching=False,
               raise_on_error=True)


@pytest.mark.server  # starts a step server
def test_each_task_is_a_fresh_named_fork_that_already_has_the_libraries(runner, monkeypatch, capsys):
    monkeypatch.setenv("WARM_PROBE", "seen")
    first, second = (probe(word=w).output.split() for w in ("a", "b"))
    assert first[0] == "a" and second[0] == "b"
    assert len({first[1], second[1], str(os.getpid())}) == 3  # a process per task, not this one
    assert first[2:] == second[2:] == ["kfp:probe", "True", "seen"]  # named by its step, warm, this environment
    assert "probe says a" in capsys.readouterr().out  # the task's output reaches kfp.local's log


@pytest.mark.server  # starts a step server
def test_a_failing_task_fails_with_its_own_error(runner, capsys):
    with pytest.raises(RuntimeError, match="fails"):
        fails(word="way")
    assert "ValueError: no way" in capsys.readouterr().out


def test_only_kfps_own_command_is_forked(monkeypatch):
    source, args = warm.task(["sh", "-ec", "... python3 -m kfp.dsl.executor_main ... \"$@\"", "def f(): ...",
                              "--executor_input", "{}", "--function_to_execute", "f"])
    assert source == "def f(): ..." and args == ["--executor_input", "{}", "--function_to_execute", "f"]
    assert warm.task(["python3", "-m", "kfp.dsl.executor_main", "--executor_input", "{}"]) is None
    assert warm.task(["sh", "-c", "echo hi", "x"]) is None


@pytest.mark.parametrize("argv, warmed", [
    (["run"], True), (["run", "--param", "a=1"], True), (["run", "--runner", "subprocess"], True),
    (["run", "--runner", "docker"], False), (["run", "--runner=docker"], False), (["compile"], False), ([], False)])
def test_only_a_local_subprocess_run_runs_in_the_server(argv, warmed):
    assert warm.local_run(argv) == warmed


@pytest.mark.server  # starts a step server
def test_one_server_serves_task_after_task_until_what_it_imported_changes(runner, monkeypatch, tmp_path):
    module = tmp_path / "warm_probe_module.py"
    module.write_text("VERSION = 'one'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(warm, "PRELOAD", [*warm.PRELOAD, "warm_probe_module"])  # a server of its own (its key)
    first, second = (version().output.split() for _ in range(2))
    assert first == second and first[0] == "one" and first[1] != str(os.getpid())  # the same server forked both
    module.write_text("VERSION = 'two, edited'\n")
    edited = version().output.split()
    assert edited[:2] == ["two,", "edited"] and edited[2] != first[1]  # the edit is seen, by a new server


@pytest.mark.server  # starts a step server
def test_a_task_goes_when_its_run_does(tmp_path):
    pid_file = tmp_path / "pid"
    run = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from kfp import local
from pipelines import warm
from test_warm import sleeps
warm.start()
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root={str(tmp_path)!r}, enable_caching=False)
sleeps(pid_file={str(pid_file)!r})
"""], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        assert run.poll() is None
        time.sleep(0.2)
    task = int(pid_file.read_text())
    assert Path(f"/proc/{task}/comm").read_text().strip() == "kfp:sleeps"
    run.kill()
    run.wait()
    while Path(f"/proc/{task}").exists() and time.monotonic() < deadline:  # killed by the server, then reaped
        time.sleep(0.2)
    assert not Path(f"/proc/{task}").exists()
    assert pid_file.read_text() == f"{task} SIGINT"  # interrupted first, as Ctrl-C would (GRACE_SECONDS), then killed


ASK = f"""
import os, pickle, socket, sys
sys.path[:0] = [{str(ROOT)!r}]
from pipelines import warm
name, uid, source = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if uid != os.getuid():  # as another user (root may become one)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
reader, writer = os.pipe()
task = ("task", (source, ["--function_to_execute", "f"]), dict(os.environ), "/")
request = pickle.dumps(task if source else 42)
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
    server.connect(name)
    socket.send_fds(server, [warm._HEADER.pack(len(request))], [writer])
    os.close(writer)
    try:
        server.sendall(request)
        print(warm._line(server) or "closed", warm._line(server))
    except ConnectionResetError:  # closed with the request unread
        print("closed")
"""


def ask(name: bytes, uid: int, source: str) -> str:
    """What the server at `name` answers a task request of `source` (empty: not a task) from user `uid`."""
    return subprocess.run([sys.executable, "-c", ASK, name.hex(), str(uid), source], capture_output=True, text=True,
                          cwd="/", check=True).stdout.strip()


@pytest.mark.server  # starts a step server
@pytest.mark.skipif(os.getuid() != 0, reason="only root can ask as another user")
def test_the_server_forks_for_this_user_only_and_outlives_what_it_refuses():
    with warm._connect():
        name = warm.address()  # it runs
    assert ask(name, 65534, "print('ran')") == "closed"  # another user
    assert ask(name, os.getuid(), "") == "closed"  # not a task
    # The same request from this user: the task runs (and exits as Python would: sys.exit(-1) is 255).
    assert ask(name, os.getuid(), "import sys; sys.exit(-1)").split()[::2] == ["started", "255"]


@pytest.mark.server  # starts a step server
@pytest.mark.skipif(os.getuid() != 0, reason="only root can be another user")
def test_a_run_gives_nothing_to_a_name_another_user_holds(monkeypatch):
    monkeypatch.setenv("PYTHON_WARM_TEST", str(os.getpid()))  # a name of its own
    # Another user holds the name and says what each caller sent it; once its input ends, it takes what is left
    # in its queue and ends.
    squat = subprocess.Popen([sys.executable, "-c", f"""
import os, select, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
    listener.bind({warm.address()!r})
    listener.listen()
    print("ready", flush=True)
    while listener in select.select([listener, sys.stdin], [], [])[0] or sys.stdin.read():
        caller, _ = listener.accept()
        print("got", caller.recv(4096), flush=True)
    listener.setblocking(False)
    while True:
        try:
            caller, _ = listener.accept()
        except BlockingIOError:
            break
        caller.setblocking(True)
        print("got", caller.recv(4096), flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert squat.stdout.readline() == "ready\n"
        with pytest.raises(OSError, match="held by another user"):
            warm._connect()
        assert warm.run(["pipeline.py", "run"]) is None  # so the run runs here, cold
        got = squat.communicate(timeout=60)[0].splitlines()
    finally:
        squat.kill()
    assert len(got) >= 2 and set(got) == {"got b''"}  # asked, and sent nothing


@pytest.fixture
def silent_mlflow():
    """A tracking server that takes the connection and never answers: a run waits on it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def start_run(listener: socket.socket, **env: str) -> tuple[subprocess.Popen, socket.socket]:
    """`pipeline.py run` against `listener`, once its fork (not this child) is waiting on it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{listener.getsockname()[1]}", **env}
    client = subprocess.Popen([sys.executable, "pipeline.py", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    listener.settimeout(120)
    waiting, _ = listener.accept()
    return client, waiting


@pytest.mark.server  # starts a step server
def test_a_run_is_a_fork_of_the_server_that_gets_its_terminals_signals(silent_mlflow):
    client, waiting = start_run(silent_mlflow)
    with waiting:
        client.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = client.communicate(timeout=60)
    assert "KeyboardInterrupt" in out  # raised in the fork, which wrote to this process's output
    assert client.returncode == -signal.SIGINT  # and this process ends as the fork did


@pytest.mark.server  # starts a step server
def test_a_run_goes_when_the_process_that_asked_for_it_does(silent_mlflow):
    client, waiting = start_run(silent_mlflow)
    with waiting:
        client.kill()
        client.wait()
        waiting.settimeout(60)
        while waiting.recv(4096):  # its request; then the end of the connection
            pass
    # Left alone, the fork would have said after 5 s that MLflow did not answer, on this output it shares.
    assert "not reachable" not in client.stdout.read()


@pytest.mark.server  # starts a step server
def test_a_run_ends_with_the_server_and_says_so(silent_mlflow):
    # A server of its own (a variable imports might read is part of its key): the other tests' runs go on.
    client, waiting = start_run(silent_mlflow, PYTHON_WARM_TEST=str(os.getpid()))
    with waiting:
        run = next(int(pid) for pid in os.listdir("/proc")
                   if pid.isdigit() and int(pid) != client.pid and pid_holds(int(pid), client))
        server = int(Path(f"/proc/{run}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert "warm.serve" in Path(f"/proc/{server}/cmdline").read_text()
        os.kill(server, signal.SIGKILL)
        out, _ = client.communicate(timeout=60)
    assert client.returncode == 1
    assert out.strip().splitlines()[-1] == (f"pipeline.py run: the step server ended (killed?) while the run (pid "
                                            f"{run}) went on, which ended with it; run it again")
    assert "not reachable" not in out  # the fork, which shares this output, ended with the server (or it would say)


def pid_holds(pid: int, client: subprocess.Popen) -> bool:
    """Whether process `pid` writes to the client's standard output (the run's fork does)."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{client.pid}/fd/1")
    return False
