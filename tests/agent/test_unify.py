"""vunify and vdu against real filesystems: a loop-mounted btrfs made per test, and ext4.

Each btrfs test makes its own 512 MiB image in tmp_path, attaches it to a
loop device and mounts it; the fixture unmounts and detaches it whatever the
test did. Block sharing is checked twice over: by FIEMAP physical offsets and
by `btrfs filesystem du`, the kernel's own account of exclusive bytes.
"""

# A setuid mode is part of the metadata --undo must keep: on purpose here.
# ruff: noqa: S103

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent import unify
from hostagent.paths import Paths
from tests.helpers import run

BIN = Path(sys.executable).parent
VUNIFY = str(BIN / "vunify")
VDU = str(BIN / "vdu")
MIB = 1 << 20


# --- fixtures -----------------------------------------------------------------------

@pytest.fixture
def btrfs(tmp_path: Path, root_required: None) -> Iterator[Path]:
    """A fresh btrfs filesystem mounted at tmp_path/mnt."""
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("mkfs.btrfs is missing: scripts/bootstrap.sh installs btrfs-progs")
    img = tmp_path / "btrfs.img"
    with open(img, "wb") as f:
        f.truncate(512 * MIB)
    run(["mkfs.btrfs", "-q", str(img)])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dev = run(["losetup", "--find", "--show", str(img)]).stdout.strip()
    try:
        run(["mount", "-t", "btrfs", dev, str(mnt)])
        try:
            yield mnt
        finally:
            clear_immutable(mnt)
            if run(["umount", str(mnt)], check_rc=None).returncode != 0:
                run(["umount", "-l", str(mnt)])
    finally:
        run(["losetup", "-d", dev])


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """VSERVER_* roots on ext4 (tmp_path); tests on btrfs move ROOTDIR onto it."""
    base = tmp_path / "v"
    for key, sub in (("CONFDIR", "etc"), ("ROOTDIR", "vservers"), ("RUNDIR", "run")):
        monkeypatch.setenv(f"VSERVER_{key}", str(base / sub))
    paths = Paths.from_env()
    paths.rootdir.mkdir(parents=True)
    try:
        yield paths
    finally:
        clear_immutable(base)


@pytest.fixture
def on_btrfs(btrfs: Path, roots: Paths, monkeypatch: pytest.MonkeyPatch) -> Paths:
    monkeypatch.setenv("VSERVER_ROOTDIR", str(btrfs / "vservers"))
    paths = Paths.from_env()
    paths.rootdir.mkdir()
    return paths


def clear_immutable(top: Path) -> None:
    """Let tmp_path go: hard-link tests leave immutable files if they fail midway."""
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    unify._clear_immutable(fd)
                finally:
                    os.close(fd)


# --- guest trees ----------------------------------------------------------------------

# Path -> (size, mode); files marked SAME have the same bytes in both guests.
SAME = ("usr/lib/libbig.so.1", "usr/lib/libother.so.2", "usr/lib/x86_64/libdeep.so",
        "usr/bin/tool")
EXCLUDED_SAME = ("etc/big.conf", "var/lib/dpkg/status", "var/log/old.log")


def make_guest(root: Path, own_seed: int) -> None:
    """A plain guest tree: identical 1 MiB libraries, a file of its own, identical /etc."""
    for rel in SAME:
        write(root / rel, pattern(rel, MIB), 0o755 if "/bin/" in rel else 0o644)
    for rel in EXCLUDED_SAME:
        write(root / rel, pattern(rel, MIB), 0o644)
    write(root / "usr/lib/own.so", pattern(f"own-{own_seed}", 300 * 1024), 0o644)
    # Same bytes, different mode: not shared (one inode's mode would be wrong).
    write(root / "usr/lib/mode.so", pattern("mode", 256 * 1024), 0o600 + own_seed * 0o40)
    write(root / "usr/share/empty", b"", 0o644)
    # Small enough for btrfs to keep inline in its metadata: no block to share.
    write(root / "usr/share/small", b"identical and tiny\n", 0o644)


