#!/usr/bin/env bash
# Serve the panel in the foreground (Daphne, through `manage.py runserver`,
# static files included) with the reconciler, the agent event bridge and the
# classroom auto-stop beside it in the background (`manage.py reconcile
# --repair --watch`, `manage.py agent_events` and `manage.py
# classroom_autostop`); Ctrl-C ends them all, never the agent or a guest.
# Used by `make run`, after migrate, the agent and seed_demo.
#
# The bridge and the reconciler are processes of their own: their changes
# reach the live pages through a channel layer they share with the panel, a
# private redis (scripts/redis.sh, under VPANEL_VAR_DIR/redis) unless
# REDIS_URL names one. Without redis the pages still show their changes
# when next loaded.
#
#   PANEL_ADDR       where the panel listens (default 127.0.0.1:8000)
#   RECONCILE_EVERY  seconds between the reconciler's passes (default 30)
#   AUTOSTOP_EVERY   seconds between the classroom auto-stop's passes (default 60)
#   VPANEL_VAR_DIR   the panel's state directory (default var/): the logs
#                    reconciler.log, agent-events.log and autostop.log are there
set -euo pipefail
cd "$(dirname "$0")/.."

addr=${PANEL_ADDR:-127.0.0.1:8000}
every=${RECONCILE_EVERY:-30}
var=${VPANEL_VAR_DIR:-var}
log="$var/reconciler.log"
bridge_log="$var/agent-events.log"
autostop_every=${AUTOSTOP_EVERY:-60}
autostop_log="$var/autostop.log"
mkdir -p "$var"

redis_started=""
if [ -z "${REDIS_URL:-}" ]; then
  if url=$(VPANEL_REDIS_DIR="$(realpath "$var")/redis" scripts/redis.sh start); then
    export REDIS_URL=$url
    redis_started=1
    echo "channel layer: redis at $url"
  else
    echo "channel layer: in memory (no redis): the bridge's and the reconciler's changes show when a page is loaded again" >&2
  fi
fi

echo "--- $(date -Is) reconcile --repair --watch $every" >>"$log"
echo "--- $(date -Is) agent_events" >>"$bridge_log"
echo "--- $(date -Is) classroom_autostop --interval $autostop_every" >>"$autostop_log"
# A background job of a non-interactive shell ignores the terminal's Ctrl-C,
# so the trap ends them when the panel ends.
.venv/bin/python manage.py reconcile --repair --watch "$every" >>"$log" 2>&1 </dev/null &
reconciler=$!
.venv/bin/python manage.py agent_events >>"$bridge_log" 2>&1 </dev/null &
bridge=$!
.venv/bin/python manage.py classroom_autostop --interval "$autostop_every" \
  >>"$autostop_log" 2>&1 </dev/null &
autostop=$!
stop_background() {
  kill "$reconciler" "$bridge" "$autostop" 2>/dev/null || true
  if [ -n "$redis_started" ]; then
    VPANEL_REDIS_DIR="$(realpath "$var")/redis" scripts/redis.sh stop || true
  fi
}
trap stop_background EXIT
trap 'stop_background; exit 130' INT
trap 'stop_background; exit 143' TERM
echo "reconciler: a pass every ${every} s (log: $log)"
echo "agent event bridge: one stream per host (log: $bridge_log)"
echo "classroom auto-stop: a pass every ${autostop_every} s (log: $autostop_log)"

.venv/bin/python manage.py runserver --insecure --noreload "$addr"
