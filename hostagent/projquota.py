"""XFS and ext4 project quotas: a per-guest disk limit without btrfs.

The issue's second way (after btrfs qgroups) to limit what a guest writes:
every inode of the guest's own tree (a plain guest's root, or the directory
that holds a unified guest's overlay upper and work layers) carries a
project id, the guest's context id as the seed wished, and the filesystem
enforces a block limit per project id. Directories get FS_XFLAG_PROJINHERIT,
so everything created in them later takes the id at creation
(fs/ext4/ialloc.c __ext4_new_inode, fs/xfs/xfs_inode.c xfs_inode_inherit_flags),
and a rename or hard link across project ids fails with EXDEV (ext4_rename,
xfs_rename), so files cannot be moved out of the project from inside.

Only a process in the initial user namespace may change a project id or
PROJINHERIT (fs/file_attr.c fileattr_set_prepare): guest root of a guest
with an id range (IDMAP isolated or shared) cannot, guest root of an
IDMAP="none" guest (host root) can. So hostagent.guest refuses this mode for
IDMAP="none" guests: a limit that guest root may step out of is not one.

What the kernel needs, checked at run time and never assumed (supported()):
the filesystem is XFS or ext4, mounted with project quota enforcement (the
super options mountinfo shows: `prjquota` on either; XFS shows `pqnoenforce`
for accounting without limits), and quotactl answers for PRJQUOTA on it.
This project's own machines have neither: their kernel lacks
CONFIG_XFS_QUOTA, and CONFIG_QFMT_V2, without which ext4 refuses to mount a
filesystem with the `project` or `quota` feature read-write at all.

Block limits: ext4 takes them through Q_SETQUOTA (struct if_dqblk, in 1 KiB
blocks), XFS through Q_XSETQLIM (struct fs_disk_quota, in 512-byte basic
blocks); both are read back after they are set.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hostagent import conf as confmod
from hostagent import syscalls, templates
from hostagent.paths import Paths
from hostagent.syscalls import (
    FS_DQ_BHARD,
    FS_DQ_BSOFT,
    FS_DQUOT_VERSION,
    FS_PROJ_QUOTA,
    FS_QSTATV_VERSION1,
    FS_QUOTA_PDQ_ACCT,
    FS_QUOTA_PDQ_ENFD,
    FS_XFLAG_PROJINHERIT,
    PRJQUOTA,
    Q_GETINFO,
    Q_GETQUOTA,
    Q_SETQUOTA,
    Q_XGETQSTATV,
    Q_XGETQUOTA,
    Q_XSETQLIM,
    QCMD,
    QIF_BLIMITS,
    QIF_DQBLKSIZE,
    XFS_BB,
)

__all__ = [
    "FSTYPES",
    "MountInfo",
    "ProjQuotaError",
    "Walked",
    "assign",
    "choose_project",
    "clear_limit",
    "for_build",
    "guest_project",
    "in_use",
    "kernel_config",
    "kernel_lacks",
    "mount_of",
    "option_verdict",
    "own_dir",
    "parse_mountinfo_line",
    "project_of",
    "set_limit",
    "supported",
    "usage",
]

FSTYPES = ("xfs", "ext4")
# Project ids this module hands out: the seed's static contexts (S_CONTEXT,
# 2..49151) and its dynamic ones, all far below the 32-bit maximum that XFS
# (projid32bit, the default since xfsprogs 3.2) and ext4 take. 0 is every
# other file's project and is never limited.
PROJECT_IDS = (1, 65535)


class ProjQuotaError(RuntimeError):
    pass


# --- /proc/self/mountinfo ---------------------------------------------------------

@dataclass(frozen=True)
class MountInfo:
    point: str
    dev: str  # major:minor
    fstype: str
    source: str  # the block device, for quotactl(2) without an fd
    super_options: tuple[str, ...]  # the filesystem's own, after " - fstype source"


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 space, \\011 tab, \\012 newline, \\134 \\)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo_line(line: str) -> MountInfo:
    """One line of /proc/PID/mountinfo (Documentation/filesystems/proc.rst 3.5):
    ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS."""
    left, sep, right = line.rstrip("\n").partition(" - ")
    fields, tail = left.split(), right.split()
    if not sep or len(fields) < 6 or len(tail) < 2:
        raise ValueError(f"not a mountinfo line: {line!r}")
    options = tuple(tail[2].split(",")) if len(tail) > 2 else ()
    return MountInfo(_unescape(fields[4]), fields[2], tail[0], _unescape(tail[1]), options)


def mount_of(path: Path, mountinfo: str | None = None) -> MountInfo | None:
    """The mount PATH is on: the longest mount point above its real path (the last
    mounted, if two are at the same point). MOUNTINFO: that text instead of ours."""
    if mountinfo is None:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mountinfo = f.read()
    real = os.path.realpath(path)
    best: MountInfo | None = None
    for line in mountinfo.splitlines():
        if not line.strip():
            continue
        m = parse_mountinfo_line(line)
        inside = real == m.point or real.startswith(m.point.rstrip("/") + "/")
        if inside and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def option_verdict(m: MountInfo) -> str | None:
    """None if M's filesystem and super options enforce project quota, else why not."""
    if m.fstype not in FSTYPES:
        return (f"{m.point} is on {m.fstype}: project quotas are an XFS and ext4 feature")
    opts = set(m.super_options)
    if m.fstype == "xfs":
        # xfs_showargs: "prjquota" when enforced, "pqnoenforce" when only accounted;
        # "pquota" is the mount option's other spelling.
        if opts & {"prjquota", "pquota"}:
            return None
        if "pqnoenforce" in opts:
            return (f"{m.point} (xfs) accounts project quota but does not enforce it "
                    "(mounted pqnoenforce): remount it with -o prjquota")
        return f"{m.point} (xfs) is mounted without project quota: mount it with -o prjquota"
    if "prjquota" in opts:
        return None
    return (f"{m.point} (ext4) is mounted without project quota: it needs the project and "
            "quota features (mkfs.ext4 -O project,quota, or tune2fs -O project,quota) and "
            "-o prjquota")


