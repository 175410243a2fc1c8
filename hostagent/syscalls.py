"""The kernel calls vpanel needs, through cffi in ABI mode.

One module holds every privileged primitive and its constants, so that the
surface the agent uses is small, named and reviewable (oslo.privsep keeps its
capability table the same way). Each wrapper raises OSError with the errno the
kernel gave; none of them returns a -1 to be checked by the caller.

ABI mode (dlopen of the C library already in the process) needs no compiler
at install time and costs nothing per call beyond the FFI hop, so the resident
agent can start guests without a helper binary.

Where the constants come from (Linux UAPI headers unless noted):
  CLONE_*             include/uapi/linux/sched.h
  MS_*, MNT_*         include/uapi/linux/mount.h
  OPEN_TREE_*, MOVE_MOUNT_*, MOUNT_ATTR_*  include/uapi/linux/mount.h
  AT_*                include/uapi/linux/fcntl.h
  PR_*                include/uapi/linux/prctl.h
  CAP version/structs include/uapi/linux/capability.h
  SECBIT_*            include/uapi/linux/securebits.h
  PRIO_*              include/uapi/linux/resource.h (and glibc <sys/resource.h>)
  SYS_* numbers       arch/x86/entry/syscalls/syscall_64.tbl,
                      include/uapi/asm-generic/unistd.h (arm64 and the unified
                      numbers >= 424 that every architecture shares)
  AUDIT_ARCH_*        include/uapi/linux/audit.h
  SCMP_*              libseccomp's <seccomp.h> (v2.5)
  Q_*, QIF_*, PRJQUOTA, struct if_dqblk/if_dqinfo  include/uapi/linux/quota.h
  Q_X*, FS_DQ_*, FS_QUOTA_*, struct fs_disk_quota/fs_quota_statv
                      include/uapi/linux/dqblk_xfs.h
  FS_IOC_FS[GS]ETXATTR, FS_XFLAG_*, struct fsxattr  include/uapi/linux/fs.h
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import platform
import signal
import struct
import threading
from typing import Any

from cffi import FFI

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWTIME",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "capget",
    "capset",
    "close_range",
    "fork_into",
    "fsxattr_get",
    "fsxattr_set",
    "ioctl_int",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "pidfd_open",
    "pidfd_send_signal",
    "pivot_root",
    "prctl",
    "prlimit",
    "quota_struct",
    "quotactl",
    "setdomainname",
    "sethostname",
    "setns",
    "setpriority",
    "umount2",
    "unshare",
    "warm",
]

# --- include/uapi/linux/sched.h -------------------------------------------
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_PIDFD = 0x00001000
CLONE_PARENT = 0x00008000
CLONE_INTO_CGROUP = 0x200000000
ALL_NAMESPACES = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
    | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME
)

# --- include/uapi/linux/mount.h -------------------------------------------
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4
UMOUNT_NOFOLLOW = 8
# The file-descriptor mount API (open_tree, move_mount, mount_setattr).
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_NOEXEC = 0x00000008
MOUNT_ATTR_IDMAP = 0x00100000  # Linux 5.12: attach userns_fd's id mapping to the mount
# --- include/uapi/linux/fcntl.h --------------------------------------------
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

# --- include/uapi/linux/prctl.h -------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# --- include/uapi/asm-generic/ioctls.h (x86, arm64, riscv; not ppc/mips) ----
TIOCGPTN = 0x80045430  # _IOR('T', 0x30, unsigned int): number of a pty's slave
TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int): (un)lock a pty's slave

# --- include/uapi/linux/securebits.h --------------------------------------
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_KEEP_CAPS = 1 << 4

# --- include/uapi/linux/capability.h --------------------------------------
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# --- <sys/resource.h> ------------------------------------------------------
PRIO_PROCESS = 0
PRIO_PGRP = 1
PRIO_USER = 2

# --- syscall numbers without a glibc 2.36 wrapper -------------------------
# pidfd_*, clone3 (435), close_range, open_tree, move_mount and mount_setattr
# share one number on every architecture (the unified table starting at 424);
# pivot_root does not.
_SYS_COMMON = {
    "pidfd_send_signal": 424,
    "pidfd_open": 434,
    "close_range": 436,
    "open_tree": 428,
    "move_mount": 429,
    "mount_setattr": 442,
    "quotactl_fd": 443,
}
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

_ffi = FFI()
_ffi.cdef(
    """
    typedef int pid_t;
    typedef unsigned int id_t;
    struct rlimit { unsigned long rlim_cur; unsigned long rlim_max; };
    struct mount_attr { uint64_t attr_set; uint64_t attr_clr; uint64_t propagation;
                        uint64_t userns_fd; };
    struct __user_cap_header_struct { uint32_t version; int pid; };
    struct __user_cap_data_struct { uint32_t effective; uint32_t permitted; uint32_t inheritable; };

    int unshare(int flags);
    int setns(int fd, int nstype);
    int mount(const char *source, const char *target, const char *filesystemtype,
              unsigned long mountflags, const void *data);
    int umount2(const char *target, int flags);
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5);
    int capget(struct __user_cap_header_struct *hdrp, struct __user_cap_data_struct *datap);
    int capset(struct __user_cap_header_struct *hdrp, const struct __user_cap_data_struct *datap);
    int sethostname(const char *name, size_t len);
    int setdomainname(const char *name, size_t len);
    int setpriority(int which, id_t who, int prio);
    int prlimit(pid_t pid, int resource, const struct rlimit *new_limit, struct rlimit *old_limit);
    int ioctl(int fd, unsigned long request, ...);
    long syscall(long number, ...);
    """
)
_libc: Any = _ffi.dlopen(None)
_ARCH = platform.machine()


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = _ffi.errno
        if path is None:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def _syscall_number(name: str) -> int:
    if name in _SYS_COMMON:
        return _SYS_COMMON[name]
    if name == "pivot_root":
        try:
            return _SYS_PIVOT_ROOT[_ARCH]
        except KeyError:
            raise OSError(_errno.ENOSYS, f"pivot_root: unknown syscall number on {_ARCH}") from None
    raise OSError(_errno.ENOSYS, f"{name}: no syscall number known")


def _str(value: str | bytes | os.PathLike[str] | None) -> Any:
    if value is None:
        return _ffi.NULL
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise ValueError("embedded NUL byte")
    return _ffi.new("char[]", raw)


# --- namespaces ------------------------------------------------------------

def unshare(flags: int) -> None:
    """unshare(2): move the calling process into new namespaces (CLONE_NEW*)."""
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace(s) of FD (a /proc/PID/ns/* fd or a pidfd)."""
    _check(_libc.setns(fd, nstype), "setns")


