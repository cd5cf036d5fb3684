"""The cluster: manifests/, kind-config.yaml and manifests/cluster.mk, checked offline without a cluster.

Every kustomization of ours is built with `kubectl kustomize` and its objects validated against the Kubernetes
schemas of kind's node version; checkov scans them and the Dockerfiles; names, images, Secrets, URLs and
NetworkPolicies are cross-checked; `make deploy` and `make serve` run against a stand-in kubectl that renders
what they would apply. The KFP overlay's remote bases are built only when a local copy of upstream is given
(KFP_MANIFESTS_DIR, ARGO_MANIFESTS_DIR: see manifests/README.md).
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import free_port

from components import names, rollout, sources

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
CLUSTER_MK = MANIFESTS / "cluster.mk"
# Kustomizations that build offline, in the order `make deploy` applies them (serving: `make serve`).
OURS = ["namespaces", "minio", "mlflow", "pipeline", "serving"]
# Kustomizations on upstream's remote bases: built only from a local copy (test_kfp_overlay_*).
REMOTE = ["kfp/cluster-scoped", "kfp"]
KFP_REF = "2.17.0"
KFP_REMOTE = re.compile(r"github\.com/kubeflow/pipelines/manifests/kustomize/(?P<path>[^?\s]+)\?ref=(?P<ref>\S+)")
ARGO_REMOTE = re.compile(r"https://github\.com/argoproj/argo-workflows/manifests/(?P<path>[^?\s]+)\?ref=\S+")
# Third-party images without a digest (none could be looked up offline); every other one must carry one.
UNDIGESTED = {"ghcr.io/mlflow/mlflow:v3.17.2-full"}
MINIO_URL = "http://minio.minio.svc.cluster.local:9000"
MLFLOW_URL = "http://mlflow.mlflow.svc.cluster.local:5000"
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Secrets KFP makes for itself at run time: the cache server's TLS certificate (written by kfp-cache-deployer).
KFP_RUNTIME_SECRETS = {("kubeflow", "Secret", "webhook-server-tls")}


def kustomize(path: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def catalog_refs() -> dict[str, str]:
    """image name -> tag, from `python3 -m images.catalog list` (the same call the Makefile makes)."""
    out = subprocess.run([sys.executable, "-m", "images.catalog", "list"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return dict(ref.rsplit(":", 1) for ref in out.split())


def relative_overlay(tmp: Path, base: Path, extra: str = "") -> Path:
    """A kustomization in tmp over `base` (kustomize takes relative paths only)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "kustomization.yaml").write_text(f"resources: [{os.path.relpath(base, tmp)}]\n{extra}")
    return tmp


@pytest.fixture(scope="session")
def built() -> dict[str, list[dict]]:
    return {part: kustomize(MANIFESTS / part) for part in OURS}


@pytest.fixture(scope="session")
def objects(built) -> list[dict]:
    return [doc for docs in built.values() for doc in docs]


def pod_specs(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in POD_KINDS:
            yield doc, doc["spec"]["template"]


def containers(pod: dict) -> list[dict]:
    return pod["spec"].get("containers", []) + pod["spec"].get("initContainers", [])


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------- building and schemas

def test_every_kustomization_is_covered():
    found = {str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml")
             if not any(part.startswith(".") for part in p.relative_to(MANIFESTS).parts)}
    assert found == set(OURS) | set(REMOTE)


@pytest.mark.parametrize("part", OURS)
def test_builds_and_every_object_is_namespaced(built, part):
    docs = built[part]
    assert docs
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") not in (None, "default"), doc["metadata"]


def kind_node_version() -> str:
    node = yaml.safe_load((ROOT / "kind-config.yaml").read_text())["nodes"][0]["image"]
    match = re.fullmatch(r"kindest/node:v(\d+\.\d+)\.\d+@sha256:[0-9a-f]{64}", node)
    assert match, f"kind node image not pinned by version and digest: {node}"
    return match.group(1) + ".0"


def test_kind_config_one_pinned_node_and_no_port_mappings():
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert [n["role"] for n in config["nodes"]] == ["control-plane"]
    assert "extraPortMappings" not in config["nodes"][0], "services are reached with kubectl port-forward"
    assert kind_node_version() in kubernetes_validate.utils.all_versions()


def validate(docs: list[dict]) -> list[str]:
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kind_node_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    return problems


@pytest.mark.parametrize("part", OURS)
def test_objects_validate_against_kubernetes_schemas(built, part):
    assert validate(built[part]) == []


def test_serving_image_tag_overlay_validates(tmp_path):
    name, tag = next((n, t) for n, t in catalog_refs().items() if n.endswith("-serve"))
    images = f"images: [{{name: {name}, newTag: '{tag}'}}]\n"
    docs = kustomize(relative_overlay(tmp_path, MANIFESTS / "serving", images))
    assert find(docs, "Deployment", "rental-price-serve")["spec"]["template"]["spec"]["containers"][0]["image"] \
        == f"{name}:{tag}"


# ---------------------------------------------------------------- images and pod security

def test_our_images_come_from_the_catalog_without_a_tag(objects):
    refs = catalog_refs()
    prefix = tomllib.loads((ROOT / "images" / "images.toml").read_text())["prefix"] + "-"
    ours = [(doc["metadata"]["name"], c["image"]) for doc, pod in pod_specs(objects) for c in containers(pod)
            if c["image"].startswith(prefix)]
    assert ours, "the model server uses our serve image"
    for owner, image in ours:
        assert image in refs, f"{owner}: {image} is not an image of images/catalog.py ({sorted(refs)})"
    serve = find(objects, "Deployment", "rental-price-serve")["spec"]["template"]["spec"]["containers"][0]
    assert serve["image"] == next(n for n in refs if n.endswith("-serve"))


def test_third_party_images_are_pinned_by_digest(objects):
    refs = catalog_refs()
    for doc, pod in pod_specs(objects):
        for c in containers(pod):
            image = c["image"]
            if image in refs:
                continue
            assert ":latest" not in image
            if image in UNDIGESTED:
                continue
            assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), f"{doc['metadata']['name']}: {image}"


def test_mlflow_server_version_matches_the_clients(objects):
    image = find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]
    pinned = re.search(r"^mlflow==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert image == f"ghcr.io/mlflow/mlflow:v{pinned}-full"


def test_pods_are_restricted_with_requests_and_limits(built, objects):
    for ns in built["namespaces"]:
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    checked = 0
    for doc, pod in pod_specs(objects):
        spec, where = pod["spec"], f"{doc['kind']} {doc['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] == 10001, where  # the uid of our images
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert c["imagePullPolicy"] == "IfNotPresent", where
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) == {"cpu", "memory"}, f"{where}: {kind}"
            assert c.get("livenessProbe") or doc["kind"] == "Job", where
            checked += 1
    assert checked == 5  # minio, minio-setup, postgres, mlflow, serve


