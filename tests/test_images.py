"""The container tier (`make test-images`): each image as built, and the whole pipeline with every task in its image.

Needs a running Docker daemon and the images built by `make images`.
"""

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, free_port, wait_until
from mlflow.tracking import MlflowClient

from pipelines import training
from images import catalog

pytestmark = pytest.mark.images
CONSTRAINTS = {
    re.sub(r"[-_.]+", "-", line.split("==")[0]).lower(): line.split("==")[1].strip()
    for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
}


@pytest.fixture(scope="module", autouse=True)
def daemon():
    try:
        catalog.require_daemon()
    except catalog.ImageError as exc:
        pytest.fail(f"the container tier needs Docker: {exc}")


def in_image(ref: str, script: str) -> str:
    result = subprocess.run(["docker", "run", "--rm", "--network", "none", ref, "python3", "-c", script],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("name", list(catalog.config()["images"]))
def test_image_is_lean_non_root_and_pinned(name):
    ref, spec = catalog.images()[name], catalog.config()["images"][name]
    catalog.check([name])  # built, imports what its steps need, not root
    assert in_image(ref, "import os; print(os.getuid(), os.getgid())") == "10001 10001"
    found = json.loads(in_image(ref, f"import importlib.util as u, json; print(json.dumps("
                                     f"[m for m in {spec['absent']!r} if u.find_spec(m)]))"))
    assert found == [], f"{ref} holds {found}, which it should not"
    tools = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", ref, "-c",
                            "command -v gcc cc g++ make pip pip3 || true"], capture_output=True, text=True)
    assert tools.stdout.strip() == "", f"{ref} holds build tools: {tools.stdout.split()}"
    installed = json.loads(in_image(ref, "import importlib.metadata as m, json; print(json.dumps("
                                         "{d.metadata['Name']: d.version for d in m.distributions()}))"))
    unpinned = {n: v for n, v in installed.items() if CONSTRAINTS.get(re.sub(r"[-_.]+", "-", n).lower()) != v}
    assert unpinned == {}, f"{ref} holds packages not pinned by constraints.txt"
    size_mb = int(subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", ref],
                                 capture_output=True, text=True, check=True).stdout) / 1e6
    print(f"\n{ref}: {size_mb:.0f} MB (budget {spec['budget_mb']} MB)")
    assert size_mb <= spec["budget_mb"]


def test_missing_image_says_which_and_what_to_do(monkeypatch):
    monkeypatch.setattr(catalog, "images", lambda: {"data": "rental-price-data:0.0.0-notbuilt"})
    with pytest.raises(catalog.ImageError, match=r"image rental-price-data:0.0.0-notbuilt \(steps: download, "
                                                 r"clean, check, split, monitor, retrain\) is not built: run `make images`"):
        catalog.check(["data"])


def test_image_lacking_a_package_says_which_and_what_to_do(monkeypatch):
    conf = catalog.config()
    conf["images"]["data"]["imports"].append("xgboost")
    monkeypatch.setattr(catalog, "config", lambda: conf)
    with pytest.raises(catalog.ImageError, match=r"rental-price-data:\S+ cannot import what its steps need "
                                                 r"\(ModuleNotFoundError: No module named 'xgboost'\): add the "
                                                 r"package to images/data.txt"):
        catalog.check(["data"])


def test_failed_build_says_which_image_and_what_to_do():
    with pytest.raises(catalog.ImageError, match=r"image 'serve' \(rental-price-serve:\S+\) failed to build.*"
                                                 r"make base-image"):
        catalog.build(["serve"], base_image=f"no-such-base-{uuid.uuid4().hex[:6]}:1")


