"""Disk quota per guest (the seed's "per context disk quota", its future work).

On btrfs, the layout this project recommends for $VSERVER_ROOTDIR, each
guest's own data lives in a subvolume of its own (a plain guest's whole
tree, or a unified guest's overlay upper layer) with a qgroup limit on its
*exclusive* bytes: a unified guest is charged only for what it changed, and
blocks it shares with the template or with other guests are not counted.

Elsewhere nothing here can enforce a limit: XFS and ext4 project quotas need
kernel support this project's hosts lack (reference/perf.md), and a
fixed-size image per guest is not built yet. A DISK_LIMIT there is refused,
saying why: a limit is never silently ignored. Every limit is read back.
"""

from __future__ import annotations

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
    "is_subvolume",
    "make_subvolume",
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