def test_step_images_run_as_uid_10001():
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "images" / "Dockerfile").read_text(), re.M)
    assert users and users[-1].split(":")[0] == "10001"


# ---------------------------------------------------------------- checkov

def checkov_binary() -> Path:
    path = Path(os.environ.get("CHECKOV", ROOT / ".venv" / "checkov" / "bin" / "checkov"))
    if not path.exists():
        pytest.fail(f"checkov is not installed at {path}: run `make checkov` (it gets its own venv)")
    return path


def test_every_skipped_checkov_check_says_why():
    lines = (MANIFESTS / ".checkov.yaml").read_text().splitlines()
    skipped = yaml.safe_load("\n".join(lines))["skip-check"]
    assert skipped
    for check in skipped:
        index = lines.index(f"  - {check}")
        assert lines[index - 1].strip().startswith("#"), f"{check} is skipped without a reason above it"


def test_checkov_passes_on_manifests_and_dockerfiles(tmp_path):
    checkov = checkov_binary()
    version = re.search(r"^CHECKOV_VERSION \?= (\S+)$", CLUSTER_MK.read_text(), re.M).group(1)
    name, tag = next((n, t) for n, t in catalog_refs().items() if n.endswith("-serve"))
    scan = tmp_path / "scan"
    scan.mkdir()
    for part in OURS:
        source = MANIFESTS / part
        if part == "serving":  # as `make serve` applies it: with this build's tag
            source = relative_overlay(tmp_path / "serve", source, f"images: [{{name: {name}, newTag: '{tag}'}}]\n")
        (scan / f"{part}.yaml").write_text(yaml.safe_dump_all(kustomize(source)))
    shutil.copy(ROOT / "images" / "Dockerfile", scan / "Dockerfile")
    shutil.copy(ROOT / "images" / "base.Dockerfile", scan / "base.Dockerfile")
    result = subprocess.run([str(checkov), "--config-file", str(MANIFESTS / ".checkov.yaml"), "-d", str(scan),
                             "-o", "json"], capture_output=True, text=True, timeout=300)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, result.stderr[-2000:]
    assert by_type["dockerfile"]["summary"]["resource_count"] == 2
    assert by_type["kubernetes"]["summary"]["resource_count"] >= 25
    failed = [f"{f['check_id']} {f['resource']}: {f['check_name']}"
              for r in reports for f in r["results"]["failed_checks"]]
    assert failed == []
    assert all(r["summary"]["parsing_errors"] == 0 and r["summary"]["checkov_version"] == version for r in reports)
    assert result.returncode == 0


# ---------------------------------------------------------------- names, URLs, Secrets, ConfigMaps

def services(docs) -> dict[str, set[int]]:
    return {f"{d['metadata']['name']}.{d['metadata']['namespace']}": {p["port"] for p in d["spec"]["ports"]}
            for d in docs if d["kind"] == "Service"}


