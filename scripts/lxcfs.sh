#!/usr/bin/env bash
# Start lxcfs if it is not already serving, so that guests see their own
# memory, CPUs, load and uptime in /proc (docs/lxcfs.md). Idempotent: a live
# lxcfs is left alone, a dead one's mount is cleared and a new one started.
# Used by `make run` and `make test`. Exits 0 when lxcfs serves at the end,
# 1 (saying why) when it cannot run here: guests then still start, with the
# host's /proc files.
#
#   VPANEL_LXCFS_DIR      where it is mounted (default /var/lib/lxcfs, Debian's)
#   VPANEL_LXCFS_PIDFILE  its pid file (default /run/lxcfs.pid for the default
#                         directory, which Debian's init script also uses)
#   VPANEL_LXCFS_LOG      its start-up messages (default /var/log/lxcfs.log)
set -euo pipefail

dir=${VPANEL_LXCFS_DIR:-/var/lib/lxcfs}
if [ "$dir" = /var/lib/lxcfs ]; then
  default_pidfile=/run/lxcfs.pid
else
  default_pidfile="/run/vpanel-lxcfs${dir//\//_}.pid"
fi
pidfile=${VPANEL_LXCFS_PIDFILE:-$default_pidfile}
log=${VPANEL_LXCFS_LOG:-/var/log/lxcfs.log}

say() { echo "lxcfs: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "not root: cannot start lxcfs; guests will see the host's /proc values"
  exit 1
fi
if ! command -v lxcfs >/dev/null; then
  say "not installed (scripts/bootstrap.sh installs the Debian package 'lxcfs')"
  exit 1
fi

# The fstype of the uppermost mount at $1 (mountinfo field 5, then the type
# after " - "). mountinfo writes a backslash, space, tab or newline in a path
# as an octal escape; awk -v would read backslashes in the pattern as escapes
# of its own, so the path comes in through the environment.
top_fstype() {
  local p=${1//\\/\\134}
  p=${p// /\\040}
  p=${p//$'\t'/\\011}
  p=${p//$'\n'/\\012}
  P="$p" awk '{ for (i = 7; i <= NF; i++) if ($i == "-") break;
                if ($5 == ENVIRON["P"]) t = $(i + 1) } END { print t }' /proc/self/mountinfo
}
# Does the lxcfs mounted at $dir answer? A dead one leaves a mount that fails with ENOTCONN.
serving() {
  [ "$(top_fstype "$dir")" = fuse.lxcfs ] && head -c1 "$dir/proc/meminfo" >/dev/null 2>&1
}

# Resolved through its parent: on the mount of a dead lxcfs, even stat fails (ENOTCONN).
mkdir -p "$(dirname "$dir")" "$(dirname "$pidfile")" "$(dirname "$log")"
dir="$(realpath "$(dirname "$dir")")/$(basename "$dir")"

# One caller at a time (make test and the test suite's workers may race).
exec 9>"$pidfile.lock"
flock 9

if serving; then
  exit 0
fi
if [ "$(top_fstype "$dir")" = fuse.lxcfs ]; then
  say "the lxcfs mounted at $dir has died; unmounting it (guests it served keep files" \
      "that fail until they are restarted)"
  umount -l "$dir"
fi
mkdir -p "$dir"
if [ ! -c /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
  if [ ! -c /dev/fuse ]; then
    say "/dev/fuse is missing (no FUSE in this kernel?): cannot start lxcfs"
    exit 1
  fi
fi

# --enable-loadavg: virtualise /proc/loadavg too (off by default);
# --enable-cfs: cpuinfo and cpu/online count the CPUs a CFS quota allows, not
# only the cpuset's; --enable-pidfd: follow each guest's PID 1 by pidfd, so a
# reused pid is never taken for it. lxcfs 5 always runs in the foreground
# (-f is implied; Debian's init script backgrounds it with start-stop-daemon),
# so setsid -f puts it in a session of its own, away from our terminal and
# job. Fd 9 (the lock) is not handed down: the daemon would hold it for good.
echo "--- $(date -Is) lxcfs $dir" >>"$log"
setsid -f lxcfs --enable-loadavg --enable-cfs --enable-pidfd --pidfile="$pidfile" "$dir" \
  </dev/null >>"$log" 2>&1 9>&-
for _ in $(seq 100); do
  serving && break
  sleep 0.05
done
if ! serving; then
  say "did not come up at $dir; the end of $log:"
  tail -n 5 "$log" >&2
  exit 1
fi
# As Debian's init script does: the OOM killer must never pick lxcfs, or
# every guest's /proc/meminfo and friends break at once.
pid=$(cat "$pidfile" 2>/dev/null || true)
if [ -n "$pid" ]; then
  echo -1000 >"/proc/$pid/oom_score_adj" 2>/dev/null || true
fi
say "serving at $dir (pid ${pid:-?})"
