"""Unification: files that guests have in common stored once, and what a guest really uses.

The seed's vunify hard-linked identical package files from a reference guest
into the others and made them immutable, relying on the Linux-VServer
kernel's immutable-linkage-invert bit so a guest could still unlink (and so
upgrade) its copy. Mainline has no such bit: an immutable file cannot be
unlinked, renamed over or linked again (fs/namei.c may_delete, vfs_link), so
hard links would lock every guest to the same files. The default here is to
share *blocks* instead of inodes:

  FIDEDUPERANGE   the kernel compares both ranges under its locks and shares
                  the extents only if the bytes are identical (btrfs, XFS with
                  reflink=1, bcachefs, OCFS2). Each guest keeps its own inode:
                  mode, owner, times and xattrs stay its own, and a write
                  copies the block it touches, so it never shows elsewhere.
  FICLONE         on a filesystem that clones but does not dedupe, a clone of
                  REF's file is made beside the guest's, compared byte for
                  byte with it here, and renamed over it only if identical.

`hardlink=True` keeps the seed's mode for those who accept its cost.

Every change to a guest file goes through a temporary name in the same
directory and a rename(2), after a check that the file did not change in the
meantime; the temporary is removed on any failure. Trees are walked through
directory descriptors with O_NOFOLLOW, so a symlink planted in a guest never
leads the walk (which runs as host root) out of it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import os
import secrets
import stat
import struct
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostagent.build import FS_IMMUTABLE_FL, FS_IOC_GETFLAGS, FS_IOC_SETFLAGS
from hostagent.names import check_name
from hostagent.paths import Paths

__all__ = [
    "DEFAULT_EXCLUDES",
    "FICLONE",
    "FIDEDUPERANGE",
    "FS_IMMUTABLE_FL",
    "FS_IOC_FIEMAP",
    "FS_IOC_GETFLAGS",
    "FS_IOC_SETFLAGS",
    "CannotShare",
    "DiskUsage",
    "Report",
    "Summary",
    "UnifyError",
    "disk_usage",
    "extents",
    "get_flags",
    "guest_root",
    "undo_tree",
    "unify",
    "unify_tree",
    "usage_dir",
]

# --- kernel interface -----------------------------------------------------------
#
# The generic _IOC layout (include/uapi/asm-generic/ioctl.h: x86, arm, arm64,
# riscv, s390; alpha, mips, powerpc and sparc put the direction bits
# elsewhere): dir << 30 | size << 16 | type << 8 | nr.
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


# include/uapi/linux/fs.h:
#   struct file_dedupe_range_info { __s64 dest_fd; __u64 dest_offset;
#       __u64 bytes_deduped; __s32 status; __u32 reserved; };
#   struct file_dedupe_range { __u64 src_offset; __u64 src_length;
#       __u16 dest_count; __u16 reserved1; __u32 reserved2; info[]; };
#   #define FICLONE        _IOW(0x94, 9, int)
#   #define FIDEDUPERANGE  _IOWR(0x94, 54, struct file_dedupe_range)
_DEDUPE_RANGE = struct.Struct("=QQHHI")
_DEDUPE_INFO = struct.Struct("=qQQiI")
FICLONE = _ioc(_IOC_WRITE, 0x94, 9, struct.calcsize("i"))
FIDEDUPERANGE = _ioc(_IOC_READ | _IOC_WRITE, 0x94, 54, _DEDUPE_RANGE.size)
FILE_DEDUPE_RANGE_SAME = 0
FILE_DEDUPE_RANGE_DIFFERS = 1

# FS_IOC_GETFLAGS / FS_IOC_SETFLAGS and FS_IMMUTABLE_FL are build.py's (it
# clears the flag when it deletes a tree): _IOR/_IOW('f', 1/2, long), yet the
# kernel reads and writes an int (fs/ioctl.c), hence 4-byte buffers.

# include/uapi/linux/fs.h: #define FS_IOC_FIEMAP _IOWR('f', 11, struct fiemap)
# include/uapi/linux/fiemap.h:
#   struct fiemap { __u64 fm_start; __u64 fm_length; __u32 fm_flags;
#       __u32 fm_mapped_extents; __u32 fm_extent_count; __u32 fm_reserved;
#       struct fiemap_extent fm_extents[]; };
#   struct fiemap_extent { __u64 fe_logical; __u64 fe_physical; __u64 fe_length;
#       __u64 fe_reserved64[2]; __u32 fe_flags; __u32 fe_reserved[3]; };
_FIEMAP = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")
FS_IOC_FIEMAP = _ioc(_IOC_READ | _IOC_WRITE, ord("f"), 11, _FIEMAP.size)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_SHARED = 0x2000
# Extents whose fe_physical means nothing (the data is in metadata, or not
# placed yet): never evidence of sharing.
_NO_PHYSICAL = FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_DATA_INLINE

# What a filesystem without the remap operations answers (fs/remap_range.c:
# EOPNOTSUPP when f_op->remap_file_range is missing, EINVAL for a destination
# without it; ENOTTY where the ioctl is not routed at all).
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EINVAL})

# btrfs dedupes at most 16 MiB per call (BTRFS_MAX_DEDUPE_LEN) and the VFS
# caps a call at 1 GiB; both report what they did in bytes_deduped.
_DEDUPE_CHUNK = 16 << 20
_READ_CHUNK = 1 << 20

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# --- what is never shared -----------------------------------------------------------

# Matched (fnmatch, where * also matches '/') against the guest's absolute
# path of every directory and file; a matching directory is skipped whole.
# After util-vserver's distrib/misc/vunify-exclude and the seed's "not under
# /etc/": configuration and mutable state are each guest's own.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "/etc",            # configuration (the seed never unified /etc)
    "/var",            # logs, /var/lib/dpkg/status and the other package databases,
                       # spools, mail, caches, databases: all rewritten in place
    "/home",           # people's files
    "/root",
    "/tmp",            # scratch and runtime state  # noqa: S108 (a pattern, not a file)
    "/run",
    "/dev",            # not files, or not the guest's
    "/proc",
    "/sys",
    "/mnt",
    "/media",
    "/srv",            # site data
    "/boot",
    "/lost+found",
    "/usr/lib/locale/locale-archive",  # regenerated by locale-gen
    "/usr/share/info/dir",             # regenerated by install-info
    "*/ls-R",                          # TeX's file list, regenerated by texhash
)


class UnifyError(RuntimeError):
    """vunify or vdu cannot go on; the message is for the user."""


class CannotShare(UnifyError):
    """The filesystem (or the pair of them) cannot share what was asked."""


@dataclass
class Report:
    """What one REF/GUEST pass did, or with test=True would do."""

    guest: str
    method: str = ""  # "FIDEDUPERANGE", "FICLONE", "hard links" or "unshare"
    test: bool = False
    considered: int = 0  # regular files at the same path in both, outside the excludes
    done: int = 0  # shared (unified), or made private again (undo)
    bytes: int = 0  # their size: saved, or no longer shared
    # unify: shared before this pass, or too small to share (empty, or inline
    # in btrfs metadata); undo: not shared at all
    already: int = 0
    differ: int = 0  # mode, owner, size or content not the same
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)

    def text(self, *, undo: bool = False) -> str:
        if undo:
            verb = "would be unshared" if self.test else "unshared"
            rest = f"{self.already} not shared"
            amount = f"{_size(self.bytes)} {'would become' if self.test else 'now'} private"
        else:
            verb = "would be shared" if self.test else "shared"
            rest = f"{self.already} already shared or too small, {self.differ} differ"
            amount = f"{_size(self.bytes)} {'would be ' if self.test else ''}saved"
        line = (f"{self.guest}: {self.considered} files considered, {self.done} {verb}, "
                f"{rest}, {len(self.skipped)} skipped, {len(self.failed)} failed; "
                f"{amount} ({self.method})")
        return line


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


# --- guests --------------------------------------------------------------------------

def guest_root(paths: Paths, name: str) -> Path:
    """The root tree of plain guest NAME; overlay guests are refused."""
    root = paths.root(check_name(name))
    if (paths.rootdir / ".overlay" / name).exists():
        raise UnifyError(f"{name} is an overlay guest: its files are the template's "
                         "lower layer already, shared by every guest made from it")
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise UnifyError(f"{name}: no such vserver ({root} does not exist)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnifyError(f"{name}: {root} is not a directory")
    return root


def usage_dir(paths: Paths, name: str) -> Path:
    """What vdu counts for guest NAME: its overlay upper layer if it has one, else its root."""
    upper = paths.rootdir / ".overlay" / check_name(name) / "upper"
    return upper if upper.is_dir() else paths.root(name)


# --- walking two trees together ----------------------------------------------------------

def _excluded(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclass
class _Frame:
    ref: int
    guest: int
    rel: str
    names: Iterator[str]


def _pairs(ref_fd: int, guest_fd: int,
           patterns: Sequence[str]) -> Generator[tuple[str, int, int, str], None, None]:
    """(path, REF dir fd, GUEST dir fd, name) of each regular file present in both.

    Depth first through directories that are directories in both trees, on
    the filesystem of their tree's root (as the seed's `cp -ax` and vdu: a
    mount point is not followed). The descriptors are valid until the next
    item.
    """
    ref_dev, guest_dev = os.fstat(ref_fd).st_dev, os.fstat(guest_fd).st_dev
    stack = [_Frame(os.dup(ref_fd), os.dup(guest_fd), "", iter(sorted(os.listdir(ref_fd))))]
    try:
        while stack:
            top = stack[-1]
            name = next(top.names, None)
            if name is None:
                stack.pop()
                os.close(top.ref)
                os.close(top.guest)
                continue
            path = f"{top.rel}/{name}"
            if _excluded(path, patterns):
                continue
            try:
                rst = os.stat(name, dir_fd=top.ref, follow_symlinks=False)
                gst = os.stat(name, dir_fd=top.guest, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(rst.st_mode) and stat.S_ISREG(gst.st_mode):
                yield path, top.ref, top.guest, name
            elif (stat.S_ISDIR(rst.st_mode) and stat.S_ISDIR(gst.st_mode)
                  and rst.st_dev == ref_dev and gst.st_dev == guest_dev):
                sub = _open_dir_pair(top.ref, top.guest, name)
                if sub is not None:
                    try:
                        names = iter(sorted(os.listdir(sub[0])))
                    except OSError:
                        os.close(sub[0])
                        os.close(sub[1])
                        raise
                    stack.append(_Frame(sub[0], sub[1], path, names))
    finally:
        for f in stack:
            os.close(f.ref)
            os.close(f.guest)


def _open_dir_pair(ref_dfd: int, guest_dfd: int, name: str) -> tuple[int, int] | None:
    """Both NAME directories, or None if one was replaced (by a symlink, say) meanwhile."""
    try:
        r = os.open(name, _OPEN_DIR, dir_fd=ref_dfd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise
    try:
        g = os.open(name, _OPEN_DIR, dir_fd=guest_dfd)
    except OSError as e:
        os.close(r)
        if isinstance(e, (FileNotFoundError, NotADirectoryError)) or e.errno == errno.ELOOP:
            return None
        raise
    return r, g


def _open_root(path: Path) -> int:
    try:
        return os.open(path, _OPEN_DIR)
    except OSError as e:
        raise UnifyError(f"{path}: {e.strerror}") from e


def _open_file(dfd: int, name: str) -> int:
    # O_NOATIME so that comparing (and --test) leaves atimes alone; root may
    # set it on any file, others only on their own (EPERM).
    try:
        return os.open(name, _OPEN_FILE | os.O_NOATIME, dir_fd=dfd)
    except PermissionError:
        return os.open(name, _OPEN_FILE, dir_fd=dfd)


# --- file-level primitives ------------------------------------------------------------

def _alike(a: os.stat_result, b: os.stat_result) -> bool:
    """Candidates for sharing: regular, same mode, owner and size."""
    return (stat.S_ISREG(a.st_mode) and a.st_mode == b.st_mode and a.st_uid == b.st_uid
            and a.st_gid == b.st_gid and a.st_size == b.st_size)


def _nothing_to_share(a: os.stat_result, b: os.stat_result) -> bool:
    """One inode already, or two empty files: no block to share."""
    return _same_inode(a, b) or a.st_size == b.st_size == 0


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _same_content(a: int, b: int) -> bool:
    """The bytes of A and B are the same, read to the end of both."""
    off = 0
    while True:
        x = os.pread(a, _READ_CHUNK, off)
        if x != os.pread(b, _READ_CHUNK, off):
            return False
        if not x:
            return True
        off += len(x)


def _xattrs(fd: int) -> dict[str, bytes]:
    try:
        names = os.listxattr(fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {n: os.getxattr(fd, n) for n in names}


def get_flags(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    flags: int = struct.unpack("I", buf)[0]
    return flags


def _set_flags(fd: int, flags: int) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("I", flags))


def _clear_immutable(fd: int) -> bool:
    """Clear FS_IMMUTABLE_FL on FD; True if it was set."""
    try:
        flags = get_flags(fd)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise
    if not flags & FS_IMMUTABLE_FL:
        return False
    _set_flags(fd, flags & ~FS_IMMUTABLE_FL)
    return True


def _set_immutable(fd: int) -> None:
    _set_flags(fd, get_flags(fd) | FS_IMMUTABLE_FL)


def extents(fd: int) -> list[tuple[int, int, int, int]] | None:
    """(logical, physical, length, flags) of FD's extents after a sync, or None without FIEMAP."""
    out: list[tuple[int, int, int, int]] = []
    start, batch = 0, 64
    while True:
        buf = bytearray(_FIEMAP.pack(start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, batch, 0)
                        + bytes(_FIEMAP_EXTENT.size * batch))
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                return None
            raise
        mapped = _FIEMAP.unpack_from(buf)[3]
        if mapped == 0:
            return out
        for i in range(mapped):
            logical, physical, length, _r1, _r2, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP.size + i * _FIEMAP_EXTENT.size)
            out.append((logical, physical, length, flags))
            if flags & FIEMAP_EXTENT_LAST:
                return out
        start = out[-1][0] + out[-1][2]


