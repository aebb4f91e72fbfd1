#!/usr/bin/env bash
# README's second command: set up, then run the linters and the whole test suite
# (unit, integration with S3/GCS/Azure emulators, end to end with a real tritonserver).
# Extra arguments go to pytest (e.g. -k s3, or tests/unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The shim must compile warning-free with the strictest flags (pip builds it without
# -Werror), alone and with the glibc-floor header the wheel is built with.
gcc -std=gnu11 -fPIC -shared -fvisibility=hidden -Wall -Wextra -Werror \
    -o /tmp/cacheagent-shim-check.so cacheagent/triton/shim/cacheagent_shim.c
gcc -std=gnu11 -fPIC -shared -fvisibility=hidden -Wall -Wextra -Werror \
    -include cacheagent/triton/shim/glibc_compat.h \
    -o /tmp/cacheagent-shim-check.so cacheagent/triton/shim/cacheagent_shim.c

# pytest exits non-zero when a test fails and 5 when no test ran; both fail this script.
.venv/bin/python -m pytest -p no:cacheprovider -q -ra --durations=15 "${@:-tests}"
