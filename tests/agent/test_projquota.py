"""Per-guest disk limits through XFS and ext4 project quotas (hostagent/projquota.py).

What this project's own machines can run for real: the parsing and the mode
choice, the project-id walk on a loop-mounted XFS (project ids live in every
XFS inode, quota or not), the refusals, and the hooks of a guest that has a
project id. Enforcement needs a kernel with CONFIG_XFS_QUOTA (or CONFIG_QUOTA
and CONFIG_QFMT_V2 for ext4), as Debian's own has: those tests are written
for real and skip only where the kernel says it lacks them, with its reason.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent import conf, guest, projquota, quota, syscalls, templates, usage
from hostagent.paths import Paths
from tests.conftest import mounts_under
from tests.helpers import stop_all

# --- mountinfo lines and the mode they give ---------------------------------------------

XFS_NOQUOTA = ("45 27 7:0 / /tmp/pq/x rw,relatime - xfs /dev/loop0 "
               "rw,inode64,logbufs=8,logbsize=32k,noquota")
XFS_PRJQUOTA = ("88 29 8:17 / /vservers rw,relatime shared:30 - xfs /dev/sdb1 "
                "rw,attr2,inode64,logbufs=8,logbsize=32k,prjquota")
XFS_PQNOENFORCE = ("88 29 8:17 / /vservers rw,relatime shared:30 - xfs /dev/sdb1 "
                   "rw,attr2,inode64,logbufs=8,logbsize=32k,pqnoenforce")
XFS_ESCAPED = r"50 27 0:45 / /mnt/my\040guests rw - xfs /dev/loop1 rw,inode64,prjquota"
EXT4_PLAIN = "36 25 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw,errors=remount-ro"
EXT4_PRJQUOTA = ("91 29 253:3 / /vservers rw,relatime shared:31 - ext4 /dev/mapper/vg-vservers "
                 "rw,prjquota")
BTRFS = ("40 29 0:38 / /vservers rw,relatime shared:20 - btrfs /dev/sdc "
         "rw,space_cache=v2,subvolid=5,subvol=/")
TMPFS = "22 1 0:21 / /dev/shm rw,nosuid,nodev shared:3 master:1 - tmpfs tmpfs rw,inode64"


@pytest.mark.parametrize(("line", "point", "dev", "fstype", "source", "option"), [
    (XFS_NOQUOTA, "/tmp/pq/x", "7:0", "xfs", "/dev/loop0", "noquota"),
    (XFS_PRJQUOTA, "/vservers", "8:17", "xfs", "/dev/sdb1", "prjquota"),
    (XFS_ESCAPED, "/mnt/my guests", "0:45", "xfs", "/dev/loop1", "prjquota"),
    (EXT4_PRJQUOTA, "/vservers", "253:3", "ext4", "/dev/mapper/vg-vservers", "prjquota"),
    (BTRFS, "/vservers", "0:38", "btrfs", "/dev/sdc", "subvol=/"),
    (TMPFS, "/dev/shm", "0:21", "tmpfs", "tmpfs", "inode64"),
])
def test_mountinfo_lines_parse_into_point_device_type_source_and_super_options(
        line: str, point: str, dev: str, fstype: str, source: str, option: str) -> None:
    m = projquota.parse_mountinfo_line(line + "\n")
    assert (m.point, m.dev, m.fstype, m.source) == (point, dev, fstype, source)
    assert option in m.super_options
    # The per-mount options before " - " are not the filesystem's own.
    assert "relatime" not in m.super_options


def test_a_line_without_its_separator_is_refused() -> None:
    with pytest.raises(ValueError, match="not a mountinfo line"):
        projquota.parse_mountinfo_line("45 27 7:0 / /x rw,relatime xfs /dev/loop0 rw")


def test_the_mount_of_a_path_is_the_longest_mount_point_above_it(tmp_path: Path) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    text = "\n".join([
        EXT4_PLAIN,
        f"60 36 7:1 / {tmp_path / 'a'} rw - xfs /dev/loop1 rw,prjquota",
        f"61 36 7:2 / {tmp_path / 'ab'} rw - btrfs /dev/loop2 rw",
    ])
    found = projquota.mount_of(inner, text)
    assert found is not None and (found.fstype, found.source) == ("xfs", "/dev/loop1")
    top = projquota.mount_of(tmp_path, text)
    assert top is not None and top.fstype == "ext4"


@pytest.mark.parametrize(("line", "why"), [
    (XFS_PRJQUOTA, None),
    (EXT4_PRJQUOTA, None),
    (XFS_ESCAPED, None),
    (XFS_NOQUOTA, "mounted without project quota: mount it with -o prjquota"),
    (XFS_PQNOENFORCE, "does not enforce it (mounted pqnoenforce)"),
    (EXT4_PLAIN, "mkfs.ext4 -O project,quota"),
    (BTRFS, "project quotas are an XFS and ext4 feature"),
    (TMPFS, "project quotas are an XFS and ext4 feature"),
])
def test_mount_options_decide_whether_a_project_quota_is_enforced(
        line: str, why: str | None) -> None:
    got = projquota.option_verdict(projquota.parse_mountinfo_line(line))
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got, got


KERNEL_OK = None
NO_XFS_QUOTA = ("this kernel has no xfs quota support (quotactl Q_XGETQSTATV on /vservers: "
                "ENOSYS); this kernel was built without CONFIG_XFS_QUOTA")
EXT4_OFF = "project quota is off on / (quotactl Q_GETINFO: ESRCH)"
NOT_ENFORCED = "project quota limits are not enforced on /vservers (quotactl Q_XGETQSTATV)"


@pytest.mark.parametrize(("line", "kernel", "mode", "reasons"), [
    # btrfs comes first: its qgroup charges a unified guest only for what it changed.
    (BTRFS, KERNEL_OK, quota.BTRFS_QGROUP, ()),
    (XFS_PRJQUOTA, KERNEL_OK, quota.PROJECT_QUOTA, ()),
    (EXT4_PRJQUOTA, KERNEL_OK, quota.PROJECT_QUOTA, ()),
    # Mounted for it, but the kernel cannot: refused, with the kernel's reason.
    (XFS_PRJQUOTA, NO_XFS_QUOTA, None, ("btrfs:", "not btrfs", NO_XFS_QUOTA)),
    # Neither: both reasons, the mount's and the kernel's.
    (EXT4_PLAIN, EXT4_OFF, None, ("btrfs:", "is on ext4, not btrfs", "project quota:",
                                  "-o prjquota", EXT4_OFF)),
    (XFS_PQNOENFORCE, NOT_ENFORCED, None, ("pqnoenforce", NOT_ENFORCED)),
    (TMPFS, KERNEL_OK, None, ("not btrfs", "project quotas are an XFS and ext4 feature")),
])
def test_the_disk_limit_mode_is_btrfs_then_project_quota_then_refused_with_each_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, kernel: str | None,
        mode: str | None, reasons: tuple[str, ...]) -> None:
    m = projquota.parse_mountinfo_line(line)
    monkeypatch.setattr(quota, "filesystem_of", lambda _p: m.fstype)
    monkeypatch.setattr(projquota, "mount_of", lambda _p, _t=None: m)
    monkeypatch.setattr(projquota, "_kernel_verdict", lambda _fd, _m: kernel)
    how, why = quota.method(tmp_path)
    assert how == mode
    if mode is None:
        assert why is not None and quota.support(tmp_path) == why
        for reason in reasons:
            assert reason in why, why
    else:
        assert why is None


def test_the_refusal_on_this_hosts_own_filesystem_names_each_way_checked(vroots: Paths) -> None:
    how, why = quota.method(vroots.rootdir)
    if how is not None:
        pytest.skip(f"this tmp directory has {how}: nothing to refuse")
    assert why is not None and "btrfs:" in why and "project quota:" in why, why
    m = projquota.mount_of(vroots.rootdir)
    assert m is not None
    lacks = projquota.kernel_lacks(m.fstype) if m.fstype in projquota.FSTYPES else None
    if lacks is not None:
        assert lacks in why, why  # "this kernel was built without ..." is said, not hidden


# --- loop-mounted filesystems made by the tests -------------------------------------------

def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def _mkfs(kind: str, image: Path, *, with_quota: bool) -> None:
    with open(image, "wb") as f:
        f.truncate(512 << 20)  # sparse; XFS wants at least 300 MB
    if kind == "xfs":
        if shutil.which("mkfs.xfs") is None:
            pytest.skip("mkfs.xfs is missing (scripts/bootstrap.sh installs xfsprogs)")
        res = _run("mkfs.xfs", "-q", "-f", str(image))
    else:
        features = "project,quota" if with_quota else "project"
        # 256-byte inodes: ext4 keeps the project id in the inode's extra space.
        res = _run("mkfs.ext4", "-q", "-F", "-I", "256", "-O", features, str(image))
    assert res.returncode == 0, res.stderr


def _unmount_all(mnt: Path) -> None:
    for point in sorted(mounts_under(mnt), key=len, reverse=True):
        if point != str(mnt):
            syscalls.umount2(point, syscalls.MNT_DETACH)
    _run("umount", "-l", str(mnt))  # `mount -o loop` set autoclear: the loop goes with it


def _mount_or_skip(kind: str, image: Path, mnt: Path, options: str) -> None:
    """Mount IMAGE; skip only when the kernel's build says it cannot, else fail."""
    mnt.mkdir()
    res = _run("mount", "-o", f"loop,{options}", str(image), str(mnt))
    if res.returncode == 0:
        return
    lacks = projquota.kernel_lacks(kind)
    if lacks is None:
        pytest.fail(f"mount -o {options} of a fresh {kind} failed: {res.stderr.strip()}")
    pytest.skip(f"{lacks} (mount -o {options}: {res.stderr.strip().splitlines()[0]})")


