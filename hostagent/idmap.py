"""A private range of host user and group ids per guest (NAME.conf IDMAP).

The seed wanted the context and the user id coined into one unique id, so
that a guest's root is no host root and per-uid quotas tell guests apart. A
user namespace does that: with IDMAP="isolated" a guest's uids and gids 0..65535
are host ids IDMAP_BASE..IDMAP_BASE+65535, in a user namespace made with the
guest's other namespaces (so that it owns them all) at its start.

This module hands out the ranges, shifts a tree's ownership from one range to
another, and makes the idmapped mounts that let one template on disk, owned
by real root, serve guests with different ranges:

  * Ranges are blocks of 65536 ids aligned on 65536, from 131072 up (the first
    such block above the host's own ids, which by convention stay below
    100000), never overlapping another guest's, an /etc/subuid or /etc/subgid
    entry, or an id the host's /etc/passwd or /etc/group names. A build
    reserves one under RUNDIR/idmaps/.lock, as context numbers are reserved
    (hostagent/contexts.py): the reservation names the building process and
    frees itself when that process ends; once NAME.conf holds IDMAP_BASE, the
    conf is the record, read again at every later allocation.
  * `shared` guests all get one range (the first shared guest's), for
    comparison with the seed's privileged mode only: they are not apart.
  * A shift rewrites owners with lchown semantics (fchownat without following
    anything, an fd per directory so no symlink swapped in mid-walk is ever
    followed), keeps setuid and setgid bits (chown clears them), rewrites file
    capabilities as VFS_CAP_REVISION_3 with the new range's root as rootid,
    and moves the ids in POSIX ACLs. It is idempotent (an id already in the
    target range stays), so an interrupted shift is finished by running it
    again; RUNDIR is not where that is remembered (a reboot empties it), but
    a `.NAME.idmap-shift` file beside NAME.conf.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hostagent import conf as confmod
from hostagent import procfs, syscalls
from hostagent.names import check_name
from hostagent.paths import Paths

__all__ = [
    "FIRST_BASE",
    "ISOLATED",
    "NONE",
    "RANGE",
    "SHARED",
    "IdmapError",
    "RangeRegistry",
    "Shift",
    "base_of",
    "become_root",
    "begin_shift",
    "end_shift",
    "idmapped_tree",
    "pending_shift",
    "shift_tree",
    "to_host",
    "write_maps",
]

NONE, ISOLATED, SHARED = "none", "isolated", "shared"
RANGE = 65536  # ids per guest: 0..65535 inside, as a distribution expects (nobody is 65534)
FIRST_BASE = 2 * RANGE  # 131072: the first aligned block at or above 100000
# uid 4294967295 is (uid_t)-1, "no change" to chown(2): the last block stops short.
LAST_BASE = (1 << 32) - 2 * RANGE
NOBODY = 65534  # where an id from outside the old range lands in the new one
HOST_IDS_BELOW = 100000  # the host's own users and groups (useradd, LXC, Podman)

SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
ID_FILES = (Path("/etc/passwd"), Path("/etc/group"))

# include/uapi/linux/capability.h: the security.capability xattr.
VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_REVISION_1 = 0x01000000
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_REVISION_3 = 0x03000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001
XATTR_CAPS = "security.capability"
# include/uapi/linux/posix_acl_xattr.h and posix_acl.h.
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
ACL_USER, ACL_GROUP = 0x02, 0x08


class IdmapError(RuntimeError):
    """No range can be given, or ids could not be mapped; the message says why."""


def to_host(base: int | None, guest_id: int) -> int:
    """The host id of GUEST_ID in a guest whose range starts at BASE (None: no range)."""
    return guest_id if base is None else base + guest_id


# --- the ranges ---------------------------------------------------------------------

def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


def host_reserved(subid_files: Iterable[Path] = SUBID_FILES,
                  id_files: Iterable[Path] = ID_FILES) -> list[tuple[int, int]]:
    """(start, count) of every id this host gives out itself above HOST_IDS_BELOW:
    /etc/subuid and /etc/subgid entries (Podman's and LXC's ranges), and the ids
    /etc/passwd and /etc/group name (a directory service's users, a big uid)."""
    out: list[tuple[int, int]] = []
    for path in subid_files:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    out.append((int(parts[1]), int(parts[2])))
    for path in id_files:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                parts = line.split(":")
                if len(parts) > 2 and parts[2].isdigit() and int(parts[2]) >= HOST_IDS_BELOW:
                    out.append((int(parts[2]), 1))
    return out


@dataclass(frozen=True)
class Held:
    """A range some guest has or is about to have."""

    guest: str
    mode: str
    base: int


def _shift_file(paths: Paths, name: str) -> Path:
    """Beside NAME.conf: the bases of a shift under way, so that an interrupted one
    is finished with the same ones (RUNDIR would not survive a reboot)."""
    return paths.confdir / f".{check_name(name)}.idmap-shift"


@dataclass(frozen=True)
class Shift:
    """A shift of a guest's files from range OLD to NEW (0: the host's own ids),
    for IDMAP=MODE."""

    old: int
    new: int
    mode: str


def pending_shift(paths: Paths, name: str) -> Shift | None:
    """The unfinished shift of NAME's files, if one was interrupted."""
    try:
        old, new, mode = _shift_file(paths, name).read_text().split()
        return Shift(int(old), int(new), mode)
    except (OSError, ValueError):
        return None


# NAME.conf lines that give IDMAP_BASE a number and IDMAP a word (hostagent/conf.py
# grammar: optional indent, single or double quotes, a trailing # comment).
_BASE_RE = re.compile(r"""^[ \t]*IDMAP_BASE=(["']?)([0-9]+)\1[ \t]*(?:#.*)?$""", re.M)
_MODE_RE = re.compile(r"""^[ \t]*IDMAP=(["']?)([a-z]+)\1[ \t]*(?:#.*)?$""", re.M)


class RangeRegistry:
    """Who holds which range, and a lock to hand out new ones."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.dir = paths.rundir / "idmaps"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def recorded(self) -> list[Held]:
        """Every range a NAME.conf records, and the target of every unfinished shift.

        Read as raw assignments, not validated settings (a guest whose conf has
        some other fault still holds its range), and with a scan rather than a
        parse: every start of a guest with a range reads every conf.
        """
        out = []
        for name in self.paths.guest_names():
            try:
                text = self.paths.conf(name).read_text(errors="replace")
            except OSError:
                continue
            bases = _BASE_RE.findall(text)
            if bases:  # the last assignment wins, as in sh
                modes = _MODE_RE.findall(text)
                out.append(Held(name, modes[-1][1] if modes else ISOLATED, int(bases[-1][1])))
            shift = pending_shift(self.paths, name)
            if shift is not None and shift.new:
                out.append(Held(name, shift.mode, shift.new))
        return out

    def _reserved(self) -> list[Held]:
        """Live reservations of builds under way; stale ones are removed."""
        out = []
        for p in self.dir.glob("[a-z]*"):
            try:
                mode, base, pid, start = p.read_text().split()
                held = Held(check_name(p.name), mode, int(base))
                alive = procfs.start_time(int(pid)) == int(start)
            except (OSError, ValueError):
                alive = False
            if alive:
                out.append(held)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        return out

    def allocate(self, name: str, mode: str) -> int:
        """Reserve a range for NAME (ISOLATED or SHARED) for the calling process; its base.

        The reservation lasts until release(NAME) or the end of this process;
        by then NAME.conf must record the base.
        """
        if mode not in (ISOLATED, SHARED):
            raise ValueError(f"no range is allocated for IDMAP={mode}")
        check_name(name)
        with self._lock():
            held = [h for h in self.recorded() + self._reserved() if h.guest != name]
            base = None
            if mode == SHARED:
                base = next((h.base for h in held if h.mode == SHARED), None)
            if base is None:
                taken = [(h.base, RANGE) for h in held] + host_reserved()
                base = next((b for b in range(FIRST_BASE, LAST_BASE + 1, RANGE)
                             if not any(_overlaps(b, RANGE, s, n) for s, n in taken)), None)
                if base is None:
                    raise IdmapError("no free range of 65536 host ids is left")
            tmp = self.dir / f".{name}.new"
            tmp.write_text(f"{mode} {base} {os.getpid()} {procfs.start_time(os.getpid())}\n")
            os.replace(tmp, self.dir / name)
            return base

    def release(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / check_name(name)).unlink()

    def check(self, name: str, mode: str, base: int) -> None:
        """Refuse a range another guest holds too (a NAME.conf copied from another
        host, for one), unless both are shared guests on the same range."""
        for h in self.recorded():
            if h.guest == name or not _overlaps(base, RANGE, h.base, RANGE):
                continue
            if mode == SHARED and h.mode == SHARED and h.base == base:
                continue
            raise IdmapError(f"its id range {base}..{base + RANGE - 1} overlaps vserver "
                             f"{h.guest}'s ({h.base}..{h.base + RANGE - 1}); give one of them "
                             "another with `vserver NAME set IDMAP isolated` after clearing "
                             "its IDMAP_BASE")


def base_of(paths: Paths, name: str) -> int | None:
    """The first host id of NAME's range as its NAME.conf records it; None without one."""
    try:
        return confmod.settings_from_file(paths.conf(name)).idmap_base
    except (confmod.ConfigError, OSError):
        return None


def begin_shift(paths: Paths, name: str, shift: Shift) -> None:
    path = _shift_file(paths, name)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(f"{shift.old} {shift.new} {shift.mode}\n")
    os.replace(tmp, path)


def end_shift(paths: Paths, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _shift_file(paths, name).unlink()


# --- user namespaces for id maps --------------------------------------------------

def write_maps(pid: int, base: int) -> None:
    """Map ids 0..65535 of PID's new user namespace to host ids BASE...

    Written from outside the namespace by a process with CAP_SETUID and
    CAP_SETGID over its parent (user_namespaces(7)), which is also why
    /proc/PID/setgroups can stay "allow": guest root may then call
    setgroups(2), which login, su and sshd need.
    """
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 {base} {RANGE}\n")


def become_root() -> None:
    """In a user namespace whose maps are written: become its root (uid and gid 0,
    no supplementary group of the host's).

    From host root (unmapped) to the namespace's root keeps the capabilities
    the namespace gave (capabilities(7): only a change away from uid 0 clears
    them).
    """
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


def userns_fd(base: int) -> int:
    """An fd of a user namespace whose ids 0..65535 are host ids BASE.., for
    MOUNT_ATTR_IDMAP. A child made for it in the new namespace waits on a pipe
    while its maps are written and ends once the namespace is held by the fd."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = syscalls.fork_into(syscalls.CLONE_NEWUSER)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    try:
        write_maps(pid, base)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def idmapped_tree(path: Path, base: int) -> int:
    """A detached mount of PATH, idmapped so that its owner ids 0..65535 read as
    host ids BASE..; returns its fd (attach it with syscalls.move_mount).

    The files on disk keep their ids: a template owned by real root stays so,
    and serves guests with different ranges, one copy in the page cache.
    """
    fd = syscalls.open_tree(path, syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC)
    try:
        ns = userns_fd(base)
        try:
            syscalls.mount_setattr(fd, attr_set=syscalls.MOUNT_ATTR_IDMAP, userns_fd=ns)
        finally:
            os.close(ns)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- shifting a tree's ownership ----------------------------------------------------

def _mapper(old: int, new: int) -> Callable[[int], int]:
    """Id OLD+n becomes NEW+n; an id already in NEW's range stays (a resumed shift);
    any other becomes NEW's nobody (a privileged guest's file owned by 70000)."""
    def move(i: int) -> int:
        if old <= i < old + RANGE:
            return i - old + new
        if new <= i < new + RANGE:
            return i
        return new + NOBODY
    return move


def _shift_caps(raw: bytes, move: Callable[[int], int]) -> bytes | None:
    """The security.capability value with its root id moved; None if unchanged."""
    if len(raw) < 4:
        return None
    magic = struct.unpack_from("<I", raw)[0]
    rev = magic & VFS_CAP_REVISION_MASK
    if rev == VFS_CAP_REVISION_3 and len(raw) >= 24:
        rootid = struct.unpack_from("<I", raw, 20)[0]
        data = raw[4:20]
    elif rev == VFS_CAP_REVISION_2 and len(raw) >= 20:
        rootid, data = 0, raw[4:20]
    elif rev == VFS_CAP_REVISION_1 and len(raw) >= 12:
        rootid, data = 0, raw[4:12] + b"\0" * 8
    else:
        return None
    new_root = move(rootid)
    if new_root == rootid and rev != VFS_CAP_REVISION_1:
        return None
    flags = magic & VFS_CAP_FLAGS_EFFECTIVE
    if new_root == 0:
        return struct.pack("<I", VFS_CAP_REVISION_2 | flags) + data
    return struct.pack("<I", VFS_CAP_REVISION_3 | flags) + data + struct.pack("<I", new_root)


def _shift_acl(raw: bytes, move: Callable[[int], int]) -> bytes | None:
    if len(raw) < 4 or (len(raw) - 4) % 8:
        return None
    out = bytearray(raw)
    changed = False
    for off in range(4, len(raw), 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, off)
        if tag in (ACL_USER, ACL_GROUP):
            new = move(ident)
            if new != ident:
                struct.pack_into("<HHI", out, off, tag, perm, new)
                changed = True
    return bytes(out) if changed else None


def _getxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise


def _shift_inode(dfd: int, name: str, st: os.stat_result, move: Callable[[int], int]) -> bool:
    """Shift one inode NAME in DFD (already lstat'ed as ST); True if it changed."""
    uid, gid = move(st.st_uid), move(st.st_gid)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # Symlinks, devices, fifos, sockets: their owner only, never followed.
        if (uid, gid) != (st.st_uid, st.st_gid):
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
            return True
        return False
    # A regular file or a directory: through an fd of its own, opened without
    # following a link, so that chown, the mode and the xattrs all land on it.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    fd = os.open(name, flags | getattr(os, "O_NOATIME", 0), dir_fd=dfd) if name else \
        os.dup(dfd)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise IdmapError(f"{name} changed while its owner was being shifted")
        caps = _getxattr(fd, XATTR_CAPS) if stat.S_ISREG(st.st_mode) else None
        acls = {a: _getxattr(fd, a) for a in ACL_XATTRS}
        changed = (uid, gid) != (st.st_uid, st.st_gid)
        if changed:
            os.fchown(fd, uid, gid)  # clears setuid/setgid bits and file capabilities
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
        if caps is not None:
            new_caps = _shift_caps(caps, move)
            if new_caps is not None or changed:
                os.setxattr(fd, XATTR_CAPS, new_caps if new_caps is not None else caps)
                changed = True
        for attr, value in acls.items():
            new_acl = None if value is None else _shift_acl(value, move)
            if new_acl is not None:
                os.setxattr(fd, attr, new_acl)
                changed = True
        return changed
    finally:
        os.close(fd)


def shift_tree(root: Path, old: int, new: int,
               log: Callable[[str], None] = lambda _m: None) -> int:
    """Move the owner of everything under ROOT (ROOT too) from range OLD to range NEW.

    0 is the host's own range (a privileged guest). Never leaves ROOT's
    filesystem (a mount below it is someone else's) and never follows a
    symlink; each inode with several links is shifted once. Returns how many
    inodes changed.
    """
    if old == new:
        return 0
    move = _mapper(old, new)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        rst = os.fstat(root_fd)
        changed = int(_shift_inode(root_fd, "", rst, move))
        seen: set[int] = set()
        for _dirpath, dirnames, filenames, dfd in os.fwalk(dir_fd=root_fd,
                                                           follow_symlinks=False):
            for name in list(dirnames):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if st.st_dev != rst.st_dev:
                    dirnames.remove(name)  # a mount point: not this tree's to change
                    continue
                changed += _shift_inode(dfd, name, st, move)
            for name in filenames:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if st.st_dev != rst.st_dev:
                    continue  # a file bind-mounted here
                if st.st_nlink > 1:
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                changed += _shift_inode(dfd, name, st, move)
    finally:
        os.close(root_fd)
    log(f"shifted the owners of {changed} files of {root} from ids {old}.. to {new}..")
    return changed
