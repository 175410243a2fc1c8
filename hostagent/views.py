"""The seed's context 1, rebuilt: one view of every process with its context.

In Linux-VServer, security context 1 could see the processes of every
context (and signal none); vps, vpstree, vtop and vserver-stat ran their
tools there. On a stock kernel the host's PID namespace already sees every
process, so what is left is to say which context each one belongs to, and
that is what this module does for the tools in hostagent/cli:

  * a process belongs to a running guest iff its cgroup in the tracking
    hierarchy is the guest's (RunState.cgroup) or below it;
  * it belongs to chcontext context N iff its cgroup is CGROUP_BASE/ctx-N or
    below (hostagent/cli/chcontext.py makes those);
  * anything else is the host's, context 0, which the seed called MAIN.

Everything here only reads /proc and cgroupfs; nothing needs a lock, and a
process that exits while it is being read is skipped, not an error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hostagent import guest
from hostagent.cgroup import Hierarchy, cgroup_base, cgroup_of, tracking_hierarchy
from hostagent.paths import Paths

__all__ = [
    "HOST",
    "MAIN",
    "UNNAMED",
    "Context",
    "ContextMap",
    "Proc",
    "all_procs",
    "clock_ticks",
    "host_pid_in",
    "mem_total",
    "nspid",
    "parse_stat",
    "print_json",
    "read_proc",
    "render_table",
    "running_states",
    "start_of",
    "stdout_closed",
    "user_name",
]

# The seed's names for contexts that are no vserver (scripts/vps getcontextname).
MAIN = "MAIN"
UNNAMED = "UNKNOWN"

_CTX_DIR_RE = re.compile(r"ctx-(\d+)\Z")

# /proc/PID/stat flags: PF_KTHREAD (include/linux/sched.h).
PF_KTHREAD = 0x00200000


@functools.cache
def clock_ticks() -> int:
    """USER_HZ: the unit of the times in /proc/PID/stat and cpuacct.stat."""
    return os.sysconf("SC_CLK_TCK")


@functools.cache
def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def mem_total() -> int:
    """MemTotal of /proc/meminfo, in bytes (the base of %MEM, as in ps and top)."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


_PASSWD_MAX = 1 << 20


def guest_user_names(root: Path) -> dict[int, str]:
    """uid -> login name from the guest's own /etc/passwd under ROOT.

    The guest writes that file, so it is found as the guest sees it
    (pkg.locate: no symlink leads out of ROOT), not followed at its last
    component, read only if it is a regular file, and at most 1 MiB of it.
    Anything unreadable gives no names (callers show numbers then)."""
    from hostagent import pkg

    where = pkg.locate(root, "/etc/passwd")
    if where is None:
        return {}
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        data = os.read(fd, _PASSWD_MAX)
    except OSError:
        return {}
    finally:
        os.close(fd)
    names: dict[int, str] = {}
    for line in data.decode(errors="replace").splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[2].isdigit():
            names.setdefault(int(parts[2]), printable(parts[0])[:32])
    return names


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str:
    """The host's name for UID, as ps prints it: a privileged guest's users share the
    host's uids; an isolated guest's (IDMAP) are numbers of its range, as on disk."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --- contexts -------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """Which context a process is in: a number and, for a vserver, its name."""

    number: int
    guest: str | None = None

    @property
    def label(self) -> str:
        """NAME as the seed's vps printed it: the vserver, MAIN for the host, else UNKNOWN."""
        if self.guest is not None:
            return self.guest
        return MAIN if self.number == 0 else UNNAMED


HOST = Context(0)


def running_states(paths: Paths) -> dict[str, guest.RunState]:
    """The RunState of every running guest, by name."""
    states = {}
    for name in paths.guest_names():
        st = guest.read_state(paths, name)
        if st is not None and guest.running(paths, name):
            states[name] = st
    return states


