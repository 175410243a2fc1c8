"""hostagent.build: real builds in tmp_path, hostile tarballs, and delete_root.

Every build goes into tmp_path / "guests" / NAME, so a test can check that a
failed build left nothing at all beside it, and that nothing landed outside.
"""

# The trees built here need setuid files, executables and a world-writable
# /dev/null: permissive modes are what these tests check, not a mistake.
# ruff: noqa: S103

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import io
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from hostagent import build
from hostagent.build import (
    FS_APPEND_FL,
    FS_IMMUTABLE_FL,
    FS_IOC_GETFLAGS,
    FS_IOC_SETFLAGS,
    METHODS,
    BuildError,
    build_root,
    delete_root,
    is_static_elf,
)

pytestmark = pytest.mark.usefixtures("root_required")

# cap_net_raw (13) and cap_setuid (7), permitted and effective, as
# vfs_cap_data revision 2 (include/uapi/linux/capability.h). Bit 7 makes a
# 0x80 byte, so the value is not valid UTF-8 and exercises the binary path.
CAP_XATTR = struct.pack("<IIIII", 0x02000001, (1 << 13) | (1 << 7), 0, 0, 0)


class Lines(list[str]):
    """A log callback that keeps what it was told."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def text(self) -> str:
        return "\n".join(self)


@pytest.fixture
def guests(tmp_path: Path) -> Path:
    d = tmp_path / "guests"
    d.mkdir()
    return d


def assert_nothing_left(guests: Path) -> None:
    """No guest, no .NAME.build-XXXX: a failed build leaves the directory as it was."""
    assert sorted(p.name for p in guests.iterdir()) == []


def chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=60)


def make_dev_null(root: Path) -> None:
    """The agent mounts a /dev at start; a chroot test needs at least /dev/null."""
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(root / "dev/null", 0o666)


# --- busybox ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busybox_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One busybox guest, plus the awkward entries a rootfs must carry over."""
    base = tmp_path_factory.mktemp("bbsrc")
    root = base / "src"
    build_root(root, "busybox", log=lambda _line: None)
    suid = root / "usr/bin/suid-test"
    shutil.copyfile(root / "etc/profile", suid)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    os.chmod(root / "usr/bin", 0o2755)  # a setgid directory
    os.symlink("/bin/busybox", root / "etc/abs-link")
    os.link(root / "etc/profile", root / "etc/profile-hardlink")
    os.mkfifo(root / "run/fifo", 0o600)
    os.mknod(root / "dev/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    owned = root / "home/guest/notes"
    owned.write_text("mine\n")
    os.chown(owned, 1000, 1000)
    os.utime(root / "etc/init.d", (1_000_000_000, 1_000_000_000))
    ping = root / "bin/ping-caps"
    shutil.copyfile(root / "etc/profile", ping)
    os.chmod(ping, 0o755)
    os.setxattr(ping, "user.gnu", b"made by GNU tar")
    return root


def test_methods_are_the_four_the_cli_offers():
    assert METHODS == ("copy", "busybox", "rootfs", "debootstrap")


def test_busybox_guest_layout(guests: Path):
    root = guests / "bb"
    log = Lines()
    build_root(root, "busybox", log=log)

    assert (root / "bin/busybox").is_file() and not (root / "bin/busybox").is_symlink()
    assert is_static_elf(root / "bin/busybox")
    for applet in ("bin/sh", "sbin/init", "sbin/syslogd", "usr/sbin/httpd", "bin/su"):
        link = root / applet
        assert link.is_symlink(), applet
        # Relative, so it resolves inside the tree when looked at from the host.
        assert not os.readlink(link).startswith("/")
        assert link.resolve() == (root / "bin/busybox").resolve()
    rc = root / "etc/init.d/rc"
    assert rc.stat().st_mode & 0o111
    passwd = (root / "etc/passwd").read_text()
    assert passwd.startswith("root:x:0:0:root:/root:/bin/sh\n")
    assert "guest:x:1000:1000:" in passwd and "nobody:x:65534:65534:" in passwd
    shadow = root / "etc/shadow"
    assert stat.S_IMODE(shadow.stat().st_mode) in (0o600, 0o640)
    assert shadow.read_text().startswith("root:!:")
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "root").stat().st_mode) == 0o700
    assert (root / "home/guest").stat().st_uid == 1000
    for d in ("dev", "proc", "sys", "run", "var/run", "var/log", "var/www", "mnt"):
        assert (root / d).is_dir(), d
    inittab = (root / "etc/inittab").read_text()
    assert "::sysinit:/etc/init.d/rc 3" in inittab
    assert "::shutdown:/etc/init.d/rc 0" in inittab
    entries = [line for line in inittab.splitlines() if not line.startswith("#")]
    assert not [line for line in entries if "getty" in line]
    assert os.readlink(root / "etc/rc3.d/S10syslogd") == "../init.d/syslogd"
    assert os.readlink(root / "etc/rc3.d/S20httpd") == "../init.d/httpd"
    for level in ("0", "6"):
        assert os.readlink(root / f"etc/rc{level}.d/K90syslogd") == "../init.d/syslogd"
        assert os.readlink(root / f"etc/rc{level}.d/K80httpd") == "../init.d/httpd"
    assert (root / "etc/hostname").read_text() == "bb\n"
    assert "method=busybox" in (root / "etc/vpanel-guest").read_text()
    assert_only(guests, "bb")
    assert "applets linked" in log.text()


