#!/usr/bin/env bash
# Builds the .deb with cargo-deb (installing cargo-deb if missing: a few minutes, once) and
# checks it: the file list, the control fields, the conffiles, and that the packaged binary
# runs (`--version`) and accepts the packaged config (`check-config`) after `dpkg -x` into a
# scratch directory. Does not install the package. Prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo install --list | grep -q '^cargo-deb '; then
    echo "installing: cargo-deb"
    cargo install cargo-deb --locked
fi

echo "== cargo deb"
deb=$(cargo deb --locked | tail -n 1)
[[ -f $deb ]] || {
    echo "cargo deb did not print a .deb path: $deb" >&2
    exit 1
}
echo "$deb"

fail() {
    echo "$deb: $*" >&2
    exit 1
}

echo "== dpkg-deb -c"
files=$(dpkg-deb -c "$deb" | awk '{ print $1, $NF }')
for want in \
    "-rwxr-xr-x ./usr/bin/scalechat" \
    "-rw-r--r-- ./etc/scalechat/scalechat.toml" \
    "-rw-r--r-- ./lib/systemd/system/scalechat@.service" \
    "-rw-r--r-- ./usr/share/doc/scalechat/README.md" \
    "-rw-r--r-- ./usr/share/doc/scalechat/protocol.md" \
    "-rw-r--r-- ./usr/share/doc/scalechat/socketio.md" \
    "-rw-r--r-- ./usr/share/doc/scalechat/archive.md" \
    "-rw-r--r-- ./usr/share/doc/scalechat/copyright"; do
    grep -qxF -- "$want" <<<"$files" || fail "missing or wrong mode: $want"
done

echo "== dpkg-deb -f"
[[ $(dpkg-deb -f "$deb" Package) == scalechat ]] || fail "Package is not scalechat"
version=$(cargo metadata --no-deps --format-version 1 --locked |
    sed -n 's/.*"name":"scalechat","version":"\([^"]*\)".*/\1/p')
[[ $(dpkg-deb -f "$deb" Version) == "$version"* ]] || fail "Version is not $version"
depends=$(dpkg-deb -f "$deb" Depends)
[[ -n $depends ]] || fail "Depends is empty"
for field in Architecture Maintainer Section Priority Description; do
    [[ -n $(dpkg-deb -f "$deb" "$field") ]] || fail "no $field"
done
dpkg-deb -f "$deb" Package Version Architecture Section Priority Depends

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
dpkg-deb -e "$deb" "$scratch/DEBIAN"
grep -qx /etc/scalechat/scalechat.toml "$scratch/DEBIAN/conffiles" || fail "conffiles lacks the config"
for script in postinst prerm postrm; do
    [[ -x $scratch/DEBIAN/$script ]] || fail "no executable $script"
done

echo "== dpkg -x: run the packaged binary"
dpkg -x "$deb" "$scratch/root"
"$scratch/root/usr/bin/scalechat" --version
# Only the packaged file: none of this shell's configuration variables.
unset_env=(-u PORT -u REDIS_HOST -u REDIS_PORT -u REDIS_PASSWORD -u DATABASE_URL)
for name in $(compgen -e | grep '^SCALECHAT_' || true); do unset_env+=(-u "$name"); done
env "${unset_env[@]}" "$scratch/root/usr/bin/scalechat" --config "$scratch/root/etc/scalechat/scalechat.toml" \
    check-config >"$scratch/effective.toml"
grep -qx 'transport = "memory"' "$scratch/effective.toml" || fail "check-config printed an unexpected config"
echo "ok: $deb"
