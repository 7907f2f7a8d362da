#!/bin/sh
# `docker run IMAGE` serves; `docker run IMAGE user list` (any other cargohold command) runs it.
# Options for `serve` may follow: `docker run IMAGE serve --site eu`.
set -eu
case "${1:-serve}" in
    -*) set -- serve "$@" ;;
esac
exec /opt/cargohold/bin/cargohold "$@"
