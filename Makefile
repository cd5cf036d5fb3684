# NYC rental-price pipeline. `make help` lists the targets; every ?= variable can be overridden:
#   make run DATA_URL=/path/to/listings.csv PARAMS="learning_rate=0.05" SWEEP="max_leaf_nodes=15,31,63"
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# The Python of the venv: python3 if the project supports it (pyproject.toml: 3.11 to 3.13), else the first of
# python3.13, python3.12, python3.11 that is there. `make PYTHON=/path/to/python3.12 ...` chooses one.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3 python3.13 python3.12 python3.11; do \
  command -v $$p >/dev/null 2>&1 && $$p manifests/preflight.py --python >/dev/null 2>&1 && { echo $$p; break; }; \
  done)
endif
VENV ?= .venv
PY := $(VENV)/bin/python

# Local MLflow server (sqlite + artifact folder on 127.0.0.1), started by `make mlflow` when none answers; one worker
# process (MLflow's default is four): a run is faster against it (bench: 17.9 s against 20.6 s) and it starts sooner.
#: the port of the local MLflow server make starts (another one is already on 5000: MLFLOW_PORT=5001)
MLFLOW_PORT ?= 5000
#: the MLflow server the runs use; a 127.0.0.1 or localhost address is started when nothing answers there
MLFLOW_TRACKING_URI ?= http://127.0.0.1:$(MLFLOW_PORT)
#: where the local MLflow server keeps its database, artifacts and log
MLFLOW_DIR ?= .mlflow
# A step whose artifacts MLflow refuses quotes the cause from the log of the server make started (tracking.py).
export MLFLOW_SERVER_LOG ?= $(abspath $(MLFLOW_DIR))/server.log
export MLFLOW_TRACKING_URI
# MLflow's usage telemetry would call a public endpoint from every step and server: off everywhere.
export MLFLOW_DISABLE_TELEMETRY = true
# MLflow 3's job runner (GenAI scorers, trace rollups, none used here) starts 8 more processes with each server: about
# 20 s of CPU at every start and 1.3 GB more memory (measured: 2.6 GB against 0.8 GB with two workers). Off.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION = false

#: the listings to run on: a path, file://, http(s)://, s3:// or sample:// (default: the shipped sample)
DATA_URL ?=
#: pipeline parameters, e.g. PARAMS="learner=random_forest max_price=500" (a name it does not know lists them all)
PARAMS ?=
#: a grid of sweep trials, e.g. SWEEP="learning_rate=0.05,0.1 max_leaf_nodes=31,63" (4 trials); empty: one trial
SWEEP ?=
PIPELINE_SPEC ?= pipeline.yaml
BATCH_SPEC ?= pipeline-batch.yaml
MONITOR_SPEC ?= pipeline-monitor.yaml
#: batch scoring: the model version to price with, e.g. MODEL=3 (default: the prod version of MODEL_NAME)
MODEL ?=
# KFP API through a port-forward of the dashboard (make ui, or make submit opens one for itself).
KFP_PORT ?= 8081
KFP_HOST ?= http://127.0.0.1:$(KFP_PORT)
#: submit: WAIT=1 waits for the cluster run to end and prints its outcome
WAIT ?=
#: NO_CACHE=1 runs every step again instead of reusing the unchanged ones
NO_CACHE ?=
#: monitoring: RETRAIN=1 trains on the new listings when prod's error on them is worse (degraded); RETRAIN=shifted also when only distributions moved
RETRAIN ?=
#: monitoring: when DATA_URL is a model server's inference log (a folder, or an s3:// prefix ending in /), the hours of it read (0: all)
LOG_HOURS ?=
# When the cluster's recurring monitoring run starts: 5 cron fields (KFP's 6, seconds first, also do).
CRON ?= 0 6 * * *
# What it reads unless DATA_URL= says otherwise: the inference log the cluster's model server writes.
CLUSTER_INFERENCE_LOG ?= s3://inference-log/serving/
#: VERBOSE=1 prints kfp.local's whole output (every task's input and logs) instead of a line per step and a log file
VERBOSE ?=

