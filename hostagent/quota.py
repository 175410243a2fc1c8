"""Disk quota per guest (the seed's "per context disk quota", its future work).

On btrfs, the layout this project recommends for $VSERVER_ROOTDIR, each
guest's own data lives in a subvolume of its own (a plain guest's whole
tree, or a unified guest's overlay upper layer) with a qgroup limit on its
*exclusive* bytes: a unified guest is charged only for what it changed, and
blocks it shares with the template or with other guests are not counted.

Where the kernel has XFS or ext4 project quotas and $VSERVER_ROOTDIR is
mounted with them (hostagent/projquota.py, detected at run time), the same
tree carries a project id, the guest's context id, with a block limit on
it. This project's own hosts lack both (their kernels are built without
CONFIG_XFS_QUOTA and CONFIG_QFMT_V2); what remains there is a fixed-size
filesystem image per guest, loop-mounted at its root (OpenVZ's ploop did the
same), chosen explicitly with DISK_LIMIT_MODE="image" since it costs the
whole size up front on some filesystems and a copy at build. Without any of
these, a DISK_LIMIT is refused, saying what was checked and why each is
missing: a limit is never silently ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hostagent import projquota

__all__ = [
    "BTRFS_QGROUP",
    "PROJECT_QUOTA",
    "QuotaError",
    "Usage",
    "assign_project",
    "clear_project",
    "delete_subvolume",
    "filesystem_of",
    "has_own_limit",
    "image_path",
    "image_usage",
    "is_subvolume",
    "make_subvolume",
    "method",
    "mount_image",
    "move_into_image",
    "project_of",
    "set_limit",
    "subvolume_id",
    "support",
    "usage",
    "usages",
]


class QuotaError(RuntimeError):
    pass


@dataclass(frozen=True)
class _Mount:
    point: str
    dev: str  # major:minor of its filesystem, the same for each subvolume of a btrfs
    fstype: str


def _mounts() -> list[_Mount]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            out.append(_Mount(fields[4].replace("\\040", " "), fields[2], right.split()[0]))
    return out


def _mount_of(path: Path, mounts: list[_Mount]) -> _Mount | None:
    """The mount PATH is on: the longest mount point above it (the last mounted, if tied)."""
    real = os.path.realpath(path)
    best: _Mount | None = None
    for m in mounts:
        inside = real == m.point or real.startswith(m.point.rstrip("/") + "/")
        if inside and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def filesystem_of(path: Path) -> str:
    """The filesystem type PATH is on, from the longest mount point above it."""
    m = _mount_of(path, _mounts())
    return "" if m is None else m.fstype


BTRFS_QGROUP = "btrfs-qgroup"
PROJECT_QUOTA = "project-quota"


def _btrfs_support(path: Path) -> str | None:
    fstype = filesystem_of(path)
    if fstype != "btrfs":
        return f"{path} is on {fstype or 'an unknown filesystem'}, not btrfs"
    if shutil.which("btrfs") is None:
        return "the btrfs command is missing: apt-get install btrfs-progs"
    return None


def method(path: Path) -> tuple[str | None, str | None]:
    """How a DISK_LIMIT is enforced for guests under PATH, and why not if it cannot be.

    (BTRFS_QGROUP, None) on btrfs; else (PROJECT_QUOTA, None) where the
    kernel enforces XFS or ext4 project quota there; else (None, why), with
    each way checked and the reason it is missing. The image mode is never
    chosen here: it is asked for (DISK_LIMIT_MODE="image").
    """
    why_btrfs = _btrfs_support(path)
    if why_btrfs is None:
        return BTRFS_QGROUP, None
    why_project = projquota.supported(path)
    if why_project is None:
        return PROJECT_QUOTA, None
    return None, (f"per-guest disk limits need $VSERVER_ROOTDIR on btrfs (qgroups) or on XFS "
                  f"or ext4 with project quota; btrfs: {why_btrfs}; project quota: "
                  f"{why_project} (docs/storage.md)")


def support(path: Path) -> str | None:
    """None if a disk limit can be enforced for guests under PATH, else why not."""
    return method(path)[1]


def project_of(path: Path, fstype: str | None = None) -> int | None:
    """The project id of the guest tree at PATH, if it was given one of its own.

    On XFS or ext4 only (FSTYPE: PATH's, if the caller knows it), and only
    when PATH's directory hands its id on (PROJINHERIT) and did not inherit
    it from the directory above: a host that keeps all of $VSERVER_ROOTDIR in
    one project of its own makes no guest look limited by it.
    """
    if (fstype or filesystem_of(path)) not in projquota.FSTYPES:
        return None
    pid = projquota.project_of(path)
    if pid is None or projquota.project_of(path.parent) == pid:
        return None
    return pid


def has_own_limit(path: Path) -> bool:
    """Whether the guest tree at PATH has a disk limit of its own: a btrfs
    subvolume (its qgroup) or a project id of its own."""
    return is_subvolume(path) or project_of(path) is not None


def assign_project(path: Path, project_id: int) -> None:
    """Put every inode of the guest tree at PATH into project PROJECT_ID, its
    directories handing it on to what is created in them later."""
    try:
        projquota.assign(path, project_id)
    except (projquota.ProjQuotaError, OSError) as e:
        raise QuotaError(str(e)) from e


def clear_project(path: Path, project_id: int) -> None:
    """Lift project PROJECT_ID's limit on the filesystem of PATH (a deleted guest's:
    its context number may be reused by another guest)."""
    try:
        projquota.clear_limit(path, project_id)
    except (projquota.ProjQuotaError, OSError) as e:
        raise QuotaError(str(e)) from e


def _btrfs(*args: str) -> str:
    res = subprocess.run(["btrfs", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise QuotaError(f"btrfs {' '.join(args)}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def is_subvolume(path: Path) -> bool:
    # A btrfs subvolume's root directory always has inode number 256.
    try:
        return filesystem_of(path) == "btrfs" and os.lstat(path).st_ino == 256
    except OSError:
        return False


def make_subvolume(path: Path) -> None:
    _btrfs("subvolume", "create", str(path))


def delete_subvolume(path: Path) -> None:
    _btrfs("subvolume", "delete", str(path))


# _IOWR(BTRFS_IOCTL_MAGIC 0x94, 18, struct btrfs_ioctl_ino_lookup_args), 4096 bytes:
# include/uapi/linux/btrfs.h.
BTRFS_IOC_INO_LOOKUP = (3 << 30) | (4096 << 16) | (0x94 << 8) | 18
BTRFS_FIRST_FREE_OBJECTID = 256  # a subvolume's root directory


def subvolume_id(path: Path) -> int:
    """The id of the btrfs subvolume the directory PATH is in, without a process.

    BTRFS_IOC_INO_LOOKUP with treeid 0 answers the tree of the descriptor;
    asked for BTRFS_FIRST_FREE_OBJECTID it needs no privilege (fs/btrfs/ioctl.c,
    btrfs_ioctl_ino_lookup).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        args = bytearray(struct.pack("=QQ", 0, BTRFS_FIRST_FREE_OBJECTID) + bytes(4080))
        fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, args)
    finally:
        os.close(fd)
    return int(struct.unpack_from("=Q", args)[0])


