"""Building and deleting a guest's root tree (`vserver NAME build`, `delete`).

The seed built a guest with `cp -ax /bin /etc /lib /sbin /usr /var` and a few
mkdirs, then turned host services off by hand. vpanel keeps that method
(`copy`) and adds three: `busybox` (a tiny guest made from the host's static
busybox, what the tests and the demo run), `rootfs` (a directory or tarball
someone else made) and `debootstrap` (a clean Debian).

Every build happens in a temporary sibling of the target, `.NAME.build-XXXX`,
renamed into place only when complete, so a failed or interrupted build leaves
nothing a later `vserver NAME start` could mistake for a guest. docs/build.md
describes what each method produces and the tarball rules.
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import datetime
import errno
import fcntl
import fnmatch
import gzip
import io
import logging
import lzma
import os
import posixpath
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import zstandard

from hostagent.names import NAME_RE
from hostagent.syscalls import MNT_DETACH, UMOUNT_NOFOLLOW, umount2

__all__ = [
    "BUSYBOX_CANDIDATES",
    "HOST_ONLY_SERVICES",
    "METHODS",
    "SUITE_RE",
    "BuildError",
    "build_root",
    "delete_root",
    "is_static_elf",
]

_LOG = logging.getLogger(__name__)

METHODS = ("copy", "busybox", "rootfs", "debootstrap")

SUITE_RE = re.compile(r"^[a-z][a-z0-9-]{1,30}\Z")

# Debian's busybox-static installs /bin/busybox; the dynamic `busybox` package
# uses the same path, which is why the ELF is checked and not just found.
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

# What the seed's `vserver build` copied, plus the multilib directories.
# On a usr-merged host the first six are symlinks into /usr and are copied as
# symlinks.
COPY_TOPS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "var")

# Services that act on the host's hardware, kernel or disks. In a guest they
# either fail for want of a capability (CAP_SYS_TIME, CAP_SYS_MODULE,
# CAP_MKNOD, CAP_SYS_ADMIN) or, given one, would reconfigure the host: the
# clock, modules, sysctls, the console keymap, block devices, root's fsck and
# remount. Matched against SysV link names without their `S20` prefix and
# systemd unit names without their suffix.
HOST_ONLY_SERVICES = (
    "hwclock*",
    "kmod",
    "module-init-tools",
    "udev*",
    "systemd-udev*",
    "systemd-modules-load",
    "procps",
    "systemd-sysctl",
    "networking",
    "keyboard-setup*",
    "console-setup*",
    "kbd",
    "mountall*",
    "mountkernfs*",
    "mountdevsubfs*",
    "checkroot*",
    "checkfs*",
    "umountfs",
    "umountroot",
    "systemd-remount-fs",
    "systemd-fsck*",
    "urandom",
    "systemd-random-seed",
    "lvm*",
    "blk-availability",
    "mdadm*",
    "mdmonitor*",
    "brightness",
    "systemd-backlight*",
    "cpufrequtils",
    "loadcpufreq",
    "systemd-timesyncd",
    "hdparm",
    "smartmontools",
    "smartd",
    "irqbalance",
    "acpid",
    # Gettys would open the host's ttys; a guest is entered with `vserver
    # NAME enter`, not through a console.
    "getty@*",
    "serial-getty@*",
    "getty-static",
)

# Mount points the agent needs in every guest, whatever built it.
_MOUNT_POINTS = ("dev", "proc", "sys", "tmp", "run")

# FS_IOC_GETFLAGS / FS_IOC_SETFLAGS and the two flags that make unlink(2)
# fail with EPERM even for root (include/uapi/linux/fs.h). The numbers are
# _IOR('f', 1, long) / _IOW('f', 2, long) in the generic _IOC layout
# (include/uapi/asm-generic/ioctl.h: x86, arm, arm64, riscv, s390); the
# kernel nevertheless reads and writes an int (fs/ioctl.c), hence 4 bytes.
_IOC_WRITE = 1
_IOC_READ = 2
_SIZEOF_LONG = struct.calcsize("l")
FS_IOC_GETFLAGS = (_IOC_READ << 30) | (_SIZEOF_LONG << 16) | (ord("f") << 8) | 1
FS_IOC_SETFLAGS = (_IOC_WRITE << 30) | (_SIZEOF_LONG << 16) | (ord("f") << 8) | 2
FS_IMMUTABLE_FL = 0x00000010
FS_APPEND_FL = 0x00000020

# ELF constants (include/uapi/linux/elf.h).
_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Extended attributes a tarball may set. security.capability carries file
# capabilities (Debian's ping has cap_net_raw) and the ACL names carry
# ACLs; trusted.* (overlayfs redirects, for one) and security.selinux/ima
# are the host's business and are dropped with a log line.
_XATTR_ALLOWED = ("user.", "security.capability", "system.posix_acl_access",
                  "system.posix_acl_default")

_MAXSYMLINKS = 40  # what the kernel allows in one path walk (include/linux/namei.h)

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """A guest tree could not be built or deleted; the message says which part."""


# --- public API --------------------------------------------------------------


def build_root(
    root: Path,
    method: str,
    source: str | None = None,
    *,
    log: Log = _LOG.info,
    host_root: Path = Path("/"),
) -> None:
    """Build a guest root tree at ROOT with METHOD (one of METHODS).

    SOURCE is the directory or tarball for `rootfs` and the suite for
    `debootstrap`; `copy` and `busybox` take none. HOST_ROOT is the tree
    `copy` copies from; only tests change it. LOG receives progress lines.

    ROOT must not exist and its parent must. The tree is built in a
    temporary sibling and renamed into place on success; on any failure,
    KeyboardInterrupt included, the temporary tree is removed and ROOT is
    never created.
    """
    root = Path(os.path.abspath(root))
    if method not in METHODS:
        raise BuildError(f"unknown build method {method!r}: use one of {', '.join(METHODS)}")
    if root.name in ("", ".", ".."):
        raise BuildError(f"{root} cannot be a guest root")
    if os.path.lexists(root):
        raise BuildError(f"{root} already exists; delete it first")
    if not root.parent.is_dir():
        raise BuildError(f"{root.parent} does not exist; create the guests' directory first")
    builder = _prepare(method, source, root, host_root)

    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
    try:
        try:
            # mkdtemp makes 0700; the guest's "/" must be searchable by its
            # non-root users (and by package scripts run as them under
            # debootstrap). The guests' directory above stays the barrier.
            os.chmod(tmp, 0o755)  # noqa: S103 (a guest's "/" is world-searchable)
            log(f"building {root} with {method} in {tmp}")
            builder(tmp, log)
            _install_vreboot(tmp, log)
            _write_build_note(tmp, method, source, log)
            # Again, because `cp -a SRC/. TMP` gives TMP the source's owner and
            # mode: the guest's "/" must be root's, or that uid inside the guest
            # could replace anything at the top of the tree.
            os.chown(tmp, 0, 0)
            os.chmod(tmp, 0o755)  # noqa: S103 (as above)
            # A concurrent build of the same name has a non-empty tree there,
            # so rename(2) fails with ENOTEMPTY instead of replacing it; only
            # an empty directory could be replaced, and losing one is harmless.
            if os.path.lexists(root):
                raise BuildError(f"{root} appeared while building; not replacing it")
            os.rename(tmp, root)
        except (OSError, EOFError, tarfile.TarError, lzma.LZMAError, zlib.error,
                zstandard.ZstdError) as e:
            # OSError includes gzip.BadGzipFile (CRC) and bz2's "Invalid data
            # stream"; EOFError is a compressed stream cut short.
            raise BuildError(f"building {root} with {method} failed: {e}") from e
    except BaseException:
        _discard(tmp, log)
        raise
    log(f"built {root}")


def delete_root(root: Path) -> None:
    """Remove the guest tree at ROOT; a missing ROOT is not an error.

    Symlinks are removed, never followed, and the walk never enters another
    filesystem. Anything mounted at or under ROOT (in this mount namespace)
    means the guest is running or something is bind-mounted into it, and is
    refused. Files made immutable or append-only (chattr +i/+a) are cleared
    when unlink(2) fails with EPERM on them.
    """
    root = Path(os.path.abspath(root))
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise BuildError(f"{root} is a symlink; refusing to delete through it")
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"{root} is not a directory")
    real = os.path.realpath(root)
    if real == "/":
        raise BuildError("refusing to delete /")
    mounts = _mounts_under(real)
    if mounts:
        raise BuildError(
            f"{mounts[0]} is a mount point inside {root}: stop the guest (or unmount it) first"
        )
    _remove_tree(root, clear_parent_flags=False)


# --- method dispatch -----------------------------------------------------------


Builder = Callable[[Path, Log], None]


def _prepare(method: str, source: str | None, root: Path, host_root: Path) -> Builder:
    """Check METHOD's arguments before anything is created; return its builder."""
    hostname = root.name if NAME_RE.match(root.name) else "vserver"
    if method == "copy":
        if source is not None:
            raise BuildError("copy takes no source: it copies this host")
        if not host_root.is_dir():
            raise BuildError(f"{host_root} is not a directory")
        return lambda tmp, log: _build_copy(tmp, log, Path(host_root), root, hostname)
    if method == "busybox":
        if source is not None:
            raise BuildError("busybox takes no source: it uses the host's static busybox")
        busybox = _find_busybox()
        return lambda tmp, log: _build_busybox(tmp, log, busybox, hostname)
    if method == "rootfs":
        if not source:
            raise BuildError("rootfs needs a source: a directory or a tarball")
        src = Path(source)
        if not src.exists():
            raise BuildError(f"rootfs source {src} does not exist")
        if not (src.is_dir() or src.is_file()):
            raise BuildError(f"rootfs source {src} is neither a directory nor a file")
        return lambda tmp, log: _build_rootfs(tmp, log, src)
    # debootstrap
    if source is None or not SUITE_RE.match(source):
        raise BuildError(f"debootstrap needs a suite name such as bookworm, not {source!r}")
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed: apt-get install debootstrap")
    suite = source
    return lambda tmp, log: _build_debootstrap(tmp, log, suite, hostname)