# --- mounts ----------------------------------------------------------------

def mount(
    source: str | None,
    target: str | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2)."""
    _check(
        _libc.mount(_str(source), _str(target), _str(fstype), flags, _str(data)),
        f"mount {fstype or 'bind'} on {os.fspath(target)}",
        os.fspath(target),
    )


def umount2(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(_str(target), flags), "umount2", os.fspath(target))


def pivot_root(new_root: str | os.PathLike[str], put_old: str | os.PathLike[str]) -> None:
    """pivot_root(2); glibc has no wrapper, so it goes through syscall(2)."""
    nr = _ffi.cast("long", _syscall_number("pivot_root"))
    c_new, c_old = _str(new_root), _str(put_old)  # held: see open_tree
    _check(
        _libc.syscall(nr, _ffi.cast("char *", c_new), _ffi.cast("char *", c_old)),
        "pivot_root",
        os.fspath(new_root),
    )


def open_tree(path: str | os.PathLike[str], flags: int, dirfd: int = AT_FDCWD) -> int:
    """open_tree(2) (Linux 5.2): with OPEN_TREE_CLONE, a detached copy of the mount
    at PATH (AT_RECURSIVE: with everything below it) held by the returned fd.

    The copy belongs to no mount namespace until move_mount() attaches it, so a
    process in another mount namespace (a guest's launcher) can attach a tree
    that it could not reach by path itself.
    """
    nr = _ffi.cast("long", _syscall_number("open_tree"))
    c_path = _str(path)  # held here: a cast pointer does not keep its memory alive
    return int(_check(
        _libc.syscall(nr, _ffi.cast("int", dirfd), _ffi.cast("char *", c_path),
                      _ffi.cast("unsigned int", flags)),
        "open_tree", os.fspath(path)))


def move_mount(from_fd: int, to_path: str | os.PathLike[str], *, from_path: str = "",
               to_fd: int = AT_FDCWD, flags: int = MOVE_MOUNT_F_EMPTY_PATH) -> None:
    """move_mount(2) (Linux 5.2): attach the mount FROM_FD refers to (an open_tree
    clone) at TO_PATH, relative to TO_FD."""
    nr = _ffi.cast("long", _syscall_number("move_mount"))
    c_from, c_to = _str(from_path), _str(to_path)  # held: see open_tree
    _check(
        _libc.syscall(nr, _ffi.cast("int", from_fd), _ffi.cast("char *", c_from),
                      _ffi.cast("int", to_fd), _ffi.cast("char *", c_to),
                      _ffi.cast("unsigned int", flags)),
        "move_mount", os.fspath(to_path))


def mount_setattr(fd: int, *, attr_set: int = 0, attr_clr: int = 0, userns_fd: int = -1,
                  recursive: bool = False) -> None:
    """mount_setattr(2) (Linux 5.12) on the mount FD refers to (AT_EMPTY_PATH).

    MOUNT_ATTR_IDMAP with USERNS_FD makes an idmapped mount: files are seen and
    created through it with their ids mapped by that user namespace's uid_map
    and gid_map (Documentation/filesystems/idmappings.rst). Only a detached
    mount that was never attached may be idmapped, and only once.
    """
    attr = _ffi.new("struct mount_attr *")
    attr.attr_set = attr_set
    attr.attr_clr = attr_clr
    if userns_fd >= 0:
        attr.userns_fd = userns_fd
    nr = _ffi.cast("long", _syscall_number("mount_setattr"))
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    empty = _str("")  # held: see open_tree
    _check(
        _libc.syscall(nr, _ffi.cast("int", fd), _ffi.cast("char *", empty),
                      _ffi.cast("unsigned int", flags), attr,
                      _ffi.cast("size_t", _ffi.sizeof("struct mount_attr"))),
        "mount_setattr")


# --- process attributes -----------------------------------------------------

def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); returns the call's non-negative result."""
    return int(_check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})"))


