#!/bin/sh
# Builds the cargohold container image offline: no base image is pulled. mmdebstrap makes a
# minimal Debian 12 root filesystem from Debian's package archive (python3, etcd-server,
# ca-certificates), pip installs cargohold and the wheels pinned in requirements.txt into a
# venv inside it, and buildah turns that into a one-layer image "from scratch". The result is
# the image the Containerfile builds (same paths, user, settings, labels, healthcheck).
#
#   deploy/container/build.sh [--tag NAME] [--archive FILE]
#
# Needs root on Debian/Ubuntu with mmdebstrap and buildah (install.sh --test installs them),
# Debian's package archive and PyPI. Environment:
#   SOURCE_DATE_EPOCH  the time of every file and of the image (default: the last commit's)
#   DEBIAN_MIRROR      the archive (default http://deb.debian.org/debian); for a fully pinned
#                      build a snapshot, e.g. http://snapshot.debian.org/archive/debian/20250520T000000Z
#   DEBIAN_SECURITY    the security archive ("" leaves it out; default deb.debian.org's)
#   PYTHON             a Python 3.11 with pip, to fetch the wheels (default: .venv/bin/python)
# Reproducible: the same inputs (packages, wheels, source, SOURCE_DATE_EPOCH) give the same
# layer digest; the packages that went in are listed in the build log (dpkg -l).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml")
tag="localhost/cargohold:$version"
archive=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --archive) archive=$2; shift 2 ;;
        *) echo "usage: $0 [--tag NAME] [--archive FILE (docker-archive)]" >&2; exit 2 ;;
    esac
done
for tool in mmdebstrap buildah; do
    command -v $tool >/dev/null || { echo "build.sh: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done
: "${SOURCE_DATE_EPOCH:=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 1700000000)}"
export SOURCE_DATE_EPOCH
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY-http://deb.debian.org/debian-security}
python=${PYTHON:-$repo/.venv/bin/python}
pip_version=24.0           # runs only during the build; not in the image

work=$(mktemp -d "${TMPDIR:-/tmp}/cargohold-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== wheels (PyPI, pinned)"
mkdir "$work/wheels" "$work/src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/cargohold" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$python" -m pip download -q --disable-pip-version-check --only-binary :all: --no-deps \
    -d "$work/wheels" -r "$here/requirements.txt" "pip==$pip_version"
"$python" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/wheels" "$work/src"

echo "== root filesystem (mmdebstrap, Debian 12)"
# Hooks run on the host with the root filesystem as $1; in_root runs a command inside it with
# a clean environment (the host's PIP_* settings must not reach the image's pip).
in_root='chroot "$1" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root SOURCE_DATE_EPOCH='"$SOURCE_DATE_EPOCH"
install_venv="$in_root"' python3 -m venv --without-pip /opt/cargohold
    cp -r '"$work"'/wheels "$1/tmp/wheels"
    '"$in_root"' /opt/cargohold/bin/python /tmp/wheels/pip-'"$pip_version"'-py3-none-any.whl/pip install -q \
        --no-index --find-links /tmp/wheels --no-compile --no-warn-script-location \
        -r /tmp/wheels/requirements.txt cargohold
    '"$in_root"' /opt/cargohold/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/cargohold/lib
    rm -rf "$1/tmp/wheels"'
cp "$here/requirements.txt" "$work/wheels/requirements.txt"
add_user='echo "cargohold:x:10001:10001:cargohold:/data:/usr/sbin/nologin" >> "$1/etc/passwd"
    echo "cargohold:x:10001:" >> "$1/etc/group"
    echo "cargohold:!:1::::::" >> "$1/etc/shadow"
    mkdir -p "$1/data" "$1/etc/cargohold" "$1/usr/local/lib/cargohold"
    chown 10001:10001 "$1/data"
    cp '"$here"'/entrypoint.sh '"$here"'/healthcheck.py "$1/usr/local/lib/cargohold/"'
# Only what the image needs at run time: no apt, no docs, no caches, no logs of the build.
trim="$in_root"' dpkg -l | awk "/^ii/ {print \$2, \$3}" > '"$work"'/packages.txt
    rm -rf "$1/var/cache/"* "$1/var/lib/apt/lists/"* "$1/var/log/"* "$1/etc/machine-id" \
        "$1/usr/share/python-wheels" "$1/tmp/"*'
set -- "deb $mirror bookworm main" "deb $mirror bookworm-updates main"
[ -n "$security" ] && set -- "$@" "deb $security bookworm-security main"
# merged-usr: /usr merged by mmdebstrap itself, so usrmerge (and with it perl, ~55 MB) stays out.
mmdebstrap --quiet --variant=essential --include=python3,libstdc++6,etcd-server,ca-certificates \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook="$install_venv" --customize-hook="$add_user" --customize-hook="$trim" \
    bookworm "$work/rootfs.tar" "$@"
sed 's/^/   /' "$work/packages.txt"

echo "== image (buildah, from scratch)"
export BUILDAH_FORMAT=docker    # the OCI image config has no HEALTHCHECK
container=$(buildah from scratch)
buildah add --quiet "$container" "$work/rootfs.tar" / >/dev/null
buildah config \
    --os linux --arch "$(dpkg --print-architecture)" \
    --user 10001:10001 --workingdir /data --volume /data --port 5000/tcp \
    --env PATH=/opt/cargohold/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env PYTHONDONTWRITEBYTECODE=1 --env CARGOHOLD_LISTEN=0.0.0.0:5000 --env CARGOHOLD_DATA_DIR=/data \
    --entrypoint '["/usr/local/lib/cargohold/entrypoint.sh"]' --cmd serve \
    --healthcheck 'CMD /opt/cargohold/bin/python /usr/local/lib/cargohold/healthcheck.py' \
    --healthcheck-interval 30s --healthcheck-timeout 5s --healthcheck-start-period 30s --healthcheck-retries 3 \
    --label org.opencontainers.image.title=cargohold \
    --label "org.opencontainers.image.description=A clustered OCI container image registry on etcd and gRPC" \
    --label org.opencontainers.image.source=https://github.com/cargohold/cargohold \
    --label "org.opencontainers.image.version=$version" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    "$container"
buildah commit --quiet --format docker --timestamp "$SOURCE_DATE_EPOCH" --rm "$container" "$tag" >/dev/null
[ -z "$archive" ] || buildah push --quiet "$tag" "docker-archive:$archive:$tag" >/dev/null
printf '%s %s\n' "$tag" "$(buildah inspect --type image --format '{{.FromImageDigest}}' "$tag")"