def assert_only(guests: Path, *names: str) -> None:
    assert sorted(p.name for p in guests.iterdir()) == sorted(names)


def test_busybox_guest_runs_a_shell(guests: Path):
    root = guests / "bb"
    build_root(root, "busybox", log=Lines())
    r = chroot(root, "/bin/sh", "-c", "echo ok")
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    r = chroot(root, "/bin/su", "guest", "-c", "id -u")
    assert r.stdout == "1000\n", r.stderr


def write_service(path: Path) -> None:
    path.write_text('#!/bin/sh\necho "${0##*/} $1" >>/tmp/order\n')
    os.chmod(path, 0o755)


def test_rc_runs_kill_scripts_then_start_scripts_in_order(guests: Path):
    root = guests / "bb"
    build_root(root, "busybox", log=Lines())
    make_dev_null(root)
    for level in ("3", "0"):
        for link in (root / f"etc/rc{level}.d").iterdir():
            link.unlink()
    for name in ("etc/rc3.d/S02b", "etc/rc3.d/S01a", "etc/rc3.d/K01c", "etc/rc0.d/K02y",
                 "etc/rc0.d/K01x", "etc/rc0.d/S99halt"):
        write_service(root / name)
    (root / "etc/rc3.d/S50not-executable").write_text("#!/bin/sh\necho no >>/tmp/order\n")

    r = chroot(root, "/etc/init.d/rc", "3")
    assert r.returncode == 0, r.stderr
    assert (root / "tmp/order").read_text() == "K01c stop\nS01a start\nS02b start\n"

    (root / "tmp/order").unlink()
    r = chroot(root, "/etc/init.d/rc", "0")
    assert r.returncode == 0, r.stderr
    assert (root / "tmp/order").read_text() == "K01x stop\nK02y stop\nS99halt stop\n"

    r = chroot(root, "/etc/init.d/rc", "nine")
    assert r.returncode == 2 and "usage" in r.stderr


def pid_from(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text())
    except (OSError, ValueError):
        return None