def capget(pid: int = 0) -> tuple[int, int, int]:
    """capget(2): (effective, permitted, inheritable) as 64-bit masks."""
    hdr = _ffi.new("struct __user_cap_header_struct *", [_LINUX_CAPABILITY_VERSION_3, pid])
    data = _ffi.new("struct __user_cap_data_struct[2]")
    _check(_libc.capget(hdr, data), "capget")
    return (
        data[0].effective | (data[1].effective << 32),
        data[0].permitted | (data[1].permitted << 32),
        data[0].inheritable | (data[1].inheritable << 32),
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) on the calling thread."""
    hdr = _ffi.new("struct __user_cap_header_struct *", [_LINUX_CAPABILITY_VERSION_3, 0])
    data = _ffi.new("struct __user_cap_data_struct[2]")
    mask = 0xFFFFFFFF
    for i, shift in enumerate((0, 32)):
        data[i].effective = (effective >> shift) & mask
        data[i].permitted = (permitted >> shift) & mask
        data[i].inheritable = (inheritable >> shift) & mask
    _check(_libc.capset(hdr, data), "capset")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, len(raw)), "setdomainname")


def setpriority(which: int, who: int, prio: int) -> None:
    """setpriority(2); `prio` is a nice value (-20..19)."""
    _check(_libc.setpriority(which, who, prio), "setpriority")


def prlimit(pid: int, resource: int, limits: tuple[int, int] | None = None) -> tuple[int, int]:
    """prlimit(2): set (soft, hard) when given; always return the old pair."""
    old = _ffi.new("struct rlimit *")
    new = _ffi.NULL
    if limits is not None:
        new = _ffi.new("struct rlimit *", list(limits))
    _check(_libc.prlimit(pid, resource, new, old), "prlimit")
    return int(old.rlim_cur), int(old.rlim_max)


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """ioctl(2) with an integer argument (e.g. TIOCSCTTY, FS_IOC_* take pointers: use fcntl)."""
    return int(_check(_libc.ioctl(fd, _ffi.cast("unsigned long", request),
                                  _ffi.cast("long", arg)), f"ioctl({request:#x})"))


# --- pidfds ---------------------------------------------------------------

def pidfd_open(pid: int, flags: int = 0) -> int:
    """pidfd_open(2): a file descriptor that refers to PID and never to a reused one."""
    nr = _ffi.cast("long", _syscall_number("pidfd_open"))
    return int(_check(_libc.syscall(nr, _ffi.cast("int", pid), _ffi.cast("unsigned int", flags)),
                      "pidfd_open"))


def pidfd_send_signal(pidfd: int, sig: int, flags: int = 0) -> None:
    """pidfd_send_signal(2): signal the process a pidfd refers to (no PID-reuse race)."""
    nr = _ffi.cast("long", _syscall_number("pidfd_send_signal"))
    _check(
        _libc.syscall(nr, _ffi.cast("int", pidfd), _ffi.cast("int", sig),
                      _ffi.cast("void *", 0), _ffi.cast("unsigned int", flags)),
        "pidfd_send_signal",
    )


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    """close_range(2): close every descriptor from FIRST to LAST in one call."""
    nr = _ffi.cast("long", _syscall_number("close_range"))
    _check(_libc.syscall(nr, _ffi.cast("unsigned int", first), _ffi.cast("unsigned int", last),
                         _ffi.cast("unsigned int", flags)), "close_range")


# --- capability bounding set helpers -------------------------------------

def capbset_drop(cap: int) -> None:
    """PR_CAPBSET_DROP: remove CAP from the bounding set for good (needs CAP_SETPCAP)."""
    prctl(PR_CAPBSET_DROP, cap)


def capbset_read(cap: int) -> bool:
    return prctl(PR_CAPBSET_READ, cap) == 1


def warm() -> None:
    """Resolve every foreign function and type once, in the calling process.

    cffi builds each function's call interface on first use; done in a
    freshly forked child that costs milliseconds per guest (and copies the
    pages it touches), done once here it is shared by every child.
    """
    for name in ("unshare", "setns", "mount", "umount2", "prctl", "capget", "capset",
                 "sethostname", "setdomainname", "setpriority", "prlimit", "ioctl", "syscall"):
        getattr(_libc, name)
    for ctype in ("long", "int", "unsigned int", "char *", "void *", "unsigned long",
                  "size_t"):
        _ffi.cast(ctype, 0)
    _ffi.new("struct __user_cap_header_struct *")
    _ffi.new("struct __user_cap_data_struct[2]")
    _ffi.new("struct rlimit *")
    _ffi.new("struct mount_attr *")
    _ffi.new("char[]", b"x")
    capget()


# --- fork into namespaces and a cgroup in one step -------------------------

class _CloneArgs(ctypes.Structure):
    """struct clone_args, include/uapi/linux/sched.h (CLONE_ARGS_SIZE_VER2)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
        "stack_size", "tls", "set_tid", "set_tid_size", "cgroup")]


