#!/usr/bin/env bash
# Checks config/nginx.conf with `nginx -t` (installing Debian's nginx-light if missing), and
# that docker-compose.yml is valid YAML naming the services it should. nginx resolves upstream
# host names when it loads a config and the compose service names (scalechat-1, scalechat-2)
# exist only on the compose network, so the check runs on a scratch copy with them replaced by
# 127.0.0.1: it checks everything but name resolution.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null; then
    echo "installing: nginx-light"
    apt-get update -qq && apt-get install -y -qq nginx-light
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
sed -E 's/^(\s*server\s+)scalechat-[0-9]+:/\1127.0.0.1:/' config/nginx.conf >"$scratch/nginx.conf"
if grep -q 'scalechat-[0-9]' "$scratch/nginx.conf"; then
    echo "config/nginx.conf: an upstream host left unreplaced" >&2
    exit 1
fi
echo "== nginx -t -c config/nginx.conf"
nginx -t -q -c "$scratch/nginx.conf" -p "$scratch" -e /dev/stderr

echo "== docker-compose.yml"
python3 -c 'import yaml' 2>/dev/null || apt-get install -y -qq python3-yaml
python3 - <<'PY'
import sys, yaml
services = yaml.safe_load(open("docker-compose.yml"))["services"]
want = {"redis", "postgres", "scalechat-1", "scalechat-2", "nginx"}
if set(services) != want:
    sys.exit(f"docker-compose.yml services: {sorted(services)}, want {sorted(want)}")
for node in ("scalechat-1", "scalechat-2"):
    if services[node]["build"]["dockerfile"] != "packaging/Dockerfile":
        sys.exit(f"{node} is not built from packaging/Dockerfile")
    if "@postgres:5432/" not in services[node]["environment"].get("DATABASE_URL", ""):
        sys.exit(f"{node} does not archive into the postgres service")
PY
echo "ok: config/nginx.conf, docker-compose.yml"
