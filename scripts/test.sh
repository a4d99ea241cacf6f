#!/usr/bin/env bash
# The whole test suite: lint, type check, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check cachebind indexing jobs tests benchmarks
.venv/bin/ruff format --check cachebind indexing jobs tests benchmarks
.venv/bin/mypy  # cachebind, indexing and jobs; pyproject.toml [tool.mypy]
# Test files run in parallel, one worker per core up to 4 (many tests start Ray or a server of
# their own); each file stays on one worker, so a module's server or Ray instance starts once.
# CACHEBIND_TEST_WORKERS=0 runs them in this process, one after another.
cores=$(nproc)
.venv/bin/python -m pytest -n "${CACHEBIND_TEST_WORKERS:-$((cores < 4 ? cores : 4))}" --dist loadfile "$@"