class ContextMap:
    """Cgroup path -> context, built once per listing from the running guests."""

    def __init__(self, paths: Paths, hierarchy: Hierarchy | None = None,
                 states: dict[str, guest.RunState] | None = None) -> None:
        self.hierarchy = hierarchy or tracking_hierarchy()
        self.states = running_states(paths) if states is None else states
        self.base = cgroup_base()
        self._guests = {st.cgroup: Context(st.context, name) for name, st in self.states.items()}
        self._levels: dict[str, int | None] = {}

    def of_cgroup(self, cgroup: str | None) -> Context:
        """The context whose cgroup is CGROUP or one of its ancestors."""
        if not cgroup:
            return HOST
        parts = cgroup.split("/")
        # Longest prefix first: a guest's cgroup may sit below another one.
        for n in range(len(parts), 0, -1):
            hit = self._guests.get("/".join(parts[:n]))
            if hit is not None:
                return hit
        base = self.base.split("/")
        if parts[:len(base)] == base and len(parts) > len(base):
            m = _CTX_DIR_RE.match(parts[len(base)])
            if m:
                return Context(int(m.group(1)))
        return HOST

    def of_pid(self, pid: int) -> Context | None:
        """PID's context, or None if PID no longer exists."""
        cg = cgroup_of(pid, self.hierarchy)
        if cg is None and not os.path.exists(f"/proc/{pid}"):
            return None
        return self.of_cgroup(cg)

    def guest_level(self, name: str) -> int | None:
        """Depth of guest NAME's PID namespace: its pids are NSpid[level]."""
        if name not in self._levels:
            st = self.states.get(name)
            ns = None if st is None else nspid(st.init_pid)
            self._levels[name] = None if not ns else len(ns) - 1
        return self._levels[name]

    def inner_pid(self, proc: Proc, ctx: Context) -> int | None:
        """PROC's pid as its guest sees it (None for the host's and chcontext's)."""
        if ctx.guest is None:
            return None
        level = self.guest_level(ctx.guest)
        return proc.nspid[level] if level is not None and len(proc.nspid) > level else None

    def guest_context(self, name: str) -> Context | None:
        st = self.states.get(name)
        return None if st is None else Context(st.context, name)

    def contexts(self) -> list[Context]:
        return sorted(self._guests.values(), key=lambda c: c.number)


# --- processes ------------------------------------------------------------------

_CONTROL_TO_QUESTION = {c: "?" for c in [*range(0x20), 0x7f]}


def printable(text: str) -> str:
    """Control characters as '?', as ps prints them.

    A guest picks its own argv and comm; a newline in them must not forge a
    row in a host tool's output.
    """
    return text.translate(_CONTROL_TO_QUESTION)


@dataclass(frozen=True)
class Proc:
    """What the tools need of one process, read from /proc/PID."""

    pid: int
    ppid: int
    state: str
    comm: str
    args: tuple[str, ...]  # empty for kernel threads and zombies
    uid: int  # effective uid, as ps's USER
    utime: int  # clock ticks
    stime: int  # clock ticks
    start: int  # clock ticks since boot (with pid, names the process for good)
    vsize: int  # bytes
    rss: int  # bytes
    nspid: tuple[int, ...]  # its pid in each PID namespace, outermost first
    cgroup: str | None  # in the tracking hierarchy
    kthread: bool

    @property
    def command(self) -> str:
        """The command line as ps prints it; [comm] when there is none."""
        return printable(" ".join(self.args) if self.args else f"[{self.comm}]")

    @property
    def cpu_ticks(self) -> int:
        return self.utime + self.stime


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def parse_stat(data: bytes) -> tuple[str, list[bytes]]:
    """(comm, fields from field 3 (state) on) of a /proc/PID/stat."""
    # comm may hold spaces and parentheses: it ends at the last ')'.
    lp, rp = data.index(b"("), data.rindex(b")")
    return data[lp + 1:rp].decode(errors="replace"), data[rp + 2:].split()


