# The kind cluster: KFP 2.17.0, MinIO, MLflow and the model server (manifests/README.md). Included by the
# Makefile; every ?= variable can be overridden: make deploy KIND_CLUSTER=other WAIT_TIMEOUT=30m
#   make cluster deploy      # kind cluster, then every part in order, waiting for each
#   make images load-images  # the step and serve images, into the cluster's node
#   make serve ui            # the model server; port-forwards to the KFP UI and MLflow
#   make promote-cluster VERSION=3, make rollback-cluster   # move prod, and the model server with it
KIND ?= kind
DOCKER ?= docker
KIND_CLUSTER ?= rental-price
KIND_CONFIG ?= kind-config.yaml
# Always the kind cluster's context, never whatever kubectl points at.
KUBECTL ?= kubectl --context kind-$(KIND_CLUSTER)
WAIT_TIMEOUT ?= 900s
# Local port of MLflow's port-forward: not 5000, where `make mlflow` runs the local server. The KFP UI and the
# model server use the Makefile's KFP_PORT and PORT (make submit and make predict use them too).
MLFLOW_UI_PORT ?= 5001
# Local port of MinIO's port-forward while `make deploy` puts the shipped sample into bucket data.
MINIO_PORT ?= 9002
# Generated credentials of the cluster (git-ignored). MINIO_ROOT_USER/MINIO_ROOT_PASSWORD, when given, are used
# the first time it is written; later they must match it.
CLUSTER_SECRETS ?= manifests/.secrets.env
MINIO_ROOT_USER ?=
MINIO_ROOT_PASSWORD ?=
# checkov (tests/test_manifests.py) lives in its own venv: its pinned dependencies clash with the project's.
CHECKOV_VERSION ?= 3.3.30
CHECKOV_VENV ?= .venv/checkov

TOKEN = $(PYTHON) -c 'import secrets; print(secrets.token_hex(16))'
# Creates or updates Secret $$2 in namespace $$1 from KEY=VALUE lines on stdin (printf, a shell builtin: the
# values never appear in a command line or in make's output).
SECRET = secret() { $(KUBECTL) -n "$$1" create secret generic "$$2" --from-env-file=/dev/stdin --dry-run=client \
  -o yaml | $(KUBECTL) apply --server-side --field-manager=make-deploy -f - ; }

# A variable given on the command line must agree with $(CLUSTER_SECRETS) (read into the shell just before).
same-as-file = $(if $($(1)),{ [ "$$$(1)" = '$($(1))' ] || { echo "$(1) differs from $(CLUSTER_SECRETS)" >&2; exit 1; }; } &&)
# Access key and secret key of each MinIO user (the secret keys are printf arguments).
MINIO_USERS = KFP_ACCESS_KEY=kfp\nKFP_SECRET_KEY=%s\nMLFLOW_ACCESS_KEY=mlflow\nMLFLOW_SECRET_KEY=%s\nREADER_ACCESS_KEY=pipeline-reader\nREADER_SECRET_KEY=%s\nLOG_WRITER_ACCESS_KEY=inference-log-writer\nLOG_WRITER_SECRET_KEY=%s\n

.PHONY: preflight cluster deploy seed-data load-images serve promote-cluster rollback-cluster ui predict-cluster down checkov

preflight:  ## Check Python, Docker (CPUs, memory, disk), kind, kubectl, git and inotify limits for the cluster
	$(PYTHON) manifests/preflight.py --docker $(DOCKER) --kind $(KIND) --kubectl $(firstword $(KUBECTL))

cluster: preflight  ## Create the kind cluster $(KIND_CLUSTER) from $(KIND_CONFIG) (kept if it exists)
	@if $(KIND) get clusters | grep -qx '$(KIND_CLUSTER)'; then echo "kind cluster $(KIND_CLUSTER) exists"; \
	else $(KIND) create cluster --config $(KIND_CONFIG) --name $(KIND_CLUSTER) --wait 300s; fi