# --- copy -----------------------------------------------------------------------

_SKIP = "skip"  # leave the entry out
_EMPTY = "empty"  # keep the directory, none of its contents
_DIRS_ONLY = "dirs-only"  # keep the directory tree, none of the files in it


def _build_copy(tmp: Path, log: Log, host: Path, root: Path, hostname: str) -> None:
    rules: dict[str, str] = {
        # The host's guest configuration is none of a guest's business.
        "etc/vservers": _SKIP,
        # Package caches and indexes: large, and refetched by apt on demand.
        "var/cache/apt/archives": "drop:*.deb",
        "var/lib/apt/lists": _DIRS_ONLY,
        # The host's logs would tell a guest what the host did; the
        # directories stay so that daemons find them with their owners.
        "var/log": _DIRS_ONLY,
        "var/tmp": _EMPTY,
        # Usually symlinks into /run (copied as such); old hosts have
        # directories full of the host's pidfiles and locks.
        "var/run": _EMPTY,
        "var/lock": _EMPTY,
    }
    # When the guests live under a copied directory (say /var/lib/vservers),
    # the copy must not take the other guests, nor itself, along.
    host_real = os.path.realpath(host)
    guests = os.path.realpath(root.parent)
    rel_guests = os.path.relpath(guests, host_real)
    if rel_guests != "." and not rel_guests.startswith(".."):
        rules[rel_guests] = _SKIP
    tops = [name for name in COPY_TOPS if os.path.lexists(host / name)]
    log(f"copy: copying {', '.join('/' + t for t in tops)} from {host}")
    _copy_filtered(host, tmp, "", tops, rules, os.stat(host).st_dev, log)
    _guestize(tmp, log, hostname)


def _copy_filtered(
    src_dir: Path,
    dst_dir: Path,
    rel: str,
    names: Iterable[str],
    rules: dict[str, str],
    dev: int,
    log: Log,
) -> None:
    """Copy NAMES from SRC_DIR into DST_DIR, applying RULES to paths at and below them.

    Entries with no rule at or below them are copied in one `cp -ax` call
    per directory, which keeps hard links among them; the cost is that a
    hard link between two entries that end up in different cp calls (only
    possible inside /etc and /var, which are walked here) becomes two files.
    """
    plain: list[Path] = []
    for name in sorted(names):
        crel = f"{rel}/{name}" if rel else name
        src = src_dir / name
        dst = dst_dir / name
        action = rules.get(crel)
        if action == _SKIP:
            log(f"copy: leaving out /{crel}")
            continue
        st = os.lstat(src)
        is_dir = stat.S_ISDIR(st.st_mode)
        # Each top is copied on its own filesystem, as `cp -ax /var` did when
        # /var was a separate one; below a top, a directory on another device
        # is a mount point and becomes an empty directory, as cp -x makes it.
        sub_dev = dev if rel else st.st_dev
        if is_dir and st.st_dev != sub_dev:
            _mkdir_like(st, dst)
            shutil.copystat(src, dst, follow_symlinks=False)
            continue
        below = any(r.startswith(crel + "/") for r in rules)
        if not is_dir or (action is None and not below):
            plain.append(src)
            continue
        _mkdir_like(st, dst)
        children = os.listdir(src)
        if action == _EMPTY:
            children = []
        elif action == _DIRS_ONLY:
            _copy_dir_skeleton(src, dst, sub_dev)
            children = []
        elif action is not None and action.startswith("drop:"):
            pattern = action.removeprefix("drop:")
            children = [c for c in children if not fnmatch.fnmatchcase(c, pattern)]
        _copy_filtered(src, dst, crel, children, rules, sub_dev, log)
        shutil.copystat(src, dst, follow_symlinks=False)
    if plain:
        # --reflink=auto shares extents on btrfs/XFS and copies elsewhere.
        _run(["cp", "-ax", "--reflink=auto", "-t", str(dst_dir), "--", *map(str, plain)])


def _copy_dir_skeleton(src: Path, dst: Path, dev: int) -> None:
    """Recreate the directories under SRC in DST, with owners, modes and xattrs."""
    for name in sorted(os.listdir(src)):
        child = src / name
        st = os.lstat(child)
        if stat.S_ISDIR(st.st_mode):
            _mkdir_like(st, dst / name)
            if st.st_dev == dev:  # a mount point stays empty
                _copy_dir_skeleton(child, dst / name, dev)
            shutil.copystat(child, dst / name, follow_symlinks=False)


