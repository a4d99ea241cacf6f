#!/usr/bin/env bash
# Create .venv (if needed) and install cachebind with the locked dependency set.
# Re-running is cheap: nothing is reinstalled unless requirements.lock or pyproject.toml changed.
# Usage: scripts/setup.sh [test]   ("test" also installs what the test suite needs)
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3; do command -v "$c" >/dev/null && { PY=$c; break; }; done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.cachebind-$(cat requirements.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$want"
if [ ! -f "$stamp" ]; then
  echo "Installing cachebind and its pinned dependencies into .venv (first run: a few minutes)..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps -e .
  if [ "$want" = test ]; then
    # The reference ImageBind model files serve as a test oracle; the package's own imports are
    # broken in a current environment (docs/DEPENDENCIES.md), so it is installed without dependencies
    # and its model files are loaded directly by tests/oracle.py.
    .venv/bin/python -m pip install -q --no-deps -r requirements-test.lock
  fi
  rm -f .venv/.cachebind-*
  touch "$stamp"
fi
if [ "$want" = test ] && ! command -v chromium >/dev/null; then
  # The web page is tested in a real headless browser (Debian's Chromium; no browser download).
  if [ "$(id -u)" = 0 ]; then
    echo "Installing Debian's chromium for the web page tests..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium is not installed; run: sudo apt-get install chromium" >&2
  fi
fi