# Serving (the same command runs locally, in the serving image and in the cluster's pod).
#: the local model server's port (serve-local, predict)
PORT ?= 8080
#: the registered model the targets are about
MODEL_NAME ?= rental-price
MODEL_URI ?= models:/$(MODEL_NAME)@prod
PREDICT_URL ?= http://127.0.0.1:$(PORT)
#: promote: the version to make prod, e.g. VERSION=3
VERSION ?=
#: serve-local: the model server's worker processes
SERVE_WORKERS ?= 1
#: serve-local: log every priced row (request data) to this folder or s3://bucket/prefix/, for make monitor DATA_URL=<it>; empty: off
INFERENCE_LOG ?=
DATA_ARG = $(if $(DATA_URL),--data $(DATA_URL))

# Images (names and tags come from images/images.toml through images/catalog.py, never from here).
BASE_IMAGE ?= python:3.11-slim-bookworm
OFFLINE_BASE_IMAGE ?= rental-price-base:bookworm
CA_CERTS_DIR ?= /usr/local/share/ca-certificates
IMAGE_NAMES ?=

# The kind cluster's targets (cluster, deploy, load-images, serve, ui, predict-cluster, down, checkov).
include manifests/cluster.mk

.PHONY: help venv mlflow mlflow-stop run run-docker compile submit predict-batch submit-batch monitor schedule \
        unschedule test test-tools test-fast test-core serve-local predict promote rollback bench bench-serve \
        soak base-image images test-images clean

help:  ## List the targets and the settings a run takes
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'
	@echo; echo "Settings (on the command line: make run MLFLOW_PORT=5001 PARAMS=\"learner=random_forest\"):"
	@awk '/^#: /{doc = substr($$0, 4); next} doc && /^[A-Z_]+ \?=/{split($$0, kv, / \?= ?/); \
	  printf "  %-20s %s%s\n", kv[1], doc, kv[2] == "" ? "" : " [" kv[2] "]"} {doc = ""}' $(MAKEFILE_LIST)

# A mistyped target: one line naming the nearest (a file without a rule, like pyproject.toml, is left alone).
.DEFAULT:
	$(if $(wildcard $@),,$(error no target '$@'$(shell python3 -c 'import difflib, sys; m = difflib.get_close_matches(sys.argv[1], sys.argv[2:], 1); print(f"; did you mean {m[0]}?" if m else "")' $@ $(shell grep -hoE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | cut -d: -f1)) (make help lists them)))