def test_every_cluster_url_names_a_service_and_port(objects):
    known = services(objects)
    text = yaml.safe_dump_all(objects) + (MANIFESTS / "kfp" / "object-store.yaml").read_text()
    named = re.findall(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local(?::(\d+))?", text)
    assert len(named) >= 8
    for service, namespace, port in named:
        assert f"{service}.{namespace}" in known, f"no Service {service} in namespace {namespace}"
        if port:
            assert int(port) in known[f"{service}.{namespace}"], f"{service}.{namespace} has no port {port}"


def test_pipeline_env_gives_the_steps_their_endpoints(built):
    env = find(built["pipeline"], "ConfigMap", "pipeline-env")
    assert env["metadata"]["namespace"] == "kubeflow"
    assert env["data"] == {"MLFLOW_TRACKING_URI": MLFLOW_URL, "MLFLOW_EXPERIMENT_NAME": "rental-price",
                           "S3_ENDPOINT_URL": MINIO_URL}
    assert names.EXPERIMENT == env["data"]["MLFLOW_EXPERIMENT_NAME"]  # the steps' default, locally
    serving = find(built["serving"], "ConfigMap", "serving-env")
    assert serving["data"]["MLFLOW_TRACKING_URI"] == env["data"]["MLFLOW_TRACKING_URI"]


def references(docs) -> set[tuple[str, str, str, str | None]]:
    """(namespace, Secret|ConfigMap, name, key or None for all) for everything our pods read."""
    refs = set()
    for doc, pod in pod_specs(docs):
        ns = doc["metadata"]["namespace"]
        for c in containers(pod):
            for e in c.get("env", []):
                source = e.get("valueFrom", {})
                for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if field in source and not source[field].get("optional"):
                        refs.add((ns, kind, source[field]["name"], source[field]["key"]))
            for e in c.get("envFrom", []):
                for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                    if field in e and not e[field].get("optional"):
                        refs.add((ns, kind, e[field]["name"], None))
        for v in pod["spec"].get("volumes", []):
            if "secret" in v and not v["secret"].get("optional"):
                refs.add((ns, "Secret", v["secret"]["secretName"], None))
            if "configMap" in v and not v["configMap"].get("optional"):
                refs.add((ns, "ConfigMap", v["configMap"]["name"], None))
    return refs


def kfp_object_store_references() -> set[tuple[str, str, str, str]]:
    text = (MANIFESTS / "kfp" / "object-store.yaml").read_text()
    patches = {d["metadata"]["name"]: d for d in yaml.safe_load_all(text)}
    ref = yaml.safe_load(patches["kfp-launcher"]["data"]["providers"])["minio"]["default"]["credentials"]["secretRef"]
    repo = yaml.safe_load(patches["workflow-controller-configmap"]["data"]["artifactRepository"])["s3"]
    return {("kubeflow", "Secret", ref["secretName"], ref["accessKeyKey"]),
            ("kubeflow", "Secret", ref["secretName"], ref["secretKeyKey"]),
            *(("kubeflow", "Secret", repo[k]["name"], repo[k]["key"]) for k in ("accessKeySecret", "secretKeySecret"))}


def provided(docs) -> dict[tuple[str, str, str], set[str]]:
    return {(d["metadata"]["namespace"], d["kind"], d["metadata"]["name"]):
            {*d.get("data", {}), *d.get("stringData", {})}
            for d in docs if d["kind"] in ("Secret", "ConfigMap")}


def test_secrets_and_configmaps_are_provided(objects, deployed):
    available = provided(objects) | provided(deployed["applied"])
    wanted = references(objects) | kfp_object_store_references()
    assert len(wanted) >= 10
    for ns, kind, name, key in sorted(wanted, key=str):
        assert (ns, kind, name) in available, f"{kind} {ns}/{name} is neither in manifests/ nor made by make deploy"
        if key:
            assert key in available[(ns, kind, name)], f"{kind} {ns}/{name} has no key {key}"
    # Pipeline steps read these two by name (the pipeline's code, not these manifests).
    assert available[("kubeflow", "Secret", "pipeline-s3")] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert ("kubeflow", "ConfigMap", "pipeline-env") in available


def test_the_compiled_pipeline_finds_what_it_names(objects, deployed):
    """tests/golden/pipeline.yaml (the compiled spec): its ConfigMaps, Secrets, pipeline root and images."""
    spec, platform = yaml.safe_load_all((ROOT / "tests" / "golden" / "pipeline.yaml").read_text())
    available = provided(objects) | provided(deployed["applied"])
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    named = set()
    for executor in executors:
        for kind, field, name_key, key_key in (("ConfigMap", "configMapAsEnv", "configMapName", "configMapKey"),
                                               ("Secret", "secretAsEnv", "secretName", "secretKey")):
            for ref in executor.get(field, []):
                name = ref[name_key]
                named.add(name)
                assert ("kubeflow", kind, name) in available, f"{kind} kubeflow/{name}"
                assert {k[key_key] for k in ref["keyToEnv"]} <= available[("kubeflow", kind, name)]
    assert named == {"pipeline-env", "pipeline-s3"}
    launcher = next(d for d in yaml.safe_load_all((MANIFESTS / "kfp" / "object-store.yaml").read_text())
                    if d["metadata"]["name"] == "kfp-launcher")
    assert spec["defaultPipelineRoot"] == launcher["data"]["defaultPipelineRoot"]
    names = {c["container"]["image"].rsplit(":", 1)[0] for c in spec["deploymentSpec"]["executors"].values()}
    assert names and names <= set(catalog_refs())


def test_minio_setup_script_has_every_variable_it_uses(objects, deployed):
    script = find(objects, "ConfigMap", "minio-policies")["data"]["setup.sh"]
    job = find(objects, "Job", "minio-setup")["spec"]["template"]["spec"]["containers"][0]
    given = set(env_of(job))
    for source in job.get("envFrom", []):
        given |= provided(deployed["applied"])[("minio", "Secret", source["secretRef"]["name"])]
    used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", script)) - {"MC_HOST_local"}
    assert used and used <= given, used - given
    buckets = re.search(r"mc mb --ignore-existing (.*)", script).group(1).split()
    assert set(buckets) == {"local/mlpipeline", "local/mlflow", "local/data", "local/inference-log"}


FAKE_MC = """\
#!/bin/sh
# Stands in for mc: records each call; `admin user info` reports the policy last attached to the user.
echo "$*" >> "$FAKE_LOG"
case "$1 $2 $3" in
  "admin policy attach") echo "$5" > "$FAKE_DIR/policy-$7" ;;
  "admin user info") echo "AccessKey: $5"; echo "PolicyName: $(cat "$FAKE_DIR/policy-$5" 2>/dev/null)" ;;
  "ilm rule ls") exit 1 ;;  # as mc does for a bucket with no lifecycle yet
esac
"""


@pytest.mark.parametrize("attach_works", [True, False])
def test_minio_setup_script_creates_buckets_and_users(objects, tmp_path, attach_works):
    script = find(objects, "ConfigMap", "minio-policies")["data"]["setup.sh"]
    (tmp_path / "mc").write_text(FAKE_MC if attach_works else FAKE_MC.replace('echo "$5" >', 'true >'))
    (tmp_path / "mc").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "FAKE_LOG": str(tmp_path / "log"), "FAKE_DIR": str(tmp_path),
           "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "rootpass", "KFP_ACCESS_KEY": "kfp",
           "KFP_SECRET_KEY": "k", "MLFLOW_ACCESS_KEY": "mlflow", "MLFLOW_SECRET_KEY": "m",
           "READER_ACCESS_KEY": "pipeline-reader", "READER_SECRET_KEY": "r",
           "LOG_WRITER_ACCESS_KEY": "inference-log-writer", "LOG_WRITER_SECRET_KEY": "w"}
    result = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    if not attach_works:
        assert result.returncode != 0 and "user kfp lacks policy kfp-artifacts" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    assert "mb --ignore-existing local/mlpipeline local/mlflow local/data local/inference-log" in calls
    assert "ilm rule add --expire-days 30 local/inference-log" in calls
    assert {c for c in calls if c.startswith("admin policy attach")} == {
        "admin policy attach local kfp-artifacts --user kfp",
        "admin policy attach local mlflow-artifacts --user mlflow",
        "admin policy attach local data-reader --user pipeline-reader",
        "admin policy attach local inference-log-writer --user inference-log-writer"}


def test_each_minio_client_holds_only_its_own_user(objects, deployed):
    """The model server holds the inference log's write-only user (and MLflow's credentials); pipeline steps get
    the read-only user only."""
    refs = references(objects)
    assert {r[2] for r in refs if r[0] == "serving" and r[1] == "Secret"} == {"mlflow-credentials", "inference-log-s3"}
    policies = find(objects, "ConfigMap", "minio-policies")["data"]
    writer = json.loads(policies["inference-log-writer.json"])["Statement"]
    assert writer == [{"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::inference-log/*"]}]
    secrets = {(d["metadata"]["namespace"], d["metadata"]["name"]): d
               for d in deployed["applied"] if d["kind"] == "Secret"}
    values = deployed["credentials"]
    assert secrets[("kubeflow", "pipeline-s3")]["data"]["AWS_SECRET_ACCESS_KEY"] == values["READER_SECRET_KEY"]
    assert secrets[("serving", "inference-log-s3")]["data"]["AWS_SECRET_ACCESS_KEY"] == values["LOG_WRITER_SECRET_KEY"]
    assert secrets[("mlflow", "mlflow-s3")]["data"]["AWS_SECRET_ACCESS_KEY"] == values["MLFLOW_SECRET_KEY"]
    assert secrets[("kubeflow", "mlpipeline-minio-artifact")]["data"]["secretkey"] == values["KFP_SECRET_KEY"]
    root = values["MINIO_ROOT_PASSWORD"]
    assert [k for k, s in secrets.items() if root in s["data"].values()] == [("minio", "minio-root")]


# ---------------------------------------------------------------- the services themselves

