#!/usr/bin/env bash
# Start `hostagent serve` in the background unless one already answers on
# $VSERVER_RUNDIR/agent.sock; wait until it does. Used by `make run`.
# Stopping it (scripts/agent.sh stop) leaves the guests running, as always.
#
#   VSERVER_RUNDIR   where its socket, journal and lock live
#   VPANEL_AGENT_LOG its log (default $VSERVER_RUNDIR/../agent.log)
set -euo pipefail
cd "$(dirname "$0")/.."

rundir=${VSERVER_RUNDIR:?VSERVER_RUNDIR must be set}
sock="$rundir/agent.sock"
log=${VPANEL_AGENT_LOG:-$(dirname "$rundir")/agent.log}
pidfile="$(dirname "$rundir")/agent.pid"

answers() {
  [ -S "$sock" ] && curl -fsS --max-time 2 --unix-socket "$sock" http://agent/1.0 >/dev/null 2>&1
}

case "${1:-start}" in
  start)
    if answers; then
      echo "agent: already serving on $sock"
      exit 0
    fi
    mkdir -p "$(dirname "$log")"
    setsid .venv/bin/hostagent serve >>"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 150); do
      if answers; then
        echo "agent: serving on $sock (log: $log)"
        exit 0
      fi
      if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "agent: it exited; the end of $log:" >&2
        tail -20 "$log" >&2
        exit 1
      fi
      sleep 0.1
    done
    echo "agent: no answer on $sock after 15 s; see $log" >&2
    exit 1
    ;;
  stop)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      kill -TERM "$(cat "$pidfile")"
      echo "agent: stopped (the guests keep running)"
    fi
    rm -f "$pidfile"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
