"""Chaos soak: `make soak` (not part of `make test`). N pipeline runs with a fault injected into each at a random
moment, against a real `mlflow server` and a real model server under load, all local processes; after every run
it checks invariants, and at the end it prints a table. Exit status 1 when any invariant was violated.

    .venv/bin/python tests/soak.py --runs 30 --seed 1 [--minutes 60] [--keep]

Seeded: `random.Random(seed)` draws the whole plan (each run's kind, parameters, fault, moment and how long the
fault lasts; the plan of 4 runs is the start of the plan of 30), printed first. What happens at a moment still
depends on the machine (which step is running 12 s in). Bounded: no new run starts past `--minutes`, and a run
(or its overlap partner) is killed after 10 minutes.

Setup, all its own in a temp folder D (removed at the end unless `--keep` or a violation; the artifacts live on
the tmpfs and go with it, the database and the logs stay): an `mlflow server` (sqlite in D, artifacts in
D/artifacts, log in D/server.log, which the steps quote), with a 1 GiB tmpfs mounted on D/artifacts so that a full
or read-only store is real; 6000 listings of the shared sample to train on and 3000 others to score and monitor;
model `soak-<seed>`; `PIPELINE_LEASE_SECONDS=10`. Once a prod exists, a model server (`components.serve`,
models:/soak-<seed>@prod) and a load generator thread sending one-row and small-batch requests, each request's
outcome recorded: its status, "refused" (nothing accepted the connection: the server was down) or "lost" (accepted,
then closed or reset with no answer, or no answer within 30 s).

Runs: the first a clean training run of a medium forest (a prod that stronger ones beat); then mostly training
(forests: strong, medium and weak ones, so the gate has both outcomes), some batch scoring and monitoring. Faults,
one per run, round-robin over a shuffled list (so each comes 3 or 4 times in 30 runs):
  mlflow_restart   SIGKILL the MLflow server's process group, start it again (same port and data) 1-5 s later
  step_kill        SIGKILL the process of a step (found by its /proc comm, kfp:<step>)
  store_read_only  remount the artifacts tmpfs read-only for 3-15 s
  store_full       fill the artifacts tmpfs (fallocate its free space) for 3-15 s
  serve_restart    SIGTERM the model server (uvicorn's graceful stop) under load, and start it again
  overlap          start a second training run (other parameters) 0-10 s in; both run to their end
  hand_promotion   move prod by hand to another existing version (tracking.promote, as `make promote`)
  none             nothing
The moment: serve_restart 0-5 s and overlap 0-10 s after the run started; every other fault 0-1.5 s after the
process of a named step appeared, so that each is injected (a run takes 8 s or 60 s) and faults reach the last
steps too. The steps: in training check, evaluate or register (register twice as likely: there a version is made
and prod moves), which run in every run, and for step_kill also train (the run then starts with --no-cache, so that
train is not reused from the cache); in batch scoring download or score; in monitoring download, clean or monitor.
A fault whose run ended first is reported as not injected.

Invariants, checked after every run once its processes have ended, with MLflow up (restarted if a fault left it
down):
  1 prod moves    prod (before, as the registry watcher saw it during the run, after) changes only to a version a
                  hand promotion of this window chose, or one a run of this window that exited 0 says is now prod;
                  such a version's `promotion` tag says it beat prod (or there was none).
  2 versions      every version is complete: READY, its lineage tags, its decision (`promotion`, `comparison`) and
                  card (description), its model downloadable (MLmodel and the skops file it names). Also reported:
                  each window in which the watcher saw a version without its card.
  3 no orphans    after the lease (10 s), `tracking.close_abandoned_runs()` (as any later run calls it) leaves no
                  run of the experiment RUNNING; how many were RUNNING before that call is counted.
  4 serving       the model server answers no 5xx but 503, and 503 only while a model loads after a (re)start
                  (before its first answer, within 120 s of it); no request "lost".
A problem is counted once, at the run after which it is first seen.

Not covered: the cluster (KFP, Kubernetes, MinIO, the Docker runner), several faults at once, the sqlite database's
own disk (only the artifact store is faulted), the network between hosts (everything is on 127.0.0.1), machine
crashes (the page cache), clock skew between hosts, and whether the figures a run reports are right. The windows
inside register (the version made, prod moved, then the decision and card written) last tenths of a second: a fault
lands in one by chance, so a clean soak does not show that they hold.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import requests
import urllib3
import yaml
from conftest import ROOT, SAMPLE, free_port

sys.path.insert(0, str(ROOT))
import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from test_rerun import WEAK, step_process  # noqa: E402

from components import tracking  # noqa: E402
from components.listings import parse_csv  # noqa: E402
from components.model import numbers_from_text  # noqa: E402
from components.predict import payload  # noqa: E402

EXPERIMENT = "soak"
LEASE = 10  # PIPELINE_LEASE_SECONDS for the runs and for close_abandoned_runs here
TRAIN_ROWS, OTHER_ROWS = 6000, 3000
RUN_TIMEOUT = 600
STORE_MB = 1024
FAULTS = ["mlflow_restart", "step_kill", "store_read_only", "store_full", "serve_restart", "overlap",
          "hand_promotion", "none"]
KINDS, KIND_WEIGHTS = ["training", "batch", "monitor"], [70, 15, 15]
# Faults injected while a named step runs, and the steps they pick from: those that run in every run of the kind
# (train only with --no-cache: it is reused when its data and parameters are).
ANCHORED = {"mlflow_restart", "step_kill", "store_read_only", "store_full", "hand_promotion"}
ANCHORS = {"training": ["check", "evaluate", "register", "register"], "batch": ["download", "score"],
           "monitor": ["download", "clean", "monitor"]}
STRONG = [["learner=random_forest", f"n_estimators={n}", f"max_depth={d}"]
          for n in (8, 10, 12, 15) for d in (8, 10, 12)]
MEDIUM = [["learner=random_forest", "n_estimators=4", "max_depth=5"]]
INVARIANTS = {"1 prod moves": "prod moved only by a successful run that beat it, or by a person",
              "2 versions": "every registered version complete (model, lineage, decision, card)",
              "3 no orphans": "no run RUNNING once its owner is gone",
              "4 serving": "no 5xx but 503 while loading; no request lost"}
# What register (components/promotion.py) puts on a version when it creates it, in the same call: lineage.
LINEAGE_TAGS = ["kfp_run_id", "test_mae", "test_r2", "test_coverage", "coverage", "data_source", "data_sha256",
                "data_uri", "reference_data", "city", "city_profile", "training_ids", "git_commit", "images",
                "parameters", "sweep_choice", "fingerprint"]
# ... and once it has decided: the decision and its evidence; the card is the version's description.
DECISION_TAGS = ["promotion", "comparison"]


def say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    number: int
    kind: str  # training, batch, monitor
    fault: str
    moment: float  # s after the run started, or with `step` after that step's process appeared
    hold: float  # s a fault lasts (MLflow down, the store read-only or full)
    params: list[str]
    step: str = ""  # the step the fault waits for ("": a moment after the start)
    partner: list[str] = field(default_factory=list)  # overlap: the second run's model parameters
    pick: float = 0.0  # hand_promotion: which of the other versions

    def describe(self) -> str:
        what = f" with {' '.join(self.partner[1:])}" if self.fault == "overlap" else ""
        hold = f" for {self.hold:.0f} s" if self.fault in ("mlflow_restart", "store_read_only", "store_full") else ""
        model = f" {' '.join(p for p in self.params if not p.startswith('learner'))}" if self.kind == "training" else ""
        when = "" if self.fault == "none" else f" {self.moment:.1f} s after {self.step or 'the start'}"
        cache = " (--no-cache)" if self.no_cache else ""
        return f"run {self.number:2d}: {self.kind}{model}{cache}; {self.fault}{what}{when}{hold}"

    @property
    def no_cache(self) -> bool:
        return self.step == "train"

    @property
    def label(self) -> str:
        return f"{self.fault}@{self.step}" if self.step else self.fault


def model_params(rng: random.Random) -> list[str]:
    tier = rng.choices(["strong", "medium", "weak"], weights=[50, 25, 25])[0]
    return rng.choice(STRONG) if tier == "strong" else MEDIUM[0] if tier == "medium" else WEAK


def make_plan(runs: int, seed: int) -> list[Plan]:
    """Run 1 a clean training run; then faults round-robin over a shuffled list, so each comes runs // 8 times or
    more; kind, parameters and moments drawn per run (the plan of n runs is the start of the plan of n + 1)."""
    rng = random.Random(seed)
    plans, queue = [Plan(1, "training", "none", 0.0, 0.0, MEDIUM[0])], []
    for number in range(2, runs + 1):
        if not queue:
            queue = FAULTS[:]
            rng.shuffle(queue)
        fault = queue.pop()
        kind = "training" if fault == "overlap" else rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
        step = ""
        if fault in ANCHORED:
            step = rng.choice(ANCHORS[kind] + (["train"] if fault == "step_kill" and kind == "training" else []))
            moment = rng.uniform(0, 1.5)
        else:
            moment = rng.uniform(0, 10 if fault == "overlap" else 5)
        hold = rng.uniform(1, 5) if fault == "mlflow_restart" else rng.uniform(3, 15)
        plans.append(Plan(number, kind, fault, moment, hold, model_params(rng) if kind == "training" else [],
                          step=step, partner=model_params(rng), pick=rng.random()))
    return plans


# ---------------------------------------------------------------- the servers and the store


class MlflowServer:
    """`mlflow server` on a fixed port, its process group killed and started again by mlflow_restart."""

    def __init__(self, home: Path, port: int):
        self.home, self.port, self.uri, self.process = home, port, f"http://127.0.0.1:{port}", None
        self.log = home / "server.log"

    def start(self) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", f"sqlite:///{self.home}/mlflow.db",
                 "--artifacts-destination", str(self.home / "artifacts")],
                cwd=self.home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def answers(self) -> bool:
        """Its API answers (a call that reads its database, as the Makefile waits for), not only /health."""
        try:
            return requests.get(f"{self.uri}/api/2.0/mlflow/experiments/get-by-name",
                                params={"experiment_name": "Default"}, timeout=10).ok
        except requests.RequestException:
            return False

    def wait_up(self, timeout: float = 180) -> None:
        """Until it answers; started again first if its process is gone (a fault left it down)."""
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                self.start()
            if time.monotonic() > deadline:
                raise TimeoutError(f"MLflow did not answer at {self.uri} within {timeout} s (log: {self.log})")
            time.sleep(0.5)


class Store:
    """The artifact store: a tmpfs of its own, made full by a filler file or read-only by a remount."""

    def __init__(self, path: Path, size_mb: int):
        self.path, self.size_mb, self.filler, self.mounted = path, size_mb, path / ".soak-filler", False

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)], check=True)
        self.mounted = True

    def remount(self, mode: str, timeout: float = 10) -> int:
        """Remount ro or rw; a remount ro is refused (EBUSY) while a file is open for writing: tried again.
        Returns the attempts it took."""
        deadline, attempts = time.monotonic() + timeout, 0
        while True:
            attempts += 1
            done = subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], capture_output=True, text=True,
                                  check=False)
            if done.returncode == 0:
                return attempts
            if time.monotonic() > deadline:
                raise RuntimeError(f"mount -o remount,{mode} {self.path}: {done.stderr.strip()}")
            time.sleep(0.05)

    def fill(self) -> int:
        """Allocate every free byte (again if something wrote meanwhile); returns the bytes allocated."""
        for _ in range(20):
            stat = os.statvfs(self.path)
            free = stat.f_bavail * stat.f_frsize
            if free == 0:
                break
            grown = self.filler.stat().st_size + free if self.filler.exists() else free
            subprocess.run(["fallocate", "-l", str(grown), str(self.filler)], capture_output=True, check=False)
        return self.filler.stat().st_size if self.filler.exists() else 0

    def restore(self) -> None:
        """Writable and empty of the filler, whatever a fault left."""
        if self.mounted:
            self.remount("rw")
            self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted and subprocess.run(["umount", str(self.path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
        self.mounted = False


class ModelServer:
    """`python -m components.serve` on prod; each (re)start is a new generation, for invariant 4."""

    def __init__(self, model: str, port: int, home: Path, env: dict):
        self.model, self.port, self.home, self.env = model, port, home, env
        self.url, self.process, self.generation, self.started = f"http://127.0.0.1:{port}", None, 0, {}

    def start(self) -> None:
        with (self.home / "serve.log").open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "components.serve", "--model", self.model, "--port", str(self.port),
                 "--cache", str(self.home / "serve-cache")],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.generation += 1
        self.started[self.generation] = time.time()

    def stop(self, timeout: float = 60) -> str:
        """SIGTERM (uvicorn finishes what is in flight), SIGKILL if it has not ended within `timeout`."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
            return f"ended {self.process.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return f"did not end within {timeout:.0f} s of SIGTERM: killed"