# The one call that does not go through cffi: a fork must happen with the GIL
# held, as os.fork() does it (cffi releases the GIL around every call, and a
# thread taking it during the fork would leave the child's copy locked).
# ctypes.PyDLL keeps the GIL; PyOS_BeforeFork/AfterFork_* are what os.fork()
# itself calls around fork(2).
_pyapi = ctypes.PyDLL(None, use_errno=True)
_pyapi.syscall.restype = ctypes.c_long
_pyapi.syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t]
_SYS_CLONE3 = 435


def fork_into(flags: int = 0, cgroup_fd: int | None = None) -> int:
    """clone3(2) used as fork(): the child starts in new namespaces (CLONE_NEW*
    FLAGS) and, with CGROUP_FD (a cgroup v2 directory), already in that cgroup.

    Returns 0 in the child and its pid in the parent, like os.fork(). Placing
    the child at creation avoids a write to cgroup.procs, which waits for an
    RCU grace period on most kernels (several ms per guest start or exec).

    The child has a glibc thread descriptor whose cached TID is the parent's
    (glibc's own fork() refreshes it; a raw clone cannot), so the child must
    not call raise(3) or pthread_kill(3); Python code does not, and every
    caller here execs or exits soon after.

    A raw clone3 also skips glibc's own fork handlers, which take malloc's and
    stdio's locks so that no other thread holds one at the moment of the copy.
    In a process with other threads (the agent's workers) one of them may hold
    such a lock just then, and the child would wait on it forever. There the
    clone goes through a single-threaded intermediate made by os.fork() (which
    runs those handlers); its clone3 uses CLONE_PARENT, so the child is still
    ours to wait for, and the intermediate exits at once.
    """
    if threading.active_count() > 1:
        return _fork_into_via_intermediate(flags, cgroup_fd)
    return _clone3(flags, cgroup_fd)


