"""Security contexts: start a guest's PID 1, and enter a running guest.

The seed's new_s_context() became a set of namespaces (PID, mount, UTS, IPC,
cgroup) plus a cgroup, a capability bounding set and a seccomp filter. This
module builds them from a resident process with fork(), not by starting a
new interpreter per guest: the namespaces and root switch cost about 2.4 ms,
an interpreter 7 to 10 ms more (reference/perf.md).

Starting PID 1 (launch_init):

    caller ──clone3(NEWPID|NEWNS|NEWUTS|NEWIPC[|NEWNET], INTO_CGROUP)──> B
    B (PID 1 of the new PID namespace, born in the guest's cgroup):
       unshare(NEWCGROUP), mounts, pivot_root, names, limits, ceiling,
       seccomp, exec init

With an id range (ContextSpec.idmap_base, NAME.conf IDMAP) the clone also
carries NEWUSER, so the guest's user namespace owns all the others; B waits
while the caller writes its uid_map and gid_map and sets its nice and
rlimits, then becomes the namespace's root and mounts its tree from
detached copies the caller made (_Trees), since guest root cannot walk the
host paths above its root.

B reports a failed step over a close-on-exec pipe; EOF without a message
means the exec happened. Everything B set up lives in namespaces only B
holds, so when B dies before the exec the kernel tears all of it down: no
mount, namespace or process of a failed start survives.

Entering (enter): fork C, which joins the guest's namespaces through a pidfd
of its PID 1 (so a recycled PID can never be joined), clones D inside the PID
namespace and the guest's cgroup, and waits for it; D joins the cgroup
namespace, takes the same ceiling, limits and filter as the guest, and execs
the command. open_terminal is the same with a terminal of the guest's own
devpts, whose master C hands back to the caller (with a pidfd of D) instead
of relaying it, so that an event loop can serve it (the agent's consoles).

B is the caller's child: a long-lived caller (the agent) reaps it when the
guest ends; a short-lived one (the CLI) exits and the host's init does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import resource
import select
import shutil
import signal
import socket
import struct
import termios
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostagent import caps as capmod
from hostagent import idmap, seccomp, syscalls, ulimit
from hostagent import lxcfs as lxcfsmod
from hostagent.cgroup import Cgroup
from hostagent.syscalls import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)
from hostagent.ulimit import Limit

__all__ = [
    "GUEST_NAMESPACES",
    "ContextSpec",
    "EnterRequest",
    "LaunchError",
    "StopCopy",
    "Terminal",
    "copy_until_exit",
    "enter",
    "init_binary",
    "launch_init",
    "open_terminal",
]

GUEST_NAMESPACES = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWCGROUP

# The devices every guest gets (the seed's build made the same set with mknod).
# Each is a bind mount of the host's node over an empty file on the guest's
# /dev tmpfs, which is itself nodev: a node the guest might create there
# (it cannot, without CAP_MKNOD) would not open.
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")

# /proc parts that stay readable but not writable: sysctls, sysrq-trigger
# (`echo b` reboots the host), and hardware interfaces (moby's ReadonlyPaths).
PROC_READONLY = ("sys", "sysrq-trigger", "bus", "fs", "irq")
# /proc and /sys parts hidden entirely: host memory (kcore), the host's
# keyrings, kernel timer and scheduler internals that leak host activity and
# addresses (moby's MaskedPaths; GHSA-6fw5-f8r9-fgfm for the thermal and
# powercap ones).
# Kernel heap and physical page state (slabinfo, kpage*, vmallocinfo,
# /sys/kernel/slab, vmcoreinfo) is what kernel exploits map before they strike.
MASKED_FILES = (
    "proc/kcore", "proc/keys", "proc/key-users", "proc/timer_list", "proc/timer_stats",
    "proc/sched_debug", "proc/latency_stats", "proc/kallsyms", "proc/kmsg",
    "proc/interrupts", "proc/sysrq-trigger", "proc/slabinfo", "proc/kpagecount",
    "proc/kpageflags", "proc/kpagecgroup", "proc/vmallocinfo", "proc/pagetypeinfo",
    "sys/kernel/vmcoreinfo",
)
MASKED_DIRS = ("proc/acpi", "proc/asound", "proc/scsi", "sys/firmware",
               "sys/devices/virtual/powercap", "sys/kernel/debug", "sys/kernel/security",
               "sys/kernel/slab", "sys/kernel/tracing")

_INIT_CANDIDATES = (
    "/usr/bin/catatonit", "/usr/libexec/podman/catatonit", "/usr/libexec/catatonit",
)
_STEP_PREFIX = b"FAIL "


class StopCopy(Exception):
    """Raised by a sink of copy_until_exit: kill the command now, take no more of it."""


class LaunchError(RuntimeError):
    """A step of starting or entering a context failed; `step` names it."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


