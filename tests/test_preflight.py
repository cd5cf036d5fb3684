"""`make preflight` (manifests/preflight.py) against stand-ins for docker, kind, kubectl and git: each failure it
reports, and that `make cluster` runs it first. The Makefile's choice of Python, with a stand-in python3."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("preflight", ROOT / "manifests" / "preflight.py")
preflight = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preflight)

GOOD_INFO = {"ServerVersion": "28.2.2", "NCPU": 8, "MemTotal": 16 * 2 ** 30, "DockerRootDir": "/"}


def tool(folder, name: str, stdout: str = "", code: int = 0, stderr: str = "") -> str:
    """A stand-in command that prints what it is given and exits with `code`."""
    path = folder / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{stdout}\nEOF\ncat >&2 <<'EOF'\n{stderr}\nEOF\nexit {code}\n")
    path.chmod(0o755)
    return str(path)


def proc(folder, watches: int = 524288, instances: int = 512) -> str:
    inotify = folder / "proc" / "sys" / "fs" / "inotify"
    inotify.mkdir(parents=True, exist_ok=True)
    (inotify / "max_user_watches").write_text(f"{watches}\n")
    (inotify / "max_user_instances").write_text(f"{instances}\n")
    return str(folder / "proc")


def machine(tmp_path, docker_info=None, docker=None, kind="kind v0.32.0 go1.24.3 linux/amd64", kubectl="v1.36.1",
            proc_dir=None, **extra) -> list[str]:
    """The arguments of a preflight run on a machine made of stand-ins; each keyword changes one part."""
    info = json.dumps({**GOOD_INFO, "DockerRootDir": str(tmp_path), **(docker_info or {})})
    kubectl_json = json.dumps({"clientVersion": {"major": "1", "gitVersion": kubectl}})
    return ["--docker", docker or tool(tmp_path, "docker", info),
            "--kind", tool(tmp_path, "kind", kind) if kind else str(tmp_path / "no-kind"),
            "--kubectl", tool(tmp_path, "kubectl", kubectl_json) if kubectl else str(tmp_path / "no-kubectl"),
            "--git", extra.get("git", tool(tmp_path, "git", "git version 2.39.5")),
            "--proc", proc_dir or proc(tmp_path), "--min-disk-gib", str(extra.get("min_disk_gib", 0.001))]


def run(args, capsys) -> tuple[int, list[str]]:
    code = preflight.main(args)
    return code, capsys.readouterr().out.splitlines()


def test_a_ready_machine_passes(tmp_path, capsys):
    code, lines = run(machine(tmp_path), capsys)
    assert code == 0, lines
    assert lines[-1] == "preflight: this machine is ready for `make cluster`"
    assert [line.split(":")[0] for line in lines[:-1]] == [
        "ok    python", "ok    docker", "ok    kind", "ok    kubectl", "ok    git", "ok    inotify"]
    assert "ok    docker: daemon 28.2.2, 8 CPUs, 16.0 GiB" in lines[1]


FAILURES = {
    "docker missing": (dict(docker="/nonexistent/docker"),
                       "FAIL  docker: /nonexistent/docker is not installed: install Docker"),
    "daemon down": (dict(docker="DOWN"), "FAIL  docker: no Docker daemon answers (docker info: Cannot connect to "
                                         "the Docker daemon at unix:///var/run/docker.sock.): start it"),
    "daemon errors": (dict(docker_info={"ServerErrors": ["permission denied"]}),
                      "FAIL  docker: the daemon reports permission denied"),
    "few CPUs": (dict(docker_info={"NCPU": 2}), "FAIL  docker: 2 CPU(s) available to Docker, the cluster needs 4"),
    "little memory": (dict(docker_info={"MemTotal": 4 * 2 ** 30}),
                      "FAIL  docker: 4.0 GiB of memory available to Docker, the cluster needs 8 GiB"),
    "little disk": (dict(min_disk_gib=10 ** 9), "the cluster's images need 1000000000 GiB: free some"),
    "kind missing": (dict(kind=None), "is not installed: install kind v0.32.0 or newer (https://kind.sigs.k8s.io"),
    "kind too old": (dict(kind="kind v0.24.0 go1.22.6 linux/amd64"),
                     "FAIL  kind: v0.24.0 is too old for the node image kindest/node:v1.36.1 in kind-config.yaml "
                     "(needs kind v0.32.0 or newer)"),
    "kind says no version": (dict(kind="something else"), "FAIL  kind: `"),
    "kubectl missing": (dict(kubectl=None), "is not installed: install kubectl 1.36 (https://kubernetes.io"),
    "kubectl too old": (dict(kubectl="v1.32.4"),
                        "FAIL  kubectl: v1.32.4 is more than one minor version from the cluster's Kubernetes v1.36.1 "
                        "(kind-config.yaml; supported: 1.35 to 1.37): install kubectl 1.36"),
    "kubectl too new": (dict(kubectl="v1.38.0"), "FAIL  kubectl: v1.38.0 is more than one minor version"),
    "kubectl says no version": (dict(kubectl="not-a-version"), "FAIL  kubectl: `"),
    "git missing": (dict(git="/nonexistent/git"), "FAIL  git: not installed: `kubectl apply -k manifests/kfp` "
                                                  "fetches KFP's manifests with git"),
    "inotify watches": (dict(proc_dir="LOW_WATCHES"), "FAIL  inotify: fs.inotify.max_user_watches is 8192, kind "
                                                      "needs 524288 or more: sudo sysctl fs.inotify.max_user_watches="
                                                      "524288"),
    "inotify instances": (dict(proc_dir="LOW_INSTANCES"), "FAIL  inotify: fs.inotify.max_user_instances is 128, "
                                                          "kind needs 512 or more: sudo sysctl "
                                                          "fs.inotify.max_user_instances=512"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_problem_is_one_line_with_its_fix(case, tmp_path, capsys):
    change, message = FAILURES[case]
    if change.get("docker") == "DOWN":
        change["docker"] = tool(tmp_path, "docker", code=1, stderr="Cannot connect to the Docker daemon at "
                                                                   "unix:///var/run/docker.sock.")
    if change.get("proc_dir") == "LOW_WATCHES":
        change["proc_dir"] = proc(tmp_path, watches=8192)
    if change.get("proc_dir") == "LOW_INSTANCES":
        change["proc_dir"] = proc(tmp_path, instances=128)
    code, lines = run(machine(tmp_path, **change), capsys)
    assert code == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and message in failed[0], lines
    assert lines[-1] == "preflight: 1 problem(s) above; fix them and run `make preflight` again"


def test_an_unsupported_python_is_named_with_the_fix():
    [(ok, line)] = preflight.check_python((3, 10, 12))
    assert not ok
    assert line.startswith("python: Python 3.10.12 at ")
    assert "(the project needs one of 3.11, 3.12, 3.13): install one, then `make PYTHON=python3.13 ...`" in line
    assert preflight.check_python(sys.version_info)[0][0]


def test_a_node_image_without_a_known_kind_release_is_a_problem_to_fix_here():
    [(ok, line)] = preflight.check_kind("kind", (1, 99, 0))
    assert not ok and "add it to KIND_FOR_NODE in manifests/preflight.py" in line


def test_the_kind_config_node_image_has_a_kind_release_and_the_readme_names_it():
    node = preflight.node_version()
    needed = preflight.KIND_FOR_NODE[node[:2]]
    readme = (ROOT / "README.md").read_text()
    assert f"kind ≥ {preflight.version_text(needed)}" in readme
    assert f"kubectl {node[0]}.{node[1] - 1} to {node[0]}.{node[1] + 1}" in readme
    assert "make preflight" in readme
    sizes = f"at least {preflight.MIN_CPUS} CPUs, {preflight.MIN_MEMORY_GIB} GiB and {preflight.MIN_DISK_GIB} GiB of disk"
    assert sizes in readme
    assert f"Give Docker at least {preflight.MIN_CPUS} CPUs and {preflight.MIN_MEMORY_GIB} GiB" in \
        (ROOT / "kind-config.yaml").read_text()


def test_no_linux_proc_is_not_a_problem(tmp_path, capsys):
    code, lines = run(machine(tmp_path, proc_dir=str(tmp_path / "absent")), capsys)
    assert code == 0 and any(line.startswith("ok    inotify: no ") for line in lines)


def test_make_cluster_runs_preflight_first_and_stops_on_a_problem(tmp_path):
    """With a kind that is too old, `make cluster` stops at preflight and never creates a cluster."""
    args = machine(tmp_path, kind="kind v0.24.0 go1.22.6 linux/amd64")
    values = dict(zip(args[::2], args[1::2]))
    log = tmp_path / "kind-calls"
    (tmp_path / "kind").write_text(f"#!/bin/sh\necho \"$*\" >> {log}\necho 'kind v0.24.0 go1.22.6 linux/amd64'\n")
    result = subprocess.run(
        ["make", "--no-print-directory", "cluster", f"KIND={values['--kind']}", f"DOCKER={values['--docker']}",
         f"KUBECTL={values['--kubectl']} --context kind-x", f"PYTHON={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if "MAKE" not in k})
    assert result.returncode != 0
    assert "FAIL  kind: v0.24.0 is too old for the node image" in result.stdout
    assert log.read_text().split("\n")[0] == "version"  # preflight asked its version, nothing created
    assert "create" not in log.read_text()


def test_make_finds_a_supported_python_or_says_which_to_install(tmp_path):
    """A machine whose only python3 is 3.10 (as on Ubuntu 22.04): make names the problem before any pip."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'Python 3.10.12'; exit 0; }\nexit 1\n")
    python.chmod(0o755)
    result = subprocess.run(["/usr/bin/make", "--no-print-directory", "venv", f"VENV={tmp_path}/venv"], cwd=ROOT,
                            capture_output=True, text=True, env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert result.returncode != 0
    assert ("no Python 3.11 to 3.13 found (python3 is Python 3.10.12): install one, or name it: "
            "make PYTHON=/path/to/python3.12 ...") in result.stderr
    assert not (tmp_path / "venv").exists()
