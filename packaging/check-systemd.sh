#!/usr/bin/env bash
# Checks systemd/scalechat@.service: `systemd-analyze verify` (syntax, directives, ExecStart
# binary) and `systemd-analyze security --offline=yes` (sandboxing), failing unless the overall
# exposure is below 5.0 ("OK" or better; 1.2 when written). Installs systemd from Debian if
# systemd-analyze is missing; needs no running systemd. Builds target/debug/scalechat if it is
# not there (verify needs ExecStart to name an existing executable, so it checks a scratch copy
# pointing at it), or uses $SCALECHAT_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."

unit=systemd/scalechat@.service
max_exposure=5.0

if ! command -v systemd-analyze >/dev/null; then
    echo "installing: systemd"
    apt-get update -qq && apt-get install -y -qq systemd
fi
version=$(systemd-analyze --version | awk 'NR == 1 { print $2 }')
if ((version < 250)); then
    echo "systemd $version: security --offline needs systemd 250 or later" >&2
    exit 1
fi

bin=${SCALECHAT_BIN:-target/debug/scalechat}
[[ -x $bin ]] || cargo build --locked
bin=$(realpath "$bin")

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
sed "s#^ExecStart=/usr/bin/scalechat #ExecStart=$bin #" "$unit" >"$scratch/scalechat@.service"
grep -q "^ExecStart=$bin " "$scratch/scalechat@.service" || {
    echo "$unit: no 'ExecStart=/usr/bin/scalechat ' line to check" >&2
    exit 1
}

echo "== systemd-analyze verify $unit (instance 8000)"
# verify exits 0 on some warnings: any output at all is a failure.
if ! out=$(systemd-analyze verify "$scratch/scalechat@8000.service" 2>&1) || [[ -n $out ]]; then
    echo "$out" >&2
    exit 1
fi

echo "== systemd-analyze security --offline=yes $unit"
report=$(systemd-analyze security --offline=yes "$scratch/scalechat@.service" 2>&1) || {
    echo "$report" >&2
    exit 1
}
exposure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$report")
if [[ -z $exposure ]]; then
    echo "$report" >&2
    echo "no overall exposure level in the report" >&2
    exit 1
fi
grep -v '✓' <<<"$report" # what is not sandboxed, and the verdict
if ! awk -v e="$exposure" -v max="$max_exposure" 'BEGIN { exit !(e < max) }'; then
    echo "exposure $exposure: must be below $max_exposure" >&2
    exit 1
fi
echo "ok: $unit verifies; exposure $exposure (< $max_exposure)"
