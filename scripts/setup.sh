#!/usr/bin/env bash
# Install everything cacheagent's demo, tests and benchmarks need, into ./.venv
# and ./node_modules. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The editable install compiles the Triton agent shim (cacheagent/_lib/*.so).
# "compat" mode puts the checkout on sys.path with a plain .pth line, as a wheel
# install's site-packages is: the default mode imports a path finder at every
# Python start (12-18 ms of CPU here), which the launcher, every tool and each
# Python backend stub would pay, and the benchmarks would measure. Where a
# setuptools no longer offers it, the default mode is used.
if ! .venv/bin/python -m pip install --quiet -e ".[test,bench]" \
        --config-settings editable_mode=compat 2>/dev/null; then
    echo "setup: no 'compat' editable mode in this setuptools; using the default one" >&2
    .venv/bin/python -m pip install --quiet -e ".[test,bench]"
fi

# Azurite (Azure Blob emulator) for the Azure integration tests.
if [ ! -x node_modules/.bin/azurite-blob ]; then
    if ! command -v npm >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
        else
            echo "npm is missing: install Node.js and npm, then run this again" >&2
            exit 1
        fi
    fi
    npm install --no-audit --no-fund --silent --no-save --prefix . azurite@3 >/dev/null
fi
echo "setup done: .venv and node_modules are ready"