$(CLUSTER_SECRETS):
	@if $(KUBECTL) -n minio get secret minio-root >/dev/null 2>&1; then \
	  echo "the cluster has credentials but $@ is gone: restore it, or make down and start again" >&2; exit 1; fi
	@umask 077 && { \
	  echo "MINIO_ROOT_USER=$(or $(MINIO_ROOT_USER),minio-admin)"; \
	  echo "MINIO_ROOT_PASSWORD=$(or $(MINIO_ROOT_PASSWORD),$$($(TOKEN)))"; \
	  echo "KFP_SECRET_KEY=$$($(TOKEN))"; \
	  echo "MLFLOW_SECRET_KEY=$$($(TOKEN))"; \
	  echo "READER_SECRET_KEY=$$($(TOKEN))"; \
	  echo "LOG_WRITER_SECRET_KEY=$$($(TOKEN))"; \
	  echo "POSTGRES_PASSWORD=$$($(TOKEN))"; \
	  echo "MLFLOW_ADMIN_PASSWORD=$$($(TOKEN))"; \
	  echo "MLFLOW_FLASK_SECRET_KEY=$$($(TOKEN))"; \
	} > $@.tmp && mv $@.tmp $@ && echo "wrote the cluster's credentials to $@ (git-ignored: keep it while the cluster lives)"

# The Secrets hold one MinIO user per client (manifests/minio/setup-job.yaml): KFP, MLflow, a read-only one for
# pipeline steps and a write-only one for the model server's inference log; MinIO's root credentials stay in
# namespace minio. A credentials file from before a key existed gets it added.
deploy: $(CLUSTER_SECRETS)  ## Deploy KFP, MinIO, MLflow and the pipeline's config into the cluster, waiting for each
	@umask 077 && for key in MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SECRET_KEY LOG_WRITER_SECRET_KEY; do \
	  grep -q "^$$key=" $(CLUSTER_SECRETS) || echo "$$key=$$($(TOKEN))" >> $(CLUSTER_SECRETS); done
	$(KUBECTL) apply -k manifests/kfp/cluster-scoped
	$(KUBECTL) wait --for=condition=established --timeout=$(WAIT_TIMEOUT) crd -l app.kubernetes.io/part-of=kubeflow-pipelines
	$(KUBECTL) apply -k manifests/namespaces
	@set -a && . "$(abspath $(CLUSTER_SECRETS))" && set +a && \
	$(call same-as-file,MINIO_ROOT_USER) $(call same-as-file,MINIO_ROOT_PASSWORD) \
	$(SECRET) && \
	printf 'MINIO_ROOT_USER=%s\nMINIO_ROOT_PASSWORD=%s\n' "$$MINIO_ROOT_USER" "$$MINIO_ROOT_PASSWORD" \
	  | secret minio minio-root && \
	printf '$(MINIO_USERS)' "$$KFP_SECRET_KEY" "$$MLFLOW_SECRET_KEY" "$$READER_SECRET_KEY" "$$LOG_WRITER_SECRET_KEY" \
	  | secret minio minio-users && \
	printf 'accesskey=kfp\nsecretkey=%s\n' "$$KFP_SECRET_KEY" | secret kubeflow mlpipeline-minio-artifact && \
	printf 'AWS_ACCESS_KEY_ID=pipeline-reader\nAWS_SECRET_ACCESS_KEY=%s\n' "$$READER_SECRET_KEY" \
	  | secret kubeflow pipeline-s3 && \
	printf 'AWS_ACCESS_KEY_ID=mlflow\nAWS_SECRET_ACCESS_KEY=%s\n' "$$MLFLOW_SECRET_KEY" | secret mlflow mlflow-s3 && \
	printf 'POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD=%s\n' "$$POSTGRES_PASSWORD" | secret mlflow mlflow-postgres && \
	printf 'MLFLOW_AUTH_ADMIN_USERNAME=admin\nMLFLOW_AUTH_ADMIN_PASSWORD=%s\nMLFLOW_FLASK_SERVER_SECRET_KEY=%s\n' \
	  "$$MLFLOW_ADMIN_PASSWORD" "$$MLFLOW_FLASK_SECRET_KEY" | secret mlflow mlflow-auth && \
	printf 'username=admin\npassword=%s\n' "$$MLFLOW_ADMIN_PASSWORD" | secret kubeflow kfp-mlflow-credentials && \
	printf 'MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=%s\n' "$$MLFLOW_ADMIN_PASSWORD" \
	  | secret serving mlflow-credentials && \
	printf 'AWS_ACCESS_KEY_ID=inference-log-writer\nAWS_SECRET_ACCESS_KEY=%s\n' "$$LOG_WRITER_SECRET_KEY" \
	  | secret serving inference-log-s3
	$(KUBECTL) -n minio delete job minio-setup --ignore-not-found
	$(KUBECTL) apply -k manifests/minio
	$(KUBECTL) -n minio rollout status deployment/minio --timeout=$(WAIT_TIMEOUT)
	$(KUBECTL) -n minio wait --for=condition=complete job/minio-setup --timeout=$(WAIT_TIMEOUT)
	@$(MAKE) --no-print-directory seed-data
	$(KUBECTL) apply -k manifests/mlflow
	$(KUBECTL) -n mlflow rollout status deployment/postgres --timeout=$(WAIT_TIMEOUT)
	$(KUBECTL) -n mlflow rollout status deployment/mlflow --timeout=$(WAIT_TIMEOUT)
	$(KUBECTL) apply -k manifests/pipeline
	$(KUBECTL) apply -k manifests/kfp
	$(KUBECTL) -n kubeflow wait --for=condition=Available deployment --all --timeout=$(WAIT_TIMEOUT)

