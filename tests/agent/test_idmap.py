"""A private range of host ids per guest (IDMAP), for real: user namespaces,
idmapped template layers, shifted plain guests, re-adoption by a new agent."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import re
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent import conf, guest, idmap, quota, templates, wire
from hostagent.client import AgentClient
from hostagent.paths import Paths
from tests.agent.conftest import UPLINK, Lan
from tests.agent.test_quota import btrfs_roots  # noqa: F401
from tests.agent.test_rebootmgr import Inbox, Managers, loop, managers  # noqa: F401
from tests.helpers import AgentProcess, as_guest_root, attempt, run

SUID_SOURCE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
/* What passwd needs of its setuid bit: euid 0, and /etc/shadow (0600) writable. */
int main(void) {
    printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
    int fd = open("/etc/shadow", O_WRONLY | O_APPEND);
    if (fd < 0) { perror("open /etc/shadow"); return 1; }
    if (write(fd, "", 0) < 0) { perror("write /etc/shadow"); return 1; }
    close(fd);
    puts("shadow writable");
    return 0;
}
"""


# --- helpers -----------------------------------------------------------------------

def run_in(paths: Paths, name: str, script: str, user: str | None = None) -> tuple[int, str]:
    buf = bytearray()
    code = guest.exec_in(paths, name, ["/bin/sh", "-c", script], user=user, output=buf.extend)
    return code, buf.decode(errors="replace")


def settings(paths: Paths, name: str) -> conf.GuestSettings:
    return conf.settings_from_file(paths.conf(name))


def uid_map(pid: int) -> list[tuple[int, int, int]]:
    with open(f"/proc/{pid}/uid_map") as f:
        return [(int(a), int(b), int(c)) for a, b, c in (line.split() for line in f)]


NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1), include/uapi/linux/nsfs.h


