"""Check this machine before `make cluster`: each problem is one line that says how to fix it.

    python3 manifests/preflight.py            # what `make preflight` (and so `make cluster`) runs
    python3 manifests/preflight.py --python   # only: is this Python one the project supports?

Checks the Python, Docker (daemon up, CPUs, memory and disk it has), kind and kubectl against the node image of
kind-config.yaml, git (kustomize fetches KFP's manifests with it) and the inotify limits kind needs.
Standard library only, and no syntax newer than Python 3.6: it must be able to say that a Python is too old.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the cluster needs (see kind-config.yaml): Docker's share of the machine, and room for the node's images.
MIN_CPUS = 4
MIN_MEMORY_GIB = 8
MIN_DISK_GIB = 20
# kind's "known issues" page: the defaults of many distributions (8192, 128) make pods fail with "too many open
# files".
INOTIFY = {"max_user_watches": 524288, "max_user_instances": 512}
# A node image works with the kind release that built it or a newer one (kind's release notes).
KIND_FOR_NODE = {(1, 36): (0, 32, 0)}
KIND_INSTALL = "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
KUBECTL_INSTALL = "https://kubernetes.io/docs/tasks/tools/"


def version_text(version):
    return ".".join(str(part) for part in version)


def parse_version(text):
    """(major, minor, patch) from text such as 'kind v0.32.0 go1.24 linux/amd64' or 'v1.36.1'; None if absent."""
    match = re.search(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(part or 0) for part in match.groups()) if match else None


def supported_pythons(root=ROOT):
    """(lowest, first unsupported) minor versions from pyproject.toml's requires-python, e.g. ((3, 11), (3, 14))."""
    with open(os.path.join(root, "pyproject.toml")) as f:
        match = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+),\s*<(\d+)\.(\d+)"', f.read())
    low_major, low_minor, high_major, high_minor = (int(part) for part in match.groups())
    return (low_major, low_minor), (high_major, high_minor)


def node_version(root=ROOT):
    """The Kubernetes version of kind-config.yaml's node image."""
    with open(os.path.join(root, "kind-config.yaml")) as f:
        match = re.search(r"image:\s*kindest/node:(v[\d.]+)", f.read())
    return parse_version(match.group(1))


def run(command):
    """(exit code, stdout, stderr) of a command; exit code None when it is not installed."""
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                timeout=30)
    except FileNotFoundError:
        return None, "", ""
    except subprocess.TimeoutExpired:
        return 124, "", "no answer within 30 s"
    return result.returncode, result.stdout, result.stderr


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "no output"


# Each check returns a list of (ok, line).

def check_python(version, root=ROOT):
    low, high = supported_pythons(root)
    names = ", ".join("3.%d" % minor for minor in range(low[1], high[1]))
    if low <= tuple(version[:2]) < high:
        return [(True, "python: %s (supported: %s)" % (version_text(version[:3]), names))]
    return [(False, "python: Python %s at %s is not supported (the project needs one of %s): install one, then "
                    "`make PYTHON=python3.%d ...`" % (version_text(version[:3]), sys.executable, names, high[1] - 1))]


def check_docker(docker, min_cpus, min_memory_gib, min_disk_gib):
    code, out, err = run([docker, "info", "--format", "{{json .}}"])
    if code is None:
        return [(False, "docker: %s is not installed: install Docker (Debian/Ubuntu: sudo apt-get install docker.io; "
                        "elsewhere Docker Desktop)" % docker)]
    if code != 0:
        return [(False, "docker: no Docker daemon answers (docker info: %s): start it (sudo systemctl start docker, "
                        "or open Docker Desktop)" % last_line(err or out))]
    info = json.loads(out)
    if info.get("ServerErrors"):
        return [(False, "docker: the daemon reports %s: start it (sudo systemctl start docker)"
                 % "; ".join(info["ServerErrors"])[:200])]
    results = []
    cpus, memory_gib = int(info.get("NCPU", 0)), int(info.get("MemTotal", 0)) / 2 ** 30
    if cpus < min_cpus:
        results.append((False, "docker: %d CPU(s) available to Docker, the cluster needs %d: give Docker more CPUs "
                               "(Docker Desktop: Settings > Resources) or use a larger machine" % (cpus, min_cpus)))
    if memory_gib < min_memory_gib:
        results.append((False, "docker: %.1f GiB of memory available to Docker, the cluster needs %d GiB: give Docker "
                               "more memory (Docker Desktop: Settings > Resources) or use a larger machine"
                        % (memory_gib, min_memory_gib)))
    root = info.get("DockerRootDir", "")
    if root and os.path.isdir(root):
        free_gib = shutil.disk_usage(root).free / 2 ** 30
        if free_gib < min_disk_gib:
            results.append((False, "docker: %.1f GiB free at %s (Docker's data), the cluster's images need %d GiB: "
                                   "free some (docker system prune) or move Docker's data-root"
                            % (free_gib, root, min_disk_gib)))
        disk = ", %.0f GiB free" % free_gib
    else:  # Docker Desktop: the daemon's disk is inside its VM, out of sight from here
        disk = ", its disk not visible from here (keep %d GiB free for it)" % min_disk_gib
    if not results:
        results.append((True, "docker: daemon %s, %d CPUs, %.1f GiB%s"
                        % (info.get("ServerVersion", "?"), cpus, memory_gib, disk)))
    return results