def _placed(ext: list[tuple[int, int, int, int]] | None) -> list[tuple[int, int, int]]:
    return [(lg, ph, ln) for lg, ph, ln, fl in ext or () if not fl & _NO_PHYSICAL]


def _nothing_new_to_share(ref_fd: int, guest_fd: int) -> bool:
    """GUEST's file has no block that could be shared with REF's (beyond those it does).

    True when every block already is REF's, and when the data is inline (btrfs
    keeps small files in its metadata: a dedupe then "succeeds" and shares
    nothing).
    """
    g = extents(guest_fd)
    if not g:
        return False
    if any(flags & FIEMAP_EXTENT_DATA_INLINE for *_, flags in g):
        return True
    if any(flags & _NO_PHYSICAL for *_, flags in g):
        return False
    return _placed(g) == _placed(extents(ref_fd))


def _blocks_overlap(ref_fd: int, guest_fd: int) -> bool:
    """GUEST's file has at least one block in common with REF's."""
    g = _placed(extents(guest_fd))
    if not g:
        return False
    r = sorted((ph, ph + ln) for _, ph, ln in _placed(extents(ref_fd)))
    return any(a < ge and gs < b for gs, ge in ((ph, ph + ln) for _, ph, ln in g)
               for a, b in r)


def _dedupe(src: int, dst: int, offset: int, length: int) -> tuple[int, int]:
    """One FIDEDUPERANGE call: (status, bytes_deduped); OSError for an error of either kind."""
    buf = bytearray(_DEDUPE_RANGE.pack(offset, length, 1, 0, 0)
                    + _DEDUPE_INFO.pack(dst, offset, 0, 0, 0))
    fcntl.ioctl(src, FIDEDUPERANGE, buf)
    _fd, _off, done, status, _r = _DEDUPE_INFO.unpack_from(buf, _DEDUPE_RANGE.size)
    # Errors about the destination (EXDEV, EPERM, EINVAL without remap
    # support) come back in status, not as the ioctl's own result.
    if status < 0:
        raise OSError(-status, os.strerror(-status))
    return status, done