def _clone3(flags: int, cgroup_fd: int | None) -> int:
    # With CLONE_PARENT the kernel takes the exit signal from the caller (our
    # intermediate, itself a fork: SIGCHLD) and refuses one given here.
    exit_signal = 0 if flags & CLONE_PARENT else signal.SIGCHLD
    args = _CloneArgs(flags=flags, exit_signal=exit_signal)
    if cgroup_fd is not None:
        args.flags |= CLONE_INTO_CGROUP
        args.cgroup = cgroup_fd
    _pyapi.PyOS_BeforeFork()
    pid = _pyapi.syscall(_SYS_CLONE3, ctypes.byref(args), ctypes.sizeof(args))
    if pid == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _pyapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone3: {os.strerror(err)}")
    return int(pid)


_REPORT = struct.Struct("=qi")  # the child's pid, or -1 and the errno


def _fork_into_via_intermediate(flags: int, cgroup_fd: int | None) -> int:
    """fork_into from a threaded process: see fork_into."""
    rd, wr = os.pipe2(os.O_CLOEXEC)
    try:
        mid = os.fork()
    except BaseException:
        os.close(rd)
        os.close(wr)
        raise
    if mid == 0:
        # The intermediate: the only thread of its process. It never returns
        # into the caller's code; only the child it clones does.
        pid = -1
        try:
            os.close(rd)
            pid = _clone3(flags | CLONE_PARENT, cgroup_fd)
            if pid != 0:
                os.write(wr, _REPORT.pack(pid, 0))
        except OSError as e:
            os.write(wr, _REPORT.pack(-1, e.errno or _errno.EIO))
        except BaseException:  # noqa: S110 - the caller reads a short report: "died"
            pass
        if pid == 0:
            os.close(wr)
            return 0
        os._exit(0)
    os.close(wr)
    try:
        with os.fdopen(rd, "rb", closefd=True) as f:
            report = f.read(_REPORT.size)
    finally:
        os.waitpid(mid, 0)
    if len(report) != _REPORT.size:
        raise OSError(_errno.EIO, "clone3: the intermediate process died")
    pid, err = _REPORT.unpack(report)
    if pid < 0:
        raise OSError(err, f"clone3: {os.strerror(err)}")
    return int(pid)


# --- quotas and inode attributes (hostagent/projquota.py) -------------------
# include/uapi/linux/quota.h
USRQUOTA, GRPQUOTA, PRJQUOTA = 0, 1, 2
SUBCMDSHIFT = 8
SUBCMDMASK = 0x00FF
Q_GETINFO = 0x800005
Q_GETQUOTA = 0x800007
Q_SETQUOTA = 0x800008
QIF_BLIMITS = 1
QIF_SPACE = 2
QIF_ILIMITS = 4
QIF_INODES = 8
QIF_DQBLKSIZE = 1 << 10  # the unit of if_dqblk's block limits (dqb_curspace is bytes)
# include/uapi/linux/dqblk_xfs.h: XQM_CMD(x) = ('X' << 8) + x
Q_XGETQUOTA = (ord("X") << 8) + 3
Q_XSETQLIM = (ord("X") << 8) + 4
Q_XGETQSTATV = (ord("X") << 8) + 8
FS_DQUOT_VERSION = 1
FS_QSTATV_VERSION1 = 1
FS_PROJ_QUOTA = 1 << 1  # fs_disk_quota.d_flags
FS_DQ_BSOFT = 1 << 2
FS_DQ_BHARD = 1 << 3
FS_QUOTA_PDQ_ACCT = 1 << 4  # fs_quota_statv.qs_flags
FS_QUOTA_PDQ_ENFD = 1 << 5
XFS_BB = 512  # fs_disk_quota counts "basic blocks" of 512 bytes
# include/uapi/linux/fs.h: _IOR('X', 31, struct fsxattr), _IOW('X', 32, ...), 28 bytes
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x00000200

