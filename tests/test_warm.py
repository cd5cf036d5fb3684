"""pipelines/warm.py: kfp.local's tasks run in forks of a process that has imported what steps use, each task in a
process of its own, with kfp.local's own command, output and exit status."""

import os

import pytest
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
def fails(word: str) -> str:
    raise ValueError(f"no {word}")


@pytest.fixture
def runner(tmp_path):
    warm.start()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), enable_caching=False,
               raise_on_error=True)


def test_each_task_is_a_fresh_named_fork_that_already_has_the_libraries(runner, monkeypatch, capsys):
    monkeypatch.setenv("WARM_PROBE", "seen")
    first, second = (probe(word=w).output.split() for w in ("a", "b"))
    assert first[0] == "a" and second[0] == "b"
    assert first[1] != second[1] != str(os.getpid())  # a process per task, not this one
    assert first[2:] == second[2:] == ["kfp:probe", "True", "seen"]  # named by its step, warm, this environment
    assert "probe says a" in capsys.readouterr().out  # the task's output reaches kfp.local's log


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
def test_the_server_starts_early_only_for_a_local_subprocess_run(argv, warmed, monkeypatch):
    started = []
    monkeypatch.setattr(warm.forkserver, "ensure_running", lambda: started.append(True))
    warm.start_early(argv)
    assert bool(started) == warmed