@dataclass(frozen=True)
class ContextSpec:
    """Everything that defines a context, independent of how it was configured."""

    root: Path | None  # guest root; None keeps the caller's filesystem (chcontext)
    caps: frozenset[int] = capmod.DEFAULT_CEILING
    hostname: str | None = None  # None: keep the host's
    domainname: str | None = None  # None: keep; "": clear (S_DOMAINNAME="none")
    nice: int | None = None
    ulimits: tuple[Limit, ...] = ()
    seccomp: seccomp.SeccompPolicy | None = field(default_factory=seccomp.SeccompPolicy)
    namespaces: int = GUEST_NAMESPACES
    cgroup: Cgroup | None = None
    fakeinit: bool = False
    hideinfo: bool = False
    userns: bool = False  # unprivileged chcontext: map the caller's ids into a user namespace
    # A running lxcfs's mount, whose files replace the kernel's /proc/meminfo
    # and friends in a guest's tree (hostagent/lxcfs.py); None: the kernel's.
    lxcfs: Path | None = field(default_factory=lxcfsmod.mountpoint)
    # cgroup.procs files of the guest's limit cgroups in other hierarchies
    # (cgroup v1): every process of the guest writes itself into each.
    join_cgroups: tuple[str, ...] = ()
    # The host directory of the guest's reboot socket (hostagent/rebootmgr.py),
    # bound read-only at /dev/.rebootmgr with /dev/reboot pointing into it.
    reboot_dir: Path | None = None
    # IDMAP: the guest's ids 0..65535 are host ids IDMAP_BASE.., in a user
    # namespace cloned with the others, so that it owns them all (hostagent/idmap.py).
    # None: guest root is host root.
    idmap_base: int | None = None


# --- the guest's PID 1 ------------------------------------------------------

_init_fd: int | None = None
_last_cap = -1  # /proc/sys/kernel/cap_last_cap, read once per process


def init_binary() -> str:
    """The small static PID 1 run by guests without the fakeinit flag."""
    override = os.environ.get("VPANEL_INIT")
    if override:
        return override
    for cand in _INIT_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    found = shutil.which("catatonit")
    if found:
        return found
    raise LaunchError("init", "catatonit not found; apt-get install catatonit")


def _sealed_init() -> int:
    """A sealed in-memory copy of the init binary, made once per process.

    Executing it from a memfd means the guest's /proc/1/exe names no host
    file that guest root could reopen and rewrite (CVE-2019-5736, runc).
    """
    global _init_fd
    if _init_fd is None:
        fd = os.memfd_create("vpanel-init", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        with open(init_binary(), "rb") as src:
            data = src.read()
        os.write(fd, data)
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        _init_fd = fd
    return _init_fd


# --- steps run inside the new namespaces -------------------------------------

def _bind_ro(path: str, flags: int = MS_NOSUID | MS_NODEV | MS_NOEXEC) -> None:
    syscalls.mount(path, path, None, MS_BIND | MS_REC)
    syscalls.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)


def _setup_proc(root: str, hideinfo: bool) -> None:
    proc = os.path.join(root, "proc")
    os.makedirs(proc, exist_ok=True)
    opts = "hidepid=invisible" if hideinfo else None
    syscalls.mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
    for sub in PROC_READONLY:
        p = os.path.join(proc, sub)
        if os.path.exists(p):
            _bind_ro(p)


