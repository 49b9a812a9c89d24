#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs the
# linters, the type checker and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# pytest exits 5 when no test ran; set -e turns that into a failure.
.venv/bin/pytest "$@"