@dataclass
class Request:
    sent: float
    took: float
    rows: int
    outcome: str  # the status code, "refused", "lost" or "connect-timeout"
    detail: str
    generation: int


class LoadGenerator(threading.Thread):
    """One request after another to the model server: one row (most) or 2-20 rows, each outcome recorded."""

    def __init__(self, server: ModelServer, listings: pd.DataFrame, seed: int):
        super().__init__(name="load", daemon=True)
        self.server, self.listings, self.rng = server, listings, random.Random(seed)
        self.records: list[Request] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            rows = 1 if self.rng.random() < 0.7 else self.rng.randint(2, 20)
            start = self.rng.randrange(len(self.listings) - rows)
            body = payload(self.listings.iloc[start:start + rows])
            generation, sent = self.server.generation, time.time()
            outcome, detail = self.send(body)
            self.records.append(Request(sent, time.time() - sent, rows, outcome, detail, generation))
            self.stopping.wait(0.2 if outcome == "refused" else 0.05)

    def send(self, body: dict) -> tuple[str, str]:
        """A new connection per request (no keep-alive: a client's stale pooled connection is not the server's
        doing)."""
        try:
            response = requests.post(f"{self.server.url}/invocations", json=body, timeout=(3, 30),
                                     headers={"Connection": "close"})
            return str(response.status_code), response.text[:200] if not response.ok else ""
        except requests.ConnectTimeout as exc:
            return "connect-timeout", str(exc)[:200]
        except requests.ReadTimeout as exc:
            return "lost", f"no answer within 30 s: {str(exc)[:150]}"
        except requests.ConnectionError as exc:
            cause = exc.args[0] if exc.args else exc
            cause = getattr(cause, "reason", cause)
            if isinstance(cause, urllib3.exceptions.NewConnectionError):
                return "refused", ""
            return "lost", f"{type(cause).__name__}: {str(cause)[:200]}"


