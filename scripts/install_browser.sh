#!/usr/bin/env bash
# Optional, for the web-page test only: Debian's headless Chromium and its driver (tests skip without them).
set -uo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: chromium/chromedriver missing and not installable here (needs root + apt-get); the web-page test will be skipped"
    exit 0
fi
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "note: could not install chromium; the web-page test will be skipped"
exit 0