# Through a port-forward, with MinIO's root user (the steps' own user may only read bucket data).
seed-data: venv  ## Put the shipped sample into MinIO at s3://data/ (the cluster's default source; make deploy does it)
	@$(KUBECTL) -n minio port-forward svc/minio $(MINIO_PORT):9000 >/dev/null & pf=$$!; \
	trap 'kill $$pf 2>/dev/null; wait $$pf 2>/dev/null || true' EXIT; \
	curl -s -o /dev/null --retry 30 --retry-connrefused --retry-delay 1 --retry-max-time 60 \
	  http://127.0.0.1:$(MINIO_PORT)/minio/health/live || { echo "MinIO's port-forward did not answer" >&2; exit 1; }; \
	set -a && . "$(abspath $(CLUSTER_SECRETS))" && set +a && \
	S3_ENDPOINT_URL=http://127.0.0.1:$(MINIO_PORT) AWS_ACCESS_KEY_ID="$$MINIO_ROOT_USER" \
	  AWS_SECRET_ACCESS_KEY="$$MINIO_ROOT_PASSWORD" AWS_DEFAULT_REGION=us-east-1 $(PY) pipeline.py seed-data

load-images:  ## Load this build's images (python3 -m images.catalog list) into the kind cluster
	@refs="$$($(PYTHON) -m images.catalog list)" && for ref in $$refs; do \
	  echo "$(KIND) load docker-image $$ref --name $(KIND_CLUSTER)" && \
	  $(KIND) load docker-image "$$ref" --name $(KIND_CLUSTER) || exit 1; done