class RegistryWatcher(threading.Thread):
    """Polls the registry twice a second (plain REST, short timeouts, nothing while MLflow is down): where prod is,
    and when each version first appeared, first had its card (description), and was gone (deleted)."""

    def __init__(self, uri: str, name: str):
        super().__init__(name="watcher", daemon=True)
        self.uri, self.name = uri, name
        self.prod: list[tuple[float, str | None]] = []  # (time, version) at each change seen
        self.seen: dict[str, float] = {}
        self.carded: dict[str, float] = {}
        self.deleted: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            with contextlib.suppress(requests.RequestException, ValueError, KeyError):
                self.poll()

    def poll(self) -> None:
        now = time.time()
        model = requests.get(f"{self.uri}/api/2.0/mlflow/registered-models/get", params={"name": self.name},
                             timeout=3)
        if model.status_code == 404 or (not model.ok and "RESOURCE_DOES_NOT_EXIST" in model.text):
            return
        model.raise_for_status()
        aliases = {a["alias"]: a["version"] for a in model.json()["registered_model"].get("aliases", [])}
        if not self.prod or self.prod[-1][1] != aliases.get("prod"):
            self.prod.append((now, aliases.get("prod")))
        found = requests.get(f"{self.uri}/api/2.0/mlflow/model-versions/search",
                             params={"filter": f"name = '{self.name}'", "max_results": 1000}, timeout=3)
        found.raise_for_status()
        versions = found.json().get("model_versions", [])
        for version in versions:
            self.seen.setdefault(version["version"], now)
            if version.get("description"):
                self.carded.setdefault(version["version"], now)
        for gone in set(self.seen) - {version["version"] for version in versions}:
            self.deleted.setdefault(gone, now)

    def prod_during(self, start: float, end: float) -> list[str | None]:
        return [version for t, version in self.prod if start <= t <= end]