def kill_quietly(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def test_syslogd_script_starts_reports_and_stops(guests: Path):
    root = guests / "bb"
    build_root(root, "busybox", log=Lines())
    make_dev_null(root)
    pidfile = root / "var/run/syslogd.pid"
    script = "/etc/init.d/syslogd"
    try:
        assert chroot(root, script, "status").returncode == 3
        r = chroot(root, script, "start")
        assert r.returncode == 0, r.stderr
        pid = pid_from(pidfile)
        assert pid is not None
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "syslogd"
        assert chroot(root, script, "status").returncode == 0
        # A second start sees the first and starts nothing.
        assert "already running" in chroot(root, script, "start").stdout
        assert pid_from(pidfile) == pid
        r = chroot(root, script, "stop")
        assert r.returncode == 0, r.stderr
        assert not pidfile.exists()
        assert chroot(root, script, "status").returncode == 3
        assert chroot(root, script, "stop").returncode == 0  # stopping twice is fine
    finally:
        kill_quietly(pid_from(pidfile))


def test_stale_pidfile_naming_another_process_is_not_running(guests: Path):
    root = guests / "bb"
    build_root(root, "busybox", log=Lines())
    make_dev_null(root)
    # Our own pid: alive, but not a syslogd. The name check needs /proc,
    # which a started guest always has.
    (root / "var/run/syslogd.pid").write_text(f"{os.getpid()}\n")
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        assert chroot(root, "/etc/init.d/syslogd", "status").returncode == 3
    finally:
        subprocess.run(["umount", str(root / "proc")], check=True)


def in_new_netns(code: str) -> subprocess.CompletedProcess[str]:
    """Run python CODE in a fresh network namespace, so port 80 is ours alone."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    return subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )


def test_httpd_script_serves_and_fails_fast_when_port_80_is_taken(guests: Path):
    root = guests / "bb"
    build_root(root, "busybox", log=Lines())
    make_dev_null(root)
    pidfile = root / "var/run/httpd.pid"
    try:
        r = in_new_netns(
            "import subprocess, sys\n"
            f"r = subprocess.run(['chroot', {str(root)!r}, '/etc/init.d/httpd', 'start'])\n"
            "sys.exit(r.returncode)\n"
        )
        assert r.returncode == 0, r.stderr
        assert chroot(root, "/etc/init.d/httpd", "status").returncode == 0
        assert chroot(root, "/etc/init.d/httpd", "stop").returncode == 0
        assert not pidfile.exists()

        r = in_new_netns(
            "import socket, subprocess, sys\n"
            "s = socket.socket(); s.bind(('0.0.0.0', 80)); s.listen()\n"
            f"r = subprocess.run(['chroot', {str(root)!r}, '/etc/init.d/httpd', 'start'],\n"
            "                   capture_output=True, text=True, timeout=30)\n"
            "sys.stderr.write(r.stderr)\n"
            "sys.exit(r.returncode)\n"
        )
        assert r.returncode == 1
        assert "httpd failed to start" in r.stderr
        assert not pidfile.exists()
    finally:
        kill_quietly(pid_from(pidfile))


def test_missing_busybox_names_the_package(guests: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(build, "BUSYBOX_CANDIDATES", (guests.parent / "no-busybox",))
    with pytest.raises(BuildError, match="apt-get install busybox-static"):
        build_root(guests / "bb", "busybox", log=Lines())
    assert_nothing_left(guests)


def test_dynamic_busybox_is_refused(guests: Path, monkeypatch: pytest.MonkeyPatch):
    dynamic = Path(shutil.which("ls") or "/bin/ls")
    monkeypatch.setattr(build, "BUSYBOX_CANDIDATES", (dynamic,))
    with pytest.raises(BuildError, match=r"dynamically linked.*busybox-static"):
        build_root(guests / "bb", "busybox", log=Lines())
    assert_nothing_left(guests)


def test_static_elf_check_reads_program_headers(tmp_path: Path):
    assert is_static_elf(Path("/bin/busybox"))
    assert not is_static_elf(Path(shutil.which("ls") or "/bin/ls"))
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(BuildError, match="not an ELF"):
        is_static_elf(text)


# --- build_root's promises ----------------------------------------------------------------------


def test_existing_root_is_refused_and_untouched(guests: Path):
    root = guests / "bb"
    root.mkdir()
    (root / "keep").write_text("x")
    with pytest.raises(BuildError, match="already exists"):
        build_root(root, "busybox", log=Lines())
    assert (root / "keep").read_text() == "x"
    assert_only(guests, "bb")


@pytest.mark.parametrize(
    ("method", "source", "message"),
    [
        ("vdu", None, "unknown build method"),
        ("copy", "/srv", "copy takes no source"),
        ("busybox", "/srv", "busybox takes no source"),
        ("rootfs", None, "rootfs needs a source"),
        ("rootfs", "/nonexistent/rootfs.tar", "does not exist"),
        ("debootstrap", None, "suite"),
        ("debootstrap", "Bookworm; rm -rf /", "suite"),
        ("debootstrap", "-v", "suite"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_made(
    guests: Path, method: str, source: str | None, message: str
):
    with pytest.raises(BuildError, match=message):
        build_root(guests / "g", method, source, log=Lines())
    assert_nothing_left(guests)


def test_missing_parent_is_refused(tmp_path: Path):
    with pytest.raises(BuildError, match="does not exist"):
        build_root(tmp_path / "no" / "g", "busybox", log=Lines())


def interrupt_on(marker: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        if marker in line:
            raise KeyboardInterrupt
    return log


def test_interrupted_build_leaves_no_temporary_tree(guests: Path):
    with pytest.raises(KeyboardInterrupt):
        build_root(guests / "bb", "busybox", log=interrupt_on("applets linked"))
    assert_nothing_left(guests)


def test_root_appearing_during_the_build_is_not_replaced(guests: Path):
    root = guests / "bb"

    def log(line: str) -> None:
        if "applets linked" in line:
            root.mkdir()
            (root / "theirs").write_text("x")

    with pytest.raises(BuildError, match="appeared while building"):
        build_root(root, "busybox", log=log)
    assert (root / "theirs").read_text() == "x"
    assert_only(guests, "bb")


# --- rootfs ----------------------------------------------------------------------------------


def check_carried_over(root: Path) -> None:
    """What a rootfs built from busybox_src must have kept."""
    suid = root / "usr/bin/suid-test"
    assert stat.S_IMODE(suid.stat().st_mode) == 0o4755
    assert stat.S_IMODE((root / "usr/bin").stat().st_mode) == 0o2755
    assert os.readlink(root / "etc/abs-link") == "/bin/busybox"
    assert (root / "etc/profile").stat().st_ino == (root / "etc/profile-hardlink").stat().st_ino
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)
    notes = (root / "home/guest/notes").stat()
    assert (notes.st_uid, notes.st_gid) == (1000, 1000)
    assert (root / "etc/init.d").stat().st_mtime == 1_000_000_000
    assert not os.path.lexists(root / "dev/zero")  # device nodes are never carried
    assert os.readlink(root / "bin/sh") == "busybox"
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert root.stat().st_uid == 0
    r = chroot(root, "/bin/sh", "-c", "echo ok")
    assert r.stdout == "ok\n", r.stderr


def test_rootfs_from_a_directory(guests: Path, busybox_src: Path):
    log = Lines()
    build_root(guests / "r", "rootfs", str(busybox_src), log=log)
    check_carried_over(guests / "r")
    assert "removed device node /dev/zero" in log.text()
    assert "method=rootfs" in (guests / "r/etc/vpanel-guest").read_text()
    assert_only(guests, "r")


def add_xattrs(info: tarfile.TarInfo) -> tarfile.TarInfo:
    if info.name == "./bin/ping-caps":
        info.pax_headers["SCHILY.xattr.security.capability"] = CAP_XATTR.decode(
            "utf-8", "surrogateescape"
        )
        info.pax_headers["SCHILY.xattr.user.vpanel"] = "kept"
        info.pax_headers["SCHILY.xattr.trusted.overlay.redirect"] = "/elsewhere"
    return info


def make_tarball(src: Path, dest: Path) -> Path:
    """DEST from the tree SRC, compressed as DEST's name says."""
    modes = {".tar": "w", ".gz": "w:gz", ".tgz": "w:gz", ".xz": "w:xz", ".bz2": "w:bz2"}
    if dest.suffix in (".zst", ".zstd"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(src, arcname=".", filter=add_xattrs)
        dest.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    else:
        with tarfile.open(dest, modes[dest.suffix], format=tarfile.PAX_FORMAT) as tar:
            tar.add(src, arcname=".", filter=add_xattrs)
    return dest


@pytest.mark.parametrize("name", ["rootfs.tar.gz", "rootfs.tar.xz", "rootfs.tar.zst",
                                  "rootfs.tar", "rootfs.tar.bz2"])
def test_rootfs_from_a_tarball(guests: Path, busybox_src: Path, tmp_path: Path, name: str):
    tarball = make_tarball(busybox_src, tmp_path / name)
    log = Lines()
    build_root(guests / "r", "rootfs", str(tarball), log=log)
    root = guests / "r"
    check_carried_over(root)
    assert "skipped device node ./dev/zero" in log.text()
    ping = root / "bin/ping-caps"
    assert os.getxattr(ping, "user.vpanel") == b"kept"
    # Set after the chown that would have cleared it.
    assert os.getxattr(ping, "security.capability") == CAP_XATTR
    with pytest.raises(OSError, match="No data"):
        os.getxattr(ping, "trusted.overlay.redirect")
    assert "dropped extended attribute trusted.overlay.redirect" in log.text()
    assert_only(guests, "r")


def hostile(path: Path, *members: tuple[str, str, str]) -> Path:
    """A gzip tarball of MEMBERS: (type, name, link target or file content)."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, extra in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_000_000_000
            if kind == "file":
                data = extra.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            tar.addfile(info)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A unique name in the host's /tmp that a hostile member aims at; removed after."""
    target = Path("/tmp") / f"vpanel-pwned-{uuid.uuid4().hex}"
    yield target
    if os.path.lexists(target):
        target.unlink()


def refused(guests: Path, tarball: Path, member: str) -> None:
    with pytest.raises(BuildError, match="refusing tarball member") as exc:
        build_root(guests / "g", "rootfs", str(tarball), log=Lines())
    assert repr(member) in str(exc.value)
    assert_nothing_left(guests)


def test_dotdot_member_is_refused(guests: Path, tmp_path: Path):
    tarball = hostile(tmp_path / "t.tgz", ("dir", "etc", ""), ("file", "../evil", "x"))
    refused(guests, tarball, "../evil")
    assert not (guests / "evil").exists() and not (tmp_path / "evil").exists()


def test_dotdot_inside_the_tree_is_allowed(guests: Path, tmp_path: Path):
    tarball = hostile(tmp_path / "t.tgz", ("dir", "a", ""), ("file", "a/../b", "x"))
    build_root(guests / "g", "rootfs", str(tarball), log=Lines())
    assert (guests / "g/b").read_text() == "x"


def test_absolute_member_is_put_inside_the_root(guests: Path, tmp_path: Path):
    name = f"vpanel-evil-{uuid.uuid4().hex}"
    tarball = hostile(tmp_path / "t.tgz", ("file", f"/etc/{name}", "x"))
    log = Lines()
    build_root(guests / "g", "rootfs", str(tarball), log=log)
    assert (guests / "g/etc" / name).read_text() == "x"
    assert not (Path("/etc") / name).exists()
    assert "removing leading '/'" in log.text()


def test_hardlink_leaving_the_root_is_refused(guests: Path, tmp_path: Path):
    # From guests/.g.build-XXXX, ../../x is tmp_path/x: make it exist, so an
    # unchecked link(2) would succeed.
    victim = tmp_path / "x"
    victim.write_text("host file")
    tarball = hostile(tmp_path / "t.tgz", ("hardlink", "h", "../../x"))
    refused(guests, tarball, "h")
    assert victim.stat().st_nlink == 1


def test_symlink_then_write_through_it_is_refused(guests: Path, tmp_path: Path, outside: Path):
    tarball = hostile(
        tmp_path / "t.tgz",
        ("symlink", "escape", "/"),
        ("file", f"escape/tmp/{outside.name}", "pwned"),
    )
    refused(guests, tarball, f"escape/tmp/{outside.name}")
    assert not outside.exists()


def test_relative_symlink_climbing_out_is_refused(guests: Path, tmp_path: Path):
    tarball = hostile(
        tmp_path / "t.tgz", ("symlink", "up", "../.."), ("file", "up/evil", "pwned")
    )
    refused(guests, tarball, "up/evil")
    assert not (tmp_path / "evil").exists()


def test_relative_symlink_inside_the_root_is_followed(guests: Path, tmp_path: Path):
    # usr-merged trees: lib -> usr/lib, and an archive that lists lib/x.
    tarball = hostile(
        tmp_path / "t.tgz",
        ("dir", "usr/lib", ""),
        ("symlink", "lib", "usr/lib"),
        ("file", "lib/libx.so", "elf"),
    )
    build_root(guests / "g", "rootfs", str(tarball), log=Lines())
    assert (guests / "g/usr/lib/libx.so").read_text() == "elf"
    assert os.readlink(guests / "g/lib") == "usr/lib"


def test_file_replacing_a_symlink_does_not_write_through_it(
    guests: Path, tmp_path: Path, outside: Path
):
    outside.write_text("host")
    tarball = hostile(
        tmp_path / "t.tgz", ("symlink", "link", str(outside)), ("file", "link", "guest")
    )
    build_root(guests / "g", "rootfs", str(tarball), log=Lines())
    assert outside.read_text() == "host"
    assert (guests / "g/link").read_text() == "guest"
    assert not (guests / "g/link").is_symlink()


def test_hardlink_to_an_absolute_symlink_links_the_symlink(guests: Path, tmp_path: Path):
    before = os.stat("/etc/passwd").st_nlink
    tarball = hostile(
        tmp_path / "t.tgz", ("symlink", "s", "/etc/passwd"), ("hardlink", "h", "s")
    )
    build_root(guests / "g", "rootfs", str(tarball), log=Lines())
    assert os.readlink(guests / "g/h") == "/etc/passwd"
    assert os.stat("/etc/passwd").st_nlink == before


def test_corrupt_tarball_leaves_nothing(guests: Path, busybox_src: Path, tmp_path: Path):
    good = make_tarball(busybox_src, tmp_path / "rootfs.tar.gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(BuildError):
        build_root(guests / "g", "rootfs", str(cut), log=Lines())
    assert_nothing_left(guests)


def test_corrupt_zstd_tarball_leaves_nothing(guests: Path, busybox_src: Path, tmp_path: Path):
    plain = make_tarball(busybox_src, tmp_path / "rootfs.tar").read_bytes()
    # With a content checksum, as the zstd command writes by default.
    good = zstandard.ZstdCompressor(write_checksum=True).compress(plain)
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(good[:4096] + bytes([good[4096] ^ 0xFF]) + good[4097:])
    with pytest.raises(BuildError, match="checksum"):
        build_root(guests / "g", "rootfs", str(bad), log=Lines())
    assert_nothing_left(guests)


def test_gzip_crc_is_checked(guests: Path, busybox_src: Path, tmp_path: Path):
    good = make_tarball(busybox_src, tmp_path / "rootfs.tar.gz").read_bytes()
    bad = tmp_path / "bad.tar.gz"
    # The trailer's CRC32, which tarfile's own stream reader never looks at.
    bad.write_bytes(good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:])
    with pytest.raises(BuildError, match="CRC"):
        build_root(guests / "g", "rootfs", str(bad), log=Lines())
    assert_nothing_left(guests)


def test_tarball_cut_between_members_is_refused(guests: Path, tmp_path: Path):
    whole = hostile(tmp_path / "t.tar.gz", ("file", "a", "x" * 100), ("file", "b", "y"))
    # Blocks: a's header, a's data, b's header, b's data, then the zero blocks.
    data = gzip.decompress(whole.read_bytes())
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:1024])  # ends cleanly after a: tarfile alone would not notice
    with pytest.raises(BuildError, match="truncated"):
        build_root(guests / "g", "rootfs", str(cut), log=Lines())
    assert_nothing_left(guests)
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(data[:1024] + b"garbage!" * 64 + data[1536:])  # b's header
    with pytest.raises(BuildError, match="damaged header at byte 1024"):
        build_root(guests / "g", "rootfs", str(damaged), log=Lines())
    assert_nothing_left(guests)


