#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs the
# linters, the type checker and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

# The etcd tests start etcd servers of their own (fluxkv/private_servers.py): Debian's etcd-server, installed if missing.
if ! command -v etcd >/dev/null; then
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    if ! apt_output=$({ "${as_root[@]}" apt-get update -q &&
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server; } 2>&1); then
        printf '%s\n' "$apt_output" >&2
        echo "tests/run.sh: cannot install etcd (apt-get install etcd-server failed, see above); install it and run again" >&2
        exit 1
    fi
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# pytest exits 5 when no test ran; set -e turns that into a failure.
.venv/bin/pytest "$@"
