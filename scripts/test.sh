#!/usr/bin/env bash
# Install everything the tests need into .venv, then run lint, type checks and all tests.
# Usage: ./scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/ztick_tw_plugin.py
.venv/bin/python -m pip install -q --disable-pip-version-check \
    -e '.[test]' --config-settings editable_mode=compat

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy (strict)"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
