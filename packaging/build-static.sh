#!/usr/bin/env bash
# Builds the static (musl) binary that packaging/Dockerfile copies into its image:
# target/x86_64-unknown-linux-musl/release/scalechat. Installs the rustup target and Debian's
# musl-tools (musl-gcc, for the C in mimalloc and ring) and file if missing; checks the result is static.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
need_apt=()
command -v musl-gcc >/dev/null || need_apt+=(musl-tools)
command -v file >/dev/null || need_apt+=(file)
if ((${#need_apt[@]})); then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
cargo build --release --locked --target "$target"
bin=target/$target/release/scalechat
if ! file "$bin" | grep -q 'static'; then
    file "$bin" >&2
    echo "$bin is not statically linked" >&2
    exit 1
fi
"$bin" --version
echo "ok: $bin"