# ---------------------------------------------------------------- one run


@dataclass
class Live:
    """A run while it runs: its process, its overlap partner, what the fault did."""

    plan: Plan
    process: subprocess.Popen
    started: float
    output: Path
    partner: subprocess.Popen | None = None
    partner_output: Path | None = None
    injected_at: float | None = None  # s after the start
    step_pid: int = 0  # the process of plan.step, once it appeared
    appeared: float = 0.0  # when it appeared, s after the start
    note: str = ""
    hands: list[str] = field(default_factory=list)  # versions promoted by hand during the run

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_until(self, moment: float) -> bool:
        """Sleep until `moment` s after the start; False if the run ended first."""
        while time.time() < self.started + moment:
            if not self.running():
                return False
            time.sleep(0.05)
        return self.running()

    def reach_step(self) -> bool:
        """Wait for the process of plan.step, then plan.moment more; False if the run ended first."""
        while self.running():
            try:
                self.step_pid = step_process(self.process.pid, self.plan.step)
            except LookupError:
                time.sleep(0.1)
                continue
            self.appeared = time.time() - self.started
            time.sleep(self.plan.moment)
            return self.running()
        return False

    def act(self) -> None:
        self.injected_at = time.time() - self.started


@dataclass
class Result:
    plan: Plan
    code: str
    partner_code: str
    seconds: float
    prod_before: str | None
    prod_after: str | None
    injected_at: float | None
    note: str
    left_running: int = 0
    violations: list[tuple[str, str]] = field(default_factory=list)


