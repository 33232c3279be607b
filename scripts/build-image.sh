#!/usr/bin/env bash
# Builds the server image with buildah from the repository root: `make image` (the CPU image).
#
#   scripts/build-image.sh [cpu|cuda]        build deploy/docker/Dockerfile.VARIANT
#   scripts/build-image.sh --tag [cpu|cuda]  print the image's name:tag (what deploy/k8s references)
#
# The image is cispo:<version in pyproject.toml>-VARIANT, in buildah's local storage (podman
# sees it; `buildah push` sends it to a registry).
#
# The base is the Dockerfile's own (python:3.11-slim-bookworm) when it can be pulled. Where no
# container registry is reachable, a base of the same shape is built here from Debian's packages:
# debootstrap's minimal bookworm with its python3 (3.11) and a virtual environment on PATH, so
# that `python` and a pip that may install exist, as in the upstream image. That base is kept in
# buildah's storage and reused while this script is unchanged; with CI=true it is built afresh.
#
# pip in the build uses this machine's pip configuration (PYTHON's pip, default python3): its
# indexes, local find-links directories and CA certificate are mounted into the RUN steps (never
# into the image) and named by the build argument PIP_CONFIG_FILE. Where the Dockerfile's torch
# index cannot be reached, torch comes from pip's own index and find-links (a local CPU wheel
# wins over the index's build of the same version).
#
# Environment: BASE_IMAGE (a base to build on; no pull, no debootstrap), TORCH_INDEX_URL,
# PYTHON, DEBIAN_MIRROR (default deb.debian.org), BUILDAH_ISOLATION (default chroot).
set -euo pipefail
cd "$(dirname "$0")/.."

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
tag_of() { echo "cispo:${version}-$1"; }

if [ "${1:-}" = --tag ]; then
    tag_of "${2:-cpu}"
    exit 0