def test_rootfs_from_a_gnu_tar_tarball(guests: Path, busybox_src: Path, tmp_path: Path):
    tarball = tmp_path / "gnu.tar.xz"
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=user.*", "-C", str(busybox_src), "-cJf",
         str(tarball), "."],
        check=True,
    )
    build_root(guests / "r", "rootfs", str(tarball), log=Lines())
    check_carried_over(guests / "r")
    assert os.getxattr(guests / "r/bin/ping-caps", "user.gnu") == b"made by GNU tar"


# --- copy ------------------------------------------------------------------------------------


def fake_host(base: Path) -> Path:
    """A small usr-merged Debian-like tree with everything copy must change or leave out."""
    h = base / "host"
    for d in ("usr/bin", "usr/sbin", "usr/lib", "etc/ssh", "etc/init.d", "etc/rc3.d",
              "etc/rcS.d", "etc/vservers", "etc/systemd/system/multi-user.target.wants",
              "etc/systemd/system/sysinit.target.wants", "etc/systemd/system/getty.target.wants",
              "var/cache/apt/archives/partial", "var/lib/apt/lists/partial", "var/log/apt",
              "var/tmp", "var/lib/dbus", "root", "home/alice", "proc"):
        (h / d).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "sbin", "lib"):
        os.symlink(f"usr/{name}", h / name)
    shutil.copyfile("/bin/busybox", h / "usr/bin/busybox")
    os.chmod(h / "usr/bin/busybox", 0o755)
    os.symlink("busybox", h / "usr/bin/sh")
    os.link(h / "usr/bin/busybox", h / "usr/bin/busybox-hardlink")
    suid = h / "usr/bin/passwd"
    suid.write_text("#!/bin/sh\n")
    os.chmod(suid, 0o4755)
    owned = h / "usr/lib/owned"
    owned.write_text("x")
    os.chown(owned, 1234, 5678)
    (h / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
        "bob:x:1001:1001::/home/bob:/bin/sh\n"
    )
    shadow = h / "etc/shadow"
    shadow.write_text(
        "root:$6$salt$ROOTHASH:19000:0:99999:7:::\n"
        "alice:$y$j9T$salt$ALICEHASH:19000:0:99999:7:::\n"
        "daemon:*:19000:0:99999:7:::\n"
        "locked:!$6$old$OLDHASH:19000:0:99999:7:::\n"
        "bob::19000:0:99999:7:::\n"
    )
    os.chmod(shadow, 0o640)
    os.chown(shadow, 0, 42)
    (h / "etc/ssh/sshd_config").write_text("Port 22\n")
    for key in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key"):
        (h / "etc/ssh" / key).write_text("KEY")
    (h / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (h / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (h / "etc/fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    (h / "etc/hostname").write_text("thehost\n")
    (h / "etc/vservers/other.conf").write_text("IPROOT=10.0.0.2\n")
    for script in ("udev", "ssh", "hwclock.sh", "kmod", "cron"):
        (h / "etc/init.d" / script).write_text("#!/bin/sh\n")
    for link, script in (("rc3.d/S01udev", "udev"), ("rc3.d/S02ssh", "ssh"),
                         ("rc3.d/S03cron", "cron"), ("rcS.d/S01hwclock.sh", "hwclock.sh"),
                         ("rcS.d/S02kmod", "kmod"), ("rc3.d/K01udev", "udev")):
        os.symlink(f"../init.d/{script}", h / "etc" / link)
    units = h / "etc/systemd/system"
    for wants, unit in (("multi-user.target.wants", "ssh.service"),
                        ("multi-user.target.wants", "cron.service"),
                        ("sysinit.target.wants", "systemd-timesyncd.service"),
                        ("sysinit.target.wants", "lvm2-monitor.service"),
                        ("getty.target.wants", "getty@tty1.service")):
        os.symlink(f"/lib/systemd/system/{unit}", units / wants / unit)
    (h / "var/cache/apt/archives/x.deb").write_text("deb")
    (h / "var/cache/apt/archives/lock").write_text("")
    (h / "var/lib/apt/lists/deb.debian.org_Packages").write_text("Package: x\n")
    (h / "var/log/syslog").write_text("host secrets\n")
    (h / "var/log/apt/history.log").write_text("host history\n")
    os.chown(h / "var/log/apt", 0, 4)
    (h / "var/tmp/junk").write_text("junk")
    os.symlink("/run", h / "var/run")
    os.symlink("/run/lock", h / "var/lock")
    (h / "root/.bash_history").write_text("host root's history\n")
    (h / "home/alice/private").write_text("alice's\n")
    return h


def test_copy_makes_a_guest_without_the_hosts_identity(tmp_path: Path, guests: Path):
    host = fake_host(tmp_path)
    log = Lines()
    build_root(guests / "c", "copy", log=log, host_root=host)
    g = guests / "c"

    # Copied as they are: usr-merge symlinks, hard links, setuid, owners.
    assert os.readlink(g / "bin") == "usr/bin"
    assert (g / "usr/bin/busybox").stat().st_ino == (g / "usr/bin/busybox-hardlink").stat().st_ino
    assert stat.S_IMODE((g / "usr/bin/passwd").stat().st_mode) == 0o4755
    assert (g / "usr/lib/owned").stat().st_uid == 1234
    assert (g / "usr/lib/owned").stat().st_gid == 5678
    assert os.readlink(g / "var/run") == "/run"
    assert (g / "etc/ssh/sshd_config").read_text() == "Port 22\n"

    # Mount points made, the host's homes, root and /proc not copied.
    for d in ("dev", "proc", "sys", "run", "root", "home", "mnt"):
        assert (g / d).is_dir(), d
    assert stat.S_IMODE((g / "tmp").stat().st_mode) == 0o1777
    assert list((g / "root").iterdir()) == [] and list((g / "home").iterdir()) == []

    # Left out.
    assert not (g / "etc/vservers").exists()
    assert not (g / "var/cache/apt/archives/x.deb").exists()
    assert (g / "var/cache/apt/archives/partial").is_dir()
    assert (g / "var/cache/apt/archives/lock").exists()
    assert not (g / "var/lib/apt/lists/deb.debian.org_Packages").exists()
    assert (g / "var/lib/apt/lists/partial").is_dir()
    assert not (g / "var/log/syslog").exists()
    assert not (g / "var/log/apt/history.log").exists()
    assert (g / "var/log/apt").stat().st_gid == 4
    assert list((g / "var/tmp").iterdir()) == []

    # Host-only services off, the rest left alone.
    assert sorted(p.name for p in (g / "etc/rc3.d").iterdir()) == ["K01udev", "S02ssh", "S03cron"]
    assert list((g / "etc/rcS.d").iterdir()) == []
    units = g / "etc/systemd/system"
    assert sorted(p.name for p in (units / "multi-user.target.wants").iterdir()) == [
        "cron.service", "ssh.service"]
    assert list((units / "sysinit.target.wants").iterdir()) == []
    assert list((units / "getty.target.wants").iterdir()) == []

    # Identity.
    assert sorted(p.name for p in (g / "etc/ssh").iterdir()) == ["sshd_config"]
    assert (g / "etc/machine-id").read_text() == ""
    assert not (g / "var/lib/dbus/machine-id").exists()
    assert (g / "etc/hostname").read_text() == "c\n"
    assert "/dev/sda1" not in (g / "etc/fstab").read_text()

    # Passwords: every hash gone, not merely prefixed.
    shadow = g / "etc/shadow"
    text = shadow.read_text()
    assert "HASH" not in text
    assert text.splitlines() == [
        "root:!:19000:0:99999:7:::",
        "alice:!:19000:0:99999:7:::",
        "daemon:*:19000:0:99999:7:::",
        "locked:!:19000:0:99999:7:::",  # a hash behind '!' goes too
        "bob:!:19000:0:99999:7:::",  # no password at all: locked
    ]
    st = shadow.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, 42)
    assert "locked 4 password(s)" in log.text()
    assert "ssh-keygen -A" in log.text()

    # And the host is as it was.
    assert "ROOTHASH" in (host / "etc/shadow").read_text()
    assert (host / "etc/ssh/ssh_host_rsa_key").exists()
    assert (host / "etc/rc3.d/S01udev").is_symlink()

    r = chroot(g, "/bin/sh", "-c", "echo ok")
    assert r.stdout == "ok\n", r.stderr
    assert_only(guests, "c")


def test_copy_leaves_out_the_guests_directory_itself(tmp_path: Path):
    host = fake_host(tmp_path)
    guests = host / "var/lib/vservers"
    guests.mkdir(parents=True)
    (guests / "other").mkdir()
    (guests / "other/secret").write_text("another guest's file")
    build_root(guests / "c", "copy", log=Lines(), host_root=host)
    assert not (guests / "c/var/lib/vservers").exists()
    assert (guests / "c/var/lib/dbus").is_dir()
    assert_only(guests, "c", "other")


def test_copy_does_not_cross_into_mounts(tmp_path: Path, guests: Path):
    host = fake_host(tmp_path)
    docker = host / "var/lib/docker"
    docker.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "vpanel-test", str(docker)], check=True)
    try:
        (docker / "layer").write_text("another filesystem")
        build_root(guests / "c", "copy", log=Lines(), host_root=host)
    finally:
        subprocess.run(["umount", str(docker)], check=True)
    assert (guests / "c/var/lib/docker").is_dir()
    assert list((guests / "c/var/lib/docker").iterdir()) == []


