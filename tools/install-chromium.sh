#!/usr/bin/env bash
# Installs what the Chromium interop tests (tests/test_interop_chromium.py) need:
# Debian's chromium (/usr/bin/chromium) and the playwright Python package. Idempotent:
# installs only what is missing. Never runs `playwright install` (no browser downloads:
# the tests drive the system Chromium through executable_path).
#
# Usage: tools/install-chromium.sh [PYTHON]
#   PYTHON: the interpreter whose environment gets playwright (default: $PYTHON, then
#           .venv/bin/python if present, then python3), e.g. .venv/bin/python in CI.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${1:-${PYTHON:-}}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

CHROMIUM="${WACALL_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: $CHROMIUM is missing and there is no apt-get" >&2
    exit 1
  fi
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "install-chromium: installing Debian's chromium"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x "$CHROMIUM" ]; then
  echo "install-chromium: $CHROMIUM still missing after installing chromium" >&2
  exit 1
fi

if ! "$PY" -c "import playwright.async_api" >/dev/null 2>&1; then
  echo "install-chromium: installing playwright into $PY"
  "$PY" -m pip install -q playwright
fi
"$PY" -c "import playwright.async_api" >/dev/null

echo "install-chromium: $("$CHROMIUM" --version 2>/dev/null | head -n1), playwright for $PY"
