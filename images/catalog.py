"""Image names, tags, builds and checks, all from images.toml. Standard library only: it runs before any venv.

A tag is the project version plus a hash of everything the images are built from, never `latest`, so kind
can load the images and pods never pull.

    python3 -m images.catalog list                     # one image reference a line
    python3 -m images.catalog build [--base-image B] [NAME ...]
    python3 -m images.catalog check [NAME ...]         # built, non-root, imports what its steps need
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11
    sys.exit(f"images/catalog.py needs Python 3.11 or newer (this is {sys.version.split()[0]}): "
             "run it through make, which finds one, or as python3.11 -m images.catalog")

ROOT = Path(__file__).resolve().parent.parent
# What the images are built from: any change here gives new tags.
INPUTS = ["pyproject.toml", "constraints.txt", ".dockerignore", "components", "images"]
DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"


class ImageError(Exception):
    """A problem with one image, said so that the user knows which image and what to do."""


def config() -> dict:
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
    conf, current = config(), tag()
    return {name: f"{conf['prefix']}-{name}:{current}" for name in conf["images"]}


def step_images() -> dict[str, str]:
    """pipeline step -> full image reference."""
    refs = images()
    return {step: refs[image] for step, image in config()["steps"].items()}


def steps_of(name: str) -> list[str]:
    return [step for step, image in config()["steps"].items() if image == name]


# ---------------------------------------------------------------- docker

def docker(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["docker", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise ImageError("the docker command is not installed: install Docker (Debian: apt-get install docker.io)")


def require_daemon() -> None:
    result = docker("info", "--format", "{{.ServerVersion}}")
    if result.returncode or not result.stdout.strip():
        raise ImageError("no Docker daemon answers (docker info failed): start it (systemctl start docker, "
                         "or `dockerd &` as root) and try again")


def build(names: list[str], base_image: str) -> None:
    require_daemon()
    conf, refs = config(), images()
    for name in names:
        print(f"building {refs[name]} (steps: {', '.join(steps_of(name)) or 'serving'}) from {base_image}", flush=True)
        result = subprocess.run(
            ["docker", "build", "-f", str(ROOT / "images" / conf["dockerfile"]), "-t", refs[name],
             "--build-arg", f"BASE_IMAGE={base_image}",
             "--build-arg", f"REQUIREMENTS={conf['images'][name]['requirements']}", str(ROOT)])
        if result.returncode:
            raise ImageError(f"image {name!r} ({refs[name]}) failed to build (its output is above). "
                             f"Fix the cause and run `make images` again; without registry access build the base "
                             f"first: `make base-image` then `make images BASE_IMAGE=<that image>`")


def check(names: list[str]) -> None:
    """Each image is built, starts as a non-root user and imports what its steps need."""
    require_daemon()
    conf, refs = config(), images()
    for name in names:
        ref, spec = refs[name], conf["images"][name]
        if docker("image", "inspect", ref).returncode:
            raise ImageError(f"image {ref} (steps: {', '.join(steps_of(name)) or 'serving'}) is not built: "
                             "run `make images`")
        imports = "; ".join(f"import {module}" for module in spec["imports"])
        result = docker("run", "--rm", "--network", "none", ref, "python3", "-c",
                        f"import os; {imports}; print(os.getuid())")
        if result.returncode:
            problem = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise ImageError(f"image {ref} cannot import what its steps need ({problem}): add the package to "
                             f"images/{spec['requirements']} and run `make images`")
        if result.stdout.strip() == "0":
            raise ImageError(f"image {ref} runs as root: it must run as its non-root user")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print every image reference")
    build_cmd = commands.add_parser("build", help="build images")
    build_cmd.add_argument("--base-image", default=DEFAULT_BASE_IMAGE)
    build_cmd.add_argument("names", nargs="*")
    check_cmd = commands.add_parser("check", help="check built images")
    check_cmd.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(images().values()))
    else:
        names = args.names or list(config()["images"])
        unknown = sorted(set(names) - set(config()["images"]))
        if unknown:
            parser.error(f"unknown image(s) {unknown}; images.toml has {sorted(config()['images'])}")
        try:
            build(names, args.base_image) if args.command == "build" else check(names)
        except ImageError as exc:
            print(f"images: {exc}", file=sys.stderr)
            return 1
        print(f"{args.command}: ok: {', '.join(images()[n] for n in names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
