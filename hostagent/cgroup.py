"""One cgroup per guest: how the agent knows which processes are a guest's.

A guest's context is its namespaces plus this cgroup. Membership survives
double forks, daemonising and an agent restart, so it is how `status` counts
processes, how `stop` knows that nothing of the guest remains, and how a
restarted agent re-adopts running guests.

Hosts differ (reference/perf.md): a pure cgroup v2 host, a hybrid host with
v1 controllers and a nearly empty v2 tree at /sys/fs/cgroup/unified, or a v1
host with no v2 at all. Tracking needs no controller, so v2 is used wherever
it is mounted (it alone has cgroup.kill and cgroup.events); on a v1-only host
the first of the pids, freezer or name=systemd hierarchies is used instead.
Limits (memory, pids, cpu) are another module's business.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Cgroup",
    "CgroupError",
    "Hierarchy",
    "cgroup_base",
    "cgroup_mounts",
    "tracking_hierarchy",
]


class CgroupError(OSError):
    pass


def cgroup_base() -> str:
    """Parent of every cgroup vpanel makes; VSERVER_CGROUP moves it (tests keep theirs apart)."""
    base = os.environ.get("VSERVER_CGROUP", "vpanel")
    if not base or base.startswith("/") or ".." in base.split("/"):
        raise CgroupError(errno.EINVAL, f"bad VSERVER_CGROUP {base!r}")
    return base


@dataclass(frozen=True)
class Hierarchy:
    mount: Path
    version: int  # 1 or 2
    key: str = ""  # v1: the controller or name= option identifying it in /proc/PID/cgroup


def cgroup_mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every cgroup mount, from mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                point = fields[4].replace("\\040", " ")
                out.append((point, rfields[0], rfields[2]))
    return out


def tracking_hierarchy() -> Hierarchy:
    """The hierarchy guests are tracked in on this host (see the module doc)."""
    v1: dict[str, str] = {}
    for point, fstype, opts in cgroup_mounts():
        if fstype == "cgroup2":
            return Hierarchy(Path(point), 2)
        for opt in opts.split(","):
            v1.setdefault(opt, point)
    for key in ("pids", "freezer", "name=systemd"):
        if key in v1:
            return Hierarchy(Path(v1[key]), 1, key)
    raise CgroupError(errno.ENOENT, "no cgroup hierarchy is mounted on this host")


class Cgroup:
    """A cgroup at RELPATH (e.g. 'vpanel/web1') in the tracking hierarchy."""

    def __init__(self, relpath: str, hierarchy: Hierarchy | None = None) -> None:
        if relpath.startswith("/") or ".." in relpath.split("/"):
            raise ValueError(f"bad cgroup path {relpath!r}")
        self.relpath = relpath
        self.hierarchy = hierarchy or tracking_hierarchy()
        self.path = self.hierarchy.mount / relpath

    def __repr__(self) -> str:
        return f"Cgroup({self.relpath!r}, v{self.hierarchy.version})"

    def exists(self) -> bool:
        return self.path.is_dir()

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def clone_fd(self) -> int | None:
        """A directory fd for clone3(CLONE_INTO_CGROUP), or None on cgroup v1 (no such flag)."""
        if self.hierarchy.version != 2:
            return None
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def attach(self, pid: int = 0) -> None:
        """Move PID (0: the caller) into this cgroup."""
        with open(self.procs_file(), "w", encoding="ascii") as f:
            f.write(str(pid))

    def procs(self) -> list[int]:
        """Host PIDs of every process in the cgroup and its children."""
        pids: list[int] = []
        if not self.path.is_dir():
            return pids
        for dirpath, _dirs, _files in os.walk(self.path):
            try:
                with open(os.path.join(dirpath, "cgroup.procs"), encoding="ascii") as f:
                    pids.extend(int(x) for x in f.read().split())
            except FileNotFoundError:
                continue
        return pids

    def populated(self) -> bool:
        if self.hierarchy.version == 2:
            try:
                text = (self.path / "cgroup.events").read_text()
            except FileNotFoundError:
                return False
            return "populated 1" in text
        return bool(self.procs())

    def kill(self) -> None:
        """SIGKILL everything in the cgroup, including processes forking right now."""
        killfile = self.path / "cgroup.kill"
        if self.hierarchy.version == 2 and killfile.exists():
            killfile.write_text("1")
            return
        # v1 has no cgroup.kill: repeat until a pass finds nobody, which
        # catches children forked while we were signalling.
        for _ in range(100):
            pids = self.procs()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def wait_empty(self, timeout: float) -> bool:
        """Wait until no process is left; on v2 the kernel wakes us (cgroup.events)."""
        deadline = time.monotonic() + timeout
        poller = None
        fd = -1
        if self.hierarchy.version == 2:
            try:
                fd = os.open(self.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
                poller = select.poll()
                poller.register(fd, select.POLLPRI | select.POLLERR)
            except FileNotFoundError:
                return True
        try:
            while self.populated():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if poller is not None:
                    # A modification of cgroup.events wakes the poll; the short
                    # cap covers a change between reading and polling.
                    poller.poll(min(left, 0.05) * 1000)
                else:
                    time.sleep(min(left, 0.005))
            return True
        finally:
            if fd >= 0:
                os.close(fd)

    def remove(self) -> None:
        """Remove the cgroup (and children); it must be empty of processes."""
        if not self.path.exists():
            return
        for dirpath, _dirs, _files in sorted(os.walk(self.path), key=lambda t: -len(t[0])):
            for _ in range(50):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY lingers for a moment after the last process exits.
                    if e.errno != errno.EBUSY:
                        raise
                    time.sleep(0.01)
            else:
                raise CgroupError(errno.EBUSY, f"cgroup {dirpath} still busy")
        self._remove_empty_parents()

    def _remove_empty_parents(self) -> None:
        parent = self.path.parent
        while parent != self.hierarchy.mount:
            try:
                os.rmdir(parent)
            except OSError:
                return
            parent = parent.parent


def cgroup_of(pid: int, hierarchy: Hierarchy) -> str | None:
    """The cgroup path of PID in HIERARCHY, relative to its mount, or None."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hierarchy.version == 2 and hid == "0":
            return path.lstrip("/")
        if hierarchy.version == 1 and hid != "0" and hierarchy.key in controllers.split(","):
            return path.lstrip("/")
    return None
