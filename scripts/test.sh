#!/usr/bin/env bash
# Runs every check scalechat has: formatting, clippy, and the whole test suite (unit tests,
# integration tests against real servers, processes and Redis, and the built-in page in
# headless Chromium). Installs what it needs if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v curl >/dev/null || need_apt+=(curl)
command -v redis-server >/dev/null || need_apt+=(redis-server) # the multi-node tests start their own
# the archive tests start their own PostgreSQL cluster with Debian's initdb and pg_ctl
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null ||
    need_apt+=(postgresql)
command -v npm >/dev/null || need_apt+=(nodejs npm)             # the browser tests' driver
[[ -x /usr/bin/chromium ]] || need_apt+=(chromium)               # the browser they drive
if ((${#need_apt[@]})); then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust from https://rustup.rs (stable toolchain)" >&2
    exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (the server and the bench crate)"
cargo test --workspace --all-targets --locked
echo "== benchmark smoke test (fails on lost or duplicated messages)"
bash scripts/bench.sh --quick
echo "== browser tests"
cargo build --locked
bash tests/browser/run.sh target/debug/scalechat
echo "== RFC 6455 compliance (Autobahn cases, kosoku)"
bash tests/autobahn/run.sh
echo "== socket.io-client tests"
bash tests/socketio/run.sh target/debug/scalechat
echo "== packaging checks"
bash packaging/check-systemd.sh
bash packaging/check-nginx.sh
bash packaging/check-deb.sh
bash packaging/check-static.sh
