#!/usr/bin/env bash
# A private redis-server for the panel's channel layer: the websocket tests
# (`make test`) and `make run`. Never the distribution's service: its own
# directory, a Unix socket (or a loopback port), no persistence, daemonized.
# Idempotent: `start` on one that answers only prints its URL.
#
#   scripts/redis.sh start    start it unless it answers; print its URL (REDIS_URL)
#   scripts/redis.sh stop     stop it
#   scripts/redis.sh url      print its URL
#
#   VPANEL_REDIS_DIR    its directory: socket, pid file, log
#                       (default /tmp/vpanel-redis-UID; created mode 0700)
#   VPANEL_REDIS_PORT   listen on 127.0.0.1:PORT instead of DIR/redis.sock
#
# Needs Debian's redis-server (scripts/bootstrap.sh installs it).
set -euo pipefail

dir=${VPANEL_REDIS_DIR:-/tmp/vpanel-redis-$(id -u)}
port=${VPANEL_REDIS_PORT:-}
sock=$dir/redis.sock
if [ -n "$port" ]; then
  url="redis://127.0.0.1:$port/0"
  cli=(redis-cli -h 127.0.0.1 -p "$port")
else
  url="unix://$sock"
  cli=(redis-cli -s "$sock")
fi

answers() { "${cli[@]}" ping 2>/dev/null | grep -q PONG; }

case "${1:-start}" in
url)
  echo "$url"
  ;;
stop)
  if answers; then
    "${cli[@]}" shutdown nosave >/dev/null 2>&1 || true
  fi
  ;;
start)
  if answers; then
    echo "$url"
    exit 0
  fi
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "redis.sh: redis-server is not installed (scripts/bootstrap.sh installs it as root)" >&2
    exit 1
  fi
  # A directory of our own: one left in /tmp by someone else is not used.
  mkdir -p -m 0700 "$dir"
  if [ ! -O "$dir" ] || [ -L "$dir" ]; then
    echo "redis.sh: $dir is not ours; set VPANEL_REDIS_DIR" >&2
    exit 1
  fi
  # Test workers may all ask at once: one starts it, the others find it answering.
  exec 9>"$dir/start.lock"
  flock 9
  if answers; then
    echo "$url"
    exit 0
  fi
  args=(--daemonize yes --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
        --save "" --appendonly no --databases 1)
  if [ -n "$port" ]; then
    args+=(--port "$port" --bind 127.0.0.1 --protected-mode yes)
  else
    rm -f "$sock"
    args+=(--port 0 --unixsocket "$sock" --unixsocketperm 700)
  fi
  redis-server "${args[@]}" >/dev/null 9>&-  # the lock is not the daemon's to keep
  for _ in $(seq 100); do
    if answers; then
      echo "$url"
      exit 0
    fi
    sleep 0.05
  done
  echo "redis.sh: redis-server did not answer within 5 s; its log: $dir/redis.log" >&2
  tail -n 5 "$dir/redis.log" >&2 2>/dev/null || true
  exit 1
  ;;
*)
  echo "usage: $0 [start|stop|url]" >&2
  exit 2
  ;;
esac
