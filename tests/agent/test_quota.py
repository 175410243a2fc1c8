"""Disk quota per guest on a loop-mounted btrfs made by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent import guest, quota, syscalls, templates, usage
from hostagent.paths import Paths
from tests.conftest import mounts_under
from tests.helpers import stop_all


@pytest.fixture
def btrfs_roots(vroots: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """VSERVER_ROOTDIR on a fresh 400 MB btrfs; unmounted (and the loop freed) whatever happens."""
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("mkfs.btrfs is missing (scripts/bootstrap.sh installs btrfs-progs)")
    image, mnt = tmp_path / "btrfs.img", tmp_path / "btrfs"
    with open(image, "wb") as f:
        f.truncate(400 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        monkeypatch.setenv("VSERVER_ROOTDIR", str(mnt / "vservers"))
        paths = Paths.from_env()
        paths.ensure()
        try:
            yield paths
        finally:
            stop_all(paths, delete=True)
            for point in sorted(mounts_under(mnt), key=len, reverse=True):
                syscalls.umount2(point, syscalls.MNT_DETACH)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def write(paths: Paths, name: str, mb: int, where: str = "/root/big") -> str:
    buf = bytearray()
    guest.exec_in(paths, name, ["/bin/sh", "-c",
                                f"dd if=/dev/zero of={where} bs=1M count={mb} conv=fsync; "
                                "echo rc=$?"], output=buf.extend)
    return buf.decode(errors="replace")


def test_a_guest_writing_past_its_limit_gets_edquot_while_others_keep_space(
        btrfs_roots: Paths) -> None:
    paths = btrfs_roots
    guest.build(paths, "small", guest.BuildOptions(method="busybox", disk_limit="30M"))
    guest.build(paths, "other", guest.BuildOptions(method="busybox"))
    guest.start(paths, "small")
    guest.start(paths, "other")
    out = write(paths, "small", 60)
    assert "Disk quota exceeded" in out and "rc=0" not in out, out
    used = quota.usage(paths.root("small"))
    assert used.limit == 30 << 20 and used.exclusive <= 31 << 20
    # Another guest and the host still have their space.
    assert "rc=0" in write(paths, "other", 40)
    host_file = paths.rootdir / "host-file"
    host_file.write_bytes(b"\0" * (20 << 20))
    assert "Disk: " in guest.status(paths, "small").text()


def test_a_unified_guest_is_charged_only_for_what_it_changed(btrfs_roots: Paths) -> None:
    paths = btrfs_roots
    templates.create(paths, "t", "busybox", None)
    (templates.template_path(paths, "t") / "usr/big-shared").write_bytes(os.urandom(25 << 20))
    guest.build(paths, "u", guest.BuildOptions(method="template", source="t", disk_limit="20M"))
    guest.start(paths, "u")
    own = guest.disk_of(paths, "u")
    assert own is not None and quota.usage(own).exclusive < 1 << 20  # the template is free
    out = write(paths, "u", 40)
    assert "Disk quota exceeded" in out, out
    assert quota.usage(own).exclusive <= 21 << 20


def test_disk_limit_changes_with_set(btrfs_roots: Paths) -> None:
    paths = btrfs_roots
    guest.build(paths, "g", guest.BuildOptions(method="busybox", disk_limit="20M"))
    guest.set_key(paths, "g", "DISK_LIMIT", "50M")
    assert quota.usage(paths.root("g")).limit == 50 << 20
    guest.start(paths, "g")
    assert "rc=0" in write(paths, "g", 30)


def test_delete_removes_the_guests_subvolumes(btrfs_roots: Paths) -> None:
    paths = btrfs_roots
    templates.create(paths, "t", "busybox", None)
    guest.build(paths, "p", guest.BuildOptions(method="busybox", disk_limit="20M"))
    guest.build(paths, "u", guest.BuildOptions(method="template", source="t", disk_limit="20M"))
    assert quota.is_subvolume(paths.root("p"))
    for name in ("p", "u"):
        guest.delete(paths, name)
    listing = subprocess.run(["btrfs", "subvolume", "list", str(paths.rootdir)],
                             capture_output=True, text=True, check=True).stdout
    assert listing.strip() == ""


def test_disk_limit_without_quota_support_is_refused(vroots: Paths) -> None:
    why = quota.support(vroots.rootdir)
    if why is None:
        pytest.skip("this tmp directory is on btrfs: nothing to refuse")
    with pytest.raises(guest.GuestError, match="DISK_LIMIT cannot be enforced"):
        guest.build(vroots, "x", guest.BuildOptions(method="busybox", disk_limit="1G"))
    assert vroots.guest_names() == [] and not vroots.root("x").exists()


def test_image_per_guest_stops_at_its_size(vroots: Paths) -> None:
    guest.build(vroots, "img", guest.BuildOptions(method="busybox", disk_limit="40M",
                                                  disk_image=True))
    image = quota.image_path(vroots.rootdir, "img")
    assert image.is_file() and os.path.ismount(vroots.root("img"))
    guest.start(vroots, "img")
    out = write(vroots, "img", 80)
    assert "No space left on device" in out and "rc=0" not in out, out
    assert "a filesystem image of its own" in guest.status(vroots, "img").text()
    # After a host reboot (the image unmounted) start mounts it again, data intact.
    guest.stop(vroots, "img")
    syscalls.umount2(vroots.root("img"))
    guest.start(vroots, "img")
    buf = bytearray()
    guest.exec_in(vroots, "img", ["/bin/ls", "/root/big"], output=buf.extend)
    assert buf.decode().strip() == "/root/big"
    guest.stop(vroots, "img")
    guest.delete(vroots, "img")
    assert not image.exists() and not vroots.root("img").exists()


def test_a_build_killed_half_way_is_swept_by_the_next(vroots: Paths) -> None:
    stale = vroots.rootdir / ".again.build-x1y2"
    (stale / "etc").mkdir(parents=True)
    guest.build(vroots, "again", guest.BuildOptions(method="busybox"))
    assert not stale.exists()
    assert vroots.root("again").is_dir()


def grown_by_write(paths: Paths, names: list[str], mb: int) -> dict[str, float]:
    """disk_used after writing MB in each guest minus before, as a share of MB."""
    os.sync()  # a btrfs qgroup counts what the last commit wrote
    before = usage.usage_all(paths)
    for name in names:
        assert "rc=0" in write(paths, name, mb)
    os.sync()
    after = usage.usage_all(paths)
    out = {}
    for name in names:
        b, a = before[name].disk_used, after[name].disk_used
        assert b is not None and a is not None, (name, b, a)
        out[name] = (a - b) / (mb << 20)
    return out


def test_disk_used_of_a_guest_with_a_qgroup_grows_with_what_it_writes(
        btrfs_roots: Paths) -> None:
    paths = btrfs_roots
    templates.create(paths, "t", "busybox", None)
    guest.build(paths, "q", guest.BuildOptions(method="busybox", disk_limit="100M"))
    guest.build(paths, "u", guest.BuildOptions(method="template", source="t",
                                               disk_limit="100M"))
    for name in ("q", "u"):
        guest.start(paths, name)
    unified_own = guest.disk_of(paths, "u")
    assert unified_own is not None and unified_own != paths.root("u")
    os.sync()
    now = usage.usage_all(paths)
    assert now["q"].disk_used == quota.usage(paths.root("q")).exclusive
    assert now["u"].disk_used == quota.usage(unified_own).exclusive
    grown = grown_by_write(paths, ["q", "u"], 20)
    assert all(0.9 < share < 1.2 for share in grown.values()), grown


def test_disk_used_of_image_plain_and_unified_guests_grows_with_what_they_write(
        vroots: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    guest.build(vroots, "img", guest.BuildOptions(method="busybox", disk_limit="60M",
                                                  disk_image=True))
    guest.build(vroots, "plain", guest.BuildOptions(method="busybox"))
    templates.create(vroots, "t", "busybox", None)
    guest.build(vroots, "u", guest.BuildOptions(method="template", source="t"))
    for name in ("img", "plain", "u"):
        guest.start(vroots, name)
    # The plain and unified guests' figures are walks (of the root, of the
    # upper layer), each kept DISK_TTL seconds: at 0 each call walks afresh.
    monkeypatch.setattr(usage, "DISK_TTL", 0.0)
    grown = grown_by_write(vroots, ["img", "plain", "u"], 20)
    assert all(0.9 < share < 1.2 for share in grown.values()), grown
