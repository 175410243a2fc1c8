"""What each running guest uses, from the kernel's own accounting.

`usage_all(paths)` reads every running guest in one pass, for the panel and
for vserver-stat. Its sources, per metric (None when the file is absent):

  processes     cgroup.procs of the guest's tracking cgroup and its children
                (hostagent.cgroup.Cgroup.procs): the same count `status` gives.
  cpu           cgroup v2: cpu.stat of the tracking cgroup (usage_usec,
                user_usec, system_usec). The kernel keeps these for every v2
                cgroup, with or without the cpu controller ("This file exists
                whether the controller is enabled or not", Documentation/
                admin-guide/cgroup-v2.rst); they include processes that have
                exited, as the seed's sums of utime+cutime did. A v1-only
                host: cpuacct.usage (ns) and cpuacct.stat (user and system,
                USER_HZ ticks) of the same relative path in the cpuacct
                hierarchy.
  memory        where hostagent.limits puts the guest's memory cgroup
                (controller_hierarchies: the v2 tree if the controller is
                enabled there, else the v1 memory hierarchy, same relative
                path): v2 memory.current / memory.peak, v1
                memory.usage_in_bytes / memory.max_usage_in_bytes. Both
                count page cache the guest caused, not only its processes'
                RSS.
  net           the host end of the guest's veth (RunState.host_if) in
                /proc/thread-self/net/dev, read once for all guests in the
                caller's (the host's) network namespace. What the host end
                transmits the guest receives: guest rx = host end tx, guest
                tx = host end rx. None for a guest without a veth (IPROOT=ALL
                shares the host's network; no addresses means lo only).
  disk_used     the bytes the guest holds on its own, by how its disk is kept:
                a btrfs subvolume with a qgroup (DISK_LIMIT): the qgroup's
                exclusive bytes, read for every guest of a filesystem with
                one `btrfs qgroup show` (hostagent.quota.usages), as of the
                filesystem's last commit (about every 30 s, or a sync);
                a tree with a project id of its own on XFS or ext4: the
                bytes the filesystem charges to that project (quotactl,
                one call per guest, in the same quota.usages);
                a filesystem image: its used bytes (statvfs of its mount);
                otherwise what `vdu` counts (unify.disk_usage of the overlay
                upper layer, or of the root): a walk of the tree, so each
                guest's figure is kept DISK_TTL (60) seconds and a guest's
                disk_used may be that old. None when it cannot be read.
  uptime        now - RunState.started (time.time() when `start` finished
                writing NAME.ctx).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hostagent import guest, quota, templates, views
from hostagent.cgroup import Cgroup, Hierarchy, cgroup_mounts, tracking_hierarchy
from hostagent.limits import controller_hierarchies
from hostagent.paths import Paths

__all__ = ["DISK_TTL", "GuestUsage", "net_counters", "usage_all", "usage_of"]

# Seconds a disk_used figure that took a walk of the guest's tree is kept.
DISK_TTL = 60.0
# (rootdir, name) -> (time.monotonic() when walked, bytes or None)
_walked: dict[tuple[str, str], tuple[float, int | None]] = {}


@dataclass(frozen=True)
class GuestUsage:
    name: str
    context: int
    cgroup: str  # relative path in the tracking hierarchy
    processes: int
    cpu_seconds: float | None  # user + system (and time the kernel does not split)
    cpu_user_seconds: float | None
    cpu_system_seconds: float | None
    memory_current: int | None  # bytes
    memory_peak: int | None  # bytes, since the cgroup was made (or the peak was reset)
    net_rx_bytes: int | None  # received by the guest
    net_tx_bytes: int | None  # sent by the guest
    disk_used: int | None  # bytes
    uptime: float  # seconds

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_kv(path: Path) -> dict[str, int] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _v1_mount(controller: str) -> Path | None:
    """Mount point of the v1 hierarchy that has CONTROLLER, if any."""
    for point, fstype, opts in cgroup_mounts():
        if fstype == "cgroup" and controller in opts.split(","):
            return Path(point)
    return None


def net_counters() -> dict[str, tuple[int, int]]:
    """(rx bytes, tx bytes) of every device of the caller's network namespace."""
    out: dict[str, tuple[int, int]] = {}
    try:
        with open("/proc/thread-self/net/dev", encoding="ascii") as f:
            lines = f.read().splitlines()[2:]  # two header lines
    except OSError:
        return out
    for line in lines:
        dev, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) >= 9:
            # Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
            out[dev.strip()] = (int(fields[0]), int(fields[8]))
    return out


