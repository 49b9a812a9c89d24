#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs the
# linters, the type checker and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,http-candidates]'

# The etcd tests start etcd servers of their own (deploy/private_servers.py): Debian's etcd-server, with
# etcd-client's etcdctl to set up etcd's auth; the benchmark suite's test drives a node with h2load (Debian's
# nghttp2-client), bench/http_servers.py's test drives HTTP servers with Debian's wrk; tests/interop runs a client on
# Node.js's gRPC stack (Debian's nodejs and npm). Each installed if missing.
packages=()
command -v etcd >/dev/null || packages+=(etcd-server)
command -v etcdctl >/dev/null || packages+=(etcd-client)
command -v h2load >/dev/null || packages+=(nghttp2-client)
command -v wrk >/dev/null || packages+=(wrk)
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)
if [ ${#packages[@]} -gt 0 ]; then
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    if ! apt_output=$({ "${as_root[@]}" apt-get update -q &&
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"; } 2>&1); then
        printf '%s\n' "$apt_output" >&2
        echo "tests/run.sh: cannot install ${packages[*]} (apt-get install failed, see above); install them and run again" >&2
        exit 1
    fi
fi

# The Node.js client's packages (@grpc/grpc-js, @grpc/proto-loader), as tests/interop/package-lock.json pins them.
npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The layers between fluxkv's packages, and no import cycles ([tool.importlinter] in pyproject.toml).
.venv/bin/lint-imports --no-logo
# pytest exits 5 when no test ran; set -e turns that into a failure.
.venv/bin/pytest "$@"