def _qgroup_id(path: Path) -> str:
    for line in _btrfs("subvolume", "show", str(path)).splitlines():
        key, _, value = line.strip().partition(":")
        if key.strip() == "Subvolume ID":
            return f"0/{value.strip()}"
    raise QuotaError(f"{path}: no subvolume id")


@dataclass(frozen=True)
class Usage:
    exclusive: int  # bytes the guest alone holds
    referenced: int
    limit: int | None
    how: str = "btrfs qgroup, exclusive bytes"  # for `vserver NAME status`


_QGROUP_ID = re.compile(r"[0-9]+/[0-9]+\Z")


def _qgroups(path: Path) -> dict[str, Usage]:
    """Every qgroup of the filesystem PATH is on, by id ("0/257"): one `btrfs` run."""
    out = {}
    for line in _btrfs("qgroup", "show", "-re", "--raw", str(path)).splitlines():
        # qgroupid rfer excl max_rfer max_excl [path]; then a header and a rule.
        cols = line.split()
        if len(cols) >= 5 and _QGROUP_ID.match(cols[0]):
            limit = None if cols[4] == "none" else int(cols[4])
            out[cols[0]] = Usage(int(cols[2]), int(cols[1]), limit)
    return out


def _project_usage(path: Path, project_id: int, fstype: str | None = None) -> Usage:
    try:
        used, limit = projquota.usage(path, project_id)
    except (projquota.ProjQuotaError, OSError) as e:
        raise QuotaError(str(e)) from e
    return Usage(used, used, limit,
                 f"{fstype or filesystem_of(path)} project quota {project_id}")