def test_mlflow_server_configuration(objects):
    c = find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in c["args"])
    assert args["--backend-store-uri"] == "postgresql://postgres.mlflow.svc.cluster.local:5432/mlflow"
    assert args["--artifacts-destination"] == "s3://mlflow" and "--serve-artifacts" in args
    hosts = set(args["--allowed-hosts"].split(","))
    names = ["mlflow", "mlflow.mlflow", "mlflow.mlflow.svc", "mlflow.mlflow.svc.cluster.local"]
    assert hosts == {*names, *(f"{n}:5000" for n in names), "localhost:*", "127.0.0.1:*"}
    env = env_of(c)
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == MINIO_URL
    assert {"PGUSER", "PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    assert {c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]} == {"/health"}
    # Basic auth: the admin user from Secret mlflow-auth, users kept in the same PostgreSQL database.
    assert "--app-name" in args and args["--app-name"] == "basic-auth"
    assert {k: env[k]["valueFrom"]["secretKeyRef"]["name"] for k in (
        "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")} == dict.fromkeys(
        ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"), "mlflow-auth")
    config = configparser.ConfigParser()
    config.read_string(find(objects, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"])
    assert config["mlflow"]["database_uri"] == args["--backend-store-uri"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    # No job runner: with a SQL backend MLflow 3 starts one and 7 huey consumers, about 2 GB with the two workers,
    # over the container's memory limit. The variable is MLflow's own, read by this MLflow.
    from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION

    assert env[MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name]["value"] == "false"
    assert c["resources"]["limits"]["memory"] == "1536Mi" and args["--workers"] == "2"


def test_model_server_deployment(objects):
    deployment = find(objects, "Deployment", "rental-price-serve")
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"rental-price/model-version": "none"}
    (c,) = pod["spec"]["containers"]
    assert c["name"] == "serve"
    assert c["command"] == ["python3", "-m", "components.serve", "--model", "models:/rental-price@prod",
                            "--host", "0.0.0.0", "--port", "8080"]
    env = env_of(c)
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"] == {
        "configMapKeyRef": {"name": "serving-env", "key": "MLFLOW_TRACKING_URI"}}
    # The version is the Deployment's annotation (what the pipeline patches), read by components.serve.
    assert env["MODEL_VERSION"]["valueFrom"] == {
        "fieldRef": {"fieldPath": f"metadata.annotations['{rollout.ANNOTATION}']"}}
    assert env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]["value"] == "false"
    # The inference log goes to the bucket the scheduled monitor reads by default (Makefile CLUSTER_INFERENCE_LOG).
    make_default = re.search(r"CLUSTER_INFERENCE_LOG \?= (\S+)", (ROOT / "Makefile").read_text())[1]
    assert env["SERVE_INFERENCE_LOG"]["value"] == make_default and env["S3_ENDPOINT_URL"]["value"] == MINIO_URL
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[env["SERVE_MODEL_CACHE"]["value"]]]  # kept across container restarts
    assert {env[k]["valueFrom"]["secretKeyRef"]["name"] for k in ("MLFLOW_TRACKING_USERNAME",
                                                                   "MLFLOW_TRACKING_PASSWORD")} == {"mlflow-credentials"}
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/ping"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 120
    assert services(objects)["rental-price-serve.serving"] == {8080}


def test_pipeline_runner_may_roll_the_model_server_only(objects):
    role = find(objects, "Role", "rental-price-serve-roller")
    assert role["metadata"]["namespace"] == "serving"
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments"],
                              "resourceNames": ["rental-price-serve"], "verbs": ["patch"]}]
    (binding,) = [d for d in objects if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]


# ---------------------------------------------------------------- NetworkPolicies

def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ns_labels(namespaces: dict, ns: str) -> dict:
    return {"kubernetes.io/metadata.name": ns, **namespaces.get(ns, {})}


def side_allows(policies, namespaces, pod, peer, port, direction) -> bool:
    """Do the policies selecting `pod` (for `direction`) let `peer` through on `port`? Unselected: yes."""
    ns, labels = pod
    selecting = [p for p in policies if p["metadata"]["namespace"] == ns and selects(p["spec"]["podSelector"], labels)
                 and direction in p["spec"]["policyTypes"]]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(direction.lower(), []):
            peers = rule.get("from" if direction == "Ingress" else "to")
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            assert not any("ipBlock" in p for p in peers or []), "ipBlock is not evaluated here"
            if not peers or any(
                ("namespaceSelector" in p and selects(p["namespaceSelector"], ns_labels(namespaces, peer[0]))
                 or "namespaceSelector" not in p and peer[0] == ns)
                and selects(p.get("podSelector", {}), peer[1]) for p in peers):
                return True
    return False


def can_reach(objects, source, target, port) -> bool:
    policies = [d for d in objects if d["kind"] == "NetworkPolicy"]
    namespaces = {d["metadata"]["name"]: d["metadata"].get("labels", {}) for d in objects if d["kind"] == "Namespace"}
    return side_allows(policies, namespaces, source, target, port, "Egress") and \
        side_allows(policies, namespaces, target, source, port, "Ingress")


def pods(objects) -> dict[str, tuple[str, dict]]:
    found = {doc["metadata"]["name"]: (doc["metadata"]["namespace"], pod["metadata"]["labels"])
             for doc, pod in pod_specs(objects)}
    # KFP's pods as upstream 2.17.0 labels them (test_kfp_overlay_* checks these against the real ones).
    kfp = {"application-crd-id": "kubeflow-pipelines"}
    found |= {"run-step": ("kubeflow", {"pipelines.kubeflow.org/v2_component": "true",
                                        "workflows.argoproj.io/workflow": "rental-price-x"}),
              "ml-pipeline": ("kubeflow", {"app": "ml-pipeline", **kfp}),
              "ml-pipeline-ui": ("kubeflow", {"app": "ml-pipeline-ui", **kfp}),
              "workflow-controller": ("kubeflow", {"app": "workflow-controller", **kfp}),
              "kube-dns": ("kube-system", {"k8s-app": "kube-dns"}),
              "stranger": ("default", {"app": "stranger"})}
    return found


ALLOWED = [("run-step", "minio", 9000), ("run-step", "mlflow", 5000), ("ml-pipeline", "minio", 9000),
           ("ml-pipeline-ui", "minio", 9000), ("workflow-controller", "minio", 9000), ("mlflow", "minio", 9000),
           ("mlflow", "postgres", 5432), ("rental-price-serve", "mlflow", 5000), ("minio-setup", "minio", 9000),
           ("mlflow", "kube-dns", 53), ("rental-price-serve", "kube-dns", 53), ("minio-setup", "kube-dns", 53),
           ("run-step", "rental-price-serve", 8080), ("stranger", "rental-price-serve", 8080),
           ("ml-pipeline", "mlflow", 5000), ("rental-price-serve", "minio", 9000)]
DENIED = [("rental-price-serve", "minio", 9001), ("rental-price-serve", "postgres", 5432),
          ("run-step", "postgres", 5432), ("ml-pipeline-ui", "mlflow", 5000), ("stranger", "mlflow", 5000),
          ("stranger", "minio", 9000), ("stranger", "postgres", 5432), ("minio", "mlflow", 5000),
          ("postgres", "minio", 9000), ("mlflow", "rental-price-serve", 8080), ("minio-setup", "mlflow", 5000),
          ("run-step", "minio", 9001), ("run-step", "mlflow", 8080), ("rental-price-serve", "stranger", 80)]


@pytest.mark.parametrize("source, target, port", ALLOWED)
def test_network_policy_allows(objects, source, target, port):
    found = pods(objects)
    assert can_reach(objects, found[source], found[target], port)