def _setup_sys(root: str) -> None:
    sysdir = os.path.join(root, "sys")
    os.makedirs(sysdir, exist_ok=True)
    try:
        syscalls.mount("sysfs", sysdir, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except PermissionError:
        # In a user namespace a new sysfs needs a network namespace that the
        # user namespace owns (kobj_ns_current_may_mount); a guest on the
        # host's network (IPROOT=ALL) gets a read-only copy of the host's.
        fd = syscalls.open_tree("/sys", syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC
                                | syscalls.AT_RECURSIVE)
        try:
            syscalls.mount_setattr(fd, recursive=True, attr_set=_RO_ATTRS)
            syscalls.move_mount(fd, sysdir)
        finally:
            os.close(fd)


_RO_ATTRS = (syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
             | syscalls.MOUNT_ATTR_NOEXEC)


def _setup_dev(root: str) -> None:
    dev = os.path.join(root, "dev")
    os.makedirs(dev, exist_ok=True)
    syscalls.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=64k")
    for node in DEV_NODES:
        target = os.path.join(dev, node)
        with open(target, "w"):
            pass
        syscalls.mount(f"/dev/{node}", target, None, MS_BIND)
        syscalls.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
    # The console is the null device: a guest's boot messages have nowhere on
    # the host to go, and the host's real console must never be reachable.
    console = os.path.join(dev, "console")
    with open(console, "w"):
        pass
    syscalls.mount("/dev/null", console, None, MS_BIND)
    pts = os.path.join(dev, "pts")
    os.mkdir(pts, 0o755)
    # A private devpts instance: the guest sees its own terminals only.
    syscalls.mount("devpts", pts, "devpts", MS_NOSUID | MS_NOEXEC,
                   "newinstance,ptmxmode=0666,mode=0620,gid=5")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    shm = os.path.join(dev, "shm")
    os.mkdir(shm, 0o1777)
    syscalls.mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=65536k")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))


# Where the guest sees its reboot socket's directory, inside its /dev.
REBOOT_MOUNT = ".rebootmgr"


def _bind_reboot_dir(root: str, host_dir: str) -> None:
    """The host's socket directory at /dev/.rebootmgr, read-only; /dev/reboot into it.

    The directory is bound, not the socket: an agent that restarts unlinks the
    socket and binds a new one in the same host directory, and the guest
    reaches the new one through this mount. Read-only, so guest root cannot
    replace the socket or leave files in a host directory; connect(2) needs
    write permission on the socket's inode only (unix_find_bsd), which a
    read-only mount does not take away. The guest has no CAP_SYS_ADMIN to
    unmount it. Made before pivot_root, while the host path is in view.
    """
    target = os.path.join(root, "dev", REBOOT_MOUNT)
    os.mkdir(target, 0o755)
    syscalls.mount(host_dir, target, None, MS_BIND)
    syscalls.mount(None, target, None,
                   MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.symlink(f"{REBOOT_MOUNT}/reboot", os.path.join(root, "dev", "reboot"))


def _attach_reboot_dir(root: str, tree: int) -> None:
    """As _bind_reboot_dir, from a detached read-only copy the caller made
    (_prepare_trees): a launcher in a user namespace cannot reach RUNDIR by path."""
    target = os.path.join(root, "dev", REBOOT_MOUNT)
    os.mkdir(target, 0o755)
    syscalls.move_mount(tree, target)
    os.symlink(f"{REBOOT_MOUNT}/reboot", os.path.join(root, "dev", "reboot"))


def _bind_lxcfs(root: str, lxcfs: str) -> None:
    """Put lxcfs's files over the kernel's /proc ones in the guest's tree.

    lxcfs answers for the cgroups of the PID 1 of the reader's PID namespace,
    so the same bind gives every guest its own numbers. Each bind is made
    read-only: lxcfs refuses writes anyway, but the mount flag does not
    depend on it. Guest root cannot unmount them (no CAP_SYS_ADMIN), so the
    kernel's host-wide files stay hidden. lxcfs may have died since
    ContextSpec found it: a file it no longer serves keeps the kernel's
    version, and the start goes on.
    """
    for rel in lxcfsmod.FILES:
        src = os.path.join(lxcfs, rel)
        dst = os.path.join(root, rel)
        try:
            if not (os.path.isfile(src) and os.path.isfile(dst)):
                continue
            syscalls.mount(src, dst, None, MS_BIND)
        except OSError:
            continue
        try:
            syscalls.mount(None, dst, None,
                           MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            syscalls.umount2(dst, MNT_DETACH)


def _mask(root: str) -> None:
    for rel in MASKED_FILES:
        p = os.path.join(root, rel)
        if os.path.isfile(p):
            syscalls.mount(os.path.join(root, "dev/null"), p, None, MS_BIND)
    for rel in MASKED_DIRS:
        p = os.path.join(root, rel)
        if os.path.isdir(p):
            syscalls.mount("tmpfs", p, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                           "size=0,mode=0555")


def _switch_root(root: str) -> None:
    """pivot_root into ROOT and detach the old root entirely.

    pivot_root(".", ".") stacks the old root under the new one; detaching it
    leaves the guest with no path back to the host's tree, which a chroot
    would keep (a chroot'ed guest also keeps a copy of every host mount:
    reference/perf.md, density table).
    """
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", MNT_DETACH)
    os.chdir("/")


def _mount_guest_tree(root: str, hideinfo: bool, lxcfs: Path | None,
                      reboot_dir: Path | None = None) -> None:
    # Nothing we mount may propagate back to the host.
    syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)
    # pivot_root needs the new root to be a mount point.
    syscalls.mount(root, root, None, MS_BIND | MS_REC)
    _setup_proc(root, hideinfo)
    _setup_sys(root)
    _setup_dev(root)
    if reboot_dir is not None:
        _bind_reboot_dir(root, str(reboot_dir))
    # From the host's lxcfs mount, so before pivot_root takes the host's
    # tree away; before the masks, which must stay on top.
    if lxcfs is not None:
        _bind_lxcfs(root, str(lxcfs))
    _mask(root)


@dataclass(frozen=True)
class _Trees:
    """Detached copies of what a guest in a user namespace mounts from the host.

    Its launcher is guest root from birth: it has no access to host paths
    that only host root may search ($VSERVER_ROOTDIR is mode 000, RUNDIR
    0700), and a descriptor the caller opened names a mount of the caller's
    namespace, which mount(2) refuses. open_tree(OPEN_TREE_CLONE) copies of
    them belong to no namespace until move_mount() attaches them, which the
    launcher may do in its own.
    """

    root: int
    reboot: int = -1

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.root, self.reboot) if fd >= 0)

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)


def _prepare_trees(spec: ContextSpec) -> _Trees | None:
    if spec.idmap_base is None or spec.root is None:
        return None
    root = syscalls.open_tree(spec.root, syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC
                              | syscalls.AT_RECURSIVE)
    trees = _Trees(root)
    try:
        if spec.reboot_dir is not None:
            reboot = syscalls.open_tree(spec.reboot_dir, syscalls.OPEN_TREE_CLONE
                                        | syscalls.OPEN_TREE_CLOEXEC)
            trees = _Trees(root, reboot)
            syscalls.mount_setattr(reboot, attr_set=_RO_ATTRS)
    except BaseException:
        trees.close()
        raise
    return trees


def _mount_guest_tree_from(trees: _Trees, hideinfo: bool, lxcfs: Path | None) -> None:
    """_mount_guest_tree for a launcher in a user namespace; leaves it in the guest root.

    The root's copy is attached over "/" of the launcher's own mount namespace
    (nothing needs its path: the descriptor leads into it), then everything
    else is mounted relative to it, and pivot_root(".", ".") takes it from there.
    """
    syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)
    syscalls.move_mount(trees.root, "/")
    os.fchdir(trees.root)
    _setup_proc(".", hideinfo)
    _setup_sys(".")
    _setup_dev(".")
    if trees.reboot >= 0:
        _attach_reboot_dir(".", trees.reboot)
    if lxcfs is not None:
        _bind_lxcfs(".", str(lxcfs))
    _mask(".")


def _mount_own_proc(hideinfo: bool) -> None:
    """chcontext without a root: the host's tree, but a /proc of the new PID namespace."""
    syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)
    opts = "hidepid=invisible" if hideinfo else None
    syscalls.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)


