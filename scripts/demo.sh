#!/usr/bin/env bash
# The main job: install (first run only) and run `cachebind demo`. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/cachebind demo "$@"