class Soak:
    """Everything a run, a fault and a check need: the servers, the store, the data, what was seen so far."""

    def __init__(self, home: Path, seed: int):
        self.home, self.seed, self.name = home, seed, f"soak-{seed}"
        self.store = Store(home / "artifacts", STORE_MB)
        self.mlflow = MlflowServer(home, free_port())
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": self.mlflow.uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
                    "MLFLOW_SERVER_LOG": str(self.mlflow.log), tracking.LEASE_ENV: str(LEASE),
                    "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.train_csv, self.other_csv = home / "listings.csv", home / "other.csv"
        self.serve: ModelServer | None = None
        self.load: LoadGenerator | None = None
        self.watcher = RegistryWatcher(self.mlflow.uri, self.name)
        self.live: list[subprocess.Popen] = []
        self.reported: set[str] = set()  # problems already counted (each once)
        self.models_ok: set[str] = set()  # versions whose model files were downloaded and checked
        self.checked_requests = 0

    def setup(self) -> None:
        sample = pd.read_csv(SAMPLE)
        sample.head(TRAIN_ROWS).to_csv(self.train_csv, index=False)
        sample.iloc[TRAIN_ROWS:TRAIN_ROWS + OTHER_ROWS].to_csv(self.other_csv, index=False)
        self.store.mount()
        os.environ.update({k: self.env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                                                      tracking.LEASE_ENV, "MLFLOW_DISABLE_TELEMETRY")})
        # This process's MLflow calls give up as the steps' do, not after MLflow's 17 minutes.
        os.environ.update(tracking.CLIENT_LIMITS)
        mlflow.set_tracking_uri(self.mlflow.uri)
        self.mlflow.start()
        self.mlflow.wait_up()
        self.watcher.start()

    def start_serving(self) -> None:
        """The model server and its load, once a prod exists."""
        self.serve = ModelServer(f"models:/{self.name}@prod", free_port(), self.home, self.env)
        self.serve.start()
        listings = numbers_from_text(parse_csv(self.other_csv.read_bytes(), "soak"))
        self.load = LoadGenerator(self.serve, listings, self.seed)
        self.load.start()

    def pipeline(self, kind: str, params: list[str], output: Path, no_cache: bool = False) -> subprocess.Popen:
        """`pipeline.py run` as a person starts it; its own session, so that a timeout kills its steps too."""
        params = {"training": [f"source={self.train_csv}", f"model_name={self.name}", *params],
                  "batch": [f"source={self.other_csv}", f"model=models:/{self.name}@prod", "max_rejected=1"],
                  "monitor": [f"source={self.other_csv}", f"model_name={self.name}"]}[kind]
        command = [sys.executable, "pipeline.py", "run", "--pipeline", kind, "--pipeline-root",
                   str(self.home / "outputs")] + (["--no-cache"] if no_cache else [])
        for param in params:
            command += ["--param", param]
        with output.open("w") as out:
            process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.live.append(process)
        return process

    def cleanup(self) -> None:
        """Every process this soak started ended, the store writable and unmounted: also on Ctrl-C or an error."""
        for process in self.live:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for thread in (self.load, self.watcher):
            if thread is not None:
                thread.stopping.set()
        if self.serve is not None and self.serve.process.poll() is None:
            self.serve.stop(timeout=20)
        with contextlib.suppress(Exception):
            self.store.restore()
        if self.mlflow.process is not None and self.mlflow.process.poll() is None:
            self.mlflow.kill()
        self.store.unmount()


def wait(process: subprocess.Popen, deadline: float) -> str:
    """Its exit code, or "timeout" once it was killed (its whole session) at the deadline."""
    try:
        return str(process.wait(timeout=max(1.0, deadline - time.time())))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout"


def run_once(soak: Soak, plan: Plan) -> Result:
    before = prod(soak)
    logs = soak.home / "logs"
    logs.mkdir(exist_ok=True)
    output = logs / f"run-{plan.number:02d}.txt"
    started = time.time()
    live = Live(plan, soak.pipeline(plan.kind, plan.params, output, plan.no_cache), started, output)
    injector = threading.Thread(target=inject, args=(soak, live), name="fault", daemon=True)
    injector.start()
    code = wait(live.process, started + RUN_TIMEOUT)
    ended = time.time()
    injector.join()  # the fault undone (the store writable, MLflow started again)
    partner_code = wait(live.partner, started + RUN_TIMEOUT + 10) if live.partner else ""
    seconds = (time.time() if live.partner else ended) - started
    soak.mlflow.wait_up()
    time.sleep(1.0)  # the watcher's last look at the registry before the checks
    after = prod(soak)
    outputs = {"main": (code, output.read_text())}
    if live.partner:
        outputs["partner"] = (partner_code, live.partner_output.read_text())
    result = Result(plan, code, partner_code, seconds, before, after, live.injected_at, live.note)
    window = (started, time.time())
    found = {"1 prod moves": check_prod_moves(soak, window, before, after, outputs, live.hands),
             "2 versions": check_versions_complete(soak)}
    result.left_running, found["3 no orphans"] = check_no_orphan_runs(soak)
    found["4 serving"] = check_serving(soak)
    for invariant, problems in found.items():
        for problem in problems:
            if problem not in soak.reported:
                soak.reported.add(problem)
                result.violations.append((invariant, problem))
    return result


def prod(soak: Soak) -> str | None:
    found = tracking.prod_version(soak.name)
    return found.version if found else None


# ---------------------------------------------------------------- the faults (each in the run's fault thread)


def inject(soak: Soak, live: Live) -> None:
    fault = live.plan.fault
    if fault == "none":
        return
    try:
        reached = live.reach_step() if live.plan.step else live.wait_until(live.plan.moment)
        if not reached:
            seen = f"; {live.plan.step} seen at {live.appeared:.1f} s" if live.appeared else ""
            live.note = f"not injected: the run ended at {time.time() - live.started:.1f} s, before its moment{seen}"
            return
        live.note = FAULT_FUNCTIONS[fault](soak, live)
        if live.plan.step and live.injected_at is not None:
            live.note += f" ({live.plan.step} appeared at {live.appeared:.1f} s)"
    except Exception as exc:  # the fault's own failure is reported, never silently taken for an injection
        live.note = f"the fault itself failed: {type(exc).__name__}: {exc}"
        traceback.print_exc()