def _status_fields(data: bytes) -> dict[str, str]:
    out = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def start_of(pid: int) -> int | None:
    """PID's start time in clock ticks since boot, zombie or not; None if it is gone.

    (hostagent.procfs.start_time answers None for a zombie, which is right for
    telling a live guest; signalling a zombie is harmless, as kill(1) finds.)
    """
    data = _read(f"/proc/{pid}/stat")
    return None if data is None else int(parse_stat(data)[1][19])


def nspid(pid: int) -> tuple[int, ...] | None:
    """PID's pid in each PID namespace it is in, the host's first (NSpid, Linux 4.1)."""
    data = _read(f"/proc/{pid}/status")
    if data is None:
        return None
    value = _status_fields(data).get("NSpid")
    return tuple(int(x) for x in value.split()) if value else (pid,)


def read_proc(pid: int, hierarchy: Hierarchy) -> Proc | None:
    """PID's Proc, or None if it exited while being read."""
    stat = _read(f"/proc/{pid}/stat")
    status = _read(f"/proc/{pid}/status")
    cmdline = _read(f"/proc/{pid}/cmdline")
    if stat is None or status is None or cmdline is None:
        return None
    comm, f = parse_stat(stat)
    st = _status_fields(status)
    try:
        uid = int(st["Uid"].split()[1])
    except (KeyError, IndexError, ValueError):
        uid = -1
    ns = tuple(int(x) for x in st.get("NSpid", str(pid)).split())
    args = tuple(a.decode(errors="replace") for a in cmdline.rstrip(b"\0").split(b"\0")) \
        if cmdline else ()
    # Field numbers of proc(5), counted from 1; f[0] is field 3 (state).
    return Proc(
        pid=pid,
        ppid=int(f[1]),
        state=f[0].decode(),
        comm=comm,
        args=args,
        uid=uid,
        utime=int(f[11]),
        stime=int(f[12]),
        start=int(f[19]),
        vsize=int(f[20]),
        rss=int(f[21]) * page_size(),
        nspid=ns,
        cgroup=cgroup_of(pid, hierarchy),
        kthread=bool(int(f[6]) & PF_KTHREAD),
    )


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def all_procs(hierarchy: Hierarchy, pids: Iterable[int] | None = None) -> list[Proc]:
    """Every process of the host (or of PIDS) that still exists, by pid."""
    out = []
    for pid in sorted(_pids() if pids is None else pids):
        with contextlib.suppress(ValueError, IndexError):
            p = read_proc(pid, hierarchy)
            if p is not None:
                out.append(p)
    return out


def host_pid_in(pids: Iterable[int], level: int, inner: int) -> int | None:
    """The host pid of the process among PIDS whose pid at namespace LEVEL is INNER.

    LEVEL is the depth of the context's own PID namespace (1 for a guest
    started by the host); a process of a namespace nested inside the guest
    still has its guest-level pid there, as the guest's own ps shows it.
    """
    for pid in pids:
        ns = nspid(pid)
        if ns is not None and len(ns) > level and ns[level] == inner:
            return pid
    return None


def stdout_closed() -> int:
    """For a CLI whose reader went away (`vps | head`): exit quietly, as ps does.

    Python would complain again when it flushes stdout at exit; pointing fd 1
    at /dev/null stops that. 141 is what a shell reports for SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]],
                 right: Sequence[bool]) -> list[str]:
    """Columns padded to their widest cell; RIGHT says which are right-aligned.

    The last column is never padded (a command line is as long as it is).
    """
    rows = [list(r) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for cells in [list(headers), *rows]:
        out = []
        for i, c in enumerate(cells):
            if i == len(cells) - 1:
                out.append(c)
            else:
                out.append(c.rjust(widths[i]) if right[i] else c.ljust(widths[i]))
        lines.append(" ".join(out).rstrip())
    return lines