def _mkdir_like(st: os.stat_result, dst: Path) -> None:
    """Make DST owned like ST; the caller copies mode, times and xattrs afterwards."""
    os.mkdir(dst, 0o700)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)


# --- guest-izing (copy, debootstrap) -------------------------------------------


def _guestize(tmp: Path, log: Log, hostname: str) -> None:
    """Turn a copy of a full system into a guest: mount points, no host identity."""
    for rel, mode in (("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("tmp", 0o1777),
                      ("run", 0o755), ("root", 0o700), ("home", 0o755), ("mnt", 0o755)):
        _ensure_dir(tmp, rel, mode)
    # Sticky and world-writable even if the source tree had it otherwise:
    # every guest user needs a /tmp, and nobody may delete another's files.
    os.chmod(tmp / "tmp", 0o1777)  # noqa: S103 (that is what /tmp is)
    _empty_dev(tmp, log)
    _write_tree_file(
        tmp,
        "etc/fstab",
        "# vpanel guest: the host mounts /proc, /sys and a tmpfs /dev when it starts\n"
        "# the guest; the host's disks are not the guest's to mount.\n",
        0o644,
    )
    _write_tree_file(tmp, "etc/hostname", hostname + "\n", 0o644)
    _services_off(tmp, log)
    _forget_host_identity(tmp, log)
    _lock_passwords(tmp, log)


def _empty_dev(tmp: Path, log: Log) -> None:
    """Remove what a build left in /dev (debootstrap makes null, zero, ...).

    The agent mounts a tmpfs with the guest's device nodes over /dev at start,
    so whatever is below is never seen by a running guest; removing it means
    a stopped guest's tree holds no device node that something on the host
    could be tricked into opening.
    """
    devdir = tmp / "dev"
    names = os.listdir(devdir)
    if not names:
        return
    fd = os.open(devdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        for name in names:
            cst = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(cst.st_mode):
                _remove_dir_at(fd, name, f"{devdir}/{name}", st.st_dev, clear_holder=True)
            else:
                _unlink_at(fd, name, f"{devdir}/{name}", is_dir=False, clear_holder=True)
    finally:
        os.close(fd)
    log(f"emptied /dev ({len(names)} entries): the guest gets a tmpfs /dev at start")


def _services_off(tmp: Path, log: Log) -> None:
    removed: list[str] = []
    for rcdir in sorted(tmp.glob("etc/rc?.d")):
        if not _is_real_dir(rcdir, tmp):
            continue
        for link in sorted(rcdir.iterdir()):
            m = re.match(r"S\d*(.*)\Z", link.name)
            if m and _host_only(m.group(1)):
                link.unlink()
                removed.append(f"{rcdir.name}/{link.name}")
    for wants in sorted(tmp.glob("etc/systemd/system/*.wants")):
        if not _is_real_dir(wants, tmp):
            continue
        for link in sorted(wants.iterdir()):
            unit = link.name.rsplit(".", 1)[0] if "." in link.name else link.name
            if link.is_symlink() and _host_only(unit):
                link.unlink()
                removed.append(f"{wants.name}/{link.name}")
    if removed:
        log(f"host-only services turned off: {', '.join(removed)}")


def _host_only(service: str) -> bool:
    return any(fnmatch.fnmatchcase(service, pat) for pat in HOST_ONLY_SERVICES)


def _forget_host_identity(tmp: Path, log: Log) -> None:
    """Remove what identifies the host, so no guest can pass itself off as it.

    SSH host keys would let a guest impersonate the host (and every other
    guest built by copy) to anyone who trusts its fingerprint; the machine
    id is used as a stable identifier by systemd, journald and DHCP clients;
    the random seed would make guests start their RNG from the same state.
    """
    gone: list[str] = []
    ssh = tmp / "etc/ssh"
    if _is_real_dir(ssh, tmp):
        for key in sorted(ssh.glob("ssh_host_*")):
            if key.is_symlink() or key.is_file():
                key.unlink()
                gone.append(f"/etc/ssh/{key.name}")
    machine_id = tmp / "etc/machine-id"
    if os.path.lexists(machine_id):
        # Empty, not missing: systemd then makes a fresh id at the guest's
        # first boot (machine-id(5), "uninitialized").
        machine_id.unlink()
        _write_tree_file(tmp, "etc/machine-id", "", 0o444)
        gone.append("/etc/machine-id (now empty)")
    for rel in ("var/lib/dbus/machine-id", "var/lib/systemd/random-seed",
                "var/lib/urandom/random-seed"):
        p = tmp / rel
        if p.is_file() and not p.is_symlink() and _is_real_dir(p.parent, tmp):
            p.unlink()
            gone.append("/" + rel)
    if gone:
        log(f"host identity removed: {', '.join(gone)}")
    if any(g.startswith("/etc/ssh/") for g in gone):
        log("ssh host keys removed: run `ssh-keygen -A` inside the guest before starting sshd")


def _lock_passwords(tmp: Path, log: Log) -> None:
    """Replace every password hash with '!' (locked).

    A copy of the host's /etc/shadow would let the guest's root read the
    host's hashes and crack them offline, and would let anyone who knows a
    host password log into the guest. '!' alone, rather than '!' in front of
    the hash, is what keeps the hash itself out of the guest; an empty
    field (no password at all) is locked too. Fields that hold no hash
    ('*', '!', '!!') are left as they are.
    """
    locked = 0
    for rel, field in (("etc/shadow", 1), ("etc/shadow-", 1), ("etc/gshadow", 1),
                       ("etc/gshadow-", 1), ("etc/passwd", 1), ("etc/passwd-", 1)):
        path = tmp / rel
        if not path.is_file() or path.is_symlink() or not _is_real_dir(path.parent, tmp):
            continue
        n = _lock_file(path, field, keep=("x",) if rel.startswith("etc/passwd") else ())
        if rel == "etc/shadow":
            locked = n
    opasswd = tmp / "etc/security/opasswd"
    if opasswd.is_file() and not opasswd.is_symlink():
        # pam_pwhistory's store of old hashes: the same leak as shadow.
        _truncate(opasswd)
    log(
        f"locked {locked} password(s) in /etc/shadow so the host's hashes cannot be used or "
        "read in the guest; set new ones inside the guest with passwd"
    )


def _lock_file(path: Path, field: int, keep: tuple[str, ...]) -> int:
    """Lock the password FIELD of each line of PATH in place; return how many changed.

    Rewritten through the same inode so the file keeps its owner, mode and
    xattrs (shadow is root:shadow 0640 on Debian).
    """
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "r+b") as f:
        lines = f.read().split(b"\n")
        changed = 0
        for i, line in enumerate(lines):
            parts = line.split(b":")
            if len(parts) <= field or line.startswith(b"#"):
                continue
            pw = parts[field]
            # Keep what holds no hash: '*', '!', '!!', '!*', and passwd's 'x'.
            # A hash behind '!' (usermod -L) is removed like any other.
            if pw.decode("utf-8", "surrogateescape") in keep or (pw and not pw.strip(b"!*")):
                continue
            parts[field] = b"!"
            lines[i] = b":".join(parts)
            changed += 1
        if changed:
            f.seek(0)
            f.write(b"\n".join(lines))
            f.truncate()
    return changed


def _truncate(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    os.close(fd)


# --- busybox -----------------------------------------------------------------------


def _find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.is_file():
            if not is_static_elf(candidate):
                raise BuildError(
                    f"{candidate} is dynamically linked and would not run inside a guest "
                    "without the host's libraries: apt-get install busybox-static"
                )
            return candidate
    raise BuildError(
        f"no busybox found ({', '.join(map(str, BUSYBOX_CANDIDATES))}): "
        "apt-get install busybox-static"
    )


def is_static_elf(path: Path) -> bool:
    """True if PATH is an ELF executable without a PT_INTERP program header.

    PT_INTERP names the dynamic loader; without one the kernel starts the
    program directly, so it needs nothing from the guest's /lib (static-pie
    binaries have a PT_DYNAMIC but no PT_INTERP, and count as static).
    """
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != _ELF_MAGIC:
            raise BuildError(f"{path} is not an ELF file")
        order = {1: "<", 2: ">"}.get(ident[5])
        # Elf32_Ehdr / Elf64_Ehdr after e_ident: type, machine, version,
        # entry, phoff, shoff, flags, ehsize, phentsize, phnum, ...
        body = {1: "HHIIIIIHHHHHH", 2: "HHIQQQIHHHHHH"}.get(ident[4])
        if order is None or body is None:
            raise BuildError(f"{path}: unknown ELF class or byte order")
        fmt = order + body
        raw = f.read(struct.calcsize(fmt))
        if len(raw) != struct.calcsize(fmt):
            raise BuildError(f"{path}: truncated ELF header")
        fields = struct.unpack(fmt, raw)
        phoff, phentsize, phnum = fields[4], fields[8], fields[9]
        if phnum == 0xFFFF or phentsize < 4:
            # PN_XNUM (the count lives in section 0) never occurs in real
            # executables; refuse rather than guess.
            raise BuildError(f"{path}: unusual ELF program header table")
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p = f.read(4)
            if len(p) != 4:
                raise BuildError(f"{path}: truncated ELF program header")
            if struct.unpack(order + "I", p)[0] == _PT_INTERP:
                return False
    return True


def _build_busybox(tmp: Path, log: Log, busybox: Path, hostname: str) -> None:
    for rel, mode in (
        ("bin", 0o755), ("sbin", 0o755), ("usr", 0o755), ("usr/bin", 0o755),
        ("usr/sbin", 0o755), ("etc", 0o755), ("etc/init.d", 0o755), ("etc/rc0.d", 0o755),
        ("etc/rc3.d", 0o755), ("etc/rc6.d", 0o755), ("dev", 0o755), ("proc", 0o555),
        ("sys", 0o555), ("tmp", 0o1777), ("run", 0o755), ("var", 0o755),
        ("var/run", 0o755), ("var/log", 0o755), ("var/www", 0o755), ("root", 0o700),
        ("home", 0o755), ("mnt", 0o755),
    ):
        _ensure_dir(tmp, rel, mode)
    _ensure_dir(tmp, "home/guest", 0o755, uid=1000, gid=1000)

    shutil.copyfile(busybox, tmp / "bin/busybox")
    os.chmod(tmp / "bin/busybox", 0o755)  # noqa: S103 (every guest user runs it)
    applets = _run([str(busybox), "--list-full"]).split()
    linked = 0
    for applet in applets:
        parts = applet.split("/")
        if applet.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise BuildError(f"busybox --list-full gave an odd applet path {applet!r}")
        link = tmp.joinpath(*parts)
        if applet == "bin/busybox" or os.path.lexists(link):
            continue
        for i in range(1, len(parts)):
            _ensure_dir(tmp, "/".join(parts[:i]), 0o755)
        # Relative, so the link means the same from the host (tests, the
        # agent looking at ROOT/bin/sh) as from inside the guest.
        os.symlink(os.path.relpath("bin/busybox", os.path.dirname(applet) or "."), link)
        linked += 1
    log(f"busybox: {busybox} copied, {linked} applets linked")

    for rel, text, mode in _busybox_etc(hostname):
        _write_tree_file(tmp, rel, text, mode)
    _write_tree_file(tmp, "var/www/index.html",
                     f"<!doctype html>\n<title>{hostname}</title>\n<p>{hostname} is up.</p>\n",
                     0o644)
    for script, level, order in (("syslogd", "3", "S10"), ("httpd", "3", "S20"),
                                 ("httpd", "0", "K80"), ("syslogd", "0", "K90"),
                                 ("httpd", "6", "K80"), ("syslogd", "6", "K90")):
        os.symlink(f"../init.d/{script}", tmp / f"etc/rc{level}.d/{order}{script}")


def _busybox_etc(hostname: str) -> list[tuple[str, str, int]]:
    """(path, content, mode) of every file the busybox guest's /etc needs."""
    return [
        ("etc/passwd",
         "root:x:0:0:root:/root:/bin/sh\n"
         "guest:x:1000:1000:guest:/home/guest:/bin/sh\n"
         "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644),
        ("etc/group", "root:x:0:\nguest:x:1000:\nnogroup:x:65534:\n", 0o644),
        # Locked: root in the guest logs in with `vserver NAME enter`, and
        # `passwd` inside sets a password if one is wanted.
        ("etc/shadow",
         "".join(":".join([user, pw, "", "", "", "", "", "", ""]) + "\n"
                 for user, pw in (("root", "!"), ("guest", "!"), ("nobody", "*"))),
         0o600),
        ("etc/shells", "/bin/sh\n/bin/ash\n", 0o644),
        ("etc/hostname", hostname + "\n", 0o644),
        ("etc/hosts",
         f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
         "::1\tlocalhost ip6-localhost ip6-loopback\n", 0o644),
        ("etc/profile",
         "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
         "umask 022\n"
         "if [ \"$(id -u)\" = 0 ]; then PS1='\\u@\\h:\\w# '; else PS1='\\u@\\h:\\w$ '; fi\n"
         "export PS1\n", 0o644),
        ("etc/fstab",
         "# vpanel busybox guest: the host mounts /proc, /sys and /dev at start.\n", 0o644),
        ("etc/inittab", _INITTAB, 0o644),
        ("etc/init.d/rc", _RC, 0o755),
        ("etc/init.d/syslogd",
         _service("syslogd", "busybox system logger, writes /var/log/messages",
                  "/sbin/syslogd", "-n"), 0o755),
        ("etc/init.d/httpd",
         _service("httpd", "busybox web server for /var/www on port 80",
                  "/usr/sbin/httpd", "-f -p 80 -h /var/www"), 0o755),
    ]


# busybox init reads this when it runs as the guest's pid 1 (the fakeinit
# flag). No getty lines: the guest's ttys are not the host's to take.
_INITTAB = """\
# /etc/inittab for busybox init as the guest's pid 1 (written by vpanel).
# Enter the guest with `vserver NAME enter`; no getty runs on any tty.
::sysinit:/etc/init.d/rc 3
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rc 0
::restart:/sbin/init
"""

_RC = """\
#!/bin/sh
# /etc/init.d/rc N: enter SysV runlevel N (written by vpanel).
# Runs /etc/rcN.d/K* with "stop", then /etc/rcN.d/S* with "start", in name
# order. Runlevels 0 (halt) and 6 (reboot) only stop things, so their S*
# scripts get "stop" as well, as in Debian's sysv-rc.
PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PATH
umask 022

case "${1-}" in
[0-6]) runlevel=$1 ;;
*) echo "usage: $0 RUNLEVEL (0-6)" >&2; exit 2 ;;
esac

dir=/etc/rc$runlevel.d
status=0
[ -d "$dir" ] || exit 0

for script in "$dir"/K*; do
	[ -x "$script" ] || continue
	"$script" stop || status=1
done

case "$runlevel" in
0|6) action=stop ;;
*) action=start ;;
esac
for script in "$dir"/S*; do
	[ -x "$script" ] || continue
	"$script" "$action" || status=1
done
exit $status
"""


def _service(name: str, what: str, daemon: str, args: str) -> str:
    """A start|stop|restart|status script for a busybox daemon run in the foreground."""
    return f"""\
#!/bin/sh
# /etc/init.d/{name}: {what} (written by vpanel).
# start|stop|restart|status; pidfile /var/run/{name}.pid, output in
# /var/log/{name}.log. status exits 0 when running, 3 when not (LSB).
NAME={name}
DAEMON={daemon}
PIDFILE=/var/run/{name}.pid
LOGFILE=/var/log/{name}.log
PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PATH

running() {{
	[ -r "$PIDFILE" ] || return 1
	pid=$(cat "$PIDFILE" 2>/dev/null)
	case "$pid" in
	''|*[!0-9]*) return 1 ;;
	esac
	kill -0 "$pid" 2>/dev/null || return 1
	# A pidfile left from an earlier run of the guest can name a live but
	# unrelated process; where /proc is mounted, the name must match too.
	if [ -r "/proc/$pid/comm" ]; then
		[ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$NAME" ] || return 1
	fi
	return 0
}}

start() {{
	if running; then
		echo "$NAME is already running"
		return 0
	fi
	rm -f "$PIDFILE"
	echo "Starting $NAME"
	# Foreground daemon under "&": $! is the daemon itself, so the pidfile
	# needs no help from it. Output goes to a file, never to whoever ran rc:
	# a daemon holding the caller's pipe open would make it wait forever.
	$DAEMON {args} </dev/null >>"$LOGFILE" 2>&1 &
	echo $! >"$PIDFILE"
	# A daemon that cannot start (httpd finding port 80 taken) exits at
	# once; look again after a moment so that failure is reported.
	usleep 200000
	if ! running; then
		rm -f "$PIDFILE"
		echo "$NAME failed to start, see $LOGFILE" >&2
		return 1
	fi
	return 0
}}

stop() {{
	if ! running; then
		rm -f "$PIDFILE"
		echo "$NAME is not running"
		return 0
	fi
	pid=$(cat "$PIDFILE")
	echo "Stopping $NAME"
	kill -TERM "$pid" 2>/dev/null
	n=0
	while kill -0 "$pid" 2>/dev/null; do
		n=$((n + 1))
		if [ "$n" -ge 50 ]; then
			kill -KILL "$pid" 2>/dev/null
			break
		fi
		usleep 100000
	done
	rm -f "$PIDFILE"
	return 0
}}

status() {{
	if running; then
		echo "$NAME is running (pid $(cat "$PIDFILE"))"
		return 0
	fi
	echo "$NAME is not running"
	return 3
}}

case "${{1-}}" in
start) start ;;
stop) stop ;;
restart) stop && start ;;
status) status ;;
*) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
"""


# --- rootfs ---------------------------------------------------------------------------


def _build_rootfs(tmp: Path, log: Log, src: Path) -> None:
    if src.is_dir():
        log(f"rootfs: copying the directory {src}")
        # "SRC/." copies the contents into the existing temporary root; -x
        # keeps out whatever is mounted in SRC (a running guest's /proc).
        _run(["cp", "-ax", "--reflink=auto", "--", f"{src}/.", str(tmp)])
        _drop_device_nodes(tmp, log)
    else:
        _extract_tarball(src, tmp, log)
    for rel in _MOUNT_POINTS:
        if not os.path.lexists(tmp / rel):
            _ensure_dir(tmp, rel, 0o1777 if rel == "tmp" else 0o755)
            log(f"rootfs: created the missing mount point /{rel}")


def _drop_device_nodes(tmp: Path, log: Log) -> None:
    """Remove device nodes: the guest's /dev is a tmpfs made at start, and a node
    left anywhere else in the tree would give the guest a door to host hardware.
    """
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if stat.S_ISCHR(os.lstat(p).st_mode) or stat.S_ISBLK(os.lstat(p).st_mode):
                os.unlink(p)
                log(f"rootfs: removed device node /{os.path.relpath(p, tmp)}")


def _extract_tarball(src: Path, tmp: Path, log: Log) -> None:
    """Extract the tarball SRC into TMP, refusing members that would escape it.

    Streaming, so a tarball is read once and never needs to fit in memory
    or be seekable. The compression is told by its magic number, not the
    file name, and undone here rather than by tarfile's 'r|*': tarfile's own
    stream reader never checks gzip's CRC, and going through _Tail lets the
    end of the archive be checked (see _check_end).
    """
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(src, "rb"))
        magic = raw.read(6)
        raw.seek(0)
        reader: _Readable
        if magic.startswith(b"\x1f\x8b"):
            kind, reader = "gzip", stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif magic.startswith(b"BZh"):
            kind, reader = "bzip2", stack.enter_context(bz2.BZ2File(raw))
        elif magic.startswith(b"\xfd7zXZ\x00"):
            kind, reader = "xz", stack.enter_context(lzma.LZMAFile(raw))
        elif magic.startswith(_ZSTD_MAGIC):
            # Frames after the first are part of the stream: `zstd -T0` and
            # pzstd write several.
            kind, reader = "zstd", stack.enter_context(
                zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            )
        else:
            kind, reader = "uncompressed", raw
        log(f"rootfs: extracting {src} ({kind})")
        tail = _Tail(reader)
        with tarfile.open(fileobj=tail, mode="r|") as tar:
            _Extractor(tar, tmp, log).run()
            _check_end(tar, tail)
        # Read what follows the end marker (padding, then the compressor's
        # trailer): gzip checks its CRC, and xz and zstd their checksums,
        # only when the end of the stream is reached.
        while tail.read(1 << 16):
            pass


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


_TAR_BLOCK = 512


class _Tail:
    """A read-only stream that remembers the last bytes it handed out.

    tarfile stops without a word at the first block that is not a valid
    header, or at the end of the data, as if the archive had ended there;
    a damaged or cut tarball would become a guest with files missing. With
    this window, _check_end can look at the block tarfile stopped on.
    """

    _WINDOW = 1 << 18  # far more than tarfile's read-ahead (RECORDSIZE, 10 KiB)

    def __init__(self, src: _Readable) -> None:
        self.src = src
        self.pos = 0
        self.window = bytearray()
        self.window_start = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self.src.read(size)
        self.pos += len(data)
        self.window += data
        excess = len(self.window) - self._WINDOW
        if excess > 0:
            del self.window[:excess]
            self.window_start += excess
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The 512 bytes at OFFSET if they were read and are still held, else None."""
        i = offset - self.window_start
        if i < 0:
            return None
        block = bytes(self.window[i : i + _TAR_BLOCK])
        if len(block) < _TAR_BLOCK:
            # Not read yet: read on, which is how a missing end shows itself.
            more = self.read(_TAR_BLOCK - len(block))
            block += more
        return block if len(block) == _TAR_BLOCK else None

    def write(self, b: bytes, /) -> int:
        raise io.UnsupportedOperation("read-only")

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("not seekable")

    def close(self) -> None:
        """The underlying file belongs to the caller's ExitStack."""


def _check_end(tar: tarfile.TarFile, tail: _Tail) -> None:
    """Refuse an archive that stopped anywhere but at its end-of-archive marker.

    After the last member tarfile's offset is the block it stopped on; in a
    whole archive that block is zeros (POSIX ends an archive with two).
    """
    block = tail.block_at(tar.offset)
    if block is None:
        raise BuildError(
            f"the tarball ends at byte {tar.offset} without its end-of-archive marker: "
            "it is truncated"
        )
    if block.strip(b"\0"):
        raise BuildError(f"the tarball has a damaged header at byte {tar.offset}")


class _Extractor:
    """Our own extraction, member by member, with the checks done before each write.

    This is the "filter" the build needs, but it cannot be a `filter=`
    callable: the Python here (Debian 12's 3.11.2) predates PEP 706's
    filters (3.11.4), and even with them tarfile opens an existing name
    with open(..., "wb"), following a symlink an earlier member left there,
    and hard-links with os.link(), which follows a symlink target. The
    built-in 'data' filter would also strip setuid bits and refuse absolute
    symlinks, both normal in a root filesystem. So:

    - member names: a leading '/' is removed, as GNU tar does; '.' and empty
      components are dropped; '..' is applied to the real path walked so far
      and refused if it would climb above the root;
    - the directories above a member are walked one by one in the new tree.
      A symlink met there is followed only if it is relative and stays
      inside the root, i.e. only if it means the same thing seen from the
      host as seen from inside the guest. An absolute symlink in a member's
      path (`escape -> /`, then `escape/tmp/x`) is refused: it is the classic
      way to make an extractor write on the host, and tar never produces a
      member below a symlink from a real tree;
    - the final name is unlinked if it exists and is not a directory, then
      created with O_EXCL|O_NOFOLLOW, so no earlier symlink is written through;
    - symlink members are created as they are, absolute targets included
      (they are resolved inside the guest at run time);
    - hard-link targets are resolved the same way and linked without
      following a final symlink (linkat(2) without AT_SYMLINK_FOLLOW);
    - device nodes are skipped with a log line; owners are the numeric ids
      in the archive (the host's user names mean nothing to the guest);
      modes keep setuid/setgid/sticky; mtimes are kept; directories get
      their attributes last, deepest first, so later members do not disturb
      their mtimes.

    Only this process writes into the temporary tree (mode 0755 in a parent
    only root may enter), so what is checked with lstat stays true until the
    write that follows.
    """

    def __init__(self, tar: tarfile.TarFile, root: Path, log: Log) -> None:
        self.tar = tar
        self.root = root
        self.log = log
        self.dirs: list[tuple[Path, tarfile.TarInfo]] = []
        self.stripped = False
        self.xattr_dropped: set[str] = set()

    def run(self) -> None:
        count = 0
        for member in self.tar:
            try:
                self._extract(member)
            except OSError as e:
                raise BuildError(f"member {member.name!r}: {e}") from e
            count += 1
        for path, member in sorted(self.dirs, key=lambda d: len(d[0].parts), reverse=True):
            self._set_attrs(path, member)
        self.log(f"rootfs: {count} members extracted")

    def _refuse(self, member: tarfile.TarInfo, why: str) -> BuildError:
        return BuildError(f"refusing tarball member {member.name!r}: {why}")

    def _parts(self, name: str, member: tarfile.TarInfo) -> list[str]:
        if name.startswith("/") and not self.stripped:
            self.log("rootfs: removing leading '/' from member names, as GNU tar does")
            self.stripped = True
        return [p for p in name.split("/") if p not in ("", ".")]

    def _resolve_dir(self, parts: list[str], member: tarfile.TarInfo, *, create: bool) -> Path:
        """The real directory PARTS names inside the root, walked as described above."""
        resolved: list[str] = []
        pending = collections.deque(parts)
        links = 0
        while pending:
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    raise self._refuse(member, "its path leaves the root through '..'")
                resolved.pop()
                continue
            here = self.root.joinpath(*resolved, part)
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                if not create:
                    raise self._refuse(
                        member, f"/{'/'.join([*resolved, part])} does not exist"
                    ) from None
                # Like tar, make the directories an archive leaves implicit.
                os.mkdir(here, 0o755)
                os.chmod(here, 0o755)  # noqa: S103 (tar's default for implicit dirs)
                resolved.append(part)
                continue
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(here)
                if target.startswith("/"):
                    raise self._refuse(
                        member,
                        f"/{'/'.join([*resolved, part])} is a symlink to {target}; an absolute "
                        "symlink is never written through",
                    )
                links += 1
                if links > _MAXSYMLINKS:
                    raise self._refuse(member, "too many levels of symlinks")
                pending.extendleft(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise self._refuse(member, f"/{'/'.join([*resolved, part])} is not a directory")
            resolved.append(part)
        return self.root.joinpath(*resolved)

    def _extract(self, member: tarfile.TarInfo) -> None:
        parts = self._parts(member.name, member)
        if not parts:
            # "./", the archive's own root: build_root sets its mode itself.
            if member.isdir():
                return
            raise self._refuse(member, "a non-directory in place of the root")
        if parts[-1] == "..":
            raise self._refuse(member, "its name ends in '..'")
        if member.ischr() or member.isblk():
            self.log(f"rootfs: skipped device node {member.name} "
                     "(the guest's /dev is a tmpfs made at start)")
            return
        if not (member.isdir() or member.isreg() or member.issym() or member.islnk()
                or member.isfifo()):
            self.log(f"rootfs: skipped {member.name} of unknown type {member.type!r}")
            return

        parent = self._resolve_dir(parts[:-1], member, create=True)
        target = parent / parts[-1]
        link_src: Path | None = None
        if member.islnk():
            lparts = self._parts(member.linkname, member)
            if not lparts or lparts[-1] == "..":
                raise self._refuse(member, f"hard link to {member.linkname!r}")
            link_src = self._resolve_dir(lparts[:-1], member, create=False) / lparts[-1]
            if link_src == target:
                return
            try:
                lst = os.lstat(link_src)
            except FileNotFoundError:
                raise self._refuse(
                    member, f"hard link to {member.linkname!r}, which is not in the tree"
                ) from None
            if stat.S_ISDIR(lst.st_mode):
                raise self._refuse(member, f"hard link to the directory {member.linkname!r}")

        try:
            existing: os.stat_result | None = os.lstat(target)
        except FileNotFoundError:
            existing = None
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                if existing is not None:
                    os.unlink(target)
                os.mkdir(target, 0o700)
            self.dirs.append((target, member))
            return
        if existing is not None:
            if stat.S_ISDIR(existing.st_mode):
                raise self._refuse(member, "a directory of that name is already in the tree")
            os.unlink(target)

        if link_src is not None:
            # A hard link shares the inode, hence owner, mode and times.
            os.link(link_src, target, follow_symlinks=False)
            return
        if member.issym():
            os.symlink(member.linkname, target)
        elif member.isfifo():
            os.mkfifo(target, 0o600)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                data = self.tar.extractfile(member)
                if data is not None:
                    shutil.copyfileobj(data, out, 1 << 20)
        self._set_attrs(target, member)

    def _set_attrs(self, path: Path, member: tarfile.TarInfo) -> None:
        # chown first: it clears setuid/setgid bits and file capabilities,
        # which chmod and setxattr then put back.
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        if not member.issym():
            os.chmod(path, member.mode & 0o7777)
            self._set_xattrs(path, member)
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def _set_xattrs(self, path: Path, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key.removeprefix("SCHILY.xattr.")
            if not attr.startswith(_XATTR_ALLOWED):
                if attr not in self.xattr_dropped:
                    self.log(f"rootfs: dropped extended attribute {attr} (host-only namespace)")
                    self.xattr_dropped.add(attr)
                continue
            # tarfile decodes pax values as UTF-8 with surrogateescape, so this
            # gives back the archive's bytes (capabilities are binary).
            raw = value.encode("utf-8", "surrogateescape")
            try:
                os.setxattr(path, attr, raw, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.log(f"rootfs: could not set {attr} on {member.name}: {e.strerror}")


# --- debootstrap ---------------------------------------------------------------------


def _build_debootstrap(tmp: Path, log: Log, suite: str, hostname: str) -> None:
    argv = ["debootstrap", "--variant=minbase", suite, str(tmp)]
    mirror = os.environ.get("VPANEL_DEBIAN_MIRROR")
    if mirror:
        if not re.match(r"(https?|file|ftp)://[^\s]+\Z", mirror):
            raise BuildError(f"VPANEL_DEBIAN_MIRROR={mirror!r} is not a URL")
        argv.append(mirror)
    try:
        _run_streamed(argv, log)
    except BuildError as e:
        # debootstrap points at its log, which goes with the temporary tree.
        detail = _tail(tmp / "debootstrap/debootstrap.log", 20)
        if detail:
            raise BuildError(f"{e}\n--- debootstrap.log (end) ---\n{detail}") from e
        raise
    _guestize(tmp, log, hostname)


# --- small helpers ------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    """Run ARGV; return its stdout. BuildError with its stderr if it fails."""
    try:
        done = subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise BuildError(f"{argv[0]} is not installed") from e
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode("utf-8", "replace").strip()[-4000:]
        raise BuildError(f"{shlex.join(argv)} failed (exit {e.returncode}): {err}") from e
    return done.stdout.decode("utf-8", "surrogateescape")


def _run_streamed(argv: list[str], log: Log) -> None:
    """Run ARGV, passing each line it prints to LOG as it comes.

    For debootstrap, which takes minutes: the caller sees progress instead
    of silence. The same contract as _run (BuildError with the end of its
    output on failure) without subprocess.run's check=True, which would only
    report once the output is already lost. It runs in its own session so
    that, when the build is interrupted, its whole process group (wget,
    dpkg, chroot) can be stopped before the temporary tree is removed.
    """
    tail: collections.deque[str] = collections.deque(maxlen=30)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except FileNotFoundError as e:
        raise BuildError(f"{argv[0]} is not installed") from e
    with proc:
        try:
            if proc.stdout is not None:
                for raw in proc.stdout:
                    line = raw.decode("utf-8", "replace").rstrip()
                    tail.append(line)
                    log(line)
            rc = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    if rc != 0:
        raise BuildError(f"{shlex.join(argv)} failed (exit {rc}):\n" + "\n".join(tail))


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read()[-16384:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _is_real_dir(path: Path, top: Path | None = None) -> bool:
    """PATH is a directory, not a symlink, and so is every directory between TOP and it."""
    if top is not None and path != top:
        rel = path.relative_to(top)
        for i in range(1, len(rel.parts)):
            if not _is_real_dir(top.joinpath(*rel.parts[:i])):
                return False
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _checked_parent(tmp: Path, rel: str) -> Path:
    """TMP/REL's parent, after checking every directory on the way is a real one."""
    parts = rel.split("/")
    here = tmp
    for part in parts[:-1]:
        here = here / part
        if not _is_real_dir(here):
            raise BuildError(f"/{rel}: /{here.relative_to(tmp)} is not a real directory")
    return here


def _ensure_dir(tmp: Path, rel: str, mode: int, *, uid: int = 0, gid: int = 0) -> None:
    """Create TMP/REL with MODE and owner if missing; an existing one is left as it is."""
    path = _checked_parent(tmp, rel) / rel.rsplit("/", 1)[-1]
    if os.path.lexists(path):
        if not _is_real_dir(path):
            raise BuildError(f"/{rel} exists and is not a directory")
        return
    os.mkdir(path, 0o700)
    os.chown(path, uid, gid)
    os.chmod(path, mode)  # after chown, and explicit: mkdir's mode is cut by the umask


def _write_tree_file(tmp: Path, rel: str, text: str | bytes, mode: int) -> None:
    """Write TMP/REL (root-owned, MODE), replacing what is there without following it."""
    path = _checked_parent(tmp, rel) / rel.rsplit("/", 1)[-1]
    if os.path.lexists(path):
        if _is_real_dir(path):
            raise BuildError(f"/{rel} is a directory")
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchown(f.fileno(), 0, 0)
        os.fchmod(f.fileno(), mode)
        f.write(text.encode("utf-8") if isinstance(text, str) else text)


def _tree_dir(tmp: Path, rel: str) -> str | None:
    """REL as a real directory inside TMP, symlinks resolved as the guest would see them.

    A usr-merged tree (a rootfs tarball, debootstrap) has /sbin -> usr/sbin: the
    link is read, never followed on the host, and its target taken relative to
    TMP, so it cannot lead out of the tree. None if REL leads nowhere usable.
    A missing top-level directory is made.
    """
    path = "/" + rel
    for _ in range(_MAXSYMLINKS):
        inner = path.lstrip("/")
        if not inner:
            return None
        p = tmp / inner
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if "/" in inner:
                return None
            _ensure_dir(tmp, inner, 0o755)
            return inner
        if stat.S_ISDIR(st.st_mode):
            return inner if _is_real_dir(p, tmp) else None
        if not stat.S_ISLNK(st.st_mode):
            return None
        path = "/" + posixpath.normpath(
            posixpath.join(posixpath.dirname(path), os.readlink(p))).lstrip("/")
    return None


def _install_vreboot(tmp: Path, log: Log) -> None:
    """/sbin/vreboot and /sbin/vhalt (a symlink to it), as the seed's build added them.

    The client of the reboot manager (hostagent/rebootmgr.py), compiled static
    for guests by hostagent.guestbin. Without a compiler the build goes on with
    a warning: guests can still end themselves with their own reboot(2).
    """
    from hostagent import guestbin

    try:
        data = guestbin.vreboot_binary().read_bytes()
    except (guestbin.GuestBinError, OSError) as e:
        _LOG.warning("/sbin/vreboot not installed: %s", e)
        log(f"warning: /sbin/vreboot and /sbin/vhalt not installed: {e}")
        return
    sbin = _tree_dir(tmp, "sbin")
    if sbin is None:
        _LOG.warning("/sbin/vreboot not installed: /sbin is not a directory in %s", tmp)
        log("warning: /sbin/vreboot and /sbin/vhalt not installed: /sbin leads to no "
            "directory inside the tree")
        return
    _write_tree_file(tmp, f"{sbin}/vreboot", data, 0o755)
    vhalt = _checked_parent(tmp, f"{sbin}/vhalt") / "vhalt"
    if os.path.lexists(vhalt):
        if _is_real_dir(vhalt):
            raise BuildError(f"/{sbin}/vhalt is a directory")
        os.unlink(vhalt)
    os.symlink("vreboot", vhalt)
    log(f"installed /{sbin}/vreboot and /{sbin}/vhalt (the reboot manager's client)")


def _write_build_note(tmp: Path, method: str, source: str | None, log: Log) -> None:
    """/etc/vpanel-guest: how this tree was made, for whoever debugs it later."""
    if not _is_real_dir(tmp / "etc"):
        log("no /etc directory in the tree: /etc/vpanel-guest not written")
        return
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = (
        "# Written by vpanel when this tree was built; for debugging only.\n"
        f"method={method}\n"
        + (f"source={source}\n" if source is not None else "")
        + f"built={now}\n"
    )
    _write_tree_file(tmp, "etc/vpanel-guest", text, 0o644)


# --- removal ---------------------------------------------------------------------------------


def _discard(tmp: Path, log: Log) -> None:
    """Remove a failed build's temporary tree; never raises, so the build's error shows."""
    try:
        # debootstrap mounts /proc and /sys in its target and, if killed,
        # may not get to unmount them; they are ours to detach.
        for mount in reversed(_mounts_under(os.path.realpath(tmp))):
            umount2(mount, MNT_DETACH | UMOUNT_NOFOLLOW)
        _remove_tree(tmp, clear_parent_flags=False)
        log(f"removed the unfinished tree {tmp}")
    except Exception as e:
        log(f"could not remove the unfinished tree {tmp}: {e}; remove it by hand")


def _mounts_under(path: str) -> list[str]:
    """Mount points at or below PATH in this mount namespace, shallowest first."""
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) < 5:
                continue
            # Field 5 is the mount point, with space, tab, newline and
            # backslash written as octal escapes (fs/proc_namespace.c).
            point = os.fsdecode(
                re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            )
            if point == path or point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: (p.count("/"), p))


@dataclass
class _Frame:
    name: str  # in its parent
    path: str  # for messages only; never resolved
    names: list[str]  # entries still to remove
    ino: int


def _remove_tree(top: Path, *, clear_parent_flags: bool) -> None:
    """Remove the directory TOP and everything below it, on TOP's filesystem only."""
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"{top} is not a directory")
    parent_fd = os.open(top.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _remove_dir_at(parent_fd, top.name, str(top), st.st_dev, clear_holder=clear_parent_flags)
    finally:
        os.close(parent_fd)


def _open_dir_at(dfd: int, name: str, path: str, dev: int, ino: int) -> int:
    """Open directory NAME in DFD without following a symlink; check it is the one expected."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dev, ino):
        os.close(fd)
        raise BuildError(f"{path} changed while it was being removed; is the guest stopped?")
    return fd


def _remove_dir_at(dfd: int, name: str, path: str, dev: int, *, clear_holder: bool) -> None:
    """Remove directory NAME (in the directory open as DFD) and its contents.

    Iterative, holding one directory descriptor at a time and climbing back
    with openat("..") checked against the inode seen on the way down, as
    fts(3) does: a tree of any depth neither exhausts Python's recursion
    limit nor RLIMIT_NOFILE, and every call is relative to a descriptor, so
    no path is ever resolved through a symlink. A directory on another
    device (a mount the mountinfo check missed, a btrfs subvolume) stops the
    removal.
    """
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if st.st_dev != dev:
        raise BuildError(f"{path} is on another filesystem; not crossing into it")
    fd = _open_dir_at(dfd, name, path, dev, st.st_ino)
    try:
        frames = [_Frame(name, path, os.listdir(fd), st.st_ino)]
        while frames:
            frame = frames[-1]
            if frame.names:
                child = frame.names.pop()
                cpath = f"{frame.path}/{child}"
                cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(cst.st_mode):
                    _unlink_at(fd, child, cpath, is_dir=False, clear_holder=True)
                    continue
                if cst.st_dev != dev:
                    raise BuildError(f"{cpath} is on another filesystem; not crossing into it")
                child_fd = _open_dir_at(fd, child, cpath, dev, cst.st_ino)
                os.close(fd)
                fd = child_fd
                frames.append(_Frame(child, cpath, os.listdir(fd), cst.st_ino))
                continue
            frames.pop()
            if not frames:
                break
            up = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            ust = os.fstat(up)
            os.close(fd)
            fd = up
            if (ust.st_dev, ust.st_ino) != (dev, frames[-1].ino):
                raise BuildError(
                    f"{frames[-1].path} moved while it was being removed; is the guest stopped?"
                )
            _unlink_at(fd, frame.name, frame.path, is_dir=True, clear_holder=True)
    finally:
        os.close(fd)
    _unlink_at(dfd, name, path, is_dir=True, clear_holder=clear_holder)


def _unlink_at(dfd: int, name: str, path: str, *, is_dir: bool, clear_holder: bool) -> None:
    """unlinkat(2) NAME; on EPERM clear immutable/append-only flags and retry once.

    EPERM (not EACCES) from unlink or rmdir as root means the entry is
    immutable or append-only, or the directory holding it is (fs/namei.c
    may_delete); both are cleared. CLEAR_HOLDER is false only for the
    directory above the tree, which is the host's and not ours to change.
    """
    def attempt() -> None:
        if is_dir:
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)

    try:
        attempt()
        return
    except PermissionError as e:
        if e.errno != errno.EPERM:
            raise
        cleared = _clear_flags_at(dfd, name)
        if clear_holder:
            cleared = _clear_flags_fd(dfd) or cleared
        if not cleared:
            raise BuildError(f"cannot remove {path}: {e.strerror}") from e
    attempt()


def _clear_flags_at(dfd: int, name: str) -> bool:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    # Only regular files and directories carry the flags (chattr refuses the
    # rest), and opening a device node or FIFO to ask could have effects.
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return False
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
                 dir_fd=dfd)
    try:
        return _clear_flags_fd(fd)
    finally:
        os.close(fd)


def _clear_flags_fd(fd: int) -> bool:
    """Clear FS_IMMUTABLE_FL and FS_APPEND_FL on FD; True if one was set."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        flags: int = struct.unpack("I", buf)[0]
        if not flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
            return False
        fcntl.ioctl(fd, FS_IOC_SETFLAGS,
                    struct.pack("I", flags & ~(FS_IMMUTABLE_FL | FS_APPEND_FL)))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    return True