_ffi.cdef(
    """
    struct fsxattr {
        uint32_t fsx_xflags; uint32_t fsx_extsize; uint32_t fsx_nextents;
        uint32_t fsx_projid; uint32_t fsx_cowextsize; unsigned char fsx_pad[8];
    };
    struct if_dqblk {
        uint64_t dqb_bhardlimit; uint64_t dqb_bsoftlimit; uint64_t dqb_curspace;
        uint64_t dqb_ihardlimit; uint64_t dqb_isoftlimit; uint64_t dqb_curinodes;
        uint64_t dqb_btime; uint64_t dqb_itime; uint32_t dqb_valid;
    };
    struct if_dqinfo {
        uint64_t dqi_bgrace; uint64_t dqi_igrace; uint32_t dqi_flags; uint32_t dqi_valid;
    };
    struct fs_disk_quota {
        int8_t d_version; int8_t d_flags; uint16_t d_fieldmask; uint32_t d_id;
        uint64_t d_blk_hardlimit; uint64_t d_blk_softlimit;
        uint64_t d_ino_hardlimit; uint64_t d_ino_softlimit;
        uint64_t d_bcount; uint64_t d_icount;
        int32_t d_itimer; int32_t d_btimer; uint16_t d_iwarns; uint16_t d_bwarns;
        int8_t d_itimer_hi; int8_t d_btimer_hi; int8_t d_rtbtimer_hi; int8_t d_padding2;
        uint64_t d_rtb_hardlimit; uint64_t d_rtb_softlimit; uint64_t d_rtbcount;
        int32_t d_rtbtimer; uint16_t d_rtbwarns; int16_t d_padding3; char d_padding4[8];
    };
    struct fs_qfilestatv {
        uint64_t qfs_ino; uint64_t qfs_nblks; uint32_t qfs_nextents; uint32_t qfs_pad;
    };
    struct fs_quota_statv {
        int8_t qs_version; uint8_t qs_pad1; uint16_t qs_flags; uint32_t qs_incoredqs;
        struct fs_qfilestatv qs_uquota; struct fs_qfilestatv qs_gquota;
        struct fs_qfilestatv qs_pquota;
        int32_t qs_btimelimit; int32_t qs_itimelimit; int32_t qs_rtbtimelimit;
        uint16_t qs_bwarnlimit; uint16_t qs_iwarnlimit; uint16_t qs_rtbwarnlimit;
        uint16_t qs_pad3; uint32_t qs_pad4; uint64_t qs_pad2[7];
    };
    int quotactl(int cmd, const char *special, int id, void *addr);
    """
)


def QCMD(cmd: int, qtype: int) -> int:  # the kernel's macro, and its name
    return (cmd << SUBCMDSHIFT) | (qtype & SUBCMDMASK)


def quota_struct(ctype: str) -> Any:
    """A zeroed struct for quotactl: "struct if_dqblk", "struct fs_disk_quota", ..."""
    return _ffi.new(f"{ctype} *")


def quotactl(cmd: int, qid: int, addr: Any, *, fd: int | None = None,
             special: str | None = None) -> int:
    """quotactl_fd(2) on the filesystem of FD (Linux 5.14), else quotactl(2) on the
    block device SPECIAL. CMD is a QCMD(); ADDR a quota_struct() or None."""
    buf = _ffi.NULL if addr is None else addr
    if fd is not None:
        nr = _ffi.cast("long", _syscall_number("quotactl_fd"))
        return int(_check(
            _libc.syscall(nr, _ffi.cast("unsigned int", fd), _ffi.cast("unsigned int", cmd),
                          _ffi.cast("unsigned int", qid), _ffi.cast("void *", buf)),
            f"quotactl_fd({cmd:#x})"))
    c_special = _str(special)
    return int(_check(_libc.quotactl(cmd, c_special, qid, buf), f"quotactl({cmd:#x})",
                      special))


def fsxattr_get(fd: int) -> tuple[int, int]:
    """FS_IOC_FSGETXATTR: (fsx_xflags, fsx_projid) of the inode FD refers to."""
    fa = _ffi.new("struct fsxattr *")
    _check(_libc.ioctl(fd, _ffi.cast("unsigned long", FS_IOC_FSGETXATTR), fa),
           "FS_IOC_FSGETXATTR")
    return int(fa.fsx_xflags), int(fa.fsx_projid)


def fsxattr_set(fd: int, *, projid: int, set_flags: int = 0) -> None:
    """FS_IOC_FSSETXATTR: give the inode FD refers to PROJID and add SET_FLAGS to its
    fsx_xflags, the other fields as they are (read first: the call sets them all)."""
    fa = _ffi.new("struct fsxattr *")
    _check(_libc.ioctl(fd, _ffi.cast("unsigned long", FS_IOC_FSGETXATTR), fa),
           "FS_IOC_FSGETXATTR")
    fa.fsx_projid = projid
    fa.fsx_xflags |= set_flags
    _check(_libc.ioctl(fd, _ffi.cast("unsigned long", FS_IOC_FSSETXATTR), fa),
           "FS_IOC_FSSETXATTR")
