#!/usr/bin/env bash
# Make sure a Chromium is on PATH: the dashboard's browser test drives Debian's chromium
# with Playwright (Playwright's own browser download is not used).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "chromium is missing: installing Debian's chromium package (for the browser test)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    exit 0
fi
cat >&2 <<'MSG'
chromium is missing and cannot be installed automatically (needs root and apt-get).
The dashboard's browser test needs it. Install it, then run make again:
  Debian:  sudo apt-get update && sudo apt-get install -y chromium
  Ubuntu:  sudo apt-get install -y chromium-browser
MSG
exit 1