def owner_of(ns_path: str) -> int:
    """Inode of the user namespace that owns the namespace at NS_PATH."""
    fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ufd = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            return os.fstat(ufd).st_ino
        finally:
            os.close(ufd)
    finally:
        os.close(fd)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """(uid, gid, mode, size, sha256 or link target) of everything under ROOT."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            else:
                digest = ""
            out[os.path.relpath(p, root)] = (st.st_uid, st.st_gid, st.st_mode, st.st_size,
                                             digest)
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages in the page cache, pages) of the file PATH opens, by mincore(2) on a
    mapping of it: mapping and asking read nothing in."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pages = (size + os.sysconf("SC_PAGE_SIZE") - 1) // os.sysconf("SC_PAGE_SIZE")
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def suid_binary(tmp_path: Path) -> Path:
    src, exe = tmp_path / "suid.c", tmp_path / "suid"
    src.write_text(SUID_SOURCE)
    run(["gcc", "-static", "-O2", "-o", str(exe), str(src)])
    return exe


@pytest.fixture
def template(vroots: Paths) -> str:
    templates.create(vroots, "tpl", "busybox", None)
    return "tpl"


def isolated(paths: Paths, name: str, template: str | None = None, **kw: Any) -> None:
    method = {"method": "template", "source": template} if template else {"method": "busybox"}
    guest.build(paths, name, guest.BuildOptions(**method, idmap="isolated", **kw))


# --- two guests from one template --------------------------------------------------------

def test_two_isolated_guests_from_one_template_get_ranges_that_do_not_overlap(
        vroots: Paths, template: str) -> None:
    for name in ("a", "b"):
        isolated(vroots, name, template)
    sa, sb = settings(vroots, "a"), settings(vroots, "b")
    assert sa.idmap == sb.idmap == "isolated"
    assert sa.idmap_base is not None and sb.idmap_base is not None
    assert sa.idmap_base >= 100000 and sb.idmap_base >= 100000
    assert abs(sa.idmap_base - sb.idmap_base) >= idmap.RANGE
    for name, base in (("a", sa.idmap_base), ("b", sb.idmap_base)):
        st = guest.start(vroots, name)
        assert st.idmap_base == base
        # The guest's PID 1 runs in a user namespace of its own with exactly its range.
        assert uid_map(st.init_pid) == [(0, base, idmap.RANGE)]
        assert os.stat(f"/proc/{st.init_pid}").st_uid == base
        assert f"User ids: isolated, guest 0..65535 = host {base}.." in \
            guest.status(vroots, name).text()
        own = os.stat(f"/proc/{st.init_pid}/ns/user").st_ino
        assert own != os.stat("/proc/self/ns/user").st_ino
        for ns in ("mnt", "pid", "net", "uts", "ipc", "cgroup"):
            # Every other namespace of the guest is owned by its user namespace.
            assert owner_of(f"/proc/{st.init_pid}/ns/{ns}") == own, ns


def test_a_file_root_makes_in_one_guest_is_its_range_on_the_host_and_unreadable_from_the_other(
        vroots: Paths, template: str) -> None:
    for name in ("a", "b"):
        isolated(vroots, name, template)
        guest.start(vroots, name)
    code, out = run_in(vroots, "a", "echo secret > /root/secret && chmod 600 /root/secret "
                                    "&& ls -ln /root/secret && id -u")
    assert code == 0 and out.split()[-1] == "0", out  # guest root is uid 0 to itself
    base_a, base_b = settings(vroots, "a").idmap_base, settings(vroots, "b").idmap_base
    upper = templates.overlay_dirs(vroots, "a")[0] / "root/secret"
    st = os.stat(upper)
    assert (st.st_uid, st.st_gid) == (base_a, base_a)
    assert os.stat(vroots.root("a") / "root/secret").st_uid == base_a  # the host's view
    # B's root, handed A's directory, cannot read the file; A's root can.
    dfd = os.open(vroots.root("a") / "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        def read_secret() -> str:
            return attempt(lambda: os.close(os.open("secret", os.O_RDONLY, dir_fd=dfd)))

        init_a = guest.read_state(vroots, "a").init_pid  # type: ignore[union-attr]
        init_b = guest.read_state(vroots, "b").init_pid  # type: ignore[union-attr]
        assert as_guest_root(init_b, read_secret) == "EACCES"
        assert as_guest_root(init_a, read_secret) == "ok"
    finally:
        os.close(dfd)
    assert base_b is not None and not base_b <= st.st_uid < base_b + idmap.RANGE


def test_the_template_on_disk_stays_real_roots_and_unchanged(
        vroots: Paths, template: str) -> None:
    tpl = templates.template_path(vroots, template)
    before = tree_snapshot(tpl)
    # Real root's tree, with its own users' files (/home/guest) in the host's own ids.
    assert before["bin/busybox"][:2] == (0, 0)
    assert all(v[0] < idmap.RANGE and v[1] < idmap.RANGE for v in before.values())
    for name in ("a", "b"):
        isolated(vroots, name, template)
        guest.start(vroots, name)
        code, out = run_in(vroots, name, "echo changed >> /etc/hostname && rm /bin/ls && "
                                         "touch /bin/new && chown 1000:1000 /etc/passwd && "
                                         "chmod 4755 /bin/new && ls -ln /etc/passwd")
        assert code == 0, out
        assert re.search(r" 1000 +1000 ", out), out
    # Inside, the template's files are root's (the idmapped layer) ...
    code, out = run_in(vroots, "b", "stat -c '%u %g' /bin/busybox /etc/shadow")
    assert code == 0 and out.split() == ["0", "0", "0", "0"], out
    # ... on disk, still real root's and untouched, and guests' changes are in their layer.
    assert tree_snapshot(tpl) == before
    base_a = settings(vroots, "a").idmap_base
    assert base_a is not None
    assert os.stat(templates.overlay_dirs(vroots, "a")[0] / "etc/passwd").st_uid == base_a + 1000


def test_the_page_cache_holds_one_copy_of_a_template_file(vroots: Paths, template: str) -> None:
    blob = templates.template_path(vroots, template) / "usr/share-blob"
    blob.write_bytes(os.urandom(4 << 20))
    for name in ("a", "b"):
        isolated(vroots, name, template)
        guest.start(vroots, name)
    drop_from_page_cache(blob)
    assert resident_pages(blob)[0] < resident_pages(blob)[1]
    code, out = run_in(vroots, "a", "cat /usr/share-blob > /dev/null && echo read")
    assert code == 0 and "read" in out, out
    cached, pages = resident_pages(blob)
    assert cached == pages  # A's read filled the template file's own pages
    # B never read it, and its view of the file is already in memory: the same pages.
    b_view = vroots.root("b") / "usr/share-blob"
    assert resident_pages(b_view) == (pages, pages)
    assert os.stat(b_view).st_ino == os.stat(blob).st_ino


# --- inside the guest --------------------------------------------------------------------

def test_setuid_binaries_work_inside_an_isolated_guest(
        vroots: Paths, template: str, tmp_path: Path) -> None:
    exe = templates.template_path(vroots, template) / "usr/bin/suidcheck"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_bytes(suid_binary(tmp_path).read_bytes())
    os.chmod(exe, 0o4755)  # noqa: S103 (setuid root in a test template, deleted with it)
    isolated(vroots, "u", template)
    guest.start(vroots, "u")
    code, out = run_in(vroots, "u", "/usr/bin/suidcheck", user="guest")
    assert code == 0, out
    assert "uid=1000 euid=0" in out and "shadow writable" in out, out
    # Without the setuid bit, the same user cannot: the bit, not the user, did it.
    code, out = run_in(vroots, "u", "cp /usr/bin/suidcheck /tmp/plain && /tmp/plain",
                       user="guest")
    assert code != 0 and "uid=1000 euid=1000" in out, out


def test_guest_root_installs_runs_low_port_services_and_chowns_among_its_users(
        vroots: Paths) -> None:
    isolated(vroots, "s")
    guest.start(vroots, "s")
    code, out = run_in(vroots, "s", """
        mkdir -p /opt/pkg && cp /bin/busybox /opt/pkg/tool && chown -R 1000:1000 /opt/pkg
        stat -c '%u %g' /opt/pkg/tool
        su guest -c 'id -u; touch /opt/pkg/mine && stat -c %u /opt/pkg/mine'
        /usr/sbin/httpd -p 81 -h /var/www && sleep 0.3 && netstat -ltn | grep -c ':81 '
        hostname
    """)
    assert code == 0, out
    lines = out.split()
    assert lines[:3] == ["1000", "1000", "1000"] and lines[3] == "1000", out
    assert "1" in lines[4:], out
    base = settings(vroots, "s").idmap_base
    assert base is not None
    assert os.stat(vroots.root("s") / "opt/pkg/mine").st_uid == base + 1000


def test_ps_inside_shows_uid_0_and_vps_on_the_host_shows_host_ids_and_the_guest(
        vroots: Paths) -> None:
    isolated(vroots, "p")
    st = guest.start(vroots, "p")
    code, out = run_in(vroots, "p", "ps -o user,pid,comm; id -u")
    assert code == 0, out
    rows = [line.split() for line in out.splitlines()[1:-1]]
    assert rows and all(r[0] == "root" for r in rows), out
    vps = run([str(Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin/vps"),
               "-eo", "pid,uid,args"], check_rc=0).stdout
    (line,) = [ln for ln in vps.splitlines() if ln.split()[:1] == [str(st.init_pid)]]
    assert f" {st.idmap_base} " in f" {line} " and " p " in line, line


def test_tty_of_an_enter_is_guest_roots_and_the_reboot_socket_answers(
        vroots: Paths, managers: Managers) -> None:  # noqa: F811
    isolated(vroots, "r")
    guest.start(vroots, "r")
    base = settings(vroots, "r").idmap_base
    assert base is not None
    console = guest.open_console(vroots, "r")
    try:
        os.write(console.master_fd, b"stat -c 'tty-owner=%u' $(tty); exit\n")
        out = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError, OSError):
                out += os.read(console.master_fd, 4096)
            if re.search(rb"tty-owner=\d", out) or console.poll() is not None:
                break
            time.sleep(0.05)
        assert b"tty-owner=0" in out, out
    finally:
        console.close()
    inbox = Inbox()
    managers.watch(managers.new(inbox), "r")
    assert os.stat(vroots.rundir / "reboot/r/reboot").st_uid == base
    code, out = run_in(vroots, "r", "/sbin/vreboot")
    assert code == 0, out
    assert inbox.wait_for(1) == [("r", "restart")]


# --- shifting ----------------------------------------------------------------------------

def _acl(entries: tuple[tuple[int, int, int | None], ...]) -> bytes:
    """A system.posix_acl_access value (include/uapi/linux/posix_acl_xattr.h)."""
    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF if ident is None else ident)
        for tag, perm, ident in entries)


def _acl_entries(raw: bytes) -> list[tuple[int, int, int]]:
    return [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw), 8)]


def _vfs_cap_v2(permitted: int) -> bytes:
    return struct.pack("<IIIII", 0x02000000 | 1, permitted & 0xFFFFFFFF, 0, permitted >> 32, 0)


def test_a_shift_keeps_setuid_bits_file_capabilities_acls_links_and_is_resumable(
        tmp_path: Path, root_required: None) -> None:
    t = tmp_path / "tree"
    (t / "bin").mkdir(parents=True)
    (t / "bin/su").write_bytes(b"x")
    os.chmod(t / "bin/su", 0o4755)  # noqa: S103 (what a shift must keep)
    (t / "bin/sg").write_bytes(b"x")
    os.chown(t / "bin/sg", 0, 42)
    os.chmod(t / "bin/sg", 0o2755)  # noqa: S103 (what a shift must keep)
    (t / "bin/ping").write_bytes(b"x")
    os.setxattr(t / "bin/ping", "security.capability", _vfs_cap_v2(1 << 13))
    os.link(t / "bin/su", t / "hardlink")
    os.symlink("/etc/shadow", t / "link")  # never followed
    (t / "home").mkdir()
    os.chown(t / "home", 1000, 1000)
    os.symlink("bin/su", t / "home/rel")
    os.lchown(t / "home/rel", 1000, 1000)
    (t / "odd").write_bytes(b"")
    os.chown(t / "odd", 70000, 70000)  # outside 0..65535: becomes the range's nobody
    acl = t / "acl"
    acl.write_bytes(b"")
    os.setxattr(acl, "system.posix_acl_access", _acl(((0x01, 6, None), (0x02, 6, 1000),
                                                      (0x04, 4, None), (0x08, 4, 33),
                                                      (0x10, 6, None), (0x20, 4, None))))
    shadow_before = os.stat("/etc/shadow")
    base = 5 * idmap.RANGE

    changed = idmap.shift_tree(t, 0, base)
    assert changed >= 9
    st = os.stat(t / "bin/su")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (base, base, 0o4755)
    st = os.stat(t / "bin/sg")
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (base + 42, 0o2755)
    cap = os.getxattr(t / "bin/ping", "security.capability")
    # VFS_CAP_REVISION_3, effective, CAP_NET_RAW, and the range's root as rootid.
    assert struct.unpack("<IIIIII", cap) == (0x03000001, 1 << 13, 0, 0, 0, base)
    assert os.lstat(t / "link").st_uid == base and os.lstat(t / "home/rel").st_uid == base + 1000
    assert os.stat(t / "home").st_uid == base + 1000
    assert os.stat(t / "odd").st_uid == base + 65534
    assert os.stat(t).st_uid == base
    shadow_after = os.stat("/etc/shadow")
    assert (shadow_after.st_uid, shadow_after.st_mode) == (shadow_before.st_uid,
                                                           shadow_before.st_mode)
    entries = _acl_entries(os.getxattr(acl, "system.posix_acl_access"))
    assert (0x02, 6, base + 1000) in entries and (0x08, 4, base + 33) in entries, entries
    # Again: nothing left to do (an interrupted shift is finished the same way).
    assert idmap.shift_tree(t, 0, base) == 0
    # And back: the host's own ids, with a revision 2 capability again.
    idmap.shift_tree(t, base, 0)
    assert os.stat(t / "bin/su").st_uid == 0 and stat.S_IMODE(os.stat(t / "bin/su").st_mode) \
        == 0o4755
    assert os.getxattr(t / "bin/ping", "security.capability") == _vfs_cap_v2(1 << 13)


def test_set_idmap_isolated_shifts_a_stopped_guest_once_and_records_it(
        vroots: Paths, template: str) -> None:
    guest.build(vroots, "plain", guest.BuildOptions(method="busybox"))
    guest.build(vroots, "uni", guest.BuildOptions(method="template", source=template))
    for name in ("plain", "uni"):
        guest.start(vroots, name)
        assert run_in(vroots, name, "echo x > /root/mine")[0] == 0
        with pytest.raises(guest.GuestError, match="running: stop it"):
            guest.set_key(vroots, name, "IDMAP", "isolated")
        assert settings(vroots, name).idmap == "none"
        guest.stop(vroots, name)
        lines = guest.set_key(vroots, name, "IDMAP", "isolated")
        s = settings(vroots, name)
        assert s.idmap == "isolated" and s.idmap_base is not None, lines
        assert str(s.idmap_base) in lines[0]
        assert guest.set_key(vroots, name, "IDMAP", "isolated") == ["IDMAP=isolated: unchanged"]
        assert os.stat(vroots.root(name) / "root/mine").st_uid == s.idmap_base
        assert os.stat(vroots.root(name)).st_uid == s.idmap_base
        st = guest.start(vroots, name)
        assert uid_map(st.init_pid) == [(0, s.idmap_base, idmap.RANGE)]
        code, out = run_in(vroots, name, "stat -c %u /root/mine; echo y >> /root/mine; id -u")
        assert code == 0 and out.split() == ["0", "0"], out
    assert settings(vroots, "plain").idmap_base != settings(vroots, "uni").idmap_base
    assert all(v[0] < idmap.RANGE and v[1] < idmap.RANGE
               for v in tree_snapshot(templates.template_path(vroots, template)).values())
    # And back to the seed's privileged mode, on the plain one.
    guest.stop(vroots, "plain")
    guest.set_key(vroots, "plain", "IDMAP", "none")
    s = settings(vroots, "plain")
    assert s.idmap == "none" and "IDMAP_BASE" not in conf.GuestConf.load(vroots.conf("plain"))
    assert os.stat(vroots.root("plain") / "root/mine").st_uid == 0
    with pytest.raises(guest.GuestError, match="IDMAP_BASE is the agent's record"):
        guest.set_key(vroots, "plain", "IDMAP_BASE", "1000000")


def test_an_interrupted_shift_blocks_the_start_until_it_is_finished(vroots: Paths) -> None:
    from hostagent import recovery
    from hostagent.operations import Journal

    guest.build(vroots, "cut", guest.BuildOptions(method="busybox"))
    base = idmap.RangeRegistry(vroots).allocate("cut", "isolated")
    idmap.begin_shift(vroots, "cut", idmap.Shift(0, base, "isolated"))
    idmap.RangeRegistry(vroots).release("cut")
    idmap.shift_tree(vroots.root("cut") / "etc", 0, base)  # then the agent died
    # The range is held while the shift is pending: no other guest gets it.
    assert idmap.RangeRegistry(vroots).allocate("other", "isolated") != base
    idmap.RangeRegistry(vroots).release("other")
    with pytest.raises(guest.GuestError, match="was interrupted"):
        guest.start(vroots, "cut")
    done = recovery.recover(vroots, Journal(vroots.rundir / "journal"))
    assert [(r.kind, r.guest, r.error) for r in done] == [("set", "cut", None)]
    assert settings(vroots, "cut").idmap_base == base
    assert idmap.pending_shift(vroots, "cut") is None
    assert {v[0] for v in tree_snapshot(vroots.root("cut")).values()} <= set(
        range(base, base + idmap.RANGE))
    st = guest.start(vroots, "cut")
    assert uid_map(st.init_pid) == [(0, base, idmap.RANGE)]


def test_a_guest_is_refused_a_start_with_a_range_another_guest_holds(
        vroots: Paths) -> None:
    isolated(vroots, "one")
    isolated(vroots, "two")
    c = conf.GuestConf.load(vroots.conf("two"))
    c.set("IDMAP_BASE", str(settings(vroots, "one").idmap_base))  # a copied NAME.conf
    c.save(vroots.conf("two"))
    with pytest.raises(guest.GuestError, match="overlaps vserver one's"):
        guest.start(vroots, "two")
    assert not guest.running(vroots, "two")


def test_builds_at_once_never_share_a_range(vroots: Paths) -> None:
    vserver = str(Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin/vserver")
    procs = [subprocess.Popen([vserver, f"g{i}", "build", "-m", "busybox", "--idmap"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(4)]
    for p in procs:
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out
    bases = [settings(vroots, f"g{i}").idmap_base for i in range(4)]
    assert None not in bases and len(set(bases)) == 4, bases
    assert all(b % idmap.RANGE == 0 for b in bases if b is not None)
    assert not list((vroots.rundir / "idmaps").glob("g*"))  # no reservation outlives a build


def test_shared_guests_share_one_range_apart_from_isolated_ones(vroots: Paths) -> None:
    guest.build(vroots, "s1", guest.BuildOptions(method="busybox", idmap="shared"))
    isolated(vroots, "i1")
    guest.build(vroots, "s2", guest.BuildOptions(method="busybox", idmap="shared"))
    s1, s2, i1 = (settings(vroots, n).idmap_base for n in ("s1", "s2", "i1"))
    assert s1 == s2 and s1 != i1 and s1 is not None
    for name in ("s1", "s2"):
        guest.start(vroots, name)
    assert run_in(vroots, "s2", "id -u")[1].strip() == "0"


def test_a_guest_on_the_hosts_network_gets_a_read_only_sys(vroots: Paths) -> None:
    isolated(vroots, "h")
    c = conf.GuestConf.load(vroots.conf("h"))
    c.set("IPROOT", "ALL")
    c.save(vroots.conf("h"))
    guest.start(vroots, "h")
    code, out = run_in(vroots, "h", "ls /sys/kernel >/dev/null && echo listed; "
                                    "awk '$5 == \"/sys\" {print $6}' /proc/self/mountinfo")
    assert code == 0 and "listed" in out, out
    assert out.split()[-1].split(",")[0] == "ro", out


# --- the agent ---------------------------------------------------------------------------

@pytest.fixture
def agents(vroots: Paths) -> Iterator[list[AgentProcess]]:
    made: list[AgentProcess] = []
    try:
        yield made
    finally:
        for a in made:
            a.kill(signal.SIGKILL)


def test_readoption_after_an_agent_restart_keeps_each_guests_range(
        vroots: Paths, template: str, agents: list[AgentProcess]) -> None:
    agents.append(AgentProcess(vroots).start())
    client = AgentClient(agents[-1].socket)
    for name in ("a", "b"):
        client.run(client.build(wire.BuildRequest.from_json(
            {"name": name, "method": "template", "source": template, "idmap": "isolated"})))
        client.run(client.state(name, "start"))
    before = {g.name: g.init_pid for g in client.guests()}
    maps = {n: uid_map(p) for n, p in before.items() if p}
    bases = {n: settings(vroots, n).idmap_base for n in before}
    assert len(set(bases.values())) == 2 and None not in bases.values()
    agents[-1].kill(signal.SIGKILL)
    agents.append(AgentProcess(vroots).start())
    client = AgentClient(agents[-1].socket)
    after = {g.name: (g.state, g.init_pid) for g in client.guests()}
    assert after == {n: (wire.STATE_RUNNING, p) for n, p in before.items()}
    for name, pid in before.items():
        assert pid is not None and uid_map(pid) == maps[name]
        assert settings(vroots, name).idmap_base == bases[name]
        res = client.run(client.exec(name, ["/bin/sh", "-c", "id -u; touch /root/after"]))
        assert res["exit_code"] == 0 and res["output"].split() == ["0"], res
        assert os.stat(vroots.root(name) / "root/after").st_uid == bases[name]
    # A restart by the new agent keeps the range too.
    client.run(client.state("a", "restart"))
    pid = client.guest("a").init_pid
    assert pid is not None and uid_map(pid) == maps["a"]


def test_the_api_validates_idmap_and_keeps_idmap_base_the_agents(vroots: Paths) -> None:
    req = wire.BuildRequest.from_json({"name": "x", "method": "busybox", "idmap": "isolated"})
    assert req.idmap == "isolated"
    assert wire.BuildRequest.from_json({"name": "x", "method": "busybox"}).idmap == "none"
    with pytest.raises(wire.WireError) as caught:
        wire.BuildRequest.from_json({"name": "x", "method": "busybox", "idmap": "root"})
    assert caught.value.field == "idmap"
    with pytest.raises(wire.WireError) as caught:
        wire.ConfigPut.from_json({"values": {"IDMAP_BASE": "131072"}})
    assert caught.value.field == "values.IDMAP_BASE"
    assert wire.ConfigPut.from_json({"values": {"IDMAP": "isolated"}}).values == {
        "IDMAP": "isolated"}


# --- disk limits ---------------------------------------------------------------------------

def test_an_isolated_guests_disk_limit_holds_and_its_files_are_its_range(
        btrfs_roots: Paths) -> None:  # noqa: F811
    paths = btrfs_roots
    guest.build(paths, "q", guest.BuildOptions(method="busybox", disk_limit="30M",
                                               idmap="isolated"))
    guest.start(paths, "q")
    base = settings(paths, "q").idmap_base
    assert base is not None and os.stat(paths.root("q")).st_uid == base
    _code, out = run_in(paths, "q", "dd if=/dev/zero of=/root/big bs=1M count=60 "
                                    "conv=fsync; echo rc=$?")
    assert "Disk quota exceeded" in out and "rc=0" not in out, out
    assert os.stat(paths.root("q") / "root/big").st_uid == base
    used = quota.usage(paths.root("q"))
    assert used.limit == 30 << 20 and used.exclusive <= 31 << 20


# --- the network -----------------------------------------------------------------------------

def test_an_isolated_guest_gets_its_addresses_from_the_host_and_serves_the_lan(
        lan: Lan) -> None:
    # The agent configures the guest's network namespace from outside; that
    # namespace now belongs to the guest's user namespace.
    with lan.on_host():
        guest.build(lan.paths, "net", guest.BuildOptions(
            method="busybox", ips=(lan.v4(20), lan.v6(20)), idmap="isolated"))
        c = conf.GuestConf.load(lan.paths.conf("net"))
        c.set("IPROOTDEV", UPLINK)
        c.save(lan.paths.conf("net"))
        (lan.paths.root("net") / "var/www/index.html").write_text("isolated page\n")
        st = guest.start(lan.paths, "net", output=lambda _b: None)
    assert st.idmap_base is not None
    assert lan.http_get(lan.v4(20)) == "isolated page\n"
    assert lan.http_get(lan.v6(20)) == "isolated page\n"
    _code, out = lan.run("net", "ip addr show eth0; ip addr add 198.18.0.99/32 dev eth0; "
                                "echo add=$?")
    assert lan.v4(20) in out and "add=0" not in out, out  # no CAP_NET_ADMIN, even its own


def test_the_agents_process_list_names_users_as_the_guest_knows_them(
        vroots: Paths, template: str, agents: list[AgentProcess]) -> None:
    agents.append(AgentProcess(vroots).start())
    client = AgentClient(agents[-1].socket)
    client.run(client.build(wire.BuildRequest.from_json(
        {"name": "a", "method": "template", "source": template, "idmap": "isolated"})))
    client.run(client.state("a", "start"))
    res = client.run(client.exec("a", ["/bin/sh", "-c",
                                       "echo 'lab:x:1234:1234::/home/lab:/bin/sh' >> /etc/passwd; "
                                       "su -s /bin/sh lab -c 'sleep 60 &' || "
                                       "setuidgid lab sleep 60 &"]))
    assert res["exit_code"] == 0, res
    base = settings(vroots, "a").idmap_base
    assert base is not None
    deadline = time.monotonic() + 10
    while True:
        rows = client.processes("a")
        users = {r.guest_pid: r.user for r in rows}
        if "lab" in users.values() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert users[1] == "root"  # not the host's number for the range's root
    assert "lab" in users.values(), rows
    assert not any(u.isdigit() and int(u) >= base for u in users.values())