def usage(path: Path) -> Usage:
    pid = project_of(path)
    if pid is not None:
        return _project_usage(path, pid)
    qid = _qgroup_id(path)
    found = _qgroups(path).get(qid)
    if found is None:
        raise QuotaError(f"{path}: no qgroup {qid} (are quotas enabled on its filesystem?)")
    return found


def usages(paths: Iterable[Path]) -> dict[Path, Usage]:
    """usage() of each of PATHS that is a btrfs subvolume with a qgroup, reading the
    qgroups of each filesystem once (one `btrfs` run per filesystem, not per path),
    or a tree with a project id of its own (one quotactl each).

    A path that is no subvolume, or on a filesystem without quotas, is left out.
    """
    mounts = _mounts()
    by_fs: dict[str, list[tuple[Path, int]]] = {}
    out = {}
    for path in paths:
        m = _mount_of(path, mounts)
        if m is not None and m.fstype in projquota.FSTYPES:
            pid = project_of(path, m.fstype)
            if pid is not None:
                with contextlib.suppress(QuotaError):
                    out[path] = _project_usage(path, pid, m.fstype)
            continue
        if m is None or m.fstype != "btrfs":
            continue
        try:
            if os.lstat(path).st_ino != BTRFS_FIRST_FREE_OBJECTID:
                continue
            by_fs.setdefault(m.dev, []).append((path, subvolume_id(path)))
        except OSError:
            continue
    for members in by_fs.values():
        try:
            table = _qgroups(members[0][0])
        except QuotaError:
            continue  # quotas are off on that filesystem
        for path, subvol in members:
            found = table.get(f"0/{subvol}")
            if found is not None:
                out[path] = found
    return out


def set_limit(path: Path, limit: int | None) -> str:
    """Limit what the guest tree at PATH holds: the exclusive bytes of its btrfs
    subvolume, or the blocks of its project id; read back. Returns how."""
    pid = project_of(path)
    if pid is not None:
        try:
            return projquota.set_limit(path, pid, limit)
        except (projquota.ProjQuotaError, OSError) as e:
            raise QuotaError(str(e)) from e
    _btrfs("quota", "enable", str(path))
    _btrfs("qgroup", "limit", "-e", "none" if limit is None else str(limit), str(path))
    got = usage(path).limit
    if got != limit:
        raise QuotaError(f"{path}: the qgroup limit reads back {got}, not {limit}")
    return f"btrfs qgroup {_qgroup_id(path)} exclusive limit"


# --- a filesystem image per guest -----------------------------------------------

def image_path(rootdir: Path, name: str) -> Path:
    return rootdir / ".images" / f"{name}.img"


def _run(*argv: str) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise QuotaError(f"{' '.join(argv)}: {res.stderr.strip() or res.stdout.strip()}")


def mount_image(image: Path, root: Path) -> None:
    """Loop-mount IMAGE at ROOT (idempotent)."""
    if os.path.ismount(root):
        return
    root.mkdir(mode=0o755, exist_ok=True)
    _run("mount", "-o", "loop,nosuid", str(image), str(root))


def move_into_image(root: Path, image: Path, size: int) -> None:
    """Put the tree at ROOT into a new ext4 image of SIZE bytes, mounted at ROOT.

    The image is a sparse file; writes past its size fail with ENOSPC. On
    any failure the image is removed and ROOT is left as it was.
    """
    image.parent.mkdir(mode=0o700, exist_ok=True)
    if image.exists():
        raise QuotaError(f"{image} already exists")
    staging = root.with_name(f".{root.name}.image")
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-L", root.name[:16], str(image))
        staging.mkdir(mode=0o755)
        _run("mount", "-o", "loop,nosuid", str(image), str(staging))
        try:
            _run("cp", "-a", f"{root}/.", str(staging))
            os.chmod(staging, os.stat(root).st_mode & 0o7777)
        finally:
            _run("umount", str(staging))
        staging.rmdir()
        from hostagent import build as buildmod

        buildmod.delete_root(root)
        root.mkdir(mode=0o755)
        mount_image(image, root)
    except BaseException:
        if staging.exists() and os.path.ismount(staging):
            subprocess.run(["umount", "-l", str(staging)], check=False)
        with contextlib.suppress(OSError):
            staging.rmdir()
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        raise


def image_usage(root: Path) -> Usage:
    st = os.statvfs(root)
    total = st.f_blocks * st.f_frsize
    return Usage(total - st.f_bfree * st.f_frsize, total - st.f_bfree * st.f_frsize, total,
                 "a filesystem image of its own")