@pytest.mark.parametrize("source, target, port", DENIED)
def test_network_policy_denies(objects, source, target, port):
    found = pods(objects)
    assert not can_reach(objects, found[source], found[target], port)


def test_each_namespace_of_ours_denies_by_default(objects):
    defaults = {d["metadata"]["namespace"] for d in objects if d["kind"] == "NetworkPolicy"
                and d["spec"]["podSelector"] == {} and d["spec"]["policyTypes"] == ["Ingress", "Egress"]
                and not d["spec"].get("ingress") and not d["spec"].get("egress")}
    assert defaults == {"minio", "mlflow", "serving"}


# ---------------------------------------------------------------- cluster.mk

def make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The Makefile (which includes cluster.mk), free of an outer make's flags (`make -j test`)."""
    outer = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES"}
    clean = {k: v for k, v in os.environ.items() if k not in outer}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**clean, **(env or {})}, timeout=120)


def test_cluster_mk_targets_are_documented_and_apart_from_the_makefile_s():
    text = CLUSTER_MK.read_text()
    targets = re.findall(r"^([a-z][a-z-]*):", text, re.M)
    documented = re.findall(r"^([a-z-]+):.*## ", text, re.M)  # what `make help` lists
    assert set(targets) == set(documented) >= {"cluster", "deploy", "load-images", "ui", "serve", "predict-cluster",
                                               "down", "checkov"}
    makefile = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    assert not set(targets) & (makefile | {"submit", "compile", "images", "predict"})
    assert not re.search(r"\bsleep\b", text), "wait for readiness, never sleep"


def test_make_dry_run_prints_the_commands_in_order(tmp_path):
    """The user path of the README: make cluster deploy images, make compile && make submit, make serve predict."""
    result = make("-n", "cluster", "deploy", "images", "load-images", "compile", "submit", "serve", "predict",
                  "KIND_CLUSTER=ci", f"CLUSTER_SECRETS={tmp_path}/secrets.env", f"PYTHON={sys.executable}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = ["manifests/preflight.py", "kind create cluster --config kind-config.yaml --name ci", "secrets.env.tmp",
             "apply -k manifests/kfp/cluster-scoped", "wait --for=condition=established",
             "apply -k manifests/namespaces", "secret minio minio-root", "apply -k manifests/minio",
             "wait --for=condition=complete job/minio-setup", "port-forward svc/minio", "pipeline.py seed-data",
             "apply -k manifests/mlflow",
             "rollout status deployment/mlflow", "apply -k manifests/pipeline", "apply -k manifests/kfp\n",
             "wait --for=condition=Available deployment --all", "images.catalog build", "kind load docker-image",
             "pipeline.py compile --output pipeline.yaml", "pipeline.py submit --spec pipeline.yaml",
             "images.catalog list | grep", 'apply -k "$overlay"', "rollout status deployment/rental-price-serve",
             "components.predict --url http://127.0.0.1:8080"]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions) if p == -1]
    assert positions == sorted(positions)
    kubectl_calls = re.findall(r"(?<![-\w])kubectl(?: --context \S+)? ", out)
    assert kubectl_calls and all(call == "kubectl --context kind-ci " for call in kubectl_calls)


def test_make_dry_run_of_batch_scoring_locally_and_on_the_cluster(tmp_path):
    result = make("-n", "compile", "predict-batch", "submit-batch", "DATA_URL=s3://data/new.csv",
                  "MODEL=models:/rental-price/3", f"PYTHON={sys.executable}")
    assert result.returncode == 0, result.stderr
    steps = ["pipeline.py compile --output pipeline.yaml", "pipeline.py compile --pipeline batch --output "
             "pipeline-batch.yaml", "pipeline.py run --pipeline batch --param source=s3://data/new.csv --param "
             "model=models:/rental-price/3", "pipeline.py submit --pipeline batch --spec pipeline-batch.yaml"]
    positions = [result.stdout.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), result.stdout


def test_make_dry_run_of_monitoring_locally_and_scheduled_on_the_cluster():
    result = make("-n", "monitor", "schedule", "unschedule", "DATA_URL=s3://data/new.csv", "RETRAIN=1",
                  "CRON=0 7 * * 1", f"PYTHON={sys.executable}")
    assert result.returncode == 0, result.stderr
    steps = ["pipeline.py run --pipeline monitor --param source=s3://data/new.csv --param retrain=true",
             "pipeline.py compile --pipeline monitor --output pipeline-monitor.yaml",
             "port-forward -n kubeflow svc/ml-pipeline-ui 8081:80",
             'pipeline.py schedule --cron "0 7 * * 1" --spec pipeline-monitor.yaml --training-spec pipeline.yaml',
             "--host http://127.0.0.1:8081 --param source=s3://data/new.csv --param retrain=true",
             "pipeline.py unschedule --host"]
    positions = [result.stdout.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), result.stdout


FAKE_KUBECTL = """\
#!{python}
# Stands in for kubectl: records each call, renders what `apply` would send, says "not found" to `get`.
# A port-forward to MinIO runs moto's S3 server instead (with bucket data, as the setup Job makes it) and, when
# stopped, lists what it holds in FAKE_S3.
import os, subprocess, sys
args = sys.argv[1:]
if args[:1] == ["--context"]:
    args = args[2:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
out = open(os.environ["FAKE_APPLIED"], "a")
if "port-forward" in args and "svc/minio" in args:
    import hashlib, signal, boto3
    from moto.server import ThreadedMotoServer
    port = int(args[-1].split(":")[0])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{{port}}", region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
    s3.create_bucket(Bucket="data")

    def stop(*_):
        with open(os.environ["FAKE_S3"], "w") as held:
            for item in s3.list_objects_v2(Bucket="data").get("Contents", []):
                body = s3.get_object(Bucket="data", Key=item["Key"])["Body"].read()
                held.write(f"s3://data/{{item['Key']}} {{hashlib.sha256(body).hexdigest()}}\\n")
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        signal.pause()
elif args[:2] == ["apply", "-k"]:
    if "kfp" not in args[2]:  # upstream's remote bases need the network
        out.write(subprocess.run(["kubectl", "kustomize", args[2]], capture_output=True, text=True, check=True).stdout)
        out.write("---\\n")
elif args[:1] == ["apply"]:
    out.write(sys.stdin.read() + "---\\n")
elif "create" in args:
    sys.exit(subprocess.run(["kubectl", *args]).returncode)
elif "get" in args:
    sys.exit(1)
"""