def _temp_name() -> str:
    return f".vunify-{secrets.token_hex(8)}"


def _make_temp(dfd: int) -> tuple[str, int]:
    """A new empty file under a random name in DFD, mode 0600 until its metadata is set."""
    while True:
        name = _temp_name()
        try:
            return name, os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        except FileExistsError:
            continue


def _link_temp(src_dfd: int, src_name: str, dfd: int) -> str:
    while True:
        name = _temp_name()
        try:
            os.link(src_name, name, src_dir_fd=src_dfd, dst_dir_fd=dfd, follow_symlinks=False)
            return name
        except FileExistsError:
            continue


def _unlink_quietly(dfd: int, name: str | None) -> None:
    if name is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)


def _copy_data(src: int, dst: int, size: int) -> None:
    # read/write, not copy_file_range(2) or sendfile: on btrfs and XFS
    # copy_file_range may reflink, and the point here is private blocks.
    off = 0
    while True:
        data = os.pread(src, _READ_CHUNK, off)
        if not data:
            break
        view = memoryview(data)
        while view:
            n = os.pwrite(dst, view, off)
            view, off = view[n:], off + n
    if off != size:
        raise OSError(errno.EAGAIN, f"file changed size while copied ({off} != {size} bytes)")


def _copy_meta(src: int, dst: int, st: os.stat_result) -> None:
    """Owner, mode, xattrs and times of SRC (whose stat is ST) onto DST.

    chown first: it clears setuid/setgid bits and security.capability
    (fs/attr.c, security/commoncap.c), which the chmod and xattrs then restore.
    """
    os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    for name, value in _xattrs(src).items():
        os.setxattr(dst, name, value)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _unchanged(dfd: int, name: str, fd: int, st: os.stat_result) -> bool:
    """NAME in DFD is still FD's file and FD's file was not touched since ST."""
    try:
        now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    cur = os.fstat(fd)
    return _same_inode(now, st) and (cur.st_size, cur.st_mtime_ns, cur.st_ctime_ns) == (
        st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _replace(dfd: int, name: str, fd: int, st: os.stat_result,
             fill: Callable[[int], None], check: Callable[[int], bool] | None = None) -> bool:
    """Put a new file at NAME in DFD: FILL writes its data, the rest is FD's (stat ST).

    CHECK may still refuse the new data. The new file is complete, with FD's
    owner, mode, xattrs and times and fsynced, before the rename(2) puts it in
    place; a file changed meanwhile is left alone. False when nothing changed.
    """
    tmp: str | None
    tmp, tfd = _make_temp(dfd)
    try:
        fill(tfd)
        if check is not None and not check(tfd):
            return False
        _copy_meta(fd, tfd, st)
        os.fsync(tfd)
        if not _unchanged(dfd, name, fd, st):
            raise OSError(errno.EAGAIN, "changed while being unified; left as it was")
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        tmp = None
        os.fsync(dfd)
        return True
    finally:
        os.close(tfd)
        _unlink_quietly(dfd, tmp)


def _rewrite_in_place(dfd: int, name: str, fd: int, st: os.stat_result) -> None:
    """Rewrite FD's bytes over themselves: copy-on-write gives the inode blocks of its own.

    For a file with other hard links in its guest, which a rename would part.
    """
    wfd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        if not _same_inode(os.fstat(wfd), st):
            raise OSError(errno.EAGAIN, "replaced while being unshared; left as it was")
        off = 0
        while off < st.st_size:
            data = os.pread(fd, _READ_CHUNK, off)
            if not data:
                break
            os.pwrite(wfd, data, off)
            off += len(data)
        os.fsync(wfd)
        os.utime(wfd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(wfd)


# --- sharing blocks ------------------------------------------------------------------

class _Blocks:
    """Shares one pair's blocks with the first method this filesystem supports."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.method: str | None = None

    def probe(self, ref: int, guest: int, guest_dfd: int, where: str) -> str:
        """Which method works, found without changing anything.

        A zero-length FIDEDUPERANGE goes through every check and then returns
        (fs/remap_range.c); a clone goes into an O_TMPFILE, which has no name
        and disappears with its descriptor.
        """
        if self.method is not None:
            return self.method
        try:
            _dedupe(ref, guest, 0, 0)
            self.method = "FIDEDUPERANGE"
            return self.method
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise CannotShare(f"{self.label}: REF and GUEST are on different filesystems; "
                                  "blocks can only be shared within one") from e
            if e.errno not in _UNSUPPORTED:
                raise
            dedupe_err = e
        try:
            tfd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=guest_dfd)
        except OSError:
            tfd = -1
        if tfd >= 0:
            try:
                fcntl.ioctl(tfd, FICLONE, ref)
                self.method = "FICLONE"
                return self.method
            except OSError as e:
                if e.errno not in _UNSUPPORTED | {errno.EXDEV}:
                    raise
            finally:
                os.close(tfd)
        raise CannotShare(
            f"{self.label}: the filesystem of {where} ({_fs_type(guest)}) cannot share blocks: "
            f"FIDEDUPERANGE and FICLONE are not supported ({dedupe_err.strerror}). "
            "Put the guests on btrfs or XFS (mkfs.xfs -m reflink=1), or use --hardlink "
            "and accept its immutable files")

    def share(self, ref: int, guest: int, guest_dfd: int, name: str,
              gst: os.stat_result) -> bool:
        """Share GUEST's blocks with REF's if the bytes are identical; False if they differ."""
        if self.method == "FIDEDUPERANGE":
            off = 0
            while off < gst.st_size:
                status, done = _dedupe(ref, guest, off, min(_DEDUPE_CHUNK, gst.st_size - off))
                if status == FILE_DEDUPE_RANGE_DIFFERS:
                    return False
                if done <= 0:
                    raise OSError(errno.EIO, "FIDEDUPERANGE made no progress")
                off += done
            return True
        # FICLONE: the clone is compared with the guest's file here, not REF's,
        # so a REF that changes in between can never reach the guest.
        if gst.st_nlink > 1:
            raise _Skip("has other hard links in its guest, which a clone would part")

        def clone(tfd: int) -> None:
            fcntl.ioctl(tfd, FICLONE, ref)

        return _replace(guest_dfd, name, guest, gst, fill=clone,
                        check=lambda tfd: _same_content(tfd, guest))


class _Skip(Exception):
    """This file is left alone, for the reason given."""


def _fs_type(fd: int) -> str:
    """The filesystem type of FD's mount, from /proc/self/mountinfo (for messages)."""
    dev = os.fstat(fd).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        pass
    return "unknown type"


# --- the passes -------------------------------------------------------------------

def unify(paths: Paths, ref: str, guests: Sequence[str], *,
          output: Callable[[bytes], None] | None = None, hardlink: bool = False,
          test: bool = False, excludes: Sequence[str] = ()) -> Summary:
    """Unify vservers GUESTS with vserver REF by name (what vpkg --unify calls).

    Each guest's report line goes to OUTPUT as it is done. Raises UnifyError
    (CannotShare when the filesystem cannot share) if a guest or a file
    failed, after trying them all.
    """
    ref_root = guest_root(paths, ref)
    reports: list[Report] = []
    problems: list[str] = []
    for name in guests:
        try:
            rep = unify_tree(ref_root, guest_root(paths, name), hardlink=hardlink, test=test,
                             excludes=excludes, label=name)
        except CannotShare:
            raise
        except (UnifyError, OSError) as e:
            problems.append(str(e))
            continue
        reports.append(rep)
        if output is not None:
            output((rep.text() + "\n").encode())
        problems.extend(f"{name}: {path}: {err}" for path, err in rep.failed)
    if problems:
        raise UnifyError(f"{len(problems)} problem(s), the first: {problems[0]}")
    return Summary(tuple(reports))


@dataclass(frozen=True)
class Summary:
    reports: tuple[Report, ...]

    def __str__(self) -> str:
        done = sum(r.done for r in self.reports)
        saved = sum(r.bytes for r in self.reports)
        return f"{done} files shared, {_size(saved)} saved"


def unify_tree(ref: Path, guest: Path, *, hardlink: bool = False, test: bool = False,
               excludes: Sequence[str] = (), label: str | None = None,
               method: str | None = None) -> Report:
    """Share GUEST's files with REF's identical ones; see the module's docstring.

    METHOD forces "FICLONE" instead of probing (for the tests of that path).
    Raises CannotShare when the filesystem cannot do it at all; a file that
    fails alone is listed in the report's `failed`.
    """
    if method not in (None, "FIDEDUPERANGE", "FICLONE"):
        raise ValueError(f"unknown block sharing method {method!r}")
    label = label or str(guest)
    patterns = (*DEFAULT_EXCLUDES, *excludes)
    report = Report(label, "hard links" if hardlink else "", test)
    blocks = _Blocks(label)
    blocks.method = method
    rfd, gfd = _open_root(ref), _open_root(guest)
    try:
        if hardlink and os.fstat(rfd).st_dev != os.fstat(gfd).st_dev:
            raise CannotShare(f"{label}: {ref} and {guest} are on different filesystems; "
                              "hard links cannot cross them")
        with contextlib.closing(_pairs(rfd, gfd, patterns)) as pairs:
            for path, rdfd, gdfd, name in pairs:
                report.considered += 1
                try:
                    if hardlink:
                        _hardlink_one(report, rdfd, gdfd, name)
                    else:
                        _share_one(report, blocks, rdfd, gdfd, name, str(guest))
                except _Skip as e:
                    report.skipped.append((path, str(e)))
                except CannotShare:
                    raise
                except OSError as e:
                    report.failed.append((path, e.strerror or str(e)))
    finally:
        os.close(rfd)
        os.close(gfd)
    if not hardlink:
        report.method = blocks.method or "no pair to share"
    return report


@contextlib.contextmanager
def _opened(rdfd: int, gdfd: int, name: str) -> Iterator[tuple[int, int]]:
    """NAME in REF's and in GUEST's directory, read-only."""
    r = _open_file(rdfd, name)
    try:
        g = _open_file(gdfd, name)
        try:
            yield r, g
        finally:
            os.close(g)
    finally:
        os.close(r)


def _share_one(report: Report, blocks: _Blocks, rdfd: int, gdfd: int, name: str,
               where: str) -> None:
    with _opened(rdfd, gdfd, name) as (r, g):
        rst, gst = os.fstat(r), os.fstat(g)
        if _nothing_to_share(rst, gst):
            report.already += 1
            return
        if not _alike(rst, gst):
            report.differ += 1
            return
        if _nothing_new_to_share(r, g):
            report.already += 1
            return
        blocks.probe(r, g, gdfd, where)
        if _same_content(r, g) if report.test else blocks.share(r, g, gdfd, name, gst):
            report.done += 1
            report.bytes += gst.st_size
        else:
            report.differ += 1


def _hardlink_one(report: Report, rdfd: int, gdfd: int, name: str) -> None:
    with _opened(rdfd, gdfd, name) as (r, g):
        rst, gst = os.fstat(r), os.fstat(g)
        if _nothing_to_share(rst, gst):
            report.already += 1
            return
        # One inode means one set of xattrs too (file capabilities, ACLs).
        if not (_alike(rst, gst) and _xattrs(r) == _xattrs(g) and _same_content(r, g)):
            report.differ += 1
            return
        if not report.test:
            _link_over(r, rdfd, g, gdfd, name, gst)
        report.done += 1
        report.bytes += gst.st_size


def _link_over(r: int, rdfd: int, g: int, gdfd: int, name: str, gst: os.stat_result) -> None:
    """Replace GUEST's NAME by a hard link to REF's and make that inode immutable.

    link(2) onto an immutable inode fails with EPERM (fs/namei.c vfs_link), so
    a REF file already shared with another guest is made mutable for the
    moment of the link. The guest's own copy stays under a second name until
    the flag is set, and comes back if setting it fails: a shared inode that
    guest root could write is never left behind.
    """
    was_immutable = _clear_immutable(r)
    tmp: str | None = None
    backup: str | None = None
    placed = False
    try:
        tmp = _link_temp(rdfd, name, gdfd)
        if not _same_inode(os.stat(tmp, dir_fd=gdfd, follow_symlinks=False), os.fstat(r)):
            raise OSError(errno.EAGAIN, "the reference file was replaced meanwhile")
        # Checked before the second link, which moves the guest file's ctime.
        if not _unchanged(gdfd, name, g, gst):
            raise OSError(errno.EAGAIN, "changed while being unified; left as it was")
        backup = _link_temp(gdfd, name, gdfd)
        if not _same_inode(os.stat(backup, dir_fd=gdfd, follow_symlinks=False), gst):
            raise OSError(errno.EAGAIN, "replaced while being unified; left as it was")
        os.rename(tmp, name, src_dir_fd=gdfd, dst_dir_fd=gdfd)
        tmp, placed = None, True
        try:
            _set_immutable(r)
        except OSError as e:
            os.rename(backup, name, src_dir_fd=gdfd, dst_dir_fd=gdfd)
            backup, placed = None, False
            if e.errno in _UNSUPPORTED:
                raise CannotShare(f"this filesystem cannot set the immutable attribute "
                                  f"({e.strerror}): a shared hard link would be writable by "
                                  "every guest's root, so none was made") from e
            raise
        os.fsync(gdfd)
    finally:
        _unlink_quietly(gdfd, tmp)
        _unlink_quietly(gdfd, backup)
        if was_immutable and not placed:
            _set_immutable(r)


def undo_tree(ref: Path, guest: Path, *, test: bool = False, excludes: Sequence[str] = (),
              label: str | None = None) -> Report:
    """Give GUEST private copies of every file it shares with REF (blocks or inode).

    A hard-linked file loses FS_IMMUTABLE_FL only while others still need
    it: the inode gets the flag back as long as another name links it.
    """
    label = label or str(guest)
    patterns = (*DEFAULT_EXCLUDES, *excludes)
    report = Report(label, "unshare", test)
    rfd, gfd = _open_root(ref), _open_root(guest)
    try:
        with contextlib.closing(_pairs(rfd, gfd, patterns)) as pairs:
            for path, rdfd, gdfd, name in pairs:
                report.considered += 1
                try:
                    _undo_one(report, rdfd, gdfd, name)
                except OSError as e:
                    report.failed.append((path, e.strerror or str(e)))
    finally:
        os.close(rfd)
        os.close(gfd)
    return report


def _undo_one(report: Report, rdfd: int, gdfd: int, name: str) -> None:
    with _opened(rdfd, gdfd, name) as (r, g):
        rst, gst = os.fstat(r), os.fstat(g)
        linked = _same_inode(rst, gst)
        if not linked and not _blocks_overlap(r, g):
            report.already += 1
            return
        if not report.test:
            if linked:
                _unlink_copy(g, gdfd, name)
            elif gst.st_nlink > 1:
                _rewrite_in_place(gdfd, name, g, gst)
            else:
                _replace(gdfd, name, g, gst, fill=lambda tfd: _copy_data(g, tfd, gst.st_size))
        report.done += 1
        report.bytes += gst.st_size


def _unlink_copy(fd: int, dfd: int, name: str) -> None:
    """Replace the hard link NAME (inode FD) by a private, writable copy."""
    was_immutable = _clear_immutable(fd)
    try:
        st = os.fstat(fd)  # after the flag change, which moved ctime
        _replace(dfd, name, fd, st, fill=lambda tfd: _copy_data(fd, tfd, st.st_size))
    finally:
        if was_immutable and os.fstat(fd).st_nlink > 1:
            _set_immutable(fd)


# --- vdu ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiskUsage:
    path: str
    bytes: int  # st_blocks * 512 of the single-link regular files
    files: int  # how many such files
    errors: tuple[str, ...] = ()

    @property
    def kib(self) -> int:
        return self.bytes >> 10


def disk_usage(root: Path) -> DiskUsage:
    """The seed's vdu: space of the regular files with one link under ROOT, one filesystem.

    Files with more links are (or may be) another guest's too and are not
    counted; directories, symlinks and devices are not counted either, as in
    the seed. Allocated blocks, not st_size: sparse files count what they hold.
    """
    try:
        st = os.stat(root, follow_symlinks=False)
    except OSError as e:
        raise UnifyError(f"{root}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise UnifyError(f"{root}: not a directory")
    dev = st.st_dev
    total = files = 0
    errors: list[str] = []

    def onerror(e: OSError) -> None:
        errors.append(f"{e.filename}: {e.strerror}")

    for top, dirs, names, dfd in os.fwalk(root, onerror=onerror, follow_symlinks=False):
        keep = []
        for d in dirs:
            try:
                if os.stat(d, dir_fd=dfd, follow_symlinks=False).st_dev == dev:
                    keep.append(d)
            except OSError as e:
                errors.append(f"{top}/{d}: {e.strerror}")
        dirs[:] = keep
        for n in names:
            try:
                st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                errors.append(f"{top}/{n}: {e.strerror}")
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                total += st.st_blocks * 512
                files += 1
    return DiskUsage(str(root), total, files, tuple(errors))
