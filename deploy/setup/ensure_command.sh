#!/usr/bin/env bash
# ensure_command.sh COMMAND DEBIAN_PACKAGE WHY [SERVICE]
# Make sure COMMAND is on PATH, installing Debian's DEBIAN_PACKAGE when it is missing
# (as root with apt-get); otherwise say how to install it and fail. A SERVICE the package
# starts (default: the package's name) is stopped: Relay and its tests start their own.
set -euo pipefail
command_name=$1 package=$2 why=$3 service=${4:-$2}
if command -v "$command_name" >/dev/null 2>&1; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "$command_name is missing: installing Debian's $package package ($why)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null
    service "$service" stop >/dev/null 2>&1 || true
    exit 0
fi
cat >&2 <<MSG
$command_name is missing and cannot be installed automatically (needs root and apt-get).
It is needed for $why. Install it, then run make again:
  Debian/Ubuntu:  sudo apt-get update && sudo apt-get install -y $package
MSG
exit 1
