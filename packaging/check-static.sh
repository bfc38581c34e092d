#!/usr/bin/env bash
# Builds the static musl binary (packaging/build-static.sh), then checks that `file` calls it
# static and that it serves a chat round trip on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/build-static.sh
bin=target/x86_64-unknown-linux-musl/release/scalechat
info=$(file "$bin")
echo "$info"
grep -q 'static' <<<"$info" || { echo "not static" >&2; exit 1; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
scratch=$(mktemp -d)
(cd "$scratch" && env -u REDIS_HOST PORT="$port" SCALECHAT_SERVER__HOST=127.0.0.1 RUST_LOG=warn \
    "$OLDPWD/$bin") &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$scratch"' EXIT
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.1
done
python3 packaging/roundtrip.py "127.0.0.1:$port"
kill -TERM "$pid"
wait "$pid"
echo "ok: $bin is static and serves chat; exited 0 on SIGTERM"
