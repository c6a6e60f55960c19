#!/usr/bin/env bash
# The demo (README): a local source and target, sample data, a sync, its
# status, a few live writes, a clean stop and a verify. Everything runs on
# loopback and is cleaned up on exit.
#
#   deploy/demo.sh            ports 16379 (source), 16380 (target), 19750 (status)
#   SOURCE_PORT=... TARGET_PORT=... HTTP_PORT=... deploy/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SOURCE_PORT=${SOURCE_PORT:-16379}
TARGET_PORT=${TARGET_PORT:-16380}
HTTP_PORT=${HTTP_PORT:-19750}
KEYS=${KEYS:-200000}

scripts/install-deps.sh
echo "==> building shardsync (release)"
cargo build --release --locked -p coordinator -q
BIN=target/release/shardsync

WORK=$(mktemp -d -t shardsync-demo.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

for port in "$SOURCE_PORT" "$TARGET_PORT"; do
  if redis-cli -p "$port" ping >/dev/null 2>&1; then
    echo "port $port is already in use; set SOURCE_PORT / TARGET_PORT" >&2
    exit 1
  fi
done

start_redis() { # port dir
  mkdir -p "$2"
  redis-server --port "$1" --bind 127.0.0.1 --save '' --appendonly no \
    --repl-diskless-sync-delay 0 --dir "$2" --logfile "$2/redis.log" --daemonize no &
  PIDS+=($!)
  until redis-cli -p "$1" ping >/dev/null 2>&1; do sleep 0.05; done
}

# Minimal HTTP GET without curl.
http_get() {
  exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT"
  printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$1" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}

echo "==> source 127.0.0.1:$SOURCE_PORT and target 127.0.0.1:$TARGET_PORT"
start_redis "$SOURCE_PORT" "$WORK/source"
start_redis "$TARGET_PORT" "$WORK/target"

echo "==> loading sample data into the source ($KEYS strings, plus lists, hashes, sets, zsets, a stream, two dbs)"
redis-benchmark -p "$SOURCE_PORT" -t set -n "$KEYS" -r "$KEYS" -d 100 -P 32 -q >/dev/null
src() { redis-cli -p "$SOURCE_PORT" "$@" >/dev/null; }
src RPUSH demo:list a b c d
src HSET demo:hash name shardsync kind sync
src SADD demo:set x y z
src ZADD demo:zset 1 one 2 two 3 three
src XADD demo:stream '*' event signup user 42
src SET demo:ttl "expires in an hour" EX 3600
src -n 1 SET demo:db1 "a key in database 1"
echo "    source holds $(redis-cli -p "$SOURCE_PORT" dbsize) keys in db0"

echo "==> shardsync sync --source redis://127.0.0.1:$SOURCE_PORT --target redis://127.0.0.1:$TARGET_PORT"
"$BIN" sync --source "redis://127.0.0.1:$SOURCE_PORT" --target "redis://127.0.0.1:$TARGET_PORT" \
  --http "127.0.0.1:$HTTP_PORT" 2>"$WORK/shardsync.log" &
SYNC_PID=$!
PIDS+=($SYNC_PID)

state=""
for _ in $(seq 1 600); do
  status=$(http_get /status 2>/dev/null || true)
  if [ -n "$status" ]; then
    echo "    /status: $status"
    state=$(printf '%s' "$status" | sed -n 's/^{"state":"\([a-z_]*\)".*/\1/p')
    [ "$state" = incremental ] && break
    [ "$state" = failed ] && { cat "$WORK/shardsync.log"; exit 1; }
  fi
  sleep 0.2
done
[ "$state" = incremental ] || { echo "sync did not reach incremental"; cat "$WORK/shardsync.log"; exit 1; }

echo "==> live writes on the source arrive on the target"
src SET demo:live "written after the full sync"
src LPUSH demo:list z
src INCRBY demo:counter 5
for _ in $(seq 1 50); do
  [ "$(redis-cli -p "$TARGET_PORT" get demo:live)" = "written after the full sync" ] && break
  sleep 0.1
done
echo "    target demo:live    = $(redis-cli -p "$TARGET_PORT" get demo:live)"
echo "    target demo:list    = $(redis-cli -p "$TARGET_PORT" lrange demo:list 0 -1 | tr '\n' ' ')"
echo "    target demo:counter = $(redis-cli -p "$TARGET_PORT" get demo:counter)"
echo "    target db1          = $(redis-cli -p "$TARGET_PORT" -n 1 get demo:db1)"
echo "    /status: $(http_get /status)"
echo "    /metrics (excerpt):"
http_get /metrics | grep -E '^shardsync_(commands_applied_total|full_sync_keys_total|lag_seconds|applied_offset_bytes)' | sed 's/^/      /'

echo "==> stopping shardsync (SIGTERM: drain, then exit 0)"
kill -TERM "$SYNC_PID"
wait "$SYNC_PID" && echo "    exit code 0"
tail -n 3 "$WORK/shardsync.log" | sed 's/^/    /'

echo "==> shardsync verify"
"$BIN" verify --source "redis://127.0.0.1:$SOURCE_PORT" --target "redis://127.0.0.1:$TARGET_PORT" 2>/dev/null | tail -n 3 | sed 's/^/    /'
echo "==> done"