def test_interrupted_copy_leaves_nothing(tmp_path: Path, guests: Path):
    host = fake_host(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        build_root(guests / "c", "copy", log=interrupt_on("host-only services"), host_root=host)
    assert_nothing_left(guests)


# --- debootstrap -------------------------------------------------------------------------------


@pytest.mark.debootstrap
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("VPANEL_TEST_DEBOOTSTRAP") != "1",
                    reason="downloads a Debian; set VPANEL_TEST_DEBOOTSTRAP=1 to run it")
def test_debootstrap_builds_a_debian_guest(guests: Path):
    log = Lines()
    build_root(guests / "deb", "debootstrap", "bookworm", log=log)
    g = guests / "deb"
    assert (g / "etc/debian_version").is_file()
    assert list((g / "dev").iterdir()) == []
    assert (g / "etc/hostname").read_text() == "deb\n"
    for line in (g / "etc/shadow").read_text().splitlines():
        assert line.split(":")[1] in ("!", "*") or line.split(":")[1].startswith("!")
    r = chroot(g, "/bin/sh", "-c", "echo ok")
    assert r.stdout == "ok\n", r.stderr
    assert any(line.startswith("I: ") for line in log)  # progress was streamed
    assert_only(guests, "deb")


# --- delete_root ----------------------------------------------------------------------------------


