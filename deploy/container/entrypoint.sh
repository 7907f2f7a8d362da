#!/bin/sh
# `docker run IMAGE` serves; `docker run IMAGE user list` (any other cargohold command) runs it;
# options alone are `serve` options (`docker run IMAGE --site eu`), except --version and --help.
set -eu
case "${1:-serve}" in
    --version|--help|-h) ;;
    -*) set -- serve "$@" ;;
esac
exec /opt/cargohold/bin/cargohold "$@"
