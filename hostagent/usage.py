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
  memory        cgroup v2 memory.current / memory.peak where the memory
                controller is enabled for the guest's cgroup; else the v1
                memory hierarchy's memory.usage_in_bytes /
                memory.max_usage_in_bytes at the same relative path (the
                limits module puts the guest there). Both count page cache
                the guest caused, not only its processes' RSS.
  net           the host end of the guest's veth (RunState.host_if) in
                /proc/thread-self/net/dev, read once for all guests in the
                caller's (the host's) network namespace. What the host end
                transmits the guest receives: guest rx = host end tx, guest
                tx = host end rx. None for a guest without a veth (IPROOT=ALL
                shares the host's network; no addresses means lo only).
  disk_used     None: disk accounting (project quota, overlay upper dir) is
                the storage work's.
  uptime        now - RunState.started (time.time() when `start` finished
                writing NAME.ctx).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from hostagent import guest, views
from hostagent.cgroup import Cgroup, Hierarchy, tracking_hierarchy
from hostagent.paths import Paths

__all__ = ["GuestUsage", "net_counters", "usage_all", "usage_of"]


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


def _v1_mounts() -> dict[str, Path]:
    """Mount point of each v1 controller (cpuacct, memory, ...), from mountinfo.

    Fields of proc(5): the fifth is the mount point; after " - " come the
    fstype, the source and the super options, which name a v1 hierarchy's
    controllers ("rw,cpu,cpuacct").
    """
    out: dict[str, Path] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) > 4 and len(rfields) >= 3 and rfields[0] == "cgroup":
                for opt in rfields[2].split(","):
                    out.setdefault(opt, Path(fields[4].replace("\\040", " ")))
    return out


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
        self.v1 = _v1_mounts()

    def _v2(self, relpath: str) -> Path | None:
        return self.tracking.mount / relpath if self.tracking.version == 2 else None

    def cpu(self, relpath: str) -> tuple[float | None, float | None, float | None]:
        """(total, user, system) CPU seconds."""
        v2 = self._v2(relpath)
        if v2 is not None:
            stat = _read_kv(v2 / "cpu.stat")
            if stat is not None and "usage_usec" in stat:
                user, system = stat.get("user_usec"), stat.get("system_usec")
                return (stat["usage_usec"] / 1e6,
                        None if user is None else user / 1e6,
                        None if system is None else system / 1e6)
        mount = self.v1.get("cpuacct")
        if mount is None:
            return None, None, None
        d = mount / relpath
        total = _read_int(d / "cpuacct.usage")
        ticks = _read_kv(d / "cpuacct.stat") or {}
        hz = views.clock_ticks()
        return (None if total is None else total / 1e9,
                ticks["user"] / hz if "user" in ticks else None,
                ticks["system"] / hz if "system" in ticks else None)

    def memory(self, relpath: str) -> tuple[int | None, int | None]:
        """(current, peak) bytes."""
        v2 = self._v2(relpath)
        if v2 is not None:
            current = _read_int(v2 / "memory.current")
            if current is not None:
                return current, _read_int(v2 / "memory.peak")
        mount = self.v1.get("memory")
        if mount is None:
            return None, None
        d = mount / relpath
        return _read_int(d / "memory.usage_in_bytes"), _read_int(d / "memory.max_usage_in_bytes")


def _usage(st: guest.RunState, acct: _Accounting, net: dict[str, tuple[int, int]],
           now: float) -> GuestUsage:
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
        disk_used=None,
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
    return {name: _usage(st, acct, net, now) for name, st in sorted(states.items())}


def usage_of(paths: Paths, name: str) -> GuestUsage | None:
    """Usage of guest NAME, or None if it is not running."""
    st = guest.read_state(paths, name)
    if st is None or not guest.running(paths, name):
        return None
    return usage_all(paths, {name: st})[name]