def pattern(seed: str, size: int) -> bytes:
    """SIZE bytes that differ from every other seed's (so nothing dedupes by accident)."""
    block = (seed.encode() * (4096 // len(seed) + 1))[:4096]
    return b"".join(block[:4088] + i.to_bytes(8, "little") for i in range(size // 4096)) \
        + block[: size % 4096]


def write(path: Path, data: bytes, mode: int) -> None:
    # Written, never copied: Debian's cp reflinks on btrfs by default and the
    # tests would start with blocks already shared.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def guests(paths: Paths) -> tuple[Path, Path]:
    ref, web = paths.root("ref"), paths.root("web")
    make_guest(ref, 1)
    make_guest(web, 2)
    os.sync()
    return ref, web


def physical(path: Path) -> list[tuple[int, int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        ext = unify.extents(fd)
    finally:
        os.close(fd)
    assert ext is not None
    return [(lg, ph, ln) for lg, ph, ln, _fl in ext]


def shares_blocks(a: Path, b: Path) -> bool:
    pa, pb = physical(a), physical(b)
    return bool(pa) and pa == pb


def exclusive(path: Path) -> int:
    """Bytes only PATH's files hold, as btrfs counts them."""
    out = run(["btrfs", "filesystem", "du", "--raw", "-s", str(path)]).stdout.splitlines()
    _total, excl, *_ = out[-1].split()
    return int(excl)


def vunify(*args: str, check_rc: int | None = 0) -> tuple[str, str]:
    """Run vunify, check its exit status, return its stdout and stderr."""
    p = run([VUNIFY, *args], check_rc=check_rc)
    return p.stdout, p.stderr


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every file's (inode, ctime, mtime, size): what must not move under --test."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_ino, st.st_ctime_ns, st.st_mtime_ns,
                                             st.st_size)
    return out


# --- block sharing on btrfs --------------------------------------------------------------

def test_test_mode_reports_and_changes_nothing(on_btrfs: Paths) -> None:
    ref, web = guests(on_btrfs)
    before, excl = snapshot(web), exclusive(web)

    out, _ = vunify("--test", "ref", "web")

    assert "web: 8 files considered, 4 would be shared" in out, out
    assert f"({4 * MIB} bytes) would be saved (FIDEDUPERANGE)" in out, out
    assert snapshot(web) == before
    assert exclusive(web) == excl
    assert not any(shares_blocks(ref / r, web / r) for r in SAME)


def test_identical_files_share_blocks_and_stay_independent(on_btrfs: Paths) -> None:
    ref, web = guests(on_btrfs)
    excl_before = exclusive(web)
    modes = {r: os.stat(web / r) for r in SAME}

    out, _ = vunify("ref", "web")

    assert "web: 8 files considered, 4 shared, 2 already shared or too small, 2 differ" in out, out
    assert f"({4 * MIB} bytes) saved (FIDEDUPERANGE)" in out
    for r in SAME:
        assert shares_blocks(ref / r, web / r), r
        st = os.stat(web / r)
        # Blocks, not inodes: the guest keeps its own inode and metadata.
        assert st.st_ino != os.stat(ref / r).st_ino
        assert (st.st_mode, st.st_uid, st.st_mtime_ns) == (
            modes[r].st_mode, modes[r].st_uid, modes[r].st_mtime_ns)
    # /etc and /var are never unified, nor what differs.
    for r in (*EXCLUDED_SAME, "usr/lib/own.so", "usr/lib/mode.so"):
        assert not shares_blocks(ref / r, web / r), r
    assert exclusive(web) == excl_before - 4 * MIB

    # A write in one guest never shows in the other.
    target = web / "usr/lib/libbig.so.1"
    with open(target, "r+b") as f:
        f.write(b"changed in web")
    assert (ref / "usr/lib/libbig.so.1").read_bytes() == pattern("usr/lib/libbig.so.1", MIB)
    assert target.read_bytes().startswith(b"changed in web")
    (web / "usr/bin/tool").unlink()
    assert (ref / "usr/bin/tool").read_bytes() == pattern("usr/bin/tool", MIB)

    # Running again finds what is still shared, and only that.
    out, _ = vunify("ref", "web")
    assert "7 files considered, 0 shared, 4 already shared or too small, 3 differ" in out, out


def test_undo_gives_back_private_copies(on_btrfs: Paths) -> None:
    ref, web = guests(on_btrfs)
    lib = web / "usr/lib/libbig.so.1"
    os.setxattr(lib, "user.origin", b"web")
    os.chown(lib, 1000, 1000)
    os.chmod(lib, 0o4755)
    os.chown(ref / "usr/lib/libbig.so.1", 1000, 1000)
    os.chmod(ref / "usr/lib/libbig.so.1", 0o4755)
    os.utime(lib, ns=(1_000_000_000, 2_000_000_000))
    excl_before = exclusive(web)
    vunify("ref", "web")
    assert exclusive(web) == excl_before - 4 * MIB
    ino = os.stat(web / "usr/bin/tool").st_ino

    out, _ = vunify("--undo", "--test", "ref", "web")
    assert "4 would be unshared" in out, out
    assert shares_blocks(ref / "usr/bin/tool", web / "usr/bin/tool")

    out, _ = vunify("--undo", "ref", "web")

    assert f"4 unshared, 4 not shared, 0 skipped, 0 failed; 4.0 MiB ({4 * MIB} bytes)" in out
    assert exclusive(web) == excl_before
    for r in SAME:
        assert not set(physical(ref / r)) & set(physical(web / r)), r
        assert (web / r).read_bytes() == (ref / r).read_bytes()
    st = os.stat(lib)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
        0o4755, 1000, 1000, 2_000_000_000)
    assert os.getxattr(lib, "user.origin") == b"web"
    assert os.stat(web / "usr/bin/tool").st_ino != ino  # a new, private file
    assert not [p for p in web.rglob(".vunify-*")]


def test_undo_keeps_hard_links_inside_a_guest(on_btrfs: Paths) -> None:
    ref, web = guests(on_btrfs)
    for root in (ref, web):
        os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    vunify("ref", "web")
    assert shares_blocks(ref / "usr/bin/tool", web / "usr/bin/tool-alias")

    vunify("--undo", "ref", "web")

    a, b = os.stat(web / "usr/bin/tool"), os.stat(web / "usr/bin/tool-alias")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert not set(physical(ref / "usr/bin/tool")) & set(physical(web / "usr/bin/tool"))


def test_clone_fallback_compares_and_keeps_metadata(on_btrfs: Paths) -> None:
    """FICLONE, used where a filesystem clones but cannot dedupe, forced here."""
    ref, web = guests(on_btrfs)
    os.setxattr(web / "usr/bin/tool", "user.k", b"v")
    os.utime(web / "usr/bin/tool", ns=(5, 7_000_000_000))
    os.link(web / "usr/lib/libother.so.2", web / "usr/lib/libother-link")

    rep = unify.unify_tree(ref, web, method="FICLONE")

    assert (rep.done, rep.method) == (3, "FICLONE")
    assert [p for p, _ in rep.skipped] == ["/usr/lib/libother.so.2"]
    assert shares_blocks(ref / "usr/bin/tool", web / "usr/bin/tool")
    st = os.stat(web / "usr/bin/tool")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o755, 7_000_000_000)
    assert os.getxattr(web / "usr/bin/tool", "user.k") == b"v"
    assert not shares_blocks(ref / "usr/lib/own.so", web / "usr/lib/own.so")
    assert not [p for p in web.rglob(".vunify-*")]


def test_symlinks_in_a_guest_are_never_followed(on_btrfs: Paths) -> None:
    ref, web = guests(on_btrfs)
    host = on_btrfs.rootdir.parent / "host-secret"
    write(host / "data.bin", pattern("host", MIB), 0o644)
    write(ref / "usr/lib/plugins/data.bin", pattern("host", MIB), 0o644)
    (web / "usr/lib/plugins").symlink_to(host)
    before = snapshot(host)
    vunify("ref", "web")
    assert snapshot(host) == before
    assert not shares_blocks(ref / "usr/lib/plugins/data.bin", host / "data.bin")


def test_name_api_for_vpkg(on_btrfs: Paths) -> None:
    guests(on_btrfs)
    lines: list[bytes] = []
    summary = unify.unify(on_btrfs, "ref", ["web"], output=lines.append)
    assert str(summary) == f"4 files shared, 4.0 MiB ({4 * MIB} bytes) saved"
    assert lines[0].startswith(b"web: 8 files considered, 4 shared")


# --- refusals -------------------------------------------------------------------------

def test_ext4_refuses_block_sharing_clearly(roots: Paths) -> None:
    _, web = guests(roots)
    before = snapshot(web)
    for args in (("ref", "web"), ("--test", "ref", "web")):
        out, err = vunify(*args, check_rc=1)
        assert "cannot share blocks" in err and "btrfs" in err and "--hardlink" in err, err
        assert out == ""
    assert snapshot(web) == before


@pytest.mark.parametrize(("args", "message"), [
    (("ref", "../etc"), "invalid guest name"),
    (("ref", "nosuch"), "nosuch: no such vserver"),
    (("ref", "ref"), "ref is REF itself"),
    (("--path", "relative", "/tmp"), "absolute directory"),
])
def test_bad_arguments_are_usage_errors(roots: Paths, args: tuple[str, ...],
                                        message: str) -> None:
    guests(roots)
    _, err = vunify(*args, check_rc=2)
    assert message in err, err


def test_overlay_guests_are_refused(roots: Paths) -> None:
    guests(roots)
    (roots.rootdir / ".overlay" / "web" / "upper").mkdir(parents=True)
    _, err = vunify("ref", "web", check_rc=2)
    assert "overlay guest" in err


# --- the seed's hard links ----------------------------------------------------------------

def test_hardlink_mode_links_immutable_and_undo_restores(roots: Paths) -> None:
    ref, web = guests(roots)
    db = roots.root("db")
    make_guest(db, 3)
    lib = "usr/lib/libbig.so.1"

    out, err = vunify("--hardlink", "ref", "web")

    assert "immutable" in err and "package upgrades" in err and "--undo" in err, err
    # The tiny file too: an inode needs no block to be shared.
    assert "web: 8 files considered, 5 shared" in out, out
    for r in SAME:
        assert os.stat(ref / r).st_ino == os.stat(web / r).st_ino, r
    for r in (*EXCLUDED_SAME, "usr/lib/own.so", "usr/lib/mode.so"):
        assert os.stat(ref / r).st_ino != os.stat(web / r).st_ino, r
    fd = os.open(web / lib, os.O_RDONLY)
    try:
        assert unify.get_flags(fd) & unify.FS_IMMUTABLE_FL
    finally:
        os.close(fd)
    # Even the host's root cannot write, replace or remove it now.
    with pytest.raises(PermissionError) as e, open(web / lib, "r+b"):
        pass
    assert e.value.errno == errno.EPERM
    for attempt in (lambda: (web / lib).unlink(),
                    lambda: os.rename(web / "usr/lib/own.so", web / lib)):
        with pytest.raises(PermissionError) as e:
            attempt()
        assert e.value.errno == errno.EPERM

    # A second guest: link(2) onto the immutable file needs the flag cleared first.
    out, _ = vunify("--hardlink", "ref", "db")
    assert "db: 8 files considered, 5 shared" in out, out
    assert os.stat(ref / lib).st_nlink == 3

    out, _ = vunify("--undo", "ref", "web")
    assert "5 unshared" in out, out
    with open(web / lib, "r+b") as f:
        f.write(b"web's own now")
    assert (ref / lib).read_bytes() == pattern(lib, MIB)
    assert not [p for p in web.rglob(".vunify-*")]
    # db still links REF's inode, so it stays immutable ...
    with pytest.raises(PermissionError), open(ref / lib, "r+b"):
        pass
    # ... until the last guest lets go.
    vunify("--undo", "ref", "db")
    assert os.stat(ref / lib).st_nlink == 1
    with open(ref / lib, "r+b") as f:
        f.write(b"ref's own")


# --- vdu --------------------------------------------------------------------------------

def test_vdu_counts_single_link_files_on_one_filesystem(roots: Paths, tmp_path: Path) -> None:
    top = tmp_path / "tree"
    write(top / "a", b"x" * MIB, 0o644)
    write(top / "sub/b", b"y" * (100 * 1024), 0o644)
    write(top / "sub/c", b"z", 0o644)  # one block
    os.link(top / "a", top / "sub/a-link")  # two links: not the tree's own
    write(top / "sub/d", b"w" * (64 * 1024), 0o644)
    (top / "sub/sym").symlink_to("/usr")
    mnt = top / "mnt"
    mnt.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=8m", "vdu-test", str(mnt)])
    try:
        write(mnt / "elsewhere", b"q" * MIB, 0o644)
        p = run([VDU, str(top), str(top / "sub")])
    finally:
        run(["umount", str(mnt)])
    written = {str(top): 100 + 4 + 64, str(top / "sub"): 100 + 4 + 64}
    for line in p.stdout.splitlines():
        name, size = line.split("\t")
        assert size.endswith("K")
        assert written[name] <= int(size[:-1]) <= written[name] + 8, line


def test_vdu_guest_and_overlay_upper_and_json(roots: Paths) -> None:
    guests(roots)
    upper = roots.rootdir / ".overlay" / "ovl" / "upper"
    write(upper / "usr/bin/changed", b"u" * (200 * 1024), 0o755)
    roots.root("ovl").mkdir()
    p = run([VDU, "--json", "ref", "ovl"])
    rows = {r["arg"]: r for r in json.loads(p.stdout)}
    expected_ref = 4 * MIB + 3 * MIB + 300 * 1024 + 256 * 1024
    assert 0 <= rows["ref"]["bytes"] - expected_ref <= 8 * 4096
    assert rows["ref"]["files"] == 11
    assert rows["ovl"]["path"] == str(upper)
    assert rows["ovl"]["kib"] == 200
    p = run([VDU, "ovl"])
    assert p.stdout == "ovl\t200K\n"


def test_vdu_counts_block_shared_files_in_full(on_btrfs: Paths) -> None:
    guests(on_btrfs)
    before = run([VDU, "web"]).stdout
    vunify("ref", "web")
    assert run([VDU, "web"]).stdout == before
