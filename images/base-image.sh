#!/usr/bin/env bash
# Build a Python base image without any registry: debootstrap -> docker import -> apt python3.
#   images/base-image.sh NAME [CA_CERTS_DIR]
set -euo pipefail
name=${1:?usage: base-image.sh NAME [CA_CERTS_DIR]}
ca_dir=${2:-/usr/local/share/ca-certificates}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null || { echo "base-image: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "base-image: no Docker daemon answers; start dockerd" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "base-image: debootstrap needs root" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; echo "base-image: debootstrap failed" >&2; exit 1; }
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
tar -C "$work/rootfs" -c . | docker import - "$name-rootfs" >/dev/null

mkdir -p "$work/context/ca-certificates"
find "$ca_dir" -maxdepth 1 -name '*.crt' -exec cp {} "$work/context/ca-certificates/" \; 2>/dev/null || true
docker build -q -f "$(dirname "$0")/base.Dockerfile" --build-arg ROOTFS_IMAGE="$name-rootfs" -t "$name" "$work/context" >/dev/null
docker rmi -f "$name-rootfs" >/dev/null
echo "built $name ($(docker run --rm "$name" python3 --version)); extra CA certificates from $ca_dir: $(ls "$work/context/ca-certificates" | wc -l)"