class _Accounting:
    """Where the accounting files of a relative cgroup path are, on this host."""

    def __init__(self) -> None:
        self.tracking: Hierarchy = tracking_hierarchy()
        # Memory is read where the limits module puts guests (v2 if the
        # controller is enabled there, else v1); cpuacct has no limits and is
        # only needed on a host without cgroup v2.
        self.memory_h = controller_hierarchies().get("memory")
        self.cpuacct = None if self.tracking.version == 2 else _v1_mount("cpuacct")

    def cpu(self, relpath: str) -> tuple[float | None, float | None, float | None]:
        """(total, user, system) CPU seconds."""
        if self.tracking.version == 2:
            stat = _read_kv(self.tracking.mount / relpath / "cpu.stat")
            if stat is None or "usage_usec" not in stat:
                return None, None, None
            user, system = stat.get("user_usec"), stat.get("system_usec")
            return (stat["usage_usec"] / 1e6,
                    None if user is None else user / 1e6,
                    None if system is None else system / 1e6)
        if self.cpuacct is None:
            return None, None, None
        d = self.cpuacct / relpath
        total = _read_int(d / "cpuacct.usage")
        ticks = _read_kv(d / "cpuacct.stat") or {}
        hz = views.clock_ticks()
        return (None if total is None else total / 1e9,
                ticks["user"] / hz if "user" in ticks else None,
                ticks["system"] / hz if "system" in ticks else None)

    def memory(self, relpath: str) -> tuple[int | None, int | None]:
        """(current, peak) bytes."""
        if self.memory_h is None:
            return None, None
        d = self.memory_h.mount / relpath
        if self.memory_h.version == 2:
            return _read_int(d / "memory.current"), _read_int(d / "memory.peak")
        return _read_int(d / "memory.usage_in_bytes"), _read_int(d / "memory.max_usage_in_bytes")


class _Disk:
    """disk_used of a set of guests: each source read once for all of them."""

    def __init__(self, paths: Paths, names: list[str]) -> None:
        self.paths = paths
        self.images = {n for n in names if quota.image_path(paths.rootdir, n).exists()}
        # Where a qgroup or a project id would be: a unified guest's own layer,
        # else its root (quota.usages reads both).
        self.own = {n: templates.overlay_dirs(paths, n)[0].parent
                    if templates.is_unified(paths, n) else paths.root(n)
                    for n in names if n not in self.images}
        try:
            self.qgroups = quota.usages(self.own.values()) if self.own else {}
        except OSError:
            self.qgroups = {}
        clock = time.monotonic()
        for key in [k for k, (when, _) in _walked.items() if clock - when >= DISK_TTL]:
            _walked.pop(key, None)

    def used(self, name: str) -> int | None:
        root = self.paths.root(name)
        if name in self.images:
            try:
                return quota.image_usage(root).exclusive if os.path.ismount(root) else None
            except OSError:
                return None
        found = self.qgroups.get(self.own[name])
        if found is not None:
            return found.exclusive
        key = (str(self.paths.rootdir), name)
        clock = time.monotonic()
        cached = _walked.get(key)
        if cached is not None and clock - cached[0] < DISK_TTL:
            return cached[1]
        from hostagent import unify  # only for guests without a cheaper source

        try:
            walked: int | None = unify.disk_usage(unify.usage_dir(self.paths, name)).bytes
        except unify.UnifyError:
            walked = None
        _walked[key] = (clock, walked)
        return walked


def _usage(st: guest.RunState, acct: _Accounting, net: dict[str, tuple[int, int]],
           now: float, disk: _Disk) -> GuestUsage:
    total, user, system = acct.cpu(st.cgroup)
    current, peak = acct.memory(st.cgroup)
    rx = tx = None
    if st.host_if and st.host_if in net:
        host_rx, host_tx = net[st.host_if]
        rx, tx = host_tx, host_rx
    return GuestUsage(
        name=st.name,
        context=st.context,
        cgroup=st.cgroup,
        processes=len(Cgroup(st.cgroup, acct.tracking).procs()),
        cpu_seconds=total,
        cpu_user_seconds=user,
        cpu_system_seconds=system,
        memory_current=current,
        memory_peak=peak,
        net_rx_bytes=rx,
        net_tx_bytes=tx,
        disk_used=disk.used(st.name),
        uptime=max(0.0, now - st.started),
    )


def usage_all(paths: Paths, states: dict[str, guest.RunState] | None = None,
              ) -> dict[str, GuestUsage]:
    """Usage of every running guest (or of STATES), by name."""
    if states is None:
        states = views.running_states(paths)
    acct = _Accounting()
    net = net_counters() if any(st.host_if for st in states.values()) else {}
    now = time.time()
    disk = _Disk(paths, sorted(states))
    return {name: _usage(st, acct, net, now, disk) for name, st in sorted(states.items())}


def usage_of(paths: Paths, name: str) -> GuestUsage | None:
    """Usage of guest NAME, or None if it is not running."""
    st = guest.read_state(paths, name)
    if st is None or not guest.running(paths, name):
        return None
    return usage_all(paths, {name: st})[name]