def run_with_fake_kubectl(tmp_path: Path, *targets: str, **variables: str) -> dict:
    fake = tmp_path / "kubectl"
    fake.write_text(FAKE_KUBECTL.format(python=sys.executable))
    fake.chmod(0o755)
    log, applied, secrets = tmp_path / "calls.log", tmp_path / "applied.yaml", tmp_path / "secrets.env"
    held = tmp_path / "s3.txt"
    variables = {"KUBECTL": str(fake), "CLUSTER_SECRETS": str(secrets), "PYTHON": sys.executable,
                 "MINIO_PORT": str(free_port()), **variables}
    result = make(*targets, *(f"{k}={v}" for k, v in variables.items()),
                  env={"FAKE_LOG": str(log), "FAKE_APPLIED": str(applied), "FAKE_S3": str(held)})
    return {"result": result, "calls": log.read_text().splitlines() if log.exists() else [],
            "applied": [d for d in yaml.safe_load_all(applied.read_text()) if d] if applied.exists() else [],
            "secrets": secrets, "s3": held.read_text().splitlines() if held.exists() else []}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict:
    """`make deploy` against the stand-in kubectl, on a fresh credentials file."""
    run = run_with_fake_kubectl(tmp_path_factory.mktemp("deploy"), "deploy")
    assert run["result"].returncode == 0, run["result"].stderr
    run["credentials"] = dict(line.split("=", 1) for line in run["secrets"].read_text().splitlines())
    for doc in run["applied"]:
        if doc["kind"] == "Secret":
            doc["data"] = {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}
    return run


def test_deploy_generates_credentials_once_and_never_prints_them(deployed, tmp_path):
    credentials = deployed["credentials"]
    assert set(credentials) == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "KFP_SECRET_KEY", "MLFLOW_SECRET_KEY",
                                "READER_SECRET_KEY", "POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
                                "MLFLOW_FLASK_SECRET_KEY", "LOG_WRITER_SECRET_KEY"}
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for k, v in credentials.items() if k != "MINIO_ROOT_USER")
    assert len(set(credentials.values())) == len(credentials)
    assert stat.S_IMODE(deployed["secrets"].stat().st_mode) == 0o600
    output = deployed["result"].stdout + deployed["result"].stderr
    assert not [k for k, v in credentials.items() if k != "MINIO_ROOT_USER" and v in output]
    calls = "\n".join(deployed["calls"])
    assert not [k for k, v in credentials.items() if k != "MINIO_ROOT_USER" and v in calls]


def test_deploy_applies_every_part_in_order(deployed):
    applies = [c.split()[-1] for c in deployed["calls"] if c.startswith("apply -k")]
    assert applies == ["manifests/kfp/cluster-scoped", "manifests/namespaces", "manifests/minio",
                       "manifests/mlflow", "manifests/pipeline", "manifests/kfp"]
    secrets = sorted((d["metadata"]["namespace"], d["metadata"]["name"]) for d in deployed["applied"]
                     if d["kind"] == "Secret")
    assert secrets == [("kubeflow", "kfp-mlflow-credentials"), ("kubeflow", "mlpipeline-minio-artifact"),
                       ("kubeflow", "pipeline-s3"), ("minio", "minio-root"), ("minio", "minio-users"),
                       ("mlflow", "mlflow-auth"), ("mlflow", "mlflow-postgres"), ("mlflow", "mlflow-s3"),
                       ("serving", "inference-log-s3"), ("serving", "mlflow-credentials")]
    first_secret = next(i for i, c in enumerate(deployed["calls"]) if "create secret" in c)
    assert deployed["calls"].index("apply -k manifests/namespaces") < first_secret
    assert deployed["calls"].index("-n minio delete job minio-setup --ignore-not-found") \
        < deployed["calls"].index("apply -k manifests/minio")


def test_deploy_puts_the_shipped_sample_where_the_cluster_s_default_source_reads(deployed):
    """Data enters the cluster's pipeline through MinIO: the compiled spec's default source is the object that
    `make deploy` uploaded (to moto's S3 server here, standing in for MinIO), byte for byte the shipped sample."""
    import hashlib

    shipped = hashlib.sha256(sources.read_source(sources.DEFAULT_SOURCE)).hexdigest()
    assert deployed["s3"] == [f"{sources.CLUSTER_SOURCE} {shipped}"]
    spec = next(yaml.safe_load_all((ROOT / "tests" / "golden" / "pipeline.yaml").read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["source"]["defaultValue"] == sources.CLUSTER_SOURCE
    forward = next(i for i, c in enumerate(deployed["calls"]) if "port-forward svc/minio" in c)
    assert deployed["calls"].index("-n minio wait --for=condition=complete job/minio-setup --timeout=900s") < forward


def test_the_steps_reader_may_read_buckets_data_and_inference_log_only(objects):
    policy = json.loads(find(objects, "ConfigMap", "minio-policies")["data"]["data-reader.json"])
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert actions == {"s3:GetBucketLocation", "s3:ListBucket", "s3:GetObject"}
    assert resources == {"arn:aws:s3:::data", "arn:aws:s3:::data/*", "arn:aws:s3:::inference-log",
                         "arn:aws:s3:::inference-log/*"}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])


@pytest.mark.slow  # make deploy three times against the stand-in kubectl
def test_deploy_keeps_credentials_and_refuses_conflicting_ones(tmp_path):
    first = run_with_fake_kubectl(tmp_path, "deploy", MINIO_ROOT_USER="admin", MINIO_ROOT_PASSWORD="p4ssw0rd-given")
    assert first["result"].returncode == 0, first["result"].stderr
    written = first["secrets"].read_text()
    assert "MINIO_ROOT_USER=admin\n" in written and "MINIO_ROOT_PASSWORD=p4ssw0rd-given\n" in written
    again = run_with_fake_kubectl(tmp_path, "deploy")
    assert again["result"].returncode == 0 and again["secrets"].read_text() == written
    other = run_with_fake_kubectl(tmp_path, "deploy", MINIO_ROOT_PASSWORD="something-else")
    assert other["result"].returncode != 0 and "MINIO_ROOT_PASSWORD differs" in other["result"].stderr


def test_serve_deploys_the_current_serve_image(tmp_path):
    run = run_with_fake_kubectl(tmp_path, "serve")
    assert run["result"].returncode == 0, run["result"].stderr
    name, tag = next((n, t) for n, t in catalog_refs().items() if n.endswith("-serve"))
    deployment = find(run["applied"], "Deployment", "rental-price-serve")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"{name}:{tag}"
    assert run["calls"][-1].startswith("-n serving rollout status deployment/rental-price-serve")
    assert not list(MANIFESTS.glob(".serve-*")), "make serve leaves its overlay behind"


# ---------------------------------------------------------------- KFP overlay, from a local copy of upstream