# include/uapi/linux/sockios.h and if.h
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _loopback_up() -> None:
    """Bring up lo in a fresh network namespace (where it starts down).

    Two ioctls on a datagram socket: the guest's own addresses and routes are
    the networking layer's job, but every guest needs a working 127.0.0.1.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sk, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(sk, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _set_names(spec: ContextSpec) -> None:
    if spec.hostname:
        syscalls.sethostname(spec.hostname)
    if spec.domainname is not None:
        syscalls.setdomainname(spec.domainname)


def _apply_limits(spec: ContextSpec, pid: int = 0) -> None:
    """Nice and ulimits of PID (0: this process).

    A guest's launcher in a user namespace has its capabilities there only,
    and setpriority(2) below nice 0 wants CAP_SYS_NICE in the initial one:
    its caller sets them from outside, before the launcher goes on.
    """
    if spec.nice is not None:
        syscalls.setpriority(syscalls.PRIO_PROCESS, pid, spec.nice)
        # RLIMIT_NICE = 20 - lowest nice allowed: the guest may go back down
        # to S_NICE but never below it (it has no CAP_SYS_NICE or
        # CAP_SYS_RESOURCE to get around the limit).
        # Raising a hard limit needs CAP_SYS_RESOURCE, which some hosts deny
        # even to root (reference/perf.md), so only ever lower it.
        _soft, hard = syscalls.prlimit(pid, resource.RLIMIT_NICE)
        floor = 20 - spec.nice
        if hard == resource.RLIM_INFINITY or hard > floor:
            syscalls.prlimit(pid, resource.RLIMIT_NICE, (floor, floor))
    ulimit.apply(spec.ulimits, pid)


def _apply_ceiling(spec: ContextSpec) -> None:
    """Lower the bounding set to the ceiling; the filter goes on while CAP_SYS_ADMIN remains.

    The bounding set caps what any later exec can gain, setuid-root programs
    included (that is what makes it a ceiling). Inheritable and ambient sets
    are emptied so nothing slips around it through file capabilities.
    """
    last = _last_cap if _last_cap >= 0 else capmod.last_cap()
    for cap in range(last + 1):
        if cap not in spec.caps and syscalls.capbset_read(cap):
            syscalls.capbset_drop(cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    eff, perm, _inh = syscalls.capget()
    syscalls.capset(eff, perm, 0)
    if spec.seccomp is not None:
        seccomp.load(spec.seccomp)


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "TERM": os.environ.get("TERM", "linux"),
        "container": "vpanel",
    }
    if extra:
        env.update(extra)
    return env


def _stdio_devnull() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def _fail(pipe_w: int, step: str, exc: BaseException) -> None:
    with contextlib.suppress(OSError):
        os.write(pipe_w, _STEP_PREFIX + f"{step}: {exc}".encode(errors="replace")[:4000])
    os._exit(127)


def _write_uid_map(pid: int, uid: int, gid: int) -> None:
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _init_child(spec: ContextSpec, argv: Sequence[str] | None, pipe_w: int,
                keep_fds: Sequence[int], fail_at: str | None, go_r: int = -1,
                trees: _Trees | None = None) -> None:
    """B: PID 1 of the new namespace. Never returns."""
    step = "mounts"
    try:
        def checkpoint(name: str) -> None:
            nonlocal step
            step = name
            if fail_at == name:
                raise OSError(0, f"injected failure at {name}")

        checkpoint("mounts")
        if argv is None:
            # The guest's init leaves the caller's session and process group:
            # a Ctrl-C or a signal to the caller's job must not reach it.
            os.setsid()
        if trees is not None:
            _mount_guest_tree_from(trees, spec.hideinfo, spec.lxcfs)
            checkpoint("pivot_root")
            _switch_root(".")
        elif spec.root is not None:
            _mount_guest_tree(str(spec.root), spec.hideinfo, spec.lxcfs, spec.reboot_dir)
            checkpoint("pivot_root")
            _switch_root(str(spec.root))
        else:
            _mount_own_proc(spec.hideinfo)
        checkpoint("names")
        _set_names(spec)
        if spec.namespaces & syscalls.CLONE_NEWNET:
            _loopback_up()
        checkpoint("limits")
        if spec.idmap_base is None:
            _apply_limits(spec)  # else the caller has (launch_init)
        checkpoint("fds")
        # The small init runs a guest without fakeinit, and wraps chcontext's
        # command when there is no guest root to find an init in.
        use_small_init = (argv is None and not spec.fakeinit) or (
            argv is not None and spec.root is None
        )
        init_fd = _sealed_init() if use_small_init else -1
        if argv is None:
            _stdio_devnull()
        _close_all_but([pipe_w, go_r, *keep_fds, *([init_fd] if init_fd >= 0 else [])])
        checkpoint("ceiling")
        _apply_ceiling(spec)
        if go_r >= 0:
            checkpoint("network")
            if os.read(go_r, 1) != b"1":
                raise OSError(0, "the caller gave up before the network was ready")
            os.close(go_r)
        checkpoint("exec")
        if argv is None:
            env = _clean_env()
            if spec.fakeinit:
                os.execve("/sbin/init", ["/sbin/init"], env)
            os.execve(init_fd, ["init", "-P"], env)
        elif init_fd >= 0:
            # catatonit runs the command as its child, forwards signals, reaps
            # orphans and exits with the command's status. chcontext keeps the
            # caller's environment, as the seed's did.
            os.execve(init_fd, ["init", "--", *argv], {**os.environ, "container": "vpanel"})
        else:
            os.execvpe(argv[0], list(argv), _clean_env())
    except BaseException as e:  # report every failure to the parent
        _fail(pipe_w, step, e)
    os._exit(127)


def _close_all_but(keep: Sequence[int]) -> None:
    """Close every descriptor above 2 except KEEP (close_range between them)."""
    lo = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > lo:
            syscalls.close_range(lo, fd - 1)
        lo = fd + 1
    syscalls.close_range(lo)


def launch_init(
    spec: ContextSpec,
    argv: Sequence[str] | None = None,
    *,
    fail_at: str | None = None,
    keep_fds: Sequence[int] = (0, 1, 2),
    configure: Callable[[int, int], None] | None = None,
) -> int:
    """Create the context and run its PID 1; return PID 1's host pid.

    ARGV None: the guest's init (its own /sbin/init with fakeinit, else the
    small static init in pause mode). ARGV given: run it under the small init
    as a foreground command (chcontext); the caller waits for the pid.
    CONFIGURE(pidfd, pid), if given, runs in the caller while the new PID 1
    sets itself up, and PID 1 waits for it before its exec: this is where the
    guest's network is built, so that its init never runs without it.
    Raises LaunchError naming the failed step; nothing is left behind then.
    """
    _prepare(spec)
    if spec.root is not None and spec.lxcfs is None:
        lxcfsmod.warn_absent()  # the guest starts all the same, with the host's /proc files
    if (argv is None and not spec.fakeinit) or (argv is not None and spec.root is None):
        _sealed_init()  # fail here, with a clear message, if the init is missing
    # A user namespace: the caller's own ids (unprivileged chcontext), or the
    # guest's range (IDMAP). Either way its maps are written from here while
    # the child waits on SYNC.
    userns = spec.userns or spec.idmap_base is not None
    st_r, st_w = os.pipe2(os.O_CLOEXEC)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC) if userns else (-1, -1)
    go_r, go_w = os.pipe2(os.O_CLOEXEC) if configure is not None else (-1, -1)
    flags = spec.namespaces & ~CLONE_NEWCGROUP
    if userns:
        # With the others in one clone, so the new user namespace owns them
        # all (namespaces(7)): guest root's capabilities then reach its own
        # mounts, network and names, and nothing of the host's.
        flags |= syscalls.CLONE_NEWUSER
    cg_fd = spec.cgroup.clone_fd() if spec.cgroup is not None else None
    join_fds = _open_join_files(spec)
    trees = None
    step = "mounts"
    try:
        trees = _prepare_trees(spec)
        step = "clone3"
        pid = syscalls.fork_into(flags, cg_fd)
    except OSError as e:
        for fd in (st_r, st_w, sync_r, sync_w, go_r, go_w, -1 if cg_fd is None else cg_fd,
                   *join_fds, *(trees.fds() if trees is not None else ())):
            if fd >= 0:
                os.close(fd)
        raise LaunchError(step, str(e)) from e
    if pid == 0:
        # B: PID 1 of the new namespaces. It never returns into the caller.
        step = "cgroup"
        try:
            os.close(st_r)
            if go_w >= 0:
                os.close(go_w)
            if userns:
                # The id map must be written from outside the new user
                # namespace: wait until the parent has done it.
                os.close(sync_w)
                step = "userns"
                os.read(sync_r, 1)
                os.close(sync_r)
            step = "cgroup"
            # Still host uid 0 here (the maps do not name it, the caller's
            # cgroup.procs descriptors carry the caller's credentials): the
            # moves below are allowed as they are for a privileged guest.
            if spec.cgroup is not None and cg_fd is None:
                spec.cgroup.attach(0)  # a v1 host: no CLONE_INTO_CGROUP there
            _join(join_fds)
            if spec.namespaces & CLONE_NEWCGROUP:
                # Only now, inside the guest's cgroup, so that it becomes the
                # root of the guest's cgroup namespace.
                syscalls.unshare(CLONE_NEWCGROUP)
            if spec.idmap_base is not None:
                step = "userns"
                idmap.become_root()
        except BaseException as e:
            _fail(st_w, step, e)
        _init_child(spec, argv, st_w, keep_fds, fail_at, go_r, trees)
    os.close(st_w)
    if go_r >= 0:
        os.close(go_r)
    if cg_fd is not None:
        os.close(cg_fd)
    for fd in join_fds:
        os.close(fd)
    if trees is not None:
        trees.close()
    if userns:
        os.close(sync_r)
        step = "userns"
        try:
            if spec.idmap_base is not None:
                idmap.write_maps(pid, spec.idmap_base)
                step = "limits"
                _apply_limits(spec, pid)
            else:
                _write_uid_map(pid, os.getuid(), os.getgid())
            os.write(sync_w, b"1")
        except OSError as e:
            os.close(st_r)
            _reap_failed(pid)
            raise LaunchError(step, str(e)) from e
        finally:
            os.close(sync_w)
    config_error: BaseException | None = None
    if configure is not None:
        pidfd = syscalls.pidfd_open(pid)
        try:
            configure(pidfd, pid)
            os.write(go_w, b"1")
        except BaseException as e:
            config_error = e
            _reap_failed(pid)
        finally:
            os.close(pidfd)
            os.close(go_w)
    with os.fdopen(st_r, "rb") as f:
        report = f.read()
    if report.startswith(_STEP_PREFIX):
        # PID 1's own failure is the cause even if CONFIGURE failed after it.
        _reap_failed(pid)
        step, _, msg = report[len(_STEP_PREFIX):].decode(errors="replace").partition(": ")
        raise LaunchError(step, msg)
    if config_error is not None:
        raise LaunchError("network", str(config_error)) from config_error
    return pid


def _open_join_files(spec: ContextSpec) -> list[int]:
    """Descriptors of the limit cgroups' cgroup.procs, opened while the host's
    cgroup tree is still in view (the child writes itself in through them)."""
    return [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in spec.join_cgroups]


def _join(fds: Sequence[int]) -> None:
    # One grace period pays for all: moves that follow each other closely
    # share the RCU sync of the cgroup threadgroup lock.
    for fd in fds:
        os.write(fd, b"0")
        os.close(fd)


def _prepare(spec: ContextSpec) -> None:
    """Load everything the child needs before it forks.

    After pivot_root the child sees only the guest's files, so a lazy import
    or a dlopen there would fail (or, worse, load the guest's library).
    """
    global _last_cap
    if spec.seccomp is not None:
        seccomp.warm(spec.seccomp)
    if _last_cap < 0:
        syscalls.warm()
        _last_cap = capmod.last_cap()


def _reap_failed(pid: int) -> None:
    """Kill and collect a PID 1 that failed before its exec (it is our child)."""
    with contextlib.suppress(ChildProcessError, ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# --- entering a running context ---------------------------------------------

@dataclass(frozen=True)
class EnterRequest:
    argv: Sequence[str]
    user: str | None = None  # suexec: a user name or uid looked up in the guest's /etc/passwd
    cwd: str = "/"
    env: dict[str, str] | None = None
    pty: bool = False  # allocate a terminal inside the guest and relay to ours
    stdio: tuple[int, int, int] | None = None  # fds to become the command's 0, 1, 2
    # With pty: the terminal's first size, (rows, cols); None copies our stdin's
    # if that is a terminal.
    winsize: tuple[int, int] | None = None


def enter(
    init_pidfd: int,
    spec: ContextSpec,
    req: EnterRequest,
    *,
    on_child: Callable[[int], None] | None = None,
) -> int:
    """Run REQ inside the context whose PID 1 INIT_PIDFD refers to; return its exit status.

    The exit status follows the shell's convention (128 + signal number for
    a command killed by a signal).
    """
    c, st_r = _fork_enter(init_pidfd, spec, req)
    if on_child is not None:
        on_child(c)
    while True:
        try:
            _, status = os.waitpid(c, 0)
            break
        except InterruptedError:
            continue
    _check_report(st_r)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _fork_enter(init_pidfd: int, spec: ContextSpec, req: EnterRequest,
                handoff: int = -1) -> tuple[int, int]:
    """Fork C for REQ; return its pid and the read end of the step report pipe."""
    _prepare(spec)
    cg_fd = spec.cgroup.clone_fd() if spec.cgroup is not None else None
    procs_fd = -1
    if spec.cgroup is not None and cg_fd is None:
        procs_fd = os.open(spec.cgroup.procs_file(), os.O_WRONLY | os.O_CLOEXEC)
    join_fds = _open_join_files(spec)
    st_r, st_w = os.pipe2(os.O_CLOEXEC)
    c = os.fork()
    if c == 0:
        os.close(st_r)
        code = _enter_child(init_pidfd, spec, req, cg_fd, (procs_fd, *join_fds), st_w, handoff)
        os._exit(code)
    os.close(st_w)
    for fd in (procs_fd, -1 if cg_fd is None else cg_fd, *join_fds):
        if fd >= 0:
            os.close(fd)
    return c, st_r


def _check_report(st_r: int) -> None:
    """Read the step report to its end (D's exec, or C and D gone); raise what it names."""
    with os.fdopen(st_r, "rb") as f:
        report = f.read()
    if report.startswith(_STEP_PREFIX):
        step, _, msg = report[len(_STEP_PREFIX):].decode(errors="replace").partition(": ")
        raise LaunchError(step, msg)


@dataclass(frozen=True)
class Terminal:
    """A command running inside a guest on a terminal of the guest's own devpts.

    The caller owns every descriptor here and must close them. WAITER is the
    caller's child C: it exits with the command's status once the command has
    ended (128 + signal number if a signal killed it), so its pidfd (or a
    waitpid) is how the caller learns the end and the status, and the caller
    must reap it. PIDFD pins D for signals that must never reach a recycled pid.
    """

    master: int  # the terminal's master side
    pid: int  # host pid of the command (D), the leader of its own session
    pidfd: int  # pidfd of D
    waiter: int  # host pid of C


def open_terminal(init_pidfd: int, spec: ContextSpec, req: EnterRequest) -> Terminal:
    """Start REQ (which must ask for a pty) inside the context and return at once.

    As enter() with pty=True, except that C hands the terminal's master back
    to us over a socket (SCM_RIGHTS) instead of relaying it to our stdio, then
    closes every descriptor it has and only waits for D. The caller reads and
    writes the master in its own loop.
    """
    if not req.pty:
        raise ValueError("open_terminal needs a request with pty=True")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with ours:
        try:
            c, st_r = _fork_enter(init_pidfd, spec, req, theirs.fileno())
        finally:
            theirs.close()
        fds: list[int] = []
        try:
            try:
                # EOF, no descriptors: C failed before it could send them.
                msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 2)
            finally:
                _check_report(st_r)  # after D's exec, or its failure
            if len(fds) != 2 or len(msg) != 4:
                raise LaunchError("pty", "the terminal was not handed back")
        except BaseException:
            for fd in fds:
                os.close(fd)
            _reap_failed(c)
            raise
    (pid,) = struct.unpack("i", msg)
    os.set_blocking(fds[0], False)
    return Terminal(master=fds[0], pid=pid, pidfd=fds[1], waiter=c)


