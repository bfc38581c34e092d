#!/usr/bin/env bash
# Runs one Node.js test suite (a folder with package.json, package-lock.json and *.test.mjs)
# against a scalechat binary: checks for the binary, redis-server and npm, installs the locked
# npm packages when node_modules is missing or was installed from another lockfile, then
# `node --test` in the folder, each test failing after 3 minutes at most.
#
#   bash tests/common/run-node-suite.sh SUITE_DIR [SCALECHAT_BINARY]   # default: target/debug/scalechat
set -euo pipefail
suite="$(cd "$1" && pwd)"
root="$(cd "$(dirname "$0")/../.." && pwd)"

bin="${2:-target/debug/scalechat}"
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

cd "$suite"
# npm ci records the lockfile it installed; a different one means node_modules is stale.
stamp=node_modules/.scalechat-lock
if [[ ! -f "$stamp" ]] || ! cmp -s package-lock.json "$stamp"; then
    npm ci --no-audit --no-fund
    cp package-lock.json "$stamp"
fi

# Every wait in the suites has its own timeout; this one catches any that was missed, so a
# hung test fails instead of hanging CI.
SCALECHAT_BIN="$bin" node --test --test-timeout=180000
