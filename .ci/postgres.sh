#!/usr/bin/env bash
# PostgreSQL server binaries for the multi-worker search test: tests/postgres.py starts its own throwaway server
# with initdb / pg_ctl from /usr/lib/postgresql/*/bin, so nothing is configured or started here.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
ls /usr/lib/postgresql/*/bin/initdb
