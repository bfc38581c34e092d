#!/usr/bin/env bash
# Builds scalechat and scalechat-bench in release mode and runs the benchmark suite: every
# scenario (fan-out, steady latency, max-rate, churn, idle) on the raw-TCP ceiling, one node
# on the embedded transport, and one and two nodes on a Redis of the tool's own (with --quick,
# also the fan-out and max-rate with Socket.IO members on the embedded node), then the
# presence group (churn with redis.presence on and off, a join storm into a 10,000-member
# room, presence pages of a 19,000-member room) and the Socket.IO relay (a session's requests
# sent to its own node or relayed by another). Prints the result tables (Markdown) and
# writes them to target/bench-results.md.
#
#   scripts/bench.sh            the full suite (about 10 minutes, and a few more for presence;
#                               the figures in BENCHMARKS.md)
#   scripts/bench.sh --quick    small sizes, well under a minute (run by scripts/test.sh)
#   scripts/bench.sh --setups memory,memory-pg,redis2,redis2-pg
#                               the suite with and without the PostgreSQL archive (a cluster of
#                               the tool's own), then the archive scenario on the same setups
#   scripts/bench.sh --archive [ARGS...]
#                               only the archive scenario (500 rooms, rising rates) on memory,
#                               memory-pg, redis2 and redis2-pg unless ARGS has --setups (add
#                               --quick for small sizes); results in target/archive-results.md
#   scripts/bench.sh --soak [ARGS...]
#                               only the soak under faults (about 2 minutes): steady traffic on
#                               two nodes while Redis and then one node restart; results in
#                               target/soak-results.md
#   scripts/bench.sh --presence [ARGS...]
#                               only the presence group (add --quick for small sizes);
#                               results in target/presence-results.md
#   scripts/bench.sh --rooms [ARGS...]
#                               only many rooms (2,000 rooms x 20 members, 40,000 connections)
#                               on four nodes sharing one Redis, then on four nodes over a
#                               three-shard Redis Cluster, in the same run: a ramp of rates
#                               until p99 passes 100 ms or a message is lost (add --quick for
#                               small sizes); results in target/rooms-results.md
#   scripts/bench.sh --sio-relay [ARGS...]
#                               only the Socket.IO relay's cost (under a minute; add --quick
#                               for a few seconds); results in target/sio-relay-results.md
#   scripts/bench.sh --scale [ARGS...]
#                               only one big room: 19,000 members on each of four nodes sharing
#                               one Redis (76,000 in one room): connect time, steady steps at 5
#                               and 20 msg/s, then a ramp (add --quick for 250 per node, or
#                               e.g. --scale-members 2000 --setups redis2); results in
#                               target/scale-results.md
#   scripts/bench.sh --setups raw,memory,memory-sio,sioxide1,redis2,redis2-sio,sioxide2
#                               native and Socket.IO members side by side, and socketioxide
#                               (one node, and two on Redis) as the Socket.IO peer: fan-out and
#                               max-rate on every setup, churn and idle on the native ones, and
#                               a table of ratios (Socket.IO / native, socketioxide / scalechat)
#   scripts/bench.sh ARGS...    any scalechat-bench suite arguments (see --help)
#
# Exits non-zero when a message was lost or duplicated at a rate the servers sustain.
set -euo pipefail
cd "$(dirname "$0")/.."
# redis-server, and redis-cli (redis-tools) to join the Redis Cluster of the rooms setups.
command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq redis-server redis-tools; }
# The setups with the archive start their own PostgreSQL cluster with Debian's initdb and pg_ctl.
if [[ " $* " == *" --archive "* || "$*" == *-pg* ]] &&
    ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && ! command -v initdb >/dev/null; then
    apt-get update -qq && apt-get install -y -qq postgresql
fi
cargo build --release --locked -p scalechat -p scalechat-bench
# The socketioxide peer only when a setup needs it, and on its own: its dependencies stay out
# of the other two builds (and out of the quick run's time).
if [[ " $* " == *sioxide* ]]; then
    cargo build --release --locked -p scalechat-sioxide
fi
target="${CARGO_TARGET_DIR:-target}"
if [[ "${1:-}" == "--soak" ]]; then
    shift
    exec "$target/release/scalechat-bench" soak --server-bin "$target/release/scalechat" \
        --log-dir "$target/bench-logs" --redis-dir "$target/soak-redis" \
        --out "$target/soak-results.md" "$@"
fi
if [[ "${1:-}" == "--rooms" ]]; then
    shift
    exec "$target/release/scalechat-bench" rooms --server-bin "$target/release/scalechat" \
        --log-dir "$target/bench-logs" --out "$target/rooms-results.md" "$@"
fi
if [[ "${1:-}" == "--scale" ]]; then
    shift
    exec "$target/release/scalechat-bench" scale --server-bin "$target/release/scalechat" \
        --log-dir "$target/bench-logs" --out "$target/scale-results.md" "$@"
fi
if [[ "${1:-}" == "--presence" ]]; then
    shift
    exec "$target/release/scalechat-bench" presence --server-bin "$target/release/scalechat" \
        --log-dir "$target/bench-logs" --out "$target/presence-results.md" "$@"
fi
if [[ "${1:-}" == "--sio-relay" ]]; then
    shift
    exec "$target/release/scalechat-bench" sio-relay --server-bin "$target/release/scalechat" \
        --log-dir "$target/bench-logs" --out "$target/sio-relay-results.md" "$@"
fi
if [[ "${1:-}" == "--archive" ]]; then
    shift
    exec "$target/release/scalechat-bench" archive --server-bin "$target/release/scalechat" \
        --log-dir "$target/bench-logs" --out "$target/archive-results.md" "$@"
fi
exec "$target/release/scalechat-bench" suite --server-bin "$target/release/scalechat" \
    --log-dir "$target/bench-logs" --out "$target/bench-results.md" "$@"