def check_kind(kind, node):
    needed = KIND_FOR_NODE.get(tuple(node[:2]))
    if needed is None:
        return [(False, "kind: preflight does not know which kind release builds kindest/node:v%s of kind-config.yaml:"
                        " add it to KIND_FOR_NODE in manifests/preflight.py" % version_text(node))]
    code, out, err = run([kind, "version"])
    if code is None:
        return [(False, "kind: %s is not installed: install kind v%s or newer (%s)"
                 % (kind, version_text(needed), KIND_INSTALL))]
    found = parse_version(out) if code == 0 else None
    if found is None:
        return [(False, "kind: `%s version` gave no version (%s): reinstall kind v%s or newer (%s)"
                 % (kind, last_line(err or out), version_text(needed), KIND_INSTALL))]
    if found < needed:
        return [(False, "kind: v%s is too old for the node image kindest/node:v%s in kind-config.yaml (needs kind "
                        "v%s or newer): install a newer kind (%s)"
                 % (version_text(found), version_text(node), version_text(needed), KIND_INSTALL))]
    return [(True, "kind: v%s (node image v%s needs v%s or newer)"
             % (version_text(found), version_text(node), version_text(needed)))]


def check_kubectl(kubectl, node):
    code, out, err = run([kubectl, "version", "--client", "-o", "json"])
    wanted = "%d.%d" % node[:2]
    if code is None:
        return [(False, "kubectl: %s is not installed: install kubectl %s (%s)" % (kubectl, wanted, KUBECTL_INSTALL))]
    try:
        found = parse_version(json.loads(out)["clientVersion"]["gitVersion"])
    except (ValueError, KeyError, TypeError):
        found = None
    if code != 0 or found is None:
        return [(False, "kubectl: `%s version --client` gave no version (%s): reinstall kubectl %s (%s)"
                 % (kubectl, last_line(err or out), wanted, KUBECTL_INSTALL))]
    # Kubernetes' version skew policy: kubectl within one minor version of the API server.
    if found[0] != node[0] or abs(found[1] - node[1]) > 1:
        return [(False, "kubectl: v%s is more than one minor version from the cluster's Kubernetes v%s "
                        "(kind-config.yaml; supported: 1.%d to 1.%d): install kubectl %s (%s)"
                 % (version_text(found), version_text(node), node[1] - 1, node[1] + 1, wanted, KUBECTL_INSTALL))]
    return [(True, "kubectl: v%s (cluster v%s)" % (version_text(found), version_text(node)))]


def check_git(git):
    if run([git, "--version"])[0] is None:
        return [(False, "git: not installed: `kubectl apply -k manifests/kfp` fetches KFP's manifests with git: "
                        "install git")]
    return [(True, "git: installed")]


def check_inotify(proc):
    folder = os.path.join(proc, "sys", "fs", "inotify")
    if not os.path.isdir(folder):
        return [(True, "inotify: no %s (not Linux): Docker's VM keeps its own limits" % folder)]
    results = []
    for name, needed in sorted(INOTIFY.items()):
        with open(os.path.join(folder, name)) as f:
            value = int(f.read().strip())
        if value < needed:
            results.append((False, "inotify: fs.inotify.%s is %d, kind needs %d or more: sudo sysctl "
                                   "fs.inotify.%s=%d (add it to /etc/sysctl.d/ to keep it after a reboot)"
                            % (name, value, needed, name, needed)))
    return results or [(True, "inotify: %s" % ", ".join("%s >= %d" % item for item in sorted(INOTIFY.items())))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="store_true", help="check only the Python that runs this")
    parser.add_argument("--docker", default="docker")
    parser.add_argument("--kind", default="kind")
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--git", default="git")
    parser.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
    parser.add_argument("--min-cpus", type=int, default=MIN_CPUS)
    parser.add_argument("--min-memory-gib", type=float, default=MIN_MEMORY_GIB)
    parser.add_argument("--min-disk-gib", type=float, default=MIN_DISK_GIB)
    args = parser.parse_args(argv)
    results = check_python(sys.version_info)
    if not args.python:
        node = node_version()
        results += check_docker(args.docker, args.min_cpus, args.min_memory_gib, args.min_disk_gib)
        results += check_kind(args.kind, node) + check_kubectl(args.kubectl, node) + check_git(args.git)
        results += check_inotify(args.proc)
    problems = [line for ok, line in results if not ok]
    for ok, line in results:
        print(("ok    " if ok else "FAIL  ") + line)
    if args.python:
        return 1 if problems else 0
    if problems:
        print("preflight: %d problem(s) above; fix them and run `make preflight` again" % len(problems))
        return 1
    print("preflight: this machine is ready for `make cluster`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
