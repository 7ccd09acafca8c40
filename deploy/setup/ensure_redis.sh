#!/usr/bin/env bash
# Make sure `redis-server` is on PATH: Relay starts its own when no buffer URL is given.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "redis-server is missing: installing Debian's redis-server package" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # Relay runs its own instances; the distribution's service is not needed.
    service redis-server stop >/dev/null 2>&1 || true
    exit 0
fi
cat >&2 <<'MSG'
redis-server is missing and cannot be installed automatically (needs root and apt-get).
Install it, then run make again:
  Debian/Ubuntu:  sudo apt-get update && sudo apt-get install -y redis-server
  macOS:          brew install redis
MSG
exit 1