def test_missing_daemon_is_a_clear_message(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(catalog.ImageError, match="no Docker daemon answers.*start it"):
        catalog.require_daemon()
    result = subprocess.run([sys.executable, "pipeline.py", "run", "--runner", "docker"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("pipeline.py run --runner docker: no Docker daemon")
    assert "Traceback" not in result.stderr


def test_serving_image_serves_the_prod_model(mlflow_server, registered_model, listings):
    from components import predict

    port = free_port()
    ref = catalog.images()["serve"]
    # The same command as `make serve-local` and the cluster's pod; host network to reach MLflow on 127.0.0.1.
    container = subprocess.run(
        ["docker", "run", "-d", "--rm", "--network", "host", "-e", f"MLFLOW_TRACKING_URI={mlflow_server}", ref,
         "python3", "-m", "components.serve", "--model", f"models:/{registered_model}@prod", "--port", str(port)],
        capture_output=True, text=True, check=True).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(f"{url}/ping")
        answer, version = predict.predict(url, listings.head(3))
        prices = answer["predictions"]
        assert version == "1" and len(prices) == 3 and all(10 <= p <= 350 for p in prices)
        assert all(r["low"] <= p <= r["high"] for p, r in zip(prices, answer["price_ranges"]))
    finally:
        logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True)
        subprocess.run(["docker", "stop", container], capture_output=True)
    assert "serving models:/" in logs.stderr + logs.stdout


def test_whole_pipeline_with_every_task_in_its_image(mlflow_server, tmp_path):
    """On the default source: the sample shipped inside the images."""
    model = f"rental-docker-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "docker"}
    result = subprocess.run(
        [sys.executable, "pipeline.py", "run", "--runner", "docker", "--pipeline-root", str(tmp_path / "out"),
         "--param", f"model_name={model}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    # Every task ran in a container of its own image (kfp.local logs the image it found, in the run's log file).
    logged = Path(re.search(r"^steps \(full log: (.*)\):$", result.stdout, re.M).group(1)).read_text()
    for ref in set(catalog.step_images().values()):
        assert f"Found image {ref!r}" in logged
    prod = MlflowClient(mlflow_server).get_model_version_by_alias(model, "prod")
    assert prod.version == "1" and float(prod.tags["test_mae"]) <= 30.5  # the default learner, as locally
    assert prod.tags["data_source"] == "sample://nyc_airbnb_sample1.csv.gz"
    images = catalog.step_images()
    assert json.loads(prod.tags["images"]) == {step: images[step] for step in training.STEPS}
    # Batch scoring with the version just made, its score step in the model's image.
    result = subprocess.run(
        [sys.executable, "pipeline.py", "run", "--runner", "docker", "--pipeline", "batch", "--pipeline-root",
         str(tmp_path / "out"), "--param", f"model=models:/{model}@prod", "--param", "max_rejected=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    logged = Path(re.search(r"^steps \(full log: (.*)\):$", result.stdout, re.M).group(1)).read_text()
    assert f"Found image {images['score']!r}" in logged
    priced = re.search(r"^priced (\d+) of 20000 listings with '(.+)' version 1 ", result.stdout, re.M)
    assert priced and priced.group(2) == model and int(priced.group(1)) > 19000, result.stdout
    predictions = tmp_path / "out" / "latest" / "predictions.parquet"
    assert predictions.read_bytes()[:4] == b"PAR1"  # Parquet, written in the image
    # Monitoring the same listings against that prod, its monitor step in the data image: nothing moved.
    result = subprocess.run(
        [sys.executable, "pipeline.py", "run", "--runner", "docker", "--pipeline", "monitor", "--pipeline-root",
         str(tmp_path / "out"), "--param", f"model_name={model}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    logged = Path(re.search(r"^steps \(full log: (.*)\):$", result.stdout, re.M).group(1)).read_text()
    assert f"Found image {images['monitor']!r}" in logged
    assert result.stdout.strip().splitlines()[-1].startswith("verdict: ok: nothing moved that matters")
    report = tmp_path / "out" / "latest" / "drift_report.html"
    assert "Verdict: ok" in report.read_text()