# The YAML names the image without a tag; a throwaway overlay sets this build's tag (kustomize `images`).
serve:  ## Deploy the model server with this build's serve image (after load-images; needs a prod model)
	@ref="$$($(PYTHON) -m images.catalog list | grep -e '-serve:')" && \
	overlay="$$(mktemp -d manifests/.serve-XXXXXX)" && trap 'rm -rf "$$overlay"' EXIT && \
	printf 'resources: [../serving]\nimages:\n- name: %s\n  newTag: "%s"\n' "$${ref%:*}" "$${ref##*:}" \
	  > "$$overlay/kustomization.yaml" && \
	$(KUBECTL) apply -k "$$overlay" && \
	$(KUBECTL) -n serving rollout status deployment/rental-price-serve --timeout=$(WAIT_TIMEOUT)

# The cluster's MLflow through a port-forward, as its admin user (credentials from $(CLUSTER_SECRETS), passed in
# the environment only); then the command after it.
WITH_CLUSTER_MLFLOW = $(KUBECTL) -n mlflow port-forward svc/mlflow $(MLFLOW_UI_PORT):5000 >/dev/null & pf=$$!; \
  trap 'kill $$pf 2>/dev/null; wait $$pf 2>/dev/null || true' EXIT; \
  curl -s -o /dev/null --retry 30 --retry-connrefused --retry-delay 1 --retry-max-time 60 \
    http://127.0.0.1:$(MLFLOW_UI_PORT)/health || { echo "MLflow's port-forward did not answer" >&2; exit 1; }; \
  set -a && . "$(abspath $(CLUSTER_SECRETS))" && set +a && \
  MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_UI_PORT) MLFLOW_TRACKING_USERNAME=admin \
  MLFLOW_TRACKING_PASSWORD="$$MLFLOW_ADMIN_PASSWORD"

promote-cluster: venv  ## Move the cluster's prod to VERSION= and roll the model server to it
	@[ -n "$(VERSION)" ] || { echo "make promote-cluster: say which version: VERSION=3" >&2; exit 2; }
	@$(WITH_CLUSTER_MLFLOW) $(PY) pipeline.py promote --model-name $(MODEL_NAME) --version $(VERSION) \
	  --kube-context kind-$(KIND_CLUSTER)
	$(KUBECTL) -n serving rollout status deployment/rental-price-serve --timeout=$(WAIT_TIMEOUT)

rollback-cluster: venv  ## Move the cluster's prod back to previous-prod and roll the model server to it
	@$(WITH_CLUSTER_MLFLOW) $(PY) pipeline.py rollback --model-name $(MODEL_NAME) --kube-context kind-$(KIND_CLUSTER)
	$(KUBECTL) -n serving rollout status deployment/rental-price-serve --timeout=$(WAIT_TIMEOUT)

ui:  ## Port-forward the KFP UI (and API) to localhost:$(KFP_PORT), MLflow to localhost:$(MLFLOW_UI_PORT) (Ctrl-C stops)
	@echo "KFP UI: http://127.0.0.1:$(KFP_PORT)  MLflow: http://127.0.0.1:$(MLFLOW_UI_PORT)  (Ctrl-C stops)"
	@trap 'kill $$(jobs -p) 2>/dev/null' EXIT INT TERM; \
	$(KUBECTL) -n kubeflow port-forward svc/ml-pipeline-ui $(KFP_PORT):80 >/dev/null & \
	$(KUBECTL) -n mlflow port-forward svc/mlflow $(MLFLOW_UI_PORT):5000 >/dev/null & \
	wait

predict-cluster:  ## Port-forward the model server to localhost:$(PORT), for `make predict` (Ctrl-C stops)
	@echo "model server: http://127.0.0.1:$(PORT) (make predict in another shell; Ctrl-C stops)"
	$(KUBECTL) -n serving port-forward svc/rental-price-serve $(PORT):8080

down:  ## Delete the kind cluster $(KIND_CLUSTER) and everything in it
	$(KIND) delete cluster --name $(KIND_CLUSTER)

$(CHECKOV_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==$(CHECKOV_VERSION)

checkov: $(CHECKOV_VENV)/bin/checkov  ## Install checkov $(CHECKOV_VERSION) in its own venv, $(CHECKOV_VENV) (for make test)