def _enter_child(init_pidfd: int, spec: ContextSpec, req: EnterRequest,
                 cg_fd: int | None, procs_fds: Sequence[int], st_w: int,
                 handoff: int = -1) -> int:
    """C: joins the namespaces, clones D inside them, relays and waits. Returns D's status.

    D never receives one of the caller's descriptors: it gets the caller's
    own pipes (REQ.stdio), a terminal of the guest's own devpts (REQ.pty), or
    pipes that C copies to and from the caller's stdio. A host file or
    terminal handed into the guest would stay open in whatever the command
    leaves running, and guest root can reopen it through /proc/PID/fd (or
    push keystrokes into a terminal with TIOCSTI).
    """
    step = "setns"
    try:
        syscalls.setns(init_pidfd, spec.namespaces & ~CLONE_NEWCGROUP)
        routes: dict[int, int] = {}
        feed = -1
        child_fds: list[int] = []
        if req.pty:
            step = "pty"
            master, slave = _guest_pty(req.winsize, spec.idmap_base)
            req = dataclasses.replace(req, stdio=(slave, slave, slave))
            routes, feed, child_fds = {master: 1}, master, [slave]
        elif req.stdio is None:
            step = "pipes"
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            req = dataclasses.replace(req, stdio=(in_r, out_w, err_w))
            routes, feed, child_fds = {out_r: 1, err_r: 2}, in_w, [in_r, out_w, err_w]
        else:
            child_fds = [fd for fd in req.stdio if fd > 2]
        step = "fork"
        d = syscalls.fork_into(0, cg_fd)
        if d == 0:
            for fd in {*routes, feed}:
                if fd >= 0:
                    os.close(fd)
            _enter_grandchild(init_pidfd, spec, req, procs_fds, st_w)
        os.close(st_w)
        # Only D may hold its ends, so that readers see EOF when it is done.
        for fd in set(child_fds):
            os.close(fd)
        if handoff >= 0:
            step = "handoff"
            pidfd = syscalls.pidfd_open(d)  # D is our unreaped child: it is D
            with socket.socket(fileno=handoff) as sk:
                socket.send_fds(sk, [struct.pack("i", d)], [feed, pidfd])
            # The caller holds the terminal now. C is a fork of the caller and
            # lives as long as the command: it keeps none of the caller's
            # descriptors (its sockets, other consoles' terminals, which would
            # then never hang up) and runs nothing but the wait from here on.
            _close_all_but([])
            return _exit_status(d)
        # From here C only relays and waits: it keeps none of the caller's
        # other descriptors (an agent's sockets and consoles' terminals) for
        # as long as the command runs.
        _close_all_but([*routes, feed])
        return _relay(d, routes, feed, raw=req.pty)
    except BaseException as e:
        _fail(st_w, step, e)
    return 127


