"""Disk quota per guest (the seed's "per context disk quota", its future work).

On btrfs, the layout this project recommends for $VSERVER_ROOTDIR, each
guest's own data lives in a subvolume of its own (a plain guest's whole
tree, or a unified guest's overlay upper layer) with a qgroup limit on its
*exclusive* bytes: a unified guest is charged only for what it changed, and
blocks it shares with the template or with other guests are not counted.

Elsewhere, XFS and ext4 project quotas need kernel support this project's
hosts lack (reference/perf.md); what remains is a fixed-size filesystem
image per guest, loop-mounted at its root (OpenVZ's ploop did the same),
chosen explicitly with DISK_LIMIT_MODE="image" since it costs the whole size
up front on some filesystems and a copy at build. Without either, a
DISK_LIMIT is refused, saying why: a limit is never silently ignored.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "QuotaError",
    "Usage",
    "delete_subvolume",
    "filesystem_of",
    "image_path",
    "image_usage",
    "is_subvolume",
    "make_subvolume",
    "mount_image",
    "move_into_image",
    "set_limit",
    "support",
    "usage",
]


class QuotaError(RuntimeError):
    pass


def filesystem_of(path: Path) -> str:
    """The filesystem type PATH is on, from the longest mount point above it."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, right.split()[0]
    return fstype


def support(path: Path) -> str | None:
    """None if a disk limit can be enforced for guests under PATH, else why not."""
    fstype = filesystem_of(path)
    if fstype != "btrfs":
        return (f"{path} is on {fstype or 'an unknown filesystem'}: per-guest disk limits need "
                "$VSERVER_ROOTDIR on btrfs (qgroups); this kernel has no XFS or ext4 project "
                "quota to fall back on (docs/storage.md)")
    if shutil.which("btrfs") is None:
        return "the btrfs command is missing: apt-get install btrfs-progs"
    return None


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


def usage(path: Path) -> Usage:
    qid = _qgroup_id(path)
    for line in _btrfs("qgroup", "show", "-re", "--raw", str(path)).splitlines():
        cols = line.split()
        if cols and cols[0] == qid:
            limit = None if cols[4] == "none" else int(cols[4])
            return Usage(int(cols[2]), int(cols[1]), limit)
    raise QuotaError(f"{path}: no qgroup {qid} (are quotas enabled on its filesystem?)")


def set_limit(path: Path, limit: int | None) -> str:
    """Limit the exclusive bytes of the subvolume at PATH; read back. Returns how."""
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
    return Usage(total - st.f_bfree * st.f_frsize, total - st.f_bfree * st.f_frsize, total)
