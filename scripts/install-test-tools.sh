#!/usr/bin/env bash
# Tools the test suite drives for real: Prometheus (server + promtool) from Debian and the
# Node.js gRPC client from npm. Installs only what is missing; idempotent.
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

if [ -f tests/node/package.json ] && [ ! -d tests/node/node_modules ]; then
    command -v npm >/dev/null || apt_install nodejs npm
    npm ci --prefix tests/node --no-audit --no-fund --silent
fi