@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """manifests/kfp with its remote bases pointed at local copies: KFP_MANIFESTS_DIR (kubeflow/pipelines 2.17.0
    manifests/kustomize) and ARGO_MANIFESTS_DIR (argo-workflows manifests/ at the ref upstream pins)."""
    kfp, argo = os.environ.get("KFP_MANIFESTS_DIR"), os.environ.get("ARGO_MANIFESTS_DIR")
    if not kfp or not argo:
        pytest.skip("the KFP overlay's bases are remote: set KFP_MANIFESTS_DIR to kubeflow/pipelines 2.17.0's "
                    "manifests/kustomize and ARGO_MANIFESTS_DIR to argo-workflows v4.0.5's manifests/ "
                    "(manifests/README.md shows how) to build it offline")
    work = tmp_path_factory.mktemp("upstream")
    shutil.copytree(kfp, work / "upstream")
    shutil.copytree(argo, work / "argo")
    shutil.copytree(MANIFESTS / "kfp", work / "kfp")

    def localize(pattern, target):
        for path in work.rglob("kustomization.yaml"):
            text = path.read_text()
            new = pattern.sub(lambda m: os.path.relpath(target / m.group("path"), path.parent), text)
            if new != text:
                path.write_text(new)

    for path in (work / "kfp").rglob("kustomization.yaml"):
        refs = [m.group("ref") for m in KFP_REMOTE.finditer(path.read_text())]
        assert refs and set(refs) == {KFP_REF}, f"{path}: remote bases at {refs}"
    localize(KFP_REMOTE, work / "upstream")
    localize(ARGO_REMOTE, work / "argo")
    return work


@pytest.fixture(scope="module")
def kfp_built(upstream) -> dict[str, list[dict]]:
    return {"kfp": kustomize(upstream / "kfp"), "kfp/cluster-scoped": kustomize(upstream / "kfp" / "cluster-scoped")}


def test_kfp_overlay_references_upstream_remotely_at_the_release():
    for part in REMOTE:
        resources = yaml.safe_load((MANIFESTS / part / "kustomization.yaml").read_text())["resources"]
        assert len(resources) == 1 and KFP_REMOTE.fullmatch(resources[0]).group("ref") == KFP_REF
    assert sorted(p.name for p in (MANIFESTS / "kfp").rglob("*") if p.is_file()) == \
        ["apiserver-config.json", "kustomization.yaml", "kustomization.yaml", "mlflow-plugin.yaml",
         "object-store.yaml"], "upstream is referenced, not copied"


def test_kfp_overlay_has_no_seaweedfs_left(kfp_built):
    for part, docs in kfp_built.items():
        text = yaml.safe_dump_all(docs)
        assert len(docs) > 10
        assert "seaweedfs" not in text.lower(), part
    assert not [d for d in kfp_built["kfp"]
                if d["kind"] == "Secret" and d["metadata"]["name"] == "mlpipeline-minio-artifact"]


def test_kfp_overlay_points_every_object_store_setting_at_minio(kfp_built):
    docs = kfp_built["kfp"]
    launcher = find(docs, "ConfigMap", "kfp-launcher")["data"]
    assert launcher["defaultPipelineRoot"] == "minio://mlpipeline/v2/artifacts"
    provider = yaml.safe_load(launcher["providers"])["minio"]["default"]
    assert provider["endpoint"] == MINIO_URL.removeprefix("http://") and provider["disableSSL"] is True
    install = find(docs, "ConfigMap", "pipeline-install-config")["data"]
    assert install["defaultPipelineRoot"] == launcher["defaultPipelineRoot"]
    repo = yaml.safe_load(find(docs, "ConfigMap", "workflow-controller-configmap")["data"]["artifactRepository"])["s3"]
    assert (repo["endpoint"], repo["bucket"], repo["insecure"]) == \
        (MINIO_URL.removeprefix("http://"), "mlpipeline", True)
    api = env_of(find(docs, "Deployment", "ml-pipeline")["spec"]["template"]["spec"]["containers"][0])
    assert (api["OBJECTSTORECONFIG_HOST"]["value"], api["OBJECTSTORECONFIG_PORT"]["value"]) == \
        ("minio.minio.svc.cluster.local", "9000")
    ui = env_of(find(docs, "Deployment", "ml-pipeline-ui")["spec"]["template"]["spec"]["containers"][0])
    assert f"{ui['MINIO_HOST']['value']}.{ui['MINIO_NAMESPACE']['value']}" == "minio.minio"
    assert ui["MINIO_PORT"]["value"] == "9000"
    for doc, pod in pod_specs(docs):
        for c in containers(pod):
            for e in c.get("env", []):
                assert not ("value" in e and "valueFrom" in e), f"{doc['metadata']['name']}: {e}"


def test_kfp_overlay_objects_validate_and_their_secrets_exist(kfp_built, deployed):
    for docs in kfp_built.values():
        assert validate([d for d in docs if d["kind"] != "CustomResourceDefinition"]) == []
    available = provided(kfp_built["kfp"]) | provided(deployed["applied"])
    for ns, kind, name, key in references(kfp_built["kfp"]) - {(*s, None) for s in KFP_RUNTIME_SECRETS}:
        assert (ns, kind, name) in available, f"{kind} {ns}/{name} is neither upstream's nor made by make deploy"
        assert key is None or key in available[(ns, kind, name)], f"{kind} {ns}/{name} has no key {key}"


def test_kfp_pods_that_use_the_object_store_may_reach_minio(kfp_built, objects):
    minio = pods(objects)["minio"]
    users = [(doc["metadata"]["name"], pod["metadata"]["labels"]) for doc, pod in pod_specs(kfp_built["kfp"])
             if "mlpipeline-minio-artifact" in json.dumps(pod)]
    assert {name for name, _ in users} >= {"ml-pipeline", "ml-pipeline-ui"}
    for name, labels in users:
        assert can_reach(objects, ("kubeflow", labels), minio, 9000), name
    controller = find(kfp_built["kfp"], "Deployment", "workflow-controller")["spec"]["template"]["metadata"]["labels"]
    assert can_reach(objects, ("kubeflow", controller), minio, 9000)


def test_kfp_crds_carry_the_label_deploy_waits_for(kfp_built):
    label = re.search(r"crd -l (\S+)=(\S+)", CLUSTER_MK.read_text()).groups()
    crds = [d for d in kfp_built["kfp/cluster-scoped"] if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) >= 5
    assert all(d["metadata"]["labels"].get(label[0]) == label[1] for d in crds)
    assert find(kfp_built["kfp/cluster-scoped"], "Namespace", "kubeflow")


def test_kfp_api_server_reads_our_mlflow_plugin_config(kfp_built):
    api = find(kfp_built["kfp"], "Deployment", "ml-pipeline")["spec"]["template"]["spec"]
    [mount] = [m for m in api["containers"][0]["volumeMounts"] if m["mountPath"] == "/config/config.json"]
    [volume] = [v for v in api["volumes"] if v["name"] == mount["name"]]
    config_map = find(kfp_built["kfp"], "ConfigMap", volume["configMap"]["name"])
    assert config_map["metadata"]["name"].startswith("kfp-apiserver-config-")  # hashed: a change rolls the pod
    assert json.loads(config_map["data"][mount["subPath"]]) == json.loads(PLUGIN_CONFIG.read_text())


