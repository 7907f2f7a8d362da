#!/bin/sh
# Installs everything cargohold needs on Debian/Ubuntu (run as root): etcd, skopeo,
# a Python virtual environment in .venv with cargohold in it. Idempotent. With --test also
# what the container image tests need: mmdebstrap, buildah, podman, podman-compose, runc, containerd (ctr).
#   ./install.sh          the registry
#   ./install.sh --test   the registry and what the test suite needs
set -eu
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

missing=""
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v skopeo >/dev/null 2>&1 || missing="$missing skopeo"
if [ "${1:-}" = "--test" ]; then      # the container image tests (tests/deploy): build offline, run, pull
    for tool in mmdebstrap buildah podman podman-compose runc containerd; do
        command -v $tool >/dev/null 2>&1 || missing="$missing $tool"
    done
fi
python3 -m venv --help >/dev/null 2>&1 && python3 -c "import ensurepip" 2>/dev/null || missing="$missing python3-venv"
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq $missing >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"
