#!/usr/bin/env bash
# README's first command: set up, then show native Triton vs cacheagent (cold, cached)
# on a local S3 emulator. Extra arguments go to the demo (e.g. --size-mb 1024).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m demo.demo "$@"