def mlflow_restart(soak: Soak, live: Live) -> str:
    live.act()
    soak.mlflow.kill()
    time.sleep(live.plan.hold)
    soak.mlflow.start()
    return f"MLflow killed (SIGKILL to its group), started again {live.plan.hold:.1f} s later"


def step_kill(soak: Soak, live: Live) -> str:
    step, pid = live.plan.step, live.step_pid
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/comm").read_text().strip() == f"kfp:{step}":
            live.act()
            os.kill(pid, signal.SIGKILL)
            return f"SIGKILLed {step} (pid {pid})"
    return f"not injected: {step} (pid {pid}) ended within {live.plan.moment:.1f} s"


def store_read_only(soak: Soak, live: Live) -> str:
    attempts = soak.store.remount("ro")
    live.act()
    time.sleep(live.plan.hold)
    soak.store.remount("rw")
    busy = f" (read-only after {attempts} tries: EBUSY)" if attempts > 1 else ""
    return f"store read-only for {live.plan.hold:.1f} s{busy}"


def store_full(soak: Soak, live: Live) -> str:
    filled = soak.store.fill()
    live.act()
    time.sleep(live.plan.hold)
    soak.store.filler.unlink(missing_ok=True)
    return f"store full ({filled / 2**20:.0f} MiB filler) for {live.plan.hold:.1f} s"


def serve_restart(soak: Soak, live: Live) -> str:
    if soak.serve is None:
        return "not injected: no model server yet"
    live.act()
    stopped, took = soak.serve.stop(), time.time()
    soak.serve.start()
    return f"model server SIGTERMed ({stopped} after {took - live.started - live.injected_at:.1f} s), started again"


def overlap(soak: Soak, live: Live) -> str:
    live.act()
    live.partner_output = live.output.with_name(live.output.stem + "-partner.txt")
    live.partner = soak.pipeline("training", live.plan.partner, live.partner_output)
    return f"second training run started ({' '.join(live.plan.partner[1:])})"


def hand_promotion(soak: Soak, live: Live) -> str:
    versions = sorted((v.version for v in MlflowClient().search_model_versions(f"name = '{soak.name}'")), key=int)
    current = prod(soak)
    others = [v for v in versions if v != current] or versions
    if not others:
        return "not injected: no version to promote"
    version = others[int(live.plan.pick * len(others))]
    live.hands.append(version)  # before the call: a promotion that lands counts even if the call then fails
    live.act()
    said = tracking.promote(soak.name, version)
    return f"hand promotion: {said}"


FAULT_FUNCTIONS = {"mlflow_restart": mlflow_restart, "step_kill": step_kill, "store_read_only": store_read_only,
                   "store_full": store_full, "serve_restart": serve_restart, "overlap": overlap,
                   "hand_promotion": hand_promotion}


# ---------------------------------------------------------------- the invariants


def check_prod_moves(soak: Soak, window: tuple[float, float], before: str | None, after: str | None,
                     outputs: dict[str, tuple[str, str]], hands: list[str]) -> list[str]:
    """Invariant 1: each move of prod seen in the window (before, the watcher's sightings, after) lands on a version
    a person chose in the window or one a run that exited 0 says it made prod, having beaten prod."""
    problems = []
    claims = {}  # version -> the run (pipeline run id) that exited 0 saying it is now prod
    ids = {}
    for which, (code, out) in outputs.items():
        kfp = re.search(r"pipeline run (local-\w+)", out)
        ids[kfp.group(1) if kfp else which] = code
        said = re.search(r"registered model '[^']+' version (\d+): now prod", out)
        if said and code == "0":
            claims[said.group(1)] = kfp.group(1) if kfp else which
    client = MlflowClient()
    seen = [before, *soak.watcher.prod_during(*window), after]
    moves = [(a, b) for a, b in itertools.pairwise(seen) if a != b]
    for a, b in dict.fromkeys(moves):
        if b in hands or b in claims:
            continue
        if b is None:
            problems.append(f"prod {a}→none: the alias was removed")
            continue
        tags = client.get_model_version(soak.name, b).tags
        by = tags.get(tracking.PROMOTED_BY_TAG, "?")
        failed = {kfp: code for kfp, code in ids.items() if code != "0"}
        problems.append(f"prod {a}→{b} by {by!r} (promotion: {tags.get('promotion', '-')[:150]!r}), neither a hand "
                        f"promotion of this window ({hands or 'none'}) nor a successful run's; runs that failed: "
                        f"{failed or 'none'}")
    for version, kfp in claims.items():
        reason = client.get_model_version(soak.name, version).tags.get("promotion", "")
        if not ("better than prod" in reason or reason == "no prod model yet" or reason.startswith("already prod")):
            problems.append(f"{kfp} says version {version} is now prod, but its promotion tag says {reason[:150]!r}")
    return problems


