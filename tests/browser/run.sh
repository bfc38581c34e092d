#!/usr/bin/env bash
# Runs the browser tests of the built-in chat page: headless Debian Chromium, driven by
# playwright-core, against real scalechat nodes and a real redis-server that the tests start.
#
#   bash tests/browser/run.sh [SCALECHAT_BINARY]   # default: target/debug/scalechat (cargo build)
#
# Installs Debian's chromium if missing (never a browser download of Playwright's own).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if [[ ! -x /usr/bin/chromium ]]; then
    echo "installing Debian's chromium"
    apt-get update -qq && apt-get install -y -qq chromium
fi
exec bash "$here/../common/run-node-suite.sh" "$here" "$@"
