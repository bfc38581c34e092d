#!/usr/bin/env bash
# Time-boxed fuzzing of every decoder of untrusted input, with cargo-fuzz (libFuzzer) on the
# stable toolchain (RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#
# Seeds come from fuzz/corpus/<target>/ (kept in the repository); what a run discovers goes
# to a scratch corpus under target/fuzz-work/. A crash stops the run and leaves its input in
# fuzz/artifacts/<target>/: copy it into fuzz/corpus/<target>/ so that tests/fuzz_corpus.rs
# replays it on every test run, then fix the bug.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi
for target in "${targets[@]}"; do
    work=target/fuzz-work/$target
    mkdir -p "$work"
    echo "== $target: $seconds s"
    RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048
done
echo "ok: no crash in ${targets[*]}"