# --- quotactl ----------------------------------------------------------------------

_HAVE_QUOTACTL_FD: bool | None = None


def _quotactl(fd: int, m: MountInfo, cmd: int, qid: int, addr: object) -> None:
    """quotactl on the filesystem of FD: quotactl_fd(2) where the kernel has it (5.14),
    else quotactl(2) on the block device mountinfo names."""
    global _HAVE_QUOTACTL_FD
    if _HAVE_QUOTACTL_FD is None:
        try:
            syscalls.quotactl(QCMD(Q_GETINFO, PRJQUOTA), 0, None, fd=-1)
        except OSError as e:
            # EBADF: the call exists and refused the descriptor; ENOSYS: no such call.
            _HAVE_QUOTACTL_FD = e.errno != errno.ENOSYS
    if _HAVE_QUOTACTL_FD:
        syscalls.quotactl(cmd, qid, addr, fd=fd)
    else:
        syscalls.quotactl(cmd, qid, addr, special=m.source)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


_CONFIG: dict[str, bool] | None = None


def kernel_config(option: str) -> bool | None:
    """Whether the running kernel was built with OPTION (=y or =m), from
    /proc/config.gz or /boot/config-RELEASE; None where neither can be read."""
    global _CONFIG
    if _CONFIG is None:
        text = ""
        with contextlib.suppress(OSError, EOFError, gzip.BadGzipFile), \
                gzip.open("/proc/config.gz", "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        if not text:
            with contextlib.suppress(OSError):
                text = Path(f"/boot/config-{os.uname().release}").read_text(errors="replace")
        _CONFIG = {}
        for line in text.splitlines():
            key, eq, value = line.partition("=")
            if eq and key.startswith("CONFIG_"):
                _CONFIG[key] = value in ("y", "m")
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                _CONFIG[line[2:-len(" is not set")]] = False
    if not _CONFIG:
        return None
    return _CONFIG.get(option, False)


def kernel_lacks(fstype: str) -> str | None:
    """Why the kernel's build configuration rules out project quota on FSTYPE
    (xfs or ext4), or None: it has what is needed, or cannot be read."""
    needed = ("CONFIG_XFS_QUOTA",) if fstype == "xfs" else ("CONFIG_QUOTA", "CONFIG_QFMT_V2")
    missing = [o for o in needed if kernel_config(o) is False]
    if not missing:
        return None
    if fstype == "xfs":
        return "this kernel was built without CONFIG_XFS_QUOTA"
    # fs/ext4/super.c ext4_feature_set_ok: "The kernel was not built with
    # CONFIG_QUOTA and CONFIG_QFMT_V2".
    return (f"this kernel was built without {' and '.join(missing)}, so it mounts no ext4 "
            "with the project or quota feature read-write at all")


def _config_hint(fstype: str) -> str:
    why = kernel_lacks(fstype)
    return "" if why is None else f"; {why}"


def _kernel_verdict(fd: int, m: MountInfo) -> str | None:
    """None if the kernel accounts and enforces project quota on M, else why not."""
    what = "Q_XGETQSTATV" if m.fstype == "xfs" else "Q_GETINFO"
    try:
        if m.fstype == "ext4":
            _quotactl(fd, m, QCMD(Q_GETINFO, PRJQUOTA), 0,
                      syscalls.quota_struct("struct if_dqinfo"))
            what = "Q_XGETQSTATV"
        st = syscalls.quota_struct("struct fs_quota_statv")
        st.qs_version = FS_QSTATV_VERSION1
        _quotactl(fd, m, QCMD(Q_XGETQSTATV, PRJQUOTA), 0, st)
    except OSError as e:
        hint = _config_hint(m.fstype)
        if e.errno == errno.ENOSYS:
            return (f"this kernel has no {m.fstype} quota support (quotactl {what} on "
                    f"{m.point}: ENOSYS){hint}")
        if e.errno == errno.ESRCH:
            return f"project quota is off on {m.point} (quotactl {what}: ESRCH){hint}"
        return (f"quotactl {what} for project quota on {m.point}: "
                f"{os.strerror(e.errno or 0)}{hint}")
    flags = int(st.qs_flags)
    if not flags & FS_QUOTA_PDQ_ACCT:
        return f"project quota accounting is off on {m.point} (quotactl {what})"
    if not flags & FS_QUOTA_PDQ_ENFD:
        return f"project quota limits are not enforced on {m.point} (quotactl {what})"
    return None


def supported(path: Path) -> str | None:
    """None if a project quota can be enforced under PATH, else why not.

    Both the mount's options and the kernel's own answer (quotactl) are
    asked, and a refusal names each reason found: "mounted without
    prjquota" alone would hide that this kernel could not enforce one anyway.
    """
    m = mount_of(path)
    if m is None:
        return f"{path}: no mount found in /proc/self/mountinfo"
    by_options = option_verdict(m)
    if m.fstype not in FSTYPES:
        return by_options
    try:
        with _opened(path) as fd:
            by_kernel = _kernel_verdict(fd, m)
    except OSError as e:
        by_kernel = f"{path}: {os.strerror(e.errno or 0)}"
    if by_options and by_kernel:
        return f"{by_options}; and {by_kernel}"
    return by_options or by_kernel


# --- project ids on inodes ----------------------------------------------------------

def _check_id(project_id: int) -> None:
    if not PROJECT_IDS[0] <= project_id <= PROJECT_IDS[1]:
        raise ProjQuotaError(f"project id {project_id} is outside "
                             f"{PROJECT_IDS[0]}..{PROJECT_IDS[1]}")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def project_of(path: Path) -> int | None:
    """The project id the directory PATH hands to what is created in it (its
    fsx_projid with FS_XFLAG_PROJINHERIT), or None: no project, or no such ioctl."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return None
    try:
        xflags, projid = syscalls.fsxattr_get(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return projid if projid and xflags & FS_XFLAG_PROJINHERIT else None


@dataclass
class Walked:
    directories: int = 0
    files: int = 0
    skipped: int = 0  # symlinks, devices, fifos, sockets: no fd to set an id through
    other_fs: int = 0  # directories on another filesystem, not entered


@dataclass
class _Frame:
    path: str
    names: list[str]
    ino: int


def _set(fd: int, project_id: int, flags: int, where: str) -> None:
    try:
        syscalls.fsxattr_set(fd, projid=project_id, set_flags=flags)
    except OSError as e:
        raise ProjQuotaError(f"{where}: setting project id {project_id}: "
                             f"{os.strerror(e.errno or 0)}") from e


def _open_file_at(dfd: int, name: str) -> int:
    # O_NOATIME: the walk is no access by anyone (root may use it on any file).
    try:
        return os.open(name, _FILE_FLAGS | os.O_NOATIME, dir_fd=dfd)
    except PermissionError:
        return os.open(name, _FILE_FLAGS, dir_fd=dfd)


def assign(root: Path, project_id: int) -> Walked:
    """Give every directory under ROOT (ROOT included) PROJECT_ID and
    FS_XFLAG_PROJINHERIT, and every regular file PROJECT_ID.

    The tree may be the guest's and so hostile: every step is relative to a
    directory fd, nothing is opened through a symlink (O_NOFOLLOW), each
    directory opened is checked to be the inode seen when it was listed, and
    the walk never enters another filesystem. Like hostagent.build's
    removal it holds one directory fd at a time and climbs back with ".."
    checked against the inode seen on the way down (fts(3)), so no depth
    exhausts the recursion limit or RLIMIT_NOFILE. Symlinks, devices, fifos
    and sockets keep their id (an ioctl needs an fd, and opening one would
    follow it or open the device); what is created later takes the id from
    its directory.
    """
    _check_id(project_id)
    out = Walked()
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as e:
        raise ProjQuotaError(f"{root}: {os.strerror(e.errno or 0)}") from e
    try:
        top = os.fstat(fd)
        dev = top.st_dev
        _set(fd, project_id, FS_XFLAG_PROJINHERIT, str(root))
        out.directories += 1
        frames = [_Frame(str(root), os.listdir(fd), top.st_ino)]
        while frames:
            frame = frames[-1]
            if not frame.names:
                frames.pop()
                if not frames:
                    break
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                ust = os.fstat(up)
                os.close(fd)
                fd = up
                if (ust.st_dev, ust.st_ino) != (dev, frames[-1].ino):
                    raise ProjQuotaError(f"{frames[-1].path} moved during the walk; is the "
                                         "guest stopped?")
                continue
            name = frame.names.pop()
            where = f"{frame.path}/{name}"
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != dev:
                    out.other_fs += 1
                    continue
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                cst = os.fstat(child)
                if (cst.st_dev, cst.st_ino) != (dev, st.st_ino):
                    os.close(child)
                    raise ProjQuotaError(f"{where} changed during the walk; is the guest "
                                         "stopped?")
                os.close(fd)
                fd = child
                _set(fd, project_id, FS_XFLAG_PROJINHERIT, where)
                out.directories += 1
                frames.append(_Frame(where, os.listdir(fd), st.st_ino))
            elif stat.S_ISREG(st.st_mode):
                ffd = _open_file_at(fd, name)
                try:
                    fst = os.fstat(ffd)
                    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) \
                            or not stat.S_ISREG(fst.st_mode):
                        raise ProjQuotaError(f"{where} changed during the walk; is the guest "
                                             "stopped?")
                    _set(ffd, project_id, 0, where)
                finally:
                    os.close(ffd)
                out.files += 1
            else:
                out.skipped += 1
    except OSError as e:
        raise ProjQuotaError(f"{root}: {e}") from e
    finally:
        os.close(fd)
    return out


# --- limits ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Quota:
    used: int  # bytes
    limit: int | None  # bytes; None: no hard limit
    inodes: int


def _fs(path: Path) -> MountInfo:
    m = mount_of(path)
    if m is None or m.fstype not in FSTYPES:
        raise ProjQuotaError(f"{path} is on {m.fstype if m else 'no known mount'}: "
                             "project quotas are an XFS and ext4 feature")
    return m


def _get(fd: int, m: MountInfo, project_id: int) -> _Quota:
    try:
        if m.fstype == "xfs":
            d = syscalls.quota_struct("struct fs_disk_quota")
            try:
                _quotactl(fd, m, QCMD(Q_XGETQUOTA, PRJQUOTA), project_id, d)
            except OSError as e:
                if e.errno == errno.ENOENT:  # no dquot yet: nothing charged, no limit
                    return _Quota(0, None, 0)
                raise
            hard = int(d.d_blk_hardlimit) * XFS_BB
            return _Quota(int(d.d_bcount) * XFS_BB, hard or None, int(d.d_icount))
        q = syscalls.quota_struct("struct if_dqblk")
        _quotactl(fd, m, QCMD(Q_GETQUOTA, PRJQUOTA), project_id, q)
        hard = int(q.dqb_bhardlimit) * QIF_DQBLKSIZE
        return _Quota(int(q.dqb_curspace), hard or None, int(q.dqb_curinodes))
    except OSError as e:
        raise ProjQuotaError(f"reading project quota {project_id} on {m.point}: "
                             f"{os.strerror(e.errno or 0)}") from e


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def set_limit(path: Path, project_id: int, limit: int | None) -> str:
    """Limit the blocks of project PROJECT_ID on the filesystem of PATH to LIMIT
    bytes (None: no limit), and read it back. Returns how it is enforced.

    The limit is a hard one (writes past it fail with EDQUOT at once) with no
    soft limit, so no grace period lets a guest overshoot. It is rounded up to
    the unit of the call: 1 KiB on ext4, 512 bytes on XFS.
    """
    _check_id(project_id)
    m = _fs(path)
    unit = XFS_BB if m.fstype == "xfs" else QIF_DQBLKSIZE
    want = None if limit is None else _round_up(limit, unit)
    blocks = 0 if want is None else want // unit
    try:
        with _opened(path) as fd:
            if m.fstype == "xfs":
                d = syscalls.quota_struct("struct fs_disk_quota")
                d.d_version = FS_DQUOT_VERSION
                d.d_flags = FS_PROJ_QUOTA
                d.d_id = project_id
                d.d_fieldmask = FS_DQ_BHARD | FS_DQ_BSOFT
                d.d_blk_hardlimit = blocks
                d.d_blk_softlimit = 0
                _quotactl(fd, m, QCMD(Q_XSETQLIM, PRJQUOTA), project_id, d)
            else:
                q = syscalls.quota_struct("struct if_dqblk")
                q.dqb_bhardlimit = blocks
                q.dqb_bsoftlimit = 0
                q.dqb_valid = QIF_BLIMITS
                _quotactl(fd, m, QCMD(Q_SETQUOTA, PRJQUOTA), project_id, q)
            got = _get(fd, m, project_id).limit
    except OSError as e:
        raise ProjQuotaError(f"setting project quota {project_id} on {m.point}: "
                             f"{os.strerror(e.errno or 0)}") from e
    if got != want:
        raise ProjQuotaError(f"project quota {project_id} on {m.point} reads back "
                             f"{got} bytes, not {want}")
    return f"{m.fstype} project quota {project_id}, hard block limit"


def clear_limit(path: Path, project_id: int) -> None:
    """No limit for PROJECT_ID any more (a deleted guest's: its number may be reused)."""
    set_limit(path, project_id, None)


def usage(path: Path, project_id: int) -> tuple[int, int | None]:
    """(bytes charged to PROJECT_ID, its hard limit in bytes or None) on PATH's filesystem."""
    _check_id(project_id)
    m = _fs(path)
    try:
        with _opened(path) as fd:
            q = _get(fd, m, project_id)
    except OSError as e:
        raise ProjQuotaError(f"{path}: {os.strerror(e.errno or 0)}") from e
    return q.used, q.limit


def in_use(path: Path, project_id: int) -> bool:
    """Whether any inode on PATH's filesystem is charged to PROJECT_ID.

    XFS releases a removed inode's blocks and quota in the background
    (deferred inactivation, Linux 5.15); statfs pushes that work along
    (xfs_fs_statfs), so a guest deleted a moment ago is given a few seconds
    to be gone from its project before its id counts as in use.
    """
    m = _fs(path)
    deadline = time.monotonic() + (3.0 if m.fstype == "xfs" else 0.0)
    with _opened(path) as fd:
        while True:
            q = _get(fd, m, project_id)
            if not (q.inodes or q.used):
                return False
            if time.monotonic() >= deadline:
                return True
            os.fstatvfs(fd)
            time.sleep(0.05)


# --- guests ---------------------------------------------------------------------------

def own_dir(paths: Paths, name: str) -> Path:
    """What carries guest NAME's project id: a unified guest's .overlay/NAME (its
    upper and work layers: overlayfs copies a file up through the work directory,
    and a rename between two project ids fails with EXDEV), else its root."""
    if templates.is_unified(paths, name):
        return templates.overlay_dirs(paths, name)[0].parent
    return paths.root(name)


def guest_project(paths: Paths, name: str) -> int | None:
    """The project id guest NAME's disk limit is kept under, if it has one."""
    return project_of(own_dir(paths, name))


def _contexts_of_others(paths: Paths, name: str) -> dict[int, str]:
    out = {}
    for other in paths.guest_names():
        if other == name:
            continue
        try:
            ctx = confmod.settings_from_file(paths.conf(other)).context
        except (confmod.ConfigError, OSError):
            continue
        if ctx is not None:
            out[ctx] = other
    return out


def choose_project(paths: Paths, name: str, wanted: int | None) -> int:
    """The project id for guest NAME's DISK_LIMIT: its context id.

    WANTED is its S_CONTEXT; refused if another guest names the same one (one
    project would limit both) or if files on the filesystem are charged to it
    already (a guest removed by hand, not deleted). Without S_CONTEXT, the
    highest static context (49151 down) that no guest names and no file
    carries: the build writes it to NAME.conf, so the guest's context id is
    its project id at every start.
    """
    taken = _contexts_of_others(paths, name)
    where = paths.rootdir
    if wanted is not None:
        if wanted in taken:
            raise ProjQuotaError(f"S_CONTEXT {wanted} is also {taken[wanted]}'s: its disk "
                                 "limit would be shared; give this guest a context of its own")
        if in_use(where, wanted):
            raise ProjQuotaError(f"project id {wanted} already charges files on "
                                 f"{_fs(where).point} (a guest removed by hand rather than "
                                 "deleted?); choose another S_CONTEXT")
        return wanted
    low, high = confmod.CONTEXT_RANGE
    for n in range(high, low - 1, -1):
        if n not in taken and not in_use(where, n):
            return n
    raise ProjQuotaError("no free context number left for a project id")


def for_build(paths: Paths, name: str, text: str) -> tuple[str, int]:
    """For a build of guest NAME whose DISK_LIMIT is kept by project quota: its
    NAME.conf TEXT (with S_CONTEXT set, if it had none) and the project id.

    Refused for IDMAP="none": guest root is then host root, in the initial
    user namespace, and may give its files another project id (or clear
    PROJINHERIT) with FS_IOC_FSSETXATTR, stepping out of its limit.
    """
    conf = confmod.GuestConf.parse(text, str(paths.conf(name)))
    settings = confmod.settings(conf)
    if settings.idmap == "none":
        raise ProjQuotaError(
            'a project quota does not hold root of an IDMAP="none" guest (host root may give '
            "its files another project id); build it with IDMAP isolated or shared, or keep "
            '$VSERVER_ROOTDIR on btrfs, or set DISK_LIMIT_MODE="image"')
    project = choose_project(paths, name, settings.context)
    if settings.context is None:
        conf.set("S_CONTEXT", str(project))
        text = conf.dump()
    return text, project