$(VENV)/.installed: pyproject.toml constraints.txt
	@[ -n "$(PYTHON)" ] || { echo "no Python 3.11 to 3.13 found (python3 is $$(python3 --version 2>&1 || echo missing)):" \
	  "install one, or name it: make PYTHON=/path/to/python3.12 ..." >&2; exit 1; }
	@$(PYTHON) manifests/preflight.py --python >&2
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	@# setuptools warns of any editable install that folders beside the package could be imported: not actionable.
	PYTHONWARNINGS='ignore:Editable installation' $(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed  ## Create the Python environment (.venv, pinned by constraints.txt)

# Ready means its API answers (a call that reads its database), not only /health: the first call after a start can
# take seconds on a busy machine, and a step's 5-s read timeout would fail on it.
MLFLOW_READY = --max-time 30 $(MLFLOW_TRACKING_URI)/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default
MLFLOW_START_SECONDS ?= 180

mlflow: venv  ## Start a local MLflow server on MLFLOW_PORT unless one answers at MLFLOW_TRACKING_URI
	@if curl -sf -o /dev/null $(MLFLOW_READY); then \
	  echo "MLflow answers at $(MLFLOW_TRACKING_URI): reusing it"; \
	elif ! [[ "$(MLFLOW_TRACKING_URI)" =~ ^http://(127\.0\.0\.1|localhost):([0-9]+)/?$$ ]]; then \
	  echo "MLflow does not answer at $(MLFLOW_TRACKING_URI): start it there, or leave MLFLOW_TRACKING_URI unset" \
	    "and make starts one on 127.0.0.1:$(MLFLOW_PORT) (another port: MLFLOW_PORT=5001)" >&2; exit 1; \
	else \
	  port=$${BASH_REMATCH[2]}; mkdir -p $(MLFLOW_DIR); \
	  setsid nohup $(VENV)/bin/mlflow server --host 127.0.0.1 --port $$port --workers 1 \
	    --backend-store-uri sqlite:///$(abspath $(MLFLOW_DIR))/mlflow.db \
	    --artifacts-destination $(abspath $(MLFLOW_DIR))/artifacts >$(MLFLOW_DIR)/server.log 2>&1 & \
	  echo $$! >$(MLFLOW_DIR)/server.pid; \
	  echo "starting MLflow at $(MLFLOW_TRACKING_URI) (data and log in $(MLFLOW_DIR)/)"; \
	  if ! curl -sf -o /dev/null --retry $(MLFLOW_START_SECONDS) --retry-max-time $(MLFLOW_START_SECONDS) \
	      --retry-connrefused --retry-delay 1 $(MLFLOW_READY); then \
	    tail -n 5 $(MLFLOW_DIR)/server.log >&2; $(MAKE) --no-print-directory mlflow-stop >/dev/null; \
	    echo "MLflow did not answer at $(MLFLOW_TRACKING_URI) within $(MLFLOW_START_SECONDS) s, so it was stopped;" \
	      "its log: $(abspath $(MLFLOW_DIR))/server.log (its last lines are above)" >&2; exit 1; \
	  fi; \
	  echo "started MLflow at $(MLFLOW_TRACKING_URI) (stop: make mlflow-stop)"; \
	fi

mlflow-stop:  ## Stop the local MLflow server started by `make mlflow`; returns once its processes are gone
	@if [ -f $(MLFLOW_DIR)/server.pid ]; then \
	  group=$$(cat $(MLFLOW_DIR)/server.pid); kill -- -$$group 2>/dev/null || true; \
	  for _ in $$(seq 100); do kill -0 -- -$$group 2>/dev/null || break; sleep 0.2; done; \
	  kill -KILL -- -$$group 2>/dev/null || true; rm -f $(MLFLOW_DIR)/server.pid; \
	  echo "stopped the local MLflow server (its data stays in $(MLFLOW_DIR)/)"; \
	else echo "no local MLflow server started here"; fi

RUN_PARAMS = $(if $(DATA_URL),--param source=$(DATA_URL)) $(foreach p,$(PARAMS),--param '$(p)') \
  $(if $(SWEEP),--sweep "$(SWEEP)")

run: venv mlflow  ## Run the whole pipeline locally (kfp.local, no cluster, no Docker); DATA_URL=, PARAMS=, SWEEP=, NO_CACHE=1, VERBOSE=1
	$(PY) pipeline.py run $(RUN_PARAMS) $(if $(NO_CACHE),--no-cache) $(if $(VERBOSE),--verbose)

run-docker: venv mlflow  ## Run the whole pipeline locally with every task in its image (make images first)
	$(PY) pipeline.py run --runner docker $(RUN_PARAMS) $(if $(VERBOSE),--verbose)

compile: venv  ## Compile the KFP pipeline specs: training, batch scoring and monitoring ($(PIPELINE_SPEC), $(BATCH_SPEC), $(MONITOR_SPEC))
	$(PY) pipeline.py compile --output $(PIPELINE_SPEC)
	$(PY) pipeline.py compile --pipeline batch --output $(BATCH_SPEC)
	$(PY) pipeline.py compile --pipeline monitor --output $(MONITOR_SPEC)

BATCH_PARAMS = $(if $(DATA_URL),--param source=$(DATA_URL)) $(if $(MODEL),--param model=$(MODEL)) \
  $(foreach p,$(PARAMS),--param '$(p)')

predict-batch: venv mlflow  ## Price every listing of DATA_URL with MODEL (default prod) locally; prints where the predictions are
	$(PY) pipeline.py run --pipeline batch $(BATCH_PARAMS) $(if $(VERBOSE),--verbose)

MONITOR_PARAMS = $(if $(DATA_URL),--param source=$(DATA_URL)) $(if $(RETRAIN),--param retrain=true) $(if $(filter shifted,$(RETRAIN)),--param retrain_on_shift=true) \
  $(if $(LOG_HOURS),--param log_hours=$(LOG_HOURS)) $(foreach p,$(PARAMS),--param '$(p)')

monitor: venv mlflow  ## New listings of DATA_URL against prod's data locally: prints the verdict (ok, shifted, degraded, suspect, invalid) and the report; RETRAIN=1
	$(PY) pipeline.py run --pipeline monitor $(MONITOR_PARAMS) $(if $(VERBOSE),--verbose)

# The KFP API at KFP_HOST as it is, or through a port-forward of the dashboard for the recipe's duration.
KFP_API = if ! curl -sf -o /dev/null $(KFP_HOST)/apis/v2beta1/healthz; then \
	  $(KUBECTL) port-forward -n kubeflow svc/ml-pipeline-ui $(KFP_PORT):80 >/dev/null & trap "kill $$!" EXIT; \
	  curl -sf -o /dev/null --retry 30 --retry-connrefused --retry-delay 1 $(KFP_HOST)/apis/v2beta1/healthz; \
	fi

submit: venv compile  ## Upload $(PIPELINE_SPEC) to KFP and start a run (port-forwards if needed); WAIT=1 waits, NO_CACHE=1 reuses nothing
	@$(KFP_API); \
	$(PY) pipeline.py submit --spec $(PIPELINE_SPEC) --host $(KFP_HOST) $(RUN_PARAMS) $(if $(WAIT),--wait) \
	  $(if $(NO_CACHE),--no-cache)

submit-batch: venv compile  ## Start a batch scoring run on KFP (DATA_URL= an s3:// source, MODEL=); outputs in MinIO; WAIT=1 waits
	@$(KFP_API); \
	$(PY) pipeline.py submit --pipeline batch --spec $(BATCH_SPEC) --host $(KFP_HOST) $(BATCH_PARAMS) $(if $(WAIT),--wait)

schedule: venv compile  ## Monitoring as a KFP recurring run at CRON, one run at a time, of the serving pod's inference log (DATA_URL= another s3:// source, RETRAIN=1)
	@$(KFP_API); \
	$(PY) pipeline.py schedule --cron "$(CRON)" --spec $(MONITOR_SPEC) --training-spec $(PIPELINE_SPEC) \
	  --host $(KFP_HOST) $(MONITOR_PARAMS) $(if $(DATA_URL),,--param source=$(CLUSTER_INFERENCE_LOG))

unschedule: venv  ## Remove the monitoring recurring run from KFP
	@$(KFP_API); \
	$(PY) pipeline.py unschedule --host $(KFP_HOST)

# Test processes at once (pytest-xdist), each with its own MLflow server; a module runs whole in one of them but for
# a few spread test by test, longest first (tests/conftest.py).
#: the processes the tests run in (pytest-xdist)
TEST_WORKERS ?= 2
# OpenMP's threads sleep when idle in the test processes: two workers each fitting a booster left them spinning on the
# core the other needed (test_model and test_promotion side by side: 268 s, 104 s). The same threads: the same figures.
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
TEST_ENV = $(if $(filter 1,$(TEST_WORKERS)),,OMP_WAIT_POLICY=PASSIVE)

test: test-tools venv checkov  ## Every test but the container tier: unit, compile, manifests, servers, pipeline runs (about 7 min)
	$(TEST_ENV) $(PY) -m pytest $(XDIST)

# The system tools the suite needs besides Python, each named with how to get it, before anything runs (one line).
TOOLS_MISSING = $(strip $(shell \
  kubectl version --client 2>/dev/null | grep -q '^Kustomize Version: v5' || echo "make test needs kubectl 1.27 or" \
    "later (its kustomize v5 builds manifests/; Debian's kubernetes-client is 1.20, too old):" \
    "https://kubernetes.io/docs/tasks/tools/;"; \
  { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null \
    || echo "make test needs Chromium (the browser tests): sudo apt-get install -y chromium"))
test-tools:
	@:$(if $(filter make,$(TOOLS_MISSING)),$(error $(TOOLS_MISSING)))

test-fast: venv checkov  ## The tests that need no server and run no pipeline (under a minute): run it while you edit
	$(TEST_ENV) $(PY) -m pytest $(XDIST) -m 'not server and not slow and not images'

# What CI runs on every supported Python besides the full suite on 3.11: no manifests (kubectl, checkov) or serving,
# one pipeline run (the city file's run and the whole-sample forest, `slow`, add nothing another Python could break).
CORE_TESTS ?= tests/test_sources.py tests/test_listings.py tests/test_checks.py tests/test_drift.py tests/test_cities.py \
  tests/test_model.py tests/test_reports.py tests/test_compile.py tests/test_cli.py tests/test_preflight.py tests/test_tracking.py \
  tests/test_promotion.py tests/test_warm.py tests/test_local.py::test_first_run_registers_a_prod_model_with_lineage
CORE_SKIP = --deselect tests/test_cities.py::test_a_city_file_in_todays_format_trains_and_registers_its_own_model
test-core: venv  ## Unit, compile and registry tests and one end-to-end run (CI: on Python 3.12 and 3.13 too)
	$(TEST_ENV) $(PY) -m pytest $(XDIST) -m 'not slow and not images' $(CORE_SKIP) $(CORE_TESTS)

serve-local: venv mlflow  ## Serve MODEL_URI (default the prod model) from the local MLflow server on PORT
	$(PY) -m components.serve --model $(MODEL_URI) --port $(PORT) --workers $(SERVE_WORKERS) \
	  $(if $(INFERENCE_LOG),--inference-log $(INFERENCE_LOG))

predict: venv  ## Send a few real listings to PREDICT_URL and print the predicted prices (DATA_URL= to choose them)
	$(PY) -m components.predict --url $(PREDICT_URL) $(DATA_ARG)

promote: venv  ## Move alias prod to VERSION= of MODEL_NAME
	@[ -n "$(VERSION)" ] || { echo "make promote: say which version: make promote VERSION=3" >&2; exit 2; }
	$(PY) pipeline.py promote --model-name $(MODEL_NAME) --version $(VERSION)

rollback: venv  ## Move alias prod back to the version it replaced (previous-prod)
	$(PY) pipeline.py rollback --model-name $(MODEL_NAME)

BENCH_SIZES ?= 20000,100000,500000
bench: venv  ## Pipeline benchmark: per-step wall/compute/start-up/memory, cached re-run, 20k/100k/500k rows, model MAE
	$(PY) tests/bench_pipeline.py --sizes $(BENCH_SIZES)

bench-serve: venv mlflow  ## Serving benchmark on the prod model: latency, throughput, in-process floor (prints figures)
	$(PY) tests/bench_serve.py --model $(MODEL_URI) --workers $(SERVE_WORKERS) $(DATA_ARG)

#: soak: how many pipeline runs
RUNS ?= 30
#: soak: the seed that draws each run's kind, fault and moment
SEED ?= 1
soak: venv  ## Chaos soak (not in make test; root, for its mounts): RUNS runs with faults at random moments, invariants checked after each (about 15 min)
	$(PY) tests/soak.py --runs $(RUNS) --seed $(SEED)

base-image:  ## Build $(OFFLINE_BASE_IMAGE) with no registry: debootstrap, docker import, apt python3, CA_CERTS_DIR
	images/base-image.sh $(OFFLINE_BASE_IMAGE) $(CA_CERTS_DIR)

images:  ## Build every image (IMAGE_NAMES= for some) on BASE_IMAGE, and load them into the kind cluster if it exists
	$(PYTHON) -m images.catalog build --base-image $(BASE_IMAGE) $(IMAGE_NAMES)
	@if command -v $(KIND) >/dev/null && $(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)'; then \
	  $(MAKE) --no-print-directory load-images; fi

test-images: venv images  ## Image checks and the whole pipeline with every task in its image (needs Docker)
	$(PY) -m pytest -m images -s

clean:  ## Remove local run outputs (keeps .venv and the MLflow data)
	rm -rf local_outputs $(PIPELINE_SPEC) $(BATCH_SPEC) $(MONITOR_SPEC) .pytest_cache