def check_versions_complete(soak: Soak) -> list[str]:
    """Invariant 2: every version READY, with its lineage, its decision and card, and its model's files."""
    problems = []
    for v in MlflowClient().search_model_versions(f"name = '{soak.name}'"):
        what = f"version {v.version} ({v.tags.get('kfp_run_id', 'no run id')})"
        if v.status != "READY":
            problems.append(f"{what}: status {v.status}")
        missing = [tag for tag in LINEAGE_TAGS if tag not in v.tags]
        if missing:
            problems.append(f"{what}: lineage tags missing: {', '.join(missing)}")
        missing = [tag for tag in DECISION_TAGS if not v.tags.get(tag)] + ([] if v.description else ["card"])
        if missing:
            problems.append(f"{what}: no {', '.join(missing)} (register did not finish with it)")
        if v.version not in soak.models_ok:
            problem = model_files_problem(soak, v.version)
            if problem:
                problems.append(f"{what}: model not downloadable: {problem}")
            else:
                soak.models_ok.add(v.version)
    return problems


def model_files_problem(soak: Soak, version: str) -> str:
    """'' when models:/NAME/VERSION downloads with its MLmodel and the skops file that names, else what is wrong."""
    target = soak.home / "check" / version
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    try:
        path = Path(mlflow.artifacts.download_artifacts(f"models:/{soak.name}/{version}", dst_path=str(target)))
        flavor = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["sklearn"]
        model_file = path / flavor["pickled_model"]
        if not model_file.is_file() or model_file.stat().st_size == 0:
            return f"{flavor['pickled_model']} missing or empty"
        return ""
    except Exception as exc:  # whatever it is, the version is not complete: said, never raised
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        shutil.rmtree(target, ignore_errors=True)


def check_no_orphan_runs(soak: Soak) -> tuple[int, list[str]]:
    """Invariant 3: once the lease is out, close_abandoned_runs (as any later run calls it) leaves none RUNNING.
    Returns how many were RUNNING before it, and the problems."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return 0, []

    def running():
        return MlflowClient().search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          max_results=1000)

    left = running()
    if left:
        beats = [float(r.data.tags.get(tracking.HEARTBEAT_TAG) or r.info.start_time / 1000) for r in left]
        time.sleep(max(0.0, min(max(beats) + LEASE + 1 - time.time(), LEASE + 1)))
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a link for each run it ends
            tracking.close_abandoned_runs()
    return len(left), [f"MLflow run {r.info.run_id} ({r.data.tags.get(tracking.STEP_TAG, '?')} of "
                       f"{r.data.tags.get(tracking.RUN_ID_TAG, '?')}, owner {r.data.tags.get(tracking.OWNER_TAG, '?')})"
                       f" still RUNNING after close_abandoned_runs" for r in running()]


def check_serving(soak: Soak) -> list[str]:
    """Invariant 4 on the requests since the last check: no 5xx but 503, a 503 only before the first answer of
    its server's generation (and within 120 s of its start), nothing lost."""
    if soak.load is None:
        return []
    records = soak.load.records
    new, soak.checked_requests = records[soak.checked_requests:], len(records)
    first_ok = {}
    for r in records:
        if r.outcome == "200":
            first_ok.setdefault(r.generation, r.sent + r.took)
    problems = []
    for r in new:
        when = time.strftime("%H:%M:%S", time.localtime(r.sent)) + f".{int(r.sent % 1 * 1000):03d}"
        since = r.sent - soak.serve.started.get(r.generation, r.sent)
        if r.outcome == "lost":
            problems.append(f"request at {when} ({r.rows} rows, server generation {r.generation}, {since:.1f} s "
                            f"after its start) lost: {r.detail}")
        elif r.outcome.isdigit() and int(r.outcome) >= 500 and r.outcome != "503":
            problems.append(f"request at {when} answered {r.outcome}: {r.detail}")
        elif r.outcome == "503" and (r.sent > first_ok.get(r.generation, float("inf")) or since > 120):
            problems.append(f"request at {when} answered 503 {since:.1f} s after generation {r.generation} started "
                            f"(it had answered 200 since, or 120 s passed): {r.detail}")
    return problems


# ---------------------------------------------------------------- the report


def line(result: Result, runs: int) -> str:
    p = result.plan
    at = f"@{result.injected_at:5.1f} s" if result.injected_at is not None else "  (none) "
    code = result.code + (f"/{result.partner_code}" if result.partner_code else "")
    ok = "ok" if not result.violations else f"{len(result.violations)} VIOLATION(S)"
    left = f", {result.left_running} left RUNNING" if result.left_running else ""
    return (f"run {p.number:2d}/{runs} {p.kind:<8} {p.label:<24} "
            f"{at}  exit {code:<5} {result.seconds:5.1f} s  prod {result.prod_before}→{result.prod_after}  "
            f"{ok}{left}")