def set_flags(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        old = struct.unpack("I", buf)[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("I", old | flags))
    finally:
        os.close(fd)


def clear_flags(path: Path) -> None:
    if path.exists():
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("I", 0))
        finally:
            os.close(fd)


def test_delete_removes_immutable_and_append_only_entries(guests: Path):
    root = guests / "d"
    build_root(root, "busybox", log=Lines())
    frozen = root / "etc/frozen"
    frozen.write_text("x")
    logdir = root / "var/log"
    (logdir / "append-only").write_text("x")
    try:
        set_flags(frozen, FS_IMMUTABLE_FL)
        set_flags(logdir / "append-only", FS_APPEND_FL)
        set_flags(logdir, FS_APPEND_FL)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            pytest.skip(f"{guests} does not support chattr flags ({e.strerror})")
        raise
    try:
        with pytest.raises(PermissionError):
            frozen.unlink()
        delete_root(root)
        assert not os.path.lexists(root)
        assert_nothing_left(guests)
    finally:
        for p in (frozen, logdir / "append-only", logdir):
            clear_flags(p)


def test_delete_refuses_a_tree_with_a_mount_inside(guests: Path):
    root = guests / "d"
    build_root(root, "busybox", log=Lines())
    mnt = root / "mnt"
    subprocess.run(["mount", "-t", "tmpfs", "vpanel-test", str(mnt)], check=True)
    try:
        with pytest.raises(BuildError, match=re.escape(f"{mnt} is a mount point")):
            delete_root(root)
        assert (root / "bin/busybox").is_file()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    delete_root(root)
    assert not os.path.lexists(root)


def test_delete_does_not_follow_symlinks(guests: Path, tmp_path: Path):
    root = guests / "d"
    build_root(root, "busybox", log=Lines())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    os.symlink(outside, root / "home/link-to-outside")
    os.symlink("../../..", root / "home/guest/up")
    delete_root(root)
    assert not os.path.lexists(root)
    assert (outside / "keep").read_text() == "x"


def test_delete_refuses_a_symlinked_root(guests: Path, tmp_path: Path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep").write_text("x")
    os.symlink(target, guests / "d")
    with pytest.raises(BuildError, match="symlink"):
        delete_root(guests / "d")
    assert (target / "keep").exists()


def test_delete_of_a_missing_root_is_a_no_op(guests: Path):
    delete_root(guests / "never-built")


def test_delete_removes_a_deep_tree(guests: Path):
    root = guests / "d"
    root.mkdir()
    deep = root
    for _ in range(1200):  # deeper than Python's default recursion limit
        deep = deep / "d"
        os.mkdir(deep)
    delete_root(root)
    assert not os.path.lexists(root)
