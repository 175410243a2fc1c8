"""Resource limits per guest: the seed's "global limits", on cgroups v1 or v2.

Each controller a guest needs is looked up where this host has it: in the
cgroup v2 tree when the controller is enabled there, otherwise in its own v1
hierarchy (hosts of this project's kind mount memory, pids and cpu as v1 next
to a nearly empty v2 tree). The guest's cgroup has the same relative path in
every hierarchy (`vpanel/NAME`), so tools find it without a registry.

Every value is read back after it is written. A limit the host cannot
enforce (no such controller, no such file) is never silently dropped: it
comes back as not enforced, with the reason, and `vserver NAME status` shows
it.

| key | v2 file | v1 file |
|---|---|---|
| MEMORY_LIMIT | memory.max | memory.limit_in_bytes |
| SWAP_LIMIT | memory.swap.max | memory.memsw.limit_in_bytes (memory + swap) |
| CPU_WEIGHT | cpu.weight | cpu.shares (weight * 1024 / 100) |
| CPU_MAX | cpu.max | cpu.cfs_quota_us / cpu.cfs_period_us |
| PIDS_MAX, nproc | pids.max | pids.max |
| IO_WEIGHT | io.weight | blkio.weight (10..1000, BFQ) |
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

from hostagent import syscalls
from hostagent.cgroup import (
    Cgroup,
    CgroupError,
    Hierarchy,
    cgroup_mounts,
    cgroup_of,
    tracking_hierarchy,
)
from hostagent.conf import GuestSettings

__all__ = [
    "ALL_CONTROLLERS",
    "LIVE_KEYS",
    "Applied",
    "GuestCgroups",
    "Limits",
    "limits_from_settings",
    "nofile_from_settings",
    "set_nofile",
    "was_set",
]

CFS_PERIOD_US = 100_000
ALL_CONTROLLERS = frozenset({"memory", "pids", "cpu", "io", "cpuacct", "cpuset"})
# NAME.conf keys a running guest takes at once through `vserver NAME set`.
LIVE_KEYS = frozenset({"MEMORY_LIMIT", "SWAP_LIMIT", "CPU_WEIGHT", "CPU_MAX", "PIDS_MAX",
                       "IO_WEIGHT"})
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Limits:
    memory: int | None = None
    swap: int | None = None
    cpu_weight: int | None = None
    cpu_max: float | None = None
    pids: int | None = None
    io_weight: int | None = None
    sched: bool = False  # the seed's flag: the guest weighs as one process

    def controllers(self) -> set[str]:
        """Controllers the guest is placed in: memory and pids always (accounting,
        lxcfs, the fork-bomb fence), cpu for any CPU setting or `sched`, io for IO_WEIGHT."""
        wanted = {"memory", "pids"}
        if self.sched or self.cpu_weight is not None or self.cpu_max is not None:
            # cpuacct and cpuset at the same path are where lxcfs looks for the
            # guest's CPU time and CPU count (v1; on v2 `cpu` holds both).
            wanted |= {"cpu", "cpuacct", "cpuset"}
        if self.io_weight is not None:
            wanted.add("io")
        return wanted

    def holds(self, key: str) -> bool:
        """Do these limits write KEY's cgroup file? `sched` writes CPU_WEIGHT's."""
        if key == "CPU_WEIGHT":
            return self.cpu_weight is not None or self.sched
        field = {"MEMORY_LIMIT": self.memory, "SWAP_LIMIT": self.swap, "CPU_MAX": self.cpu_max,
                 "PIDS_MAX": self.pids, "IO_WEIGHT": self.io_weight}[key]
        return field is not None


def limits_from_settings(s: GuestSettings) -> Limits:
    """The limits NAME.conf asks for. `nproc` turns ULIMIT's -u into a guest-wide pids.max."""
    pids = s.pids_max
    if pids is None and "nproc" in s.flags:
        nproc = [lim for lim in s.ulimits if lim.name == "nproc"]
        if nproc:
            value = nproc[-1].hard if nproc[-1].hard is not None else nproc[-1].soft
            pids = value if value is not None and value < 1 << 22 else None
    return Limits(memory=s.memory_limit, swap=s.swap_limit, cpu_weight=s.cpu_weight,
                  cpu_max=s.cpu_max, pids=pids, io_weight=s.io_weight,
                  sched="sched" in s.flags)