# ---------------------------------------------------------------- KFP's MLflow plugin

PLUGIN_CONFIG = MANIFESTS / "kfp" / "apiserver-config.json"


def test_mlflow_plugin_points_at_our_mlflow_and_hands_tasks_their_run(built):
    """A parent run per KFP run in our experiment, MLFLOW_RUN_ID for each task, links that open in `make ui`."""
    plugin = json.loads(PLUGIN_CONFIG.read_text())["plugins"]["mlflow"]
    settings = plugin["settings"]
    pipeline_env = find(built["pipeline"], "ConfigMap", "pipeline-env")["data"]
    assert plugin["endpoint"] == pipeline_env["MLFLOW_TRACKING_URI"] == MLFLOW_URL
    assert settings["defaultExperimentName"] == pipeline_env["MLFLOW_EXPERIMENT_NAME"]
    # Basic auth from Secret kubeflow/kfp-mlflow-credentials (the plugin's fixed name), which it also hands the
    # steps as MLFLOW_TRACKING_USERNAME/PASSWORD; no workspaces (an MLflow 3 server without them), and no tls
    # block: the plugin reads its CA file even for an http endpoint, and fails when it is absent.
    assert (settings["authType"], settings["workspacesEnabled"], settings["injectUserEnvVars"]) == (
        "basic-auth", False, True)
    assert settings["credentialSecretRef"] == {"usernameKey": "username", "passwordKey": "password"}
    assert "tls" not in plugin
    mk = (ROOT / "Makefile").read_text() + CLUSTER_MK.read_text()
    kfp_port = re.search(r"^KFP_PORT \?= (\d+)", mk, re.M).group(1)
    mlflow_port = re.search(r"^MLFLOW_UI_PORT \?= (\d+)", mk, re.M).group(1)
    assert settings["kfpBaseURL"] == f"http://127.0.0.1:{kfp_port}"
    assert settings["mlflowBaseURL"] == f"http://127.0.0.1:{mlflow_port}"
    allowed_hosts = next(a for a in find(built["mlflow"], "Deployment", "mlflow")["spec"]["template"]["spec"][
        "containers"][0]["args"] if a.startswith("--allowed-hosts="))
    assert plugin["endpoint"].removeprefix("http://") in allowed_hosts.split("=", 1)[1].split(",")


def test_mlflow_plugin_patch_mounts_the_config_over_upstream_s(tmp_path):
    """The patch and generator of manifests/kfp, over a stand-in of upstream's API server Deployment."""
    for name in ("mlflow-plugin.yaml", "apiserver-config.json"):
        shutil.copy(MANIFESTS / "kfp" / name, tmp_path / name)
    (tmp_path / "api.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ml-pipeline", "namespace": "kubeflow"},
        "spec": {"selector": {"matchLabels": {"app": "ml-pipeline"}}, "template": {
            "metadata": {"labels": {"app": "ml-pipeline"}},
            "spec": {"containers": [{"name": "ml-pipeline-api-server", "image": "api",
                                     "volumeMounts": [{"name": "mlflow-tracking-ca", "mountPath": "/etc/ca"}]}],
                     "volumes": [{"name": "mlflow-tracking-ca", "configMap": {"name": "ca", "optional": True}}]}}}}))
    ours = yaml.safe_load((MANIFESTS / "kfp" / "kustomization.yaml").read_text())
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["api.yaml"], "patches": [{"path": "mlflow-plugin.yaml"}],
        "configMapGenerator": ours["configMapGenerator"]}))
    assert {"path": "mlflow-plugin.yaml"} in ours["patches"]
    docs = kustomize(tmp_path)
    pod = find(docs, "Deployment", "ml-pipeline")["spec"]["template"]["spec"]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert set(mounts) == {"/etc/ca", "/config/config.json"}  # upstream's mount kept
    assert mounts["/config/config.json"]["subPath"] == "config.json"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/config/config.json"]["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] != "kfp-apiserver-config"
    assert json.loads(config_map["data"]["config.json"]) == json.loads(PLUGIN_CONFIG.read_text())


@pytest.fixture(scope="module")
def kfp_source() -> Path:
    source = os.environ.get("KFP_SOURCE_DIR")
    if not source:
        pytest.skip("checking the plugin config against KFP's own code needs KFP_SOURCE_DIR: a copy of "
                    "kubeflow/pipelines at 2.17.0 (manifests/README.md shows how)")
    return Path(source)


def test_mlflow_plugin_config_is_upstream_s_but_for_the_plugin(kfp_source):
    """apiserver-config.json is upstream's config.json of 2.17.0 with plugins.mlflow replaced, and the object
    store's credentials left to the env of the Deployment (OBJECTSTORECONFIG_*, from Secret
    mlpipeline-minio-artifact)."""
    upstream = json.loads((kfp_source / "backend/src/apiserver/config/config.json").read_text())
    ours = json.loads(PLUGIN_CONFIG.read_text())
    credentials = {"AccessKey", "SecretAccessKey"}
    assert set(ours) == set(upstream)
    for key in set(upstream) - {"plugins", "ObjectStoreConfig"}:
        assert ours[key] == upstream[key], key
    store, upstream_store = ours["ObjectStoreConfig"], upstream["ObjectStoreConfig"]
    assert {k: v for k, v in store.items() if k not in credentials} == \
        {k: v for k, v in upstream_store.items() if k not in credentials}
    assert all(store[k] == "" for k in credentials)
    assert set(upstream["plugins"]) == set(ours["plugins"]) == {"mlflow"}


def test_mlflow_plugin_config_uses_only_fields_kfp_knows(kfp_source):
    """Every key we set is a JSON field of the plugin's config structs at 2.17.0 (an unknown one would be
    ignored without a word), and the auth type is one the plugin supports."""
    code = (kfp_source / "backend/src/common/plugins/mlflow/config.go").read_text()
    client = (kfp_source / "backend/src/common/plugins/mlflow/client.go").read_text()

    def fields(struct: str) -> set[str]:
        body = re.search(rf"type {struct} struct \{{(.*?)\n\}}", code, re.S).group(1)
        return set(re.findall(r'json:"([A-Za-z]+)', body))

    plugin = json.loads(PLUGIN_CONFIG.read_text())["plugins"]["mlflow"]
    assert set(plugin) <= fields("PluginConfig")
    assert set(plugin["settings"]) <= fields("MLflowPluginSettings")
    supported = re.search(r"func IsSupportedAuthType.*?case (.*?):", client, re.S).group(1)
    constants = dict(re.findall(r'(AuthType\w+)\s*=\s*"([^"]+)"', client))
    assert plugin["settings"]["authType"] in {constants[name.strip()] for name in supported.split(",")}