def _guest_pty(winsize: tuple[int, int] | None = None,
               idmap_base: int | None = None) -> tuple[int, int]:
    """A terminal pair from the guest's own devpts (we are in its mount namespace).

    The guest never gets the caller's terminal: a process holding the host's
    tty could push keystrokes into it after we return (TIOCSTI).
    """
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, syscalls.TIOCSPTLCK, struct.pack("i", 0))
    ptn = struct.unpack("I", fcntl.ioctl(master, syscalls.TIOCGPTN, b"\0" * 4))[0]
    slave = os.open(f"/dev/pts/{ptn}", os.O_RDWR | os.O_NOCTTY)
    if idmap_base is not None:
        # devpts gave it our uid, which the guest's map does not name (it
        # would be nobody's there, and no chown inside could fix that): make
        # it guest root's, the owner a terminal a guest opens itself has.
        os.fchown(slave, idmap_base, -1)
    if winsize is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *winsize, 0, 0))
    elif os.isatty(0):
        fcntl.ioctl(slave, termios.TIOCSWINSZ, fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))
    return master, slave


def copy_until_exit(pid: int, sinks: dict[int, Callable[[bytes], None]],
                    feed: int = -1, timeout: float | None = None) -> None:
    """Until PID exits, hand what each fd in SINKS yields to its sink and copy
    our stdin into FEED; then take what is already written and stop.

    The end is PID's exit (seen through a pidfd), not EOF: a daemon the
    command started may keep its output open for good. FEED is written
    without blocking, so a command that neither reads its input nor stops
    writing its output cannot deadlock against us. After TIMEOUT seconds PID
    is killed. poll, not select: the agent may hold more than 1024 fds.
    A sink that raises StopCopy has PID (and its children) killed at once;
    nothing more is read, and the copy ends when PID has exited.
    """
    cfd = syscalls.pidfd_open(pid)
    sources = set(sinks)
    stopped = False  # a sink raised StopCopy: read nothing more, wait for the exit
    pending = b""
    reading_stdin = feed >= 0
    close_feed = False  # our stdin ended: close FEED once PENDING is written
    deadline = None if timeout is None else time.monotonic() + timeout
    if feed >= 0:
        os.set_blocking(feed, False)
    try:
        while True:
            masks = dict.fromkeys([cfd, *(() if stopped else sources)]
                                  + ([0] if reading_stdin and not pending else []),
                                  select.POLLIN)
            if pending:  # FEED may also be a source (a terminal): one mask for both
                masks[feed] = masks.get(feed, 0) | select.POLLOUT
            poller = select.poll()
            for fd, mask in masks.items():
                poller.register(fd, mask)
            wait_ms = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    _kill_with_children(pid, cfd)
                    deadline = None
                    continue
                wait_ms = int(left * 1000) + 1
            try:
                events = poller.poll(wait_ms)
            except InterruptedError:
                continue
            ready = {fd for fd, ev in events if ev & (select.POLLIN | select.POLLHUP
                                                      | select.POLLERR)}
            writable = any(fd == feed and ev & (select.POLLOUT | select.POLLERR)
                           for fd, ev in events) and bool(pending)
            if writable:
                try:
                    pending = pending[os.write(feed, pending):]
                except BlockingIOError:
                    pass
                except OSError:  # the reader is gone
                    pending, reading_stdin = b"", False
            for fd in ready:
                if fd == 0 and reading_stdin:
                    pending = os.read(0, 65536)
                    if not pending:
                        reading_stdin = False
                        # A terminal (FEED is also a source) is not closed on
                        # our EOF; a pipe is, so the command sees its end.
                        close_feed = feed not in sources
                elif fd in sources and not stopped:
                    try:
                        data = os.read(fd, 65536)
                    except OSError:  # EIO: a terminal whose last user is gone
                        data = b""
                    if not data:
                        sources.discard(fd)
                        continue
                    try:
                        sinks[fd](data)
                    except StopCopy:
                        _kill_with_children(pid, cfd)
                        stopped, deadline = True, None
            if close_feed and not pending and feed >= 0 and feed not in sources:
                os.close(feed)
                feed, close_feed = -1, False
            if cfd in ready:
                break
        for fd in () if stopped else sources:
            os.set_blocking(fd, False)
            with contextlib.suppress(BlockingIOError, OSError, StopCopy):
                while data := os.read(fd, 65536):
                    sinks[fd](data)
    finally:
        os.close(cfd)


