#!/usr/bin/env bash
# RFC 6455 compliance: Autobahn's test cases, run by kosoku (from PyPI), against the echo
# endpoint of a release build. The echo endpoint runs the same frame reader, limits and writer
# as chat. Cases 12 and 13 (permessage-deflate) are left out: scalechat declines the
# extension, and kosoku then reports them UNIMPLEMENTED (checked below on one case of each).
#
# Every other case must be OK, INFORMATIONAL (Autobahn's own word for "no verdict"), or
# NON-STRICT and listed in ALLOWED_NON_STRICT with the reason. The report is kept in
# tests/artifacts/autobahn/ (index.json and one page per case).
set -euo pipefail
cd "$(dirname "$0")/../.."

# 6.4.3, 6.4.4: invalid UTF-8 inside a text frame that arrives in several TCP segments. The
# frame is checked once it has arrived whole, so the close comes a few segments later than
# the first invalid byte would allow; the verdict (1007) is the same.
ALLOWED_NON_STRICT="6.4.3 6.4.4"

# Cases in a complete report (every case but 12.* and 13.*), and in the deflate check. A run
# that crashed or stopped early reports fewer, and fails.
EXPECTED_CASES=301
EXPECTED_DEFLATE_CASES=2

venv=target/autobahn-venv
if [[ ! -x $venv/bin/kosoku ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet kosoku==0.1.0
fi
cargo build --release --locked --quiet

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=tests/artifacts/autobahn
rm -rf "$out"
mkdir -p "$out"
env -u REDIS_HOST PORT="$port" SCALECHAT_SERVER__HOST=127.0.0.1 SCALECHAT_SERVER__ECHO_PATH=/echo \
    SCALECHAT_LIMITS__MAX_FRAME_BYTES=16777216 \
    SCALECHAT_LIMITS__MAX_QUEUED_BYTES=33554432 RUST_LOG=warn \
    target/release/scalechat --config /dev/null >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
ready=false
for _ in $(seq 100); do
    if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null; then
        ready=true
        break
    fi
    kill -0 "$server" 2>/dev/null || break # exited: no use waiting
    sleep 0.1
done
if ! $ready; then
    echo "autobahn: the server did not become ready on port $port; its log:" >&2
    cat "$out/server.log" >&2
    exit 1
fi

url="ws://127.0.0.1:$port/echo"
# kosoku exits non-zero on any case it does not count as passed: the report decides below.
"$venv/bin/kosoku" -x '12.*' -x '13.*' -p 2 -o "$out" "$url" | tail -n 3 || true
"$venv/bin/kosoku" -i 12.1.1 -i 13.1.1 -o "$out/deflate" "$url" >/dev/null || true

python3 - "$out" "$ALLOWED_NON_STRICT" "$EXPECTED_CASES" "$EXPECTED_DEFLATE_CASES" <<'PY'
import collections, json, sys
out, allowed = sys.argv[1], set(sys.argv[2].split())
expected, expected_deflate = int(sys.argv[3]), int(sys.argv[4])
def report(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError) as e:
        sys.exit(f"autobahn: no report at {path} ({e}): kosoku did not run to the end")
index, deflate = report(f"{out}/index.json"), report(f"{out}/deflate/index.json")
counts, bad = collections.Counter(), []
for cases in index.values():
    for case, result in cases.items():
        behavior = result["behavior"]
        counts[behavior] += 1
        if behavior == "NON-STRICT" and case in allowed:
            continue
        if behavior not in ("OK", "INFORMATIONAL") or result.get("behaviorClose") not in ("OK", "INFORMATIONAL"):
            bad.append(f"{case}: {behavior} (close: {result.get('behaviorClose')})")
for cases in deflate.values():
    for case, result in cases.items():
        if result["behavior"] != "UNIMPLEMENTED" or result.get("behaviorClose") != "OK":
            bad.append(f"{case}: permessage-deflate not declined cleanly: {result['behavior']}")
print("autobahn:", ", ".join(f"{n} {b}" for b, n in sorted(counts.items())))
total, total_deflate = sum(counts.values()), sum(len(c) for c in deflate.values())
if total < expected:
    bad.append(f"the report holds {total} cases, {expected} expected")
if total_deflate < expected_deflate:
    bad.append(f"the deflate report holds {total_deflate} cases, {expected_deflate} expected")
if bad:
    print("autobahn: failed cases:\n  " + "\n  ".join(bad))
    sys.exit(1)
print("ok: every case passed; NON-STRICT only where explained")
PY