def summary(results: list[Result], soak: Soak, plans: list[Plan], started: float) -> list[str]:
    out = ["", "per fault:", f"  {'fault':<16} {'planned':>7} {'injected':>8} {'violations':>10}"]
    for fault in FAULTS:
        done = [r for r in results if r.plan.fault == fault]
        injected = sum(r.injected_at is not None for r in done) if fault != "none" else len(done)
        out.append(f"  {fault:<16} {sum(p.fault == fault for p in plans):>7} {injected:>8} "
                   f"{sum(len(r.violations) for r in done):>10}")
    out += ["", "per invariant:"]
    for invariant, text in INVARIANTS.items():
        count = sum(1 for r in results for i, _ in r.violations if i == invariant)
        out.append(f"  {invariant:<13} {count:>3}  {text}")
    left = [r for r in results if r.left_running]
    out.append(f"\nMLflow runs left RUNNING before close_abandoned_runs: {sum(r.left_running for r in left)} after "
               f"{len(left)} run(s) ({', '.join(f'run {r.plan.number} ({r.plan.fault})' for r in left) or 'none'})")
    records = soak.load.records if soak.load else []
    counts: dict[str, int] = {}
    for r in records:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    out.append(f"load generator: {len(records)} requests" + "".join(f", {k}: {v}" for k, v in sorted(counts.items()))
               + (f"; server generations: {soak.serve.generation}" if soak.serve else "; no model server started"))
    if soak.serve:
        out.append("model server (re)starts, from the start to its first 200: " + "; ".join(
            f"{g}: {unavailable(records, g, t)}" for g, t in soak.serve.started.items()))
    windows = {v: soak.watcher.carded.get(v, float("inf")) - t for v, t in soak.watcher.seen.items()}
    uncarded = sorted((v for v, w in windows.items() if w == float("inf")), key=int)
    later = sorted(((w, v) for v, w in windows.items() if 0 < w < float("inf")), reverse=True)
    gone = soak.watcher.deleted
    out.append(f"versions: {len(windows)} registered, {len(gone)} deleted since; seen by the watcher (every 0.5 s, "
               "not while MLflow is down) without their card, then carded: "
               f"{len(later)} (longest " + (", ".join(f"v{v} {w:.1f} s" for w, v in later[:3]) or "-") + "); never "
               f"carded: {', '.join('v' + v + (' (deleted)' if v in gone else '') for v in uncarded) or 'none'}")
    out.append(f"wall time {(time.time() - started) / 60:.1f} min for {len(results)} runs")
    return out


def unavailable(records: list[Request], generation: int, started: float) -> str:
    """How long a model server generation took to answer 200, and what its clients got meanwhile."""
    mine = [r for r in records if r.generation == generation]
    ok = next((r for r in mine if r.outcome == "200"), None)
    before = [r.outcome for r in mine if ok is None or r.sent < ok.sent]
    got = ", ".join(f"{o} x{before.count(o)}" for o in sorted(set(before))) or "nothing"
    return (f"{ok.sent + ok.took - started:.1f} s" if ok else "never") + f" ({got})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=60, help="no new run starts past this")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (kept anyway on a violation)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        say("soak: needs root (it mounts a tmpfs for the artifact store)")
        return 2
    python = Path(sys.executable)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    command = (f"{python} tests/soak.py --runs {args.runs} --seed {args.seed} --minutes {args.minutes:g}"
               + (" --keep" if args.keep else ""))
    plans = make_plan(args.runs, args.seed)
    home = Path(tempfile.mkdtemp(prefix=f"soak-{args.seed}-"))
    say(f"soak: seed {args.seed}, {args.runs} runs, no new run after {args.minutes:g} min; command: {command}",
        f"folder: {home}", "plan:", *(f"  {p.describe()}" for p in plans))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: clean up, report what ran
    soak, results, started, interrupted = Soak(home, args.seed), [], time.time(), False
    try:
        soak.setup()
        say(f"MLflow at {soak.mlflow.uri}, artifacts on a {STORE_MB} MiB tmpfs at {soak.store.path}", "")
        for plan in plans:
            if time.time() - started > args.minutes * 60:
                say(f"--minutes {args.minutes:g} passed: no more runs ({len(results)} of {args.runs} ran)")
                break
            result = run_once(soak, plan)
            results.append(result)
            say(line(result, args.runs))
            if result.note:
                say(f"      fault: {result.note}")
            for invariant, problem in result.violations:
                say(f"      VIOLATION {invariant}: {problem}")
            if soak.serve is None and result.prod_after is not None:
                soak.start_serving()
                say(f"      model server on {soak.serve.url} serving models:/{soak.name}@prod, under load")
    except KeyboardInterrupt:
        interrupted = True
        say(f"\ninterrupted during run {len(results) + 1}: its processes, the servers and the store cleaned up")
    finally:
        soak.cleanup()
    violated = any(r.violations for r in results)
    say(*summary(results, soak, plans, started), f"seed {args.seed}; command: {command}")
    if violated or interrupted or args.keep:
        say(f"kept: {home} (logs/ has each run's output; server.log, serve.log)")
    else:
        shutil.rmtree(home, ignore_errors=True)
    say("RESULT: " + ("invariants violated" if violated else "no invariant violated")
        + (f" in the {len(results)} runs that ended before the interruption" if interrupted else ""))
    return 1 if violated else 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
