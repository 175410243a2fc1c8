#!/usr/bin/env bash
# Serve the panel in the foreground (Daphne, through `manage.py runserver`,
# static files included) with the reconciler beside it in the background
# (`manage.py reconcile --repair --watch`); Ctrl-C ends both, never the agent
# or a guest. Used by `make run`, after migrate, the agent and seed_demo.
#
#   PANEL_ADDR       where the panel listens (default 127.0.0.1:8000)
#   RECONCILE_EVERY  seconds between the reconciler's passes (default 30)
#   VPANEL_VAR_DIR   the panel's state directory (default var/): the
#                    reconciler's log is reconciler.log there
set -euo pipefail
cd "$(dirname "$0")/.."

addr=${PANEL_ADDR:-127.0.0.1:8000}
every=${RECONCILE_EVERY:-30}
var=${VPANEL_VAR_DIR:-var}
log="$var/reconciler.log"
mkdir -p "$var"

echo "--- $(date -Is) reconcile --repair --watch $every" >>"$log"
# A background job of a non-interactive shell ignores the terminal's Ctrl-C,
# so the trap ends it when the panel ends.
.venv/bin/python manage.py reconcile --repair --watch "$every" >>"$log" 2>&1 </dev/null &
reconciler=$!
stop_reconciler() { kill "$reconciler" 2>/dev/null || true; }
trap stop_reconciler EXIT
trap 'stop_reconciler; exit 130' INT
trap 'stop_reconciler; exit 143' TERM
echo "reconciler: a pass every ${every} s (log: $log)"

.venv/bin/python manage.py runserver --insecure --noreload "$addr"
