"""lxcfs: a guest's own memory, CPUs, load and uptime in its /proc.

The kernel's /proc/meminfo, /proc/cpuinfo, /proc/stat, /proc/loadavg and
/proc/uptime describe the whole host, so `free`, `top` and `uptime` inside a
guest show the host's RAM and CPUs, whatever the guest's cgroup limits say.
lxcfs (Debian package `lxcfs`, started by scripts/lxcfs.sh) is a FUSE
filesystem whose versions of those files answer for the cgroups of the
process that reads them: it finds the PID 1 of the reader's PID namespace
and uses that process's memory, cpu, cpuacct and cpuset cgroups (and its
start time for uptime). Bind-mounting its files over the kernel's in the
guest's tree is therefore all a guest needs (context._bind_lxcfs).

This module only finds a running lxcfs; a host without one still starts
guests, which then see the host's values (and launch_init says so once).
docs/lxcfs.md has the operations side.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["DEFAULT_DIR", "ENV_DIR", "FILES", "mount_dir", "mountpoint", "probe", "warn_absent"]

_LOG = logging.getLogger(__name__)

DEFAULT_DIR = Path("/var/lib/lxcfs")  # where Debian's lxcfs.service mounts it
ENV_DIR = "VPANEL_LXCFS_DIR"

# What a guest gets from lxcfs, relative to both the lxcfs mount and the
# guest's root. lxcfs also serves proc/slabinfo; it is left out because
# context.MASKED_FILES hides slabinfo from guests altogether.
FILES = (
    "proc/cpuinfo",
    "proc/diskstats",
    "proc/loadavg",
    "proc/meminfo",
    "proc/stat",
    "proc/swaps",
    "proc/uptime",
    "sys/devices/system/cpu/online",
)

# A file every lxcfs version serves: reading its attributes proves the daemon
# behind the mount still answers (a crashed one leaves a mount whose every
# access fails with ENOTCONN).
_SENTINEL = "proc/meminfo"

_warned: set[str] = set()


def mount_dir() -> Path:
    """Where lxcfs is expected: VPANEL_LXCFS_DIR, else /var/lib/lxcfs."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _unescape(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes are octal escapes."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def _top_fstype(point: str) -> str | None:
    """The filesystem type of the uppermost mount at POINT in our mount namespace."""
    fstype = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and _unescape(fields[4]) == point:
                    # Later lines are mounted on top of earlier ones.
                    fstype = right.split(" ", 1)[0]
    except OSError:
        return None
    return fstype


def probe() -> tuple[Path | None, str]:
    """(the lxcfs mount to use, or None; why not, when None)."""
    d = mount_dir()
    # Resolved through its parent: on the mount of a dead lxcfs even stat fails.
    point = os.path.join(os.path.realpath(d.parent), d.name)
    fstype = _top_fstype(point)
    if fstype is None and not os.path.isdir(point):
        return None, f"{d} does not exist"
    if fstype != "fuse.lxcfs":
        what = f"a {fstype} mount" if fstype else "not a mount point"
        return None, f"{d} is {what}, not a fuse.lxcfs mount"
    try:
        os.stat(os.path.join(point, _SENTINEL))
    except OSError as e:
        return None, f"the lxcfs mount at {d} does not answer ({e.strerror}): lxcfs has died"
    return Path(point), ""


def mountpoint() -> Path | None:
    """The mount of a running lxcfs, or None if there is none (guests then see the host's)."""
    return probe()[0]


def warn_absent() -> None:
    """Log, once per process and reason, that guests started now get the host's /proc files."""
    mount, why = probe()
    if mount is not None:
        _warned.clear()  # a later loss is news again
        return
    if why in _warned:
        return
    _warned.add(why)
    _LOG.warning(
        "lxcfs is not running (%s): guests started now see the host's memory, CPUs, load and "
        "uptime in /proc; scripts/lxcfs.sh starts it", why)
