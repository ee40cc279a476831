#!/usr/bin/env bash
# Headless browser for tests/test_browser.py: Debian's chromium package, never a browser download
# (Playwright, from tests/requirements-test.txt, drives /usr/bin/chromium). Idempotent: nothing to do
# once /usr/bin/chromium exists. Needs root (apt); elsewhere it only says what to install.
set -euo pipefail
[[ -x /usr/bin/chromium ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "[setup] /usr/bin/chromium is missing: install Debian's 'chromium' package for tests/test_browser.py" >&2
  exit 0
fi
echo "[setup] installing Debian's chromium for the browser test (first run: a few minutes)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