def _kill_with_children(pid: int, pidfd: int) -> None:
    """SIGKILL PID (pinned by PIDFD) and its direct children: an exec's C and D."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        children = []
    for child in children:
        with contextlib.suppress(OSError):
            fd = syscalls.pidfd_open(child)
            try:
                # PID still pinned alive: CHILD cannot be a recycled number yet.
                syscalls.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)
    with contextlib.suppress(OSError):
        syscalls.pidfd_send_signal(pidfd, signal.SIGKILL)


def _writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        with contextlib.suppress(OSError):  # our own reader went away
            while data:
                data = data[os.write(fd, data):]

    return write


def _relay(child: int, routes: dict[int, int], feed: int, *, raw: bool) -> int:
    """C's side of an exec: copy ROUTES (source fd -> our fd) and our stdin
    into FEED until CHILD exits; return its exit status."""
    old = None
    if raw and os.isatty(0):
        old = termios.tcgetattr(0)
        # TCSANOW, not setraw's default TCSAFLUSH: keystrokes typed before
        # the guest's shell came up are kept, not thrown away.
        tty.setraw(0, termios.TCSANOW)

        def winch(_sig: int, _frm: object) -> None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(feed, termios.TIOCSWINSZ,
                            fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))

        signal.signal(signal.SIGWINCH, winch)
    try:
        copy_until_exit(child, {src: _writer(dst) for src, dst in routes.items()}, feed)
    finally:
        for fd in {*routes, feed}:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if old is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, old)
    return _exit_status(child)


def _exit_status(child: int) -> int:
    """Wait for CHILD; its status as a shell gives it (128 + signal number if killed)."""
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _lookup_user(user: str) -> tuple[int, int, str, str]:
    """(uid, gid, home, shell) from the guest's /etc/passwd, read inside the guest."""
    with open("/etc/passwd", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(":")
            if len(parts) < 7:
                continue
            if parts[0] == user or (user.isdigit() and parts[2] == user):
                return int(parts[2]), int(parts[3]), parts[5] or "/", parts[6] or "/bin/sh"
    if user.isdigit():
        return int(user), int(user), "/", "/bin/sh"
    raise LookupError(f"no user {user!r} in the guest's /etc/passwd")


def _supplementary_groups(user: str, gid: int) -> list[int]:
    groups = {gid}
    with contextlib.suppress(OSError), open("/etc/group", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(":")
            if len(parts) >= 4 and user in parts[3].split(","):
                with contextlib.suppress(ValueError):
                    groups.add(int(parts[2]))
    return sorted(groups)


def _enter_grandchild(init_pidfd: int, spec: ContextSpec, req: EnterRequest,
                      procs_fds: Sequence[int], st_w: int) -> None:
    """D: inside the PID namespace. Never returns."""
    step = "cgroup"
    try:
        # The tracking cgroup on a v1-only host, and the limit cgroups in other
        # hierarchies; in the v2 tracking cgroup D was born.
        _join([fd for fd in procs_fds if fd >= 0])
        if spec.namespaces & CLONE_NEWCGROUP:
            syscalls.setns(init_pidfd, CLONE_NEWCGROUP)
        step = "limits"
        _apply_limits(spec)
        if spec.idmap_base is not None:
            # Last of the namespaces, after what needs host privileges (nice
            # below 0): from here on D is the guest's root, as its processes are.
            step = "userns"
            syscalls.setns(init_pidfd, syscalls.CLONE_NEWUSER)
            idmap.become_root()
        os.close(init_pidfd)
        # Always a session of its own: whatever the command leaves running
        # must not keep the caller's session or terminal.
        os.setsid()
        if req.stdio is not None:
            for target, fd in enumerate(req.stdio):
                os.dup2(fd, target)
        if req.pty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        step = "user"
        env = _clean_env(req.env)
        ident = None
        if req.user is not None:
            ident = _lookup_user(req.user)
            groups = _supplementary_groups(req.user, ident[1])
            env.update(HOME=ident[2], USER=req.user, LOGNAME=req.user, SHELL=ident[3])
        step = "fds"
        _close_all_but([st_w])
        step = "ceiling"
        _apply_ceiling(spec)
        if ident is not None:
            os.setgroups(groups)
            os.setgid(ident[1])
            os.setuid(ident[0])
        step = "chdir"
        cwd = ident[2] if ident is not None and req.cwd == "/" else req.cwd
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir("/")
        step = "exec"
        os.execvpe(req.argv[0], list(req.argv), env)
    except BaseException as e:
        _fail(st_w, step, e)
    os._exit(127)