fi
variant="${1:-cpu}"
dockerfile="deploy/docker/Dockerfile.${variant}"
[ -f "$dockerfile" ] || { echo "no $dockerfile: the variants are cpu and cuda" >&2; exit 2; }
missing() { echo "$1 is missing: apt-get install buildah debootstrap (make test-tools installs them)" >&2; exit 1; }
command -v buildah >/dev/null || missing buildah
PYTHON="${PYTHON:-python3}"
isolation="${BUILDAH_ISOLATION:-chroot}"
work="$(mktemp -d)"
container=""
cleanup() {
    [ -z "$container" ] || buildah rm "$container" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# The base ---------------------------------------------------------------------------------------

build_debian_base() {  # $1: the tag to commit it as
    local mnt
    command -v debootstrap >/dev/null || missing debootstrap
    echo "image: base from Debian packages (debootstrap --variant=minbase bookworm, python3)"
    container="$(buildah from scratch)"
    mnt="$(buildah mount "$container")"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$mnt" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
    chroot "$mnt" python3 -m venv /opt/venv
    # What debootstrap leaves of the build machine (its resolver, its name) and of the download.
    rm -rf "$mnt"/etc/resolv.conf "$mnt"/etc/hostname "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/lib/apt/lists/*
    buildah unmount "$container" >/dev/null
    buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python "$container"
    buildah commit --quiet --rm "$container" "$1" >/dev/null
    container=""
}

dockerfile_base="$(sed -n 's/^ARG BASE_IMAGE=//p' "$dockerfile")"
if [ -n "${BASE_IMAGE:-}" ]; then
    base="$BASE_IMAGE"
elif buildah inspect --type image "$dockerfile_base" >/dev/null 2>&1 \
        || buildah pull --quiet "$dockerfile_base" >/dev/null 2>"$work/pull.log"; then
    base="$dockerfile_base"
else
    echo "image: $dockerfile_base cannot be pulled ($(tail -n 1 "$work/pull.log"))"
    base="localhost/cispo-base:bookworm-$(sha256sum "$0" | cut -c 1-12)"
    if [ "${CI:-}" = true ] || ! buildah inspect --type image "$base" >/dev/null 2>&1; then
        buildah rmi "$base" >/dev/null 2>&1 || true
        build_debian_base "$base"
    else
        echo "image: base $base (cached)"
    fi
    # Bases of earlier versions of this script.
    buildah images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/cispo-base:' | grep -vxF "$base" \
        | xargs -r buildah rmi >/dev/null 2>&1 || true
fi

# pip's configuration, for the RUN steps -------------------------------------------------------

pip_setting() {  # the value pip uses for $1: the environment's, else the last file's
    "$PYTHON" -m pip config list 2>/dev/null | awk -v key="$1" '
        { split($0, kv, "="); name = kv[1]; sub(/^[^.]*\./, "", name) }
        name == key { value = substr($0, length(kv[1]) + 2); gsub(/^'\''|'\''$/, "", value)
                      if ($0 ~ /^:env:/) env = value; else file = value }
        END { print (env != "" ? env : file) }'
}

# One directory, mounted on the base's empty /mnt (a mount point that does not exist yet would be
# left in the image): pip.conf, the CA certificate and the find-links directories (hard links).
pip_dir="$work/pip"
mkdir -p "$pip_dir"
conf="$pip_dir/pip.conf"
echo "[global]" >"$conf"
find_links=()
n=0
for entry in $(pip_setting find-links); do
    path="${entry#file://}"
    if [ -d "$path" ]; then
        cp -al "$path" "$pip_dir/find-links-$n" 2>/dev/null || cp -a "$path" "$pip_dir/find-links-$n"
        find_links+=("/mnt/find-links-$n")
        n=$((n + 1))
    elif [[ "$entry" == http* ]]; then
        find_links+=("$entry")
    fi
done
[ "${#find_links[@]}" -eq 0 ] || echo "find-links = ${find_links[*]}" >>"$conf"
cert="$(pip_setting cert)"
if [ -f "$cert" ]; then
    cp "$cert" "$pip_dir/ca.pem"
    echo "cert = /mnt/ca.pem" >>"$conf"
fi
# Network indexes only: a local (file://) index is a copy of what the network ones serve.
index_url="$(pip_setting index-url)"
[[ "$index_url" == http* ]] || index_url=https://pypi.org/simple
echo "index-url = $index_url" >>"$conf"
extra=()
for entry in $(pip_setting extra-index-url); do
    [[ "$entry" != http* ]] || extra+=("$entry")
done
[ "${#extra[@]}" -eq 0 ] || echo "extra-index-url = ${extra[*]}" >>"$conf"

torch_index="${TORCH_INDEX_URL:-$(sed -n 's/^ARG TORCH_INDEX_URL=//p' "$dockerfile")}"
reachable() {
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)' "$1" >/dev/null 2>&1
}
if [ -z "${TORCH_INDEX_URL:-}" ] && ! reachable "${torch_index%/}/torch/"; then
    echo "image: $torch_index cannot be reached; torch from $index_url and find-links"
    torch_index="$index_url"
fi

# The image -----------------------------------------------------------------------------------

tag="$(tag_of "$variant")"
previous="$(buildah images --quiet --noheading "$tag" 2>/dev/null || true)"
echo "image: building $tag from $dockerfile on $base"
# --layers: a later build reuses the steps whose inputs are unchanged (torch, when only the
# project's sources changed).
id="$(buildah bud --isolation "$isolation" --layers --quiet -f "$dockerfile" --ignorefile "$dockerfile.dockerignore" \
    --build-arg "BASE_IMAGE=$base" --build-arg "TORCH_INDEX_URL=$torch_index" \
    --volume "$pip_dir:/mnt:ro" --build-arg PIP_CONFIG_FILE=/mnt/pip.conf \
    --tag "$tag" . | tail -n 1)"
# The image the tag named before, with its layers that nothing else uses.
if [ -n "$previous" ] && [[ "$id" != "$previous"* ]]; then
    buildah rmi "$previous" >/dev/null 2>&1 || true
fi
echo "image: built $tag $id"
