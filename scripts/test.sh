#!/usr/bin/env bash
# The whole test suite: lint, type check, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check cachebind indexing jobs tests benchmarks
.venv/bin/ruff format --check cachebind indexing jobs tests benchmarks
# The type check (cachebind, indexing and jobs; pyproject.toml [tool.mypy]) runs beside the
# tests: it is one single-threaded process of ~40 s, reported after them.
typecheck=$(mktemp)
.venv/bin/mypy >"$typecheck" 2>&1 &
mypy_pid=$!
# Test files run in parallel, one worker per core up to 4 (many tests start Ray or a server of
# their own); each file stays on one worker, so a module's server or Ray instance starts once.
# CACHEBIND_TEST_WORKERS=0 runs them in this process, one after another.
cores=$(nproc)
set +e
.venv/bin/python -m pytest -n "${CACHEBIND_TEST_WORKERS:-$((cores < 4 ? cores : 4))}" --dist loadfile "$@"
tests=$?
wait "$mypy_pid"
types=$?
echo "mypy: $(tail -n 1 "$typecheck")"
[ "$types" = 0 ] || { cat "$typecheck"; echo "the type check failed" >&2; }
rm -f "$typecheck"
[ "$tests" != 0 ] && exit "$tests"
exit "$types"
