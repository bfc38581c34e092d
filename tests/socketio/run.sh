#!/usr/bin/env bash
# Runs the Socket.IO tests: the real socket.io-client (npm) against real scalechat processes
# and a real redis-server that the tests start.
#
#   bash tests/socketio/run.sh [SCALECHAT_BINARY]   # default: target/debug/scalechat (cargo build)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec bash "$here/../common/run-node-suite.sh" "$here" "$@"
