#!/usr/bin/env bash
# Install everything the tests need into .venv, then run lint, type checks and all tests.
# Usage: ./scripts/test.sh [--quick] [extra pytest arguments]
#   --quick  neither install rabbitmq-server nor run the tests that need a RabbitMQ broker
#            (sets ZTICK_TEST_QUICK=1, see tests/conftest.py).  Ignored when CI=true:
#            CI (.ci/run) always installs and runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=
if [ "${1:-}" = "--quick" ]; then
    shift
    if [ "${CI:-}" = "true" ]; then
        echo "== --quick ignored: CI=true runs every test"
    else
        quick=1
        export ZTICK_TEST_QUICK=1
        echo "== quick path: no rabbitmq-server install, tests needing a broker are skipped"
    fi
fi

# The runner tests start a real redis-server and RabbitMQ broker of their own, on loopback
# (the tests start and stop them; the system services are not used).
missing=()
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
[ -n "$quick" ] || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    SUDO=()
    [ "$(id -u)" -eq 0 ] || SUDO=(sudo -n)
    # policy-rc.d keeps Debian from starting the system services we do not use.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${SUDO[@]}" chmod +x /usr/sbin/policy-rc.d
        remove_policy=1
    fi
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    if [ -n "${remove_policy:-}" ]; then "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d; fi
fi

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
