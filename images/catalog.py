"""Image names and tags from images.toml (standard library only: the Makefile runs it before any venv).

A tag is the project version plus a hash of everything that goes into the images, never `latest`,
so kind can load the images and pods never pull.

    python3 -m images.catalog          # prints IMAGE_<name>=<ref> lines for the Makefile
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the images are built from: any change here gives new tags.
INPUTS = ["pyproject.toml", "constraints.txt", "components", "images"]


def _config() -> dict:
    return tomllib.loads((ROOT / "images" / "images.toml").read_text())


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def content_hash() -> str:
    digest = hashlib.sha256()
    for name in INPUTS:
        path = ROOT / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if "__pycache__" in file.parts or not file.exists():
                continue
            digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def tag() -> str:
    return f"{version()}-{content_hash()}"


def images() -> dict[str, str]:
    """image name -> full reference, e.g. data -> rental-price-data:0.1.0-0123456789ab."""
    config, current = _config(), tag()
    return {name: f"{config['prefix']}-{name}:{current}" for name in config["images"]}


def step_images() -> dict[str, str]:
    """pipeline step -> full image reference."""
    refs = images()
    return {step: refs[image] for step, image in _config()["steps"].items()}


def dockerfiles() -> dict[str, str]:
    return dict(_config()["images"])


if __name__ == "__main__":
    for name, ref in images().items():
        print(f"IMAGE_{name}={ref}")
    print(f"IMAGE_TAG={tag()}")
