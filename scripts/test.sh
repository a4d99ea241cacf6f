#!/usr/bin/env bash
# The whole test suite: lint, type check, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check cachebind indexing jobs tests benchmarks
.venv/bin/ruff format --check cachebind indexing jobs tests benchmarks
.venv/bin/mypy  # cachebind, indexing and jobs; pyproject.toml [tool.mypy]
.venv/bin/python -m pytest "$@"