@dataclass(frozen=True)
class Applied:
    key: str
    wanted: str
    enforced: bool
    how: str  # the file written, or why nothing could be

    def text(self) -> str:
        state = "enforced" if self.enforced else "NOT ENFORCED"
        return f"{self.key}={self.wanted}: {state} ({self.how})"


def _v2_controllers(h: Hierarchy) -> set[str]:
    try:
        return set((h.mount / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def controller_hierarchies() -> dict[str, Hierarchy]:
    """Where each controller lives on this host: the v2 tree if enabled there, else v1."""
    found: dict[str, Hierarchy] = {}
    try:
        track = tracking_hierarchy()
    except CgroupError:
        return found
    if track.version == 2:
        for name in _v2_controllers(track) & {"memory", "pids", "cpu", "io"}:
            found[name] = track
    for point, fstype, opts in cgroup_mounts():
        if fstype != "cgroup":
            continue
        options = set(opts.split(","))
        for name, v1 in (("memory", "memory"), ("pids", "pids"), ("cpu", "cpu"),
                         ("io", "blkio"), ("cpuacct", "cpuacct"), ("cpuset", "cpuset")):
            if name not in found and v1 in options:
                found[name] = Hierarchy(Path(point), 1, v1)
    return found


class GuestCgroups:
    """A guest's cgroups for limits and accounting, beside its tracking cgroup."""

    def __init__(self, relpath: str, wanted: set[str] | frozenset[str]) -> None:
        self.relpath = relpath
        self.where = controller_hierarchies()
        self.missing = sorted(wanted - set(self.where))
        self.groups: dict[str, Cgroup] = {
            name: Cgroup(relpath, h) for name, h in self.where.items() if name in wanted
        }

    def create(self) -> None:
        for name, cg in self.groups.items():
            if cg.hierarchy.version == 2:
                self._enable_v2(name, cg)
            cg.create()
            if name == "cpuset" and cg.hierarchy.version == 1:
                self._inherit_cpuset(cg)

    def _inherit_cpuset(self, cg: Cgroup) -> None:
        """A v1 cpuset takes no task until its cpus and mems are set: copy the parent's,
        level by level down to the guest."""
        path = cg.hierarchy.mount
        for part in Path(self.relpath).parts:
            child = path / part
            for f in ("cpuset.cpus", "cpuset.mems"):
                with contextlib.suppress(OSError):
                    if not (child / f).read_text().strip():
                        (child / f).write_text((path / f).read_text().strip() or "0")
            path = child

    def _enable_v2(self, controller: str, cg: Cgroup) -> None:
        """Turn CONTROLLER on along the path down to the guest (v2 hands them down explicitly)."""
        parent = cg.hierarchy.mount
        for part in Path(self.relpath).parts[:-1]:
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text(f"+{controller}")
            parent = parent / part
            parent.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            (parent / "cgroup.subtree_control").write_text(f"+{controller}")

    def join_files(self) -> tuple[str, ...]:
        """cgroup.procs files a new guest process must write itself into.

        The tracking cgroup's hierarchy is left out: processes are cloned
        straight into that one (CLONE_INTO_CGROUP), and on a pure v2 host the
        guest's v2 cgroup is that very cgroup.
        """
        track = tracking_hierarchy()
        return tuple(sorted({str(cg.procs_file()) for cg in self.groups.values()
                             if cg.hierarchy.mount != track.mount}))

    def apply(self, lim: Limits) -> list[Applied]:
        out: list[Applied] = []
        out += self._memory(lim)
        out += self._cpu(lim)
        if lim.pids is not None:
            out.append(self._write("PIDS_MAX", str(lim.pids), "pids", "pids.max", "pids.max",
                                   str(lim.pids)))
        if lim.io_weight is not None:
            v1 = str(max(10, min(1000, lim.io_weight // 10)))
            out.append(self._write("IO_WEIGHT", str(lim.io_weight), "io", "io.weight",
                                   "blkio.weight", str(lim.io_weight), v1))
        return out

    def _memory(self, lim: Limits) -> list[Applied]:
        out: list[Applied] = []
        cg = self.groups.get("memory")
        memsw: Applied | None = None
        if (lim.memory is not None and lim.swap is not None and cg is not None
                and cg.hierarchy.version == 1
                and lim.memory > _read_int(cg.path / "memory.memsw.limit_in_bytes")):
            # v1 refuses (EINVAL) a memory.limit_in_bytes above the current
            # memory.memsw.limit_in_bytes: a raised MEMORY_LIMIT needs memsw
            # raised first (mm/memcontrol-v1.c, mem_cgroup_resize_max).
            memsw = self._write("SWAP_LIMIT", str(lim.swap), "memory", "",
                                "memory.memsw.limit_in_bytes", str(lim.memory + lim.swap))
        if lim.memory is not None:
            out.append(self._write("MEMORY_LIMIT", str(lim.memory), "memory", "memory.max",
                                   "memory.limit_in_bytes", str(lim.memory)))
        if lim.swap is not None:
            if memsw is not None:
                out.append(memsw)
            elif cg is not None and cg.hierarchy.version == 1:
                if lim.memory is None:
                    out.append(Applied("SWAP_LIMIT", str(lim.swap), False,
                                       "cgroup v1 limits swap together with memory: "
                                       "set MEMORY_LIMIT too"))
                else:
                    total = str(lim.memory + lim.swap)
                    out.append(self._write("SWAP_LIMIT", str(lim.swap), "memory", "",
                                           "memory.memsw.limit_in_bytes", total))
            else:
                out.append(self._write("SWAP_LIMIT", str(lim.swap), "memory",
                                       "memory.swap.max", "", str(lim.swap)))
        return out

    def _cpu(self, lim: Limits) -> list[Applied]:
        out: list[Applied] = []
        weight = lim.cpu_weight if lim.cpu_weight is not None else (100 if lim.sched else None)
        if weight is not None:
            shares = str(max(2, weight * 1024 // 100))
            out.append(self._write("CPU_WEIGHT" if lim.cpu_weight is not None else "sched",
                                   str(weight), "cpu", "cpu.weight", "cpu.shares",
                                   str(weight), shares))
        if lim.cpu_max is not None:
            quota = max(1000, int(lim.cpu_max * CFS_PERIOD_US))
            cg = self.groups.get("cpu")
            if cg is not None and cg.hierarchy.version == 1:
                period = self._write("CPU_MAX", str(lim.cpu_max), "cpu", "",
                                     "cpu.cfs_period_us", str(CFS_PERIOD_US))
                out.append(period if not period.enforced else self._write(
                    "CPU_MAX", str(lim.cpu_max), "cpu", "", "cpu.cfs_quota_us", str(quota)))
            else:
                out.append(self._write("CPU_MAX", str(lim.cpu_max), "cpu", "cpu.max", "",
                                       f"{quota} {CFS_PERIOD_US}"))
        return out

    def _write(self, key: str, wanted: str, controller: str, v2file: str, v1file: str,
               v2value: str, v1value: str | None = None) -> Applied:
        cg = self.groups.get(controller)
        if cg is None:
            return Applied(key, wanted, False, f"no {controller} controller on this host")
        v2 = cg.hierarchy.version == 2
        fname, value = (v2file, v2value) if v2 else (v1file, v1value or v2value)
        if not fname:
            return Applied(key, wanted, False,
                           f"cgroup v{cg.hierarchy.version} has no file for it")
        path = cg.path / fname
        try:
            path.write_text(value)
            back = path.read_text().strip()
        except OSError as e:
            # cgroupfs answers EACCES, not ENOENT, for a file it does not have
            # (blkio.weight without BFQ): creating files there is refused.
            if e.errno == errno.ENOENT or not path.exists():
                return Applied(key, wanted, False, f"{path} does not exist on this kernel")
            return Applied(key, wanted, False, f"writing {path}: {e.strerror}")
        if value in ("-1", "max") and back not in ("max", "-1"):
            return Applied(key, wanted, True, f"{path} (unlimited)")
        if not _same(back, value):
            return Applied(key, wanted, False, f"{path} reads back {back!r}, not {value!r}")
        return Applied(key, wanted, True, str(path))

    def clear(self, key: str) -> Applied:
        """Lift one limit (the key was emptied in NAME.conf) on a running guest."""
        table = {
            "MEMORY_LIMIT": ("memory", "memory.max", "memory.limit_in_bytes", "max", "-1"),
            "SWAP_LIMIT": ("memory", "memory.swap.max", "memory.memsw.limit_in_bytes",
                           "max", "-1"),
            "CPU_WEIGHT": ("cpu", "cpu.weight", "cpu.shares", "100", "1024"),
            "CPU_MAX": ("cpu", "cpu.max", "cpu.cfs_quota_us", f"max {CFS_PERIOD_US}", "-1"),
            "PIDS_MAX": ("pids", "pids.max", "pids.max", "max", "max"),
            "IO_WEIGHT": ("io", "io.weight", "blkio.weight", "default 100", "500"),
        }
        controller, v2file, v1file, v2value, v1value = table[key]
        cg = self.groups.get(controller)
        if cg is None:
            # The key just emptied may have been the last reason for this
            # controller (CPU_MAX alone): the guest is still in the cgroup the
            # limit was written to, and that value holds until it is lifted.
            h = self.where.get(controller)
            if h is None or not Cgroup(self.relpath, h).exists():
                return Applied(key, "", True, "nothing to lift")
            cg = self.groups[controller] = Cgroup(self.relpath, h)
        if key == "MEMORY_LIMIT" and cg.hierarchy.version == 1:
            # memory.limit_in_bytes may not exceed memory.memsw.limit_in_bytes
            # (EINVAL), and v1 holds no swap limit without a memory limit: lift
            # memory + swap first. No memsw file (swap accounting off): nothing to lift.
            with contextlib.suppress(OSError):
                (cg.path / "memory.memsw.limit_in_bytes").write_text("-1")
        applied = self._write(key, "", controller, v2file, v1file, v2value, v1value)
        path = cg.path / (v2file if cg.hierarchy.version == 2 else v1file)
        if not applied.enforced and not path.exists():
            # A file this kernel lacks never held a limit (blkio.weight without BFQ).
            return Applied(key, "", True, f"{path} does not exist: no limit to lift")
        return applied

    def adopt(self, pids: list[int]) -> None:
        """Move a running guest's processes into cgroups made after it started."""
        track = tracking_hierarchy()
        for cg in self.groups.values():
            if cg.hierarchy.mount == track.mount:
                continue
            present = set(cg.procs())
            for pid in pids:
                if pid not in present:
                    with contextlib.suppress(OSError):  # it may have just exited
                        cg.attach(pid)

    def remove(self) -> None:
        for cg in self.groups.values():
            if cg.exists():
                cg.kill()
                cg.wait_empty(5)
                cg.remove()


def _read_int(path: Path) -> int:
    """An integer cgroup file, or the largest value when it cannot be read."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 1 << 63


def _same(back: str, value: str) -> bool:
    """Does a read-back value match what was written (the kernel rounds memory to pages)?"""
    if back == value:
        return True
    try:
        b, v = int(back), int(value)
    except ValueError:
        return back.split() == value.split()
    return v - PAGE < b <= v


def save_applied(path: Path, applied: list[Applied]) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps([asdict(a) for a in applied]))
    os.replace(tmp, path)


def load_applied(path: Path) -> list[Applied]:
    try:
        return [Applied(**a) for a in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def was_set(applied: list[Applied], key: str) -> bool:
    """Did APPLIED (a start's or a set's) write a limit for KEY (`sched` one for CPU_WEIGHT)?"""
    names = {key, "sched"} if key == "CPU_WEIGHT" else {key}
    return any(a.key in names and a.wanted for a in applied)


# --- NOFILE: an rlimit, not a cgroup file ------------------------------------------

RLIM_INFINITY = (1 << 64) - 1  # rlim_t's RLIM_INFINITY (include/uapi/asm-generic/resource.h)


def nofile_from_settings(s: GuestSettings) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE a process started in the guest now gets: NOFILE,
    else ULIMIT's -n over the agent's own limit (what hostagent.context applies)."""
    if s.nofile is not None:
        return s.nofile, s.nofile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for lim in s.ulimits:
        if lim.resource == resource.RLIMIT_NOFILE:
            soft = soft if lim.soft is None else lim.soft
            hard = hard if lim.hard is None else lim.hard
    soft, hard = (RLIM_INFINITY if v == resource.RLIM_INFINITY else v for v in (soft, hard))
    return min(soft, hard), hard


def set_nofile(relpath: str, soft: int, hard: int) -> Applied:
    """RLIMIT_NOFILE of every process of the guest in cgroup RELPATH, now (prlimit(2)).

    Processes started later get the value from NAME.conf. Passes repeat while
    one finds a process the last did not reach: a child forked by a process
    before that process was changed inherited the old limit. Raising a hard
    limit needs CAP_SYS_RESOURCE in the host's user namespace, and so does
    changing a process whose uids are not all the caller's
    (kernel/sys.c, do_prlimit and check_prlimit_permission): a refusal is
    reported, never hidden.
    """
    wanted = str(soft) if soft == hard else f"{soft}:{hard}"
    track = tracking_hierarchy()
    group = Cgroup(relpath, track)
    seen: set[int] = set()
    changed = 0
    refused: dict[str, int] = {}
    for _ in range(10):
        new = [pid for pid in group.procs() if pid not in seen]
        if not new:
            break
        seen.update(new)
        for pid in new:
            why = _prlimit_nofile(pid, relpath, track, soft, hard)
            if why == "":
                changed += 1
            elif why is not None:
                refused[why] = refused.get(why, 0) + 1
    if refused:
        reasons = "; ".join(f"{n} refused: {why}" for why, n in sorted(refused.items()))
        hint = (" (raising a hard limit, or changing a process of another uid, needs "
                "CAP_SYS_RESOURCE; they get it at the next start)"
                if any("not permitted" in why for why in refused) else "")
        return Applied("NOFILE", wanted, False,
                       f"prlimit RLIMIT_NOFILE: {changed} processes changed, {reasons}{hint}")
    return Applied("NOFILE", wanted, True, f"prlimit RLIMIT_NOFILE of {changed} processes")


def _prlimit_nofile(pid: int, relpath: str, track: Hierarchy, soft: int,
                    hard: int) -> str | None:
    """Set and read back PID's RLIMIT_NOFILE: "" done, None gone, else why not.

    The pid is checked to be the guest's after a pidfd pins its process: the
    number came from cgroup.procs and may have gone to another process since.
    """
    try:
        pidfd = syscalls.pidfd_open(pid)
    except OSError:
        return None  # exited
    try:
        where = cgroup_of(pid, track)
        if where is None or not (where == relpath or where.startswith(relpath + "/")):
            return None  # exited, and the number is another process's now
        try:
            syscalls.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            back = syscalls.prlimit(pid, resource.RLIMIT_NOFILE)
        except OSError as e:
            return None if e.errno == errno.ESRCH else (e.strerror or str(e))
        return "" if back == (soft, hard) else f"reads back {back[0]}:{back[1]}"
    finally:
        os.close(pidfd)
