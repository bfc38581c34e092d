#!/usr/bin/env bash
# Runs the Socket.IO tests: the real socket.io-client (npm) against real scalechat processes
# and a real redis-server that the tests start.
#
#   bash tests/socketio/run.sh [SCALECHAT_BINARY]   # default: target/debug/scalechat (cargo build)
#
# Installs the locked npm packages when node_modules is missing or was installed from another
# lockfile.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

bin="${1:-target/debug/scalechat}"
[[ "$bin" = /* ]] || bin="$root/$bin"
if [[ ! -x "$bin" ]]; then
    echo "scalechat binary not found at $bin: run 'cargo build' first or pass its path" >&2
    exit 1
fi
if ! command -v redis-server >/dev/null; then
    echo "redis-server not found: install it (apt-get install redis-server); the tests start their own" >&2
    exit 1
fi
if ! command -v npm >/dev/null; then
    echo "node and npm not found: install Node.js 20 or later" >&2
    exit 1
fi

cd "$here"
# npm ci records the lockfile it installed; a different one means node_modules is stale.
stamp=node_modules/.scalechat-lock
if [[ ! -f "$stamp" ]] || ! cmp -s package-lock.json "$stamp"; then
    npm ci --no-audit --no-fund
    cp package-lock.json "$stamp"
fi

SCALECHAT_BIN="$bin" node --test