@pytest.fixture(params=["xfs", "ext4"])
def plain_fs(request: pytest.FixtureRequest, tmp_path: Path,
             root_required: None) -> Iterator[Path]:
    """A fresh XFS, or ext4 with the project feature, mounted without quota."""
    kind = str(request.param)
    image, mnt = tmp_path / f"{kind}.img", tmp_path / kind
    _mkfs(kind, image, with_quota=False)
    try:
        _mount_or_skip(kind, image, mnt, "rw")
        yield mnt
    finally:
        _unmount_all(mnt)


def xattr(path: Path) -> tuple[int, int]:
    """(fsx_xflags, fsx_projid) of PATH itself, never of a symlink's target."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return syscalls.fsxattr_get(fd)
    finally:
        os.close(fd)


def project(path: Path) -> tuple[int, bool]:
    """(project id, PROJINHERIT) of PATH itself (other fsx_xflags, such as XFS's
    HASATTR, are the filesystem's business)."""
    flags, projid = xattr(path)
    return projid, bool(flags & syscalls.FS_XFLAG_PROJINHERIT)


def lsattr_project(path: Path) -> tuple[int, str]:
    """(project id, flags) as e2fsprogs' `lsattr -p` prints them."""
    out = subprocess.run(["lsattr", "-pd", str(path)], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), out[1]


def test_assign_gives_every_directory_and_file_of_a_tree_its_project_and_never_follows_a_link(
        plain_fs: Path) -> None:
    mnt = plain_fs
    host = mnt / "host"  # a host directory beside the guest's tree, on the same filesystem
    host.mkdir()
    (host / "secret").write_text("host's\n")
    tree = mnt / "tree"
    (tree / "a/b/c").mkdir(parents=True)
    (tree / "a/b/c/file").write_bytes(b"x" * 10000)
    (tree / "a/file2").write_text("two\n")
    os.link(tree / "a/file2", tree / "a/hardlink")
    # What a hostile guest plants: links to the host's directory and file.
    os.symlink("../host", tree / "link-dir")
    os.symlink(str(host / "secret"), tree / "a/link-file")
    os.mkfifo(tree / "fifo")
    (tree / "sub/mnt").mkdir(parents=True)
    syscalls.mount("tmpfs", tree / "sub/mnt", "tmpfs", 0, "size=1m")
    (tree / "sub/mnt/other-fs").write_text("not ours\n")

    walked = projquota.assign(tree, 4242)

    assert (walked.directories, walked.files, walked.skipped, walked.other_fs) == (5, 3, 3, 1)
    for d in ("", "a", "a/b", "a/b/c", "sub"):
        assert project(tree / d) == (4242, True), d
    for f in ("a/b/c/file", "a/file2", "a/hardlink"):
        assert project(tree / f) == (4242, False), f
    # The links' targets are as they were.
    for target in (host, host / "secret", mnt):
        assert project(target) == (0, False), target
    assert projquota.project_of(tree) == 4242 and projquota.project_of(host) is None
    # e2fsprogs reads the same ids back (FS_IOC_FSGETXATTR too; "P" is PROJINHERIT).
    projid, flags = lsattr_project(tree / "a")
    assert projid == 4242 and "P" in flags
    assert lsattr_project(tree / "a/file2")[0] == 4242
    assert lsattr_project(host)[0] == 0


def test_what_is_created_in_an_assigned_directory_takes_its_project(plain_fs: Path) -> None:
    tree = plain_fs / "tree"
    (tree / "d").mkdir(parents=True)
    projquota.assign(tree, 777)
    (tree / "d/new-file").write_text("later\n")
    (tree / "d/new-dir").mkdir()
    (tree / "d/new-dir/deeper").write_text("later still\n")
    assert project(tree / "d/new-file") == (777, False)
    assert project(tree / "d/new-dir") == (777, True)
    assert project(tree / "d/new-dir/deeper") == (777, False)
    # Moving a file out of its project is refused by the filesystem itself.
    (plain_fs / "outside").mkdir()
    projquota.assign(plain_fs / "outside", 778)
    with pytest.raises(OSError) as e:
        os.rename(tree / "d/new-file", plain_fs / "outside/new-file")
    assert e.value.errno == errno.EXDEV


def test_assign_refuses_project_zero_and_a_symlinked_root(plain_fs: Path) -> None:
    (plain_fs / "real").mkdir()
    os.symlink("real", plain_fs / "link")
    with pytest.raises(projquota.ProjQuotaError, match="outside"):
        projquota.assign(plain_fs / "real", 0)
    with pytest.raises(projquota.ProjQuotaError):
        projquota.assign(plain_fs / "link", 5)
    assert project(plain_fs / "real") == (0, False)


def test_supported_on_a_filesystem_mounted_without_prjquota_says_why_not(
        plain_fs: Path) -> None:
    why = projquota.supported(plain_fs)
    assert why is not None and "mounted without project quota" in why, why
    m = projquota.mount_of(plain_fs)
    assert m is not None
    lacks = projquota.kernel_lacks(m.fstype)
    if lacks is not None:
        assert lacks in why, why  # and the kernel could not enforce one anyway
        with pytest.raises(projquota.ProjQuotaError):
            projquota.set_limit(plain_fs, 4242, 64 << 20)


def test_supported_on_a_plain_ext4_says_what_it_lacks(tmp_path: Path,
                                                       root_required: None) -> None:
    image, mnt = tmp_path / "e.img", tmp_path / "e"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    assert _run("mkfs.ext4", "-q", "-F", str(image)).returncode == 0
    try:
        _mount_or_skip("ext4", image, mnt, "rw")
        why = projquota.supported(mnt)
        assert why is not None and "mkfs.ext4 -O project,quota" in why and "ESRCH" in why, why
    finally:
        _unmount_all(mnt)


# --- guests on such a filesystem ---------------------------------------------------------

def _roots_on(mnt: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    monkeypatch.setenv("VSERVER_ROOTDIR", str(mnt / "vservers"))
    paths = Paths.from_env()
    paths.ensure()
    return paths


@pytest.fixture
def xfs_roots(vroots: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """VSERVER_ROOTDIR on a fresh XFS mounted without quota; all unmounted after."""
    image, mnt = tmp_path / "xfs.img", tmp_path / "xfsroot"
    _mkfs("xfs", image, with_quota=False)
    try:
        _mount_or_skip("xfs", image, mnt, "rw")
        paths = _roots_on(mnt, monkeypatch)
        try:
            yield paths
        finally:
            stop_all(paths, delete=True)
            os.chmod(paths.rootdir, 0o700)
    finally:
        _unmount_all(mnt)


def test_a_build_with_disk_limit_where_no_quota_is_enforced_is_refused_with_the_reason(
        xfs_roots: Paths) -> None:
    paths = xfs_roots
    why = quota.support(paths.rootdir)
    assert why is not None
    with pytest.raises(guest.GuestError, match="DISK_LIMIT cannot be enforced") as e:
        guest.build(paths, "x", guest.BuildOptions(method="busybox", disk_limit="64M",
                                                   idmap="isolated"))
    assert why in str(e.value) and "mounted without project quota" in str(e.value)
    assert paths.guest_names() == [] and not os.path.lexists(paths.root("x"))


def test_a_guest_with_a_project_id_keeps_its_context_and_id_range_and_deletes_cleanly(
        xfs_roots: Paths) -> None:
    paths = xfs_roots
    guest.build(paths, "p", guest.BuildOptions(method="busybox"))
    assert guest.disk_of(paths, "p") is None  # no project of its own: no limit claimed
    quota.assign_project(paths.root("p"), 4242)
    assert guest.disk_of(paths, "p") == paths.root("p")
    assert quota.project_of(paths.root("p")) == 4242
    with pytest.raises(guest.GuestError, match="project id of its DISK_LIMIT"):
        guest.set_key(paths, "p", "S_CONTEXT", "7")
    with pytest.raises(guest.GuestError, match='IDMAP="none"'):
        guest.set_key(paths, "p", "IDMAP", "none")
    assert conf.settings_from_file(paths.conf("p")).context is None
    # The limit is lifted after the files are gone; where the kernel has no
    # quota that fails, and the delete goes on (the id binds no file any more).
    guest.delete(paths, "p")
    assert paths.guest_names() == [] and not os.path.lexists(paths.root("p"))


def test_a_tree_that_inherits_its_parents_project_is_not_taken_for_a_limit_of_its_own(
        xfs_roots: Paths) -> None:
    paths = xfs_roots
    os.chmod(paths.rootdir, 0o700)
    projquota.assign(paths.rootdir, 900)  # a host keeping all of /vservers in one project
    guest.build(paths, "g", guest.BuildOptions(method="busybox"))
    assert project(paths.root("g")) == (900, True)
    assert quota.project_of(paths.root("g")) is None and guest.disk_of(paths, "g") is None


# --- enforcement: a kernel with project quota -----------------------------------------------

@pytest.fixture(params=["xfs", "ext4"])
def quota_roots(request: pytest.FixtureRequest, vroots: Paths, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """VSERVER_ROOTDIR on a fresh XFS or ext4 (-O project,quota) mounted -o prjquota.

    Skipped only where the kernel's build says it has no such quota."""
    kind = str(request.param)
    image, mnt = tmp_path / f"{kind}.img", tmp_path / f"{kind}root"
    _mkfs(kind, image, with_quota=True)
    try:
        _mount_or_skip(kind, image, mnt, "prjquota")
        why = projquota.supported(mnt)
        lacks = projquota.kernel_lacks(kind)
        if why is not None and lacks is not None:
            pytest.skip(f"{why}")
        assert why is None, why  # mounted with prjquota on a kernel that has it
        paths = _roots_on(mnt, monkeypatch)
        try:
            yield paths
        finally:
            stop_all(paths, delete=True)
            os.chmod(paths.rootdir, 0o700)
    finally:
        _unmount_all(mnt)


def write(paths: Paths, name: str, mb: int, where: str = "/root/big") -> str:
    buf = bytearray()
    guest.exec_in(paths, name, ["/bin/sh", "-c",
                                f"dd if=/dev/zero of={where} bs=1M count={mb} conv=fsync; "
                                "echo rc=$?"], output=buf.extend)
    return buf.decode(errors="replace")


def test_a_guest_writing_past_its_project_quota_gets_edquot_while_another_keeps_its_space(
        quota_roots: Paths) -> None:
    paths = quota_roots
    assert quota.method(paths.rootdir) == (quota.PROJECT_QUOTA, None)
    guest.build(paths, "small", guest.BuildOptions(method="busybox", disk_limit="30M",
                                                   idmap="isolated"))
    guest.build(paths, "other", guest.BuildOptions(method="busybox", disk_limit="200M",
                                                   idmap="isolated", context=4000))
    # The project id is the context id: chosen and written to NAME.conf, or S_CONTEXT's.
    small_ctx = conf.settings_from_file(paths.conf("small")).context
    assert small_ctx is not None and quota.project_of(paths.root("small")) == small_ctx
    assert quota.project_of(paths.root("other")) == 4000
    guest.start(paths, "small")
    guest.start(paths, "other")
    st = guest.read_state(paths, "small")
    assert st is not None and st.context == small_ctx
    out = write(paths, "small", 60)
    assert "Disk quota exceeded" in out and "rc=0" not in out, out
    used = quota.usage(paths.root("small"))
    assert used.limit == 30 << 20 and used.exclusive <= 31 << 20
    assert "project quota" in used.how
    assert "rc=0" in write(paths, "other", 40)
    (paths.rootdir / "host-file").write_bytes(b"\0" * (20 << 20))  # the host keeps its space
    text = guest.status(paths, "small").text()
    assert "Disk: " in text and "project quota" in text, text
    assert guest.set_key(paths, "small", "DISK_LIMIT", "100M")[0].startswith(
        "DISK_LIMIT=100M: enforced")
    assert "rc=0" in write(paths, "small", 60)
    figures = {n: u.disk_used for n, u in usage.usage_all(paths).items()}
    assert figures["small"] is not None and figures["small"] >= 60 << 20


def test_a_unified_guest_on_project_quota_is_charged_only_for_what_it_changed(
        quota_roots: Paths) -> None:
    paths = quota_roots
    templates.create(paths, "t", "busybox", None)
    (templates.template_path(paths, "t") / "usr/big-shared").write_bytes(os.urandom(25 << 20))
    guest.build(paths, "u", guest.BuildOptions(method="template", source="t", disk_limit="20M",
                                               idmap="isolated"))
    own = guest.disk_of(paths, "u")
    assert own == templates.overlay_dirs(paths, "u")[0].parent
    guest.start(paths, "u")
    assert quota.usage(own).exclusive < 1 << 20  # the template is free
    out = write(paths, "u", 40)
    assert "Disk quota exceeded" in out, out
    assert quota.usage(own).exclusive <= 21 << 20
    # A change to a template file is a copy-up into the project, not an EXDEV.
    buf = bytearray()
    guest.exec_in(paths, "u", ["/bin/sh", "-c", "rm -f /root/big; echo x >> /etc/hostname; "
                               "echo rc=$?"], output=buf.extend)
    assert os.path.exists(templates.overlay_dirs(paths, "u")[0] / "etc/hostname")
    assert "rc=0" in buf.decode(), buf.decode()


def test_delete_lifts_the_project_limit_so_a_reused_context_starts_clean(
        quota_roots: Paths) -> None:
    paths = quota_roots
    guest.build(paths, "g", guest.BuildOptions(method="busybox", disk_limit="40M",
                                               idmap="isolated", context=4100))
    assert projquota.usage(paths.rootdir, 4100)[1] == 40 << 20
    guest.delete(paths, "g")
    # XFS frees a removed inode's quota in the background (statfs pushes it along).
    deadline = time.monotonic() + 30
    while projquota.usage(paths.rootdir, 4100)[0] and time.monotonic() < deadline:
        os.statvfs(paths.rootdir)
        time.sleep(0.1)
    used, limit = projquota.usage(paths.rootdir, 4100)
    assert limit is None and used == 0
    # The number is free again, for a guest of another size.
    guest.build(paths, "h", guest.BuildOptions(method="busybox", disk_limit="60M",
                                               idmap="isolated", context=4100))
    assert quota.usage(paths.root("h")).limit == 60 << 20


def test_a_context_or_files_already_in_a_project_are_refused(quota_roots: Paths) -> None:
    paths = quota_roots
    guest.build(paths, "a", guest.BuildOptions(method="busybox", context=4200))
    with pytest.raises(guest.GuestError, match="also a's"):
        guest.build(paths, "b", guest.BuildOptions(method="busybox", disk_limit="40M",
                                                   idmap="isolated", context=4200))
    stray = paths.rootdir / ".stray"
    stray.mkdir()
    (stray / "f").write_text("left by hand\n")
    projquota.assign(stray, 4300)
    with pytest.raises(guest.GuestError, match="already charges files"):
        guest.build(paths, "c", guest.BuildOptions(method="busybox", disk_limit="40M",
                                                   idmap="isolated", context=4300))
    assert sorted(paths.guest_names()) == ["a"]


def test_an_idmap_none_guest_is_refused_a_project_quota(quota_roots: Paths) -> None:
    paths = quota_roots
    with pytest.raises(guest.GuestError, match='IDMAP="none"'):
        guest.build(paths, "n", guest.BuildOptions(method="busybox", disk_limit="40M"))
    assert paths.guest_names() == [] and not os.path.lexists(paths.root("n"))
    assert stat.S_ISDIR(os.stat(paths.rootdir).st_mode)


# --- the build's wiring, with the kernel's quota calls simulated ---------------------------

class SimulatedQuotactl:
    """Stands in for quotactl on an XFS whose kernel has no quota (this project's
    own): it keeps limits in a table and charges nothing. Only the wiring of
    build, status, set, usage and delete is tested through it, never enforcement."""

    def __init__(self) -> None:
        self.limits: dict[int, int] = {}

    def __call__(self, _fd: int, _m: projquota.MountInfo, cmd: int, qid: int,
                 addr: object) -> None:
        sub = cmd >> syscalls.SUBCMDSHIFT
        if sub == syscalls.Q_XGETQSTATV:
            addr.qs_flags = syscalls.FS_QUOTA_PDQ_ACCT | syscalls.FS_QUOTA_PDQ_ENFD  # type: ignore[attr-defined]
        elif sub == syscalls.Q_XSETQLIM:
            self.limits[qid] = int(addr.d_blk_hardlimit)  # type: ignore[attr-defined]
        elif sub == syscalls.Q_XGETQUOTA:
            if not self.limits.get(qid):
                raise OSError(errno.ENOENT, "no dquot")
            addr.d_blk_hardlimit = self.limits[qid]  # type: ignore[attr-defined]
        else:
            raise OSError(errno.ENOSYS, "not simulated")


def test_build_status_set_usage_and_delete_are_wired_to_the_project_quota(
        xfs_roots: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = xfs_roots
    sim = SimulatedQuotactl()
    monkeypatch.setattr(projquota, "_quotactl", sim)
    monkeypatch.setattr(projquota, "option_verdict", lambda _m: None)
    assert quota.method(paths.rootdir) == (quota.PROJECT_QUOTA, None)
    templates.create(paths, "t", "busybox", None)
    guest.build(paths, "p", guest.BuildOptions(method="busybox", disk_limit="30M",
                                               idmap="isolated"))
    guest.build(paths, "u", guest.BuildOptions(method="template", source="t", disk_limit="20M",
                                               idmap="isolated", context=4000))
    # The project id is the context id: the highest free static one, written to NAME.conf.
    p_ctx = conf.settings_from_file(paths.conf("p")).context
    assert p_ctx == conf.CONTEXT_RANGE[1] and sim.limits == {p_ctx: (30 << 20) // 512,
                                                             4000: (20 << 20) // 512}
    assert project(paths.root("p") / "bin") == (p_ctx, True)
    own = templates.overlay_dirs(paths, "u")[0].parent
    assert guest.disk_of(paths, "u") == own and project(own / "work") == (4000, True)
    assert not quota.is_subvolume(own)
    guest.start(paths, "u")
    st = guest.read_state(paths, "u")
    assert st is not None and st.context == 4000
    buf = bytearray()
    guest.exec_in(paths, "u", ["/bin/sh", "-c", "echo x >> /etc/hostname; echo new > /root/f; "
                               "echo rc=$?"], output=buf.extend)
    assert "rc=0" in buf.decode(), buf.decode()  # copy-up through the work dir: no EXDEV
    upper = templates.overlay_dirs(paths, "u")[0]
    assert project(upper / "etc/hostname") == (4000, False)
    assert project(upper / "root/f") == (4000, False)
    text = guest.status(paths, "u").text()
    assert "limit 20 MiB (xfs project quota 4000)" in text, text
    assert guest.set_key(paths, "u", "DISK_LIMIT", "50M") == [
        "DISK_LIMIT=50M: enforced (xfs project quota 4000, hard block limit)"]
    assert sim.limits[4000] == (50 << 20) // 512
    figures = {n: u.disk_used for n, u in usage.usage_all(paths).items()}
    assert figures == {"u": 0}  # what the simulated quotactl charges
    guest.stop(paths, "u", timeout=0)
    for name in ("p", "u"):
        guest.delete(paths, name)
    assert not any(sim.limits.values())  # both limits lifted at delete
