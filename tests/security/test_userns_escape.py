"""Guest root with a private id range (IDMAP="isolated") is no host root, even out of
its root: what an escape would hand it (a descriptor of a host directory, a host
setuid binary, a host file planted in its tree) gives it nothing of host root's.

The escape itself is simulated: a child of the test joins the guest's user and
mount namespaces and becomes guest root, as every guest process is, while it
still holds descriptors the test opened on the host. It then has every
capability of the guest's user namespace, more than the guest's ceiling, so
what it cannot do, no guest process can.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hostagent import conf, idmap
from tests.helpers import as_guest_root, attempt

if TYPE_CHECKING:
    from .conftest import Lab

SUID_SOURCE = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("euid=%d\n", (int)geteuid()); return 0; }
"""


@pytest.fixture
def iso(lab: Lab) -> str:
    """The module's guest: busybox with a private id range."""
    return lab.guest("iso", idmap="isolated")


def base_of(lab: Lab, name: str) -> int:
    base = conf.settings_from_file(lab.paths.conf(name)).idmap_base
    assert base is not None
    return base


def test_guest_root_handed_a_host_directory_cannot_write_root_owned_files(
        lab: Lab, iso: str, tmp_path: Path) -> None:
    host = tmp_path / "hostdir"
    host.mkdir(mode=0o755)
    (host / "file").write_text("host's\n")
    (host / "secret").write_text("host secret\n")
    os.chmod(host / "secret", 0o600)
    # Positive twin: a directory of the guest's own range, which it may write.
    own = host / "guests"
    own.mkdir()
    base = base_of(lab, iso)
    os.chown(own, base, base)
    before = {p.name: (p.stat().st_mode, p.read_bytes()) for p in host.iterdir() if p.is_file()}
    dfd = os.open(host, os.O_RDONLY | os.O_DIRECTORY)
    ffd = os.open(host / "file", os.O_RDONLY)
    etc = os.open("/etc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        def escape() -> dict[str, str]:
            return {
                "write": attempt(lambda: os.close(os.open("file", os.O_WRONLY, dir_fd=dfd))),
                "create": attempt(lambda: os.close(os.open("new", os.O_WRONLY | os.O_CREAT,
                                                           0o644, dir_fd=dfd))),
                "unlink": attempt(lambda: os.unlink("file", dir_fd=dfd)),
                "rename": attempt(lambda: os.rename("file", "moved", src_dir_fd=dfd,
                                                    dst_dir_fd=dfd)),
                "mkdir": attempt(lambda: os.mkdir("d", dir_fd=dfd)),
                "read_secret": attempt(lambda: os.close(os.open("secret", os.O_RDONLY,
                                                                dir_fd=dfd))),
                "chmod": attempt(lambda: os.fchmod(dfd, 0o777)),
                "chown": attempt(lambda: os.fchown(ffd, 0, 0)),  # to guest root's ids
                "xattr": attempt(lambda: os.setxattr(ffd, "user.x", b"1")),
                "etc_passwd": attempt(lambda: os.close(os.open("passwd",
                                                               os.O_WRONLY | os.O_APPEND,
                                                               dir_fd=etc))),
                "etc_shadow": attempt(lambda: os.close(os.open("shadow", os.O_RDONLY,
                                                               dir_fd=etc))),
                "own_dir": attempt(lambda: os.close(os.open("guests/mine",
                                                            os.O_WRONLY | os.O_CREAT, 0o644,
                                                            dir_fd=dfd))),
            }

        got = as_guest_root(lab.init_pid(iso), escape)
    finally:
        for fd in (dfd, ffd, etc):
            os.close(fd)
    assert got.pop("own_dir") == "ok", got  # the twin: the simulation can write what it owns
    assert (own / "mine").stat().st_uid == base
    assert all(v in ("EACCES", "EPERM") for v in got.values()), json.dumps(got)
    after = {p.name: (p.stat().st_mode, p.read_bytes()) for p in host.iterdir() if p.is_file()}
    assert after == before


def test_a_host_setuid_root_binary_handed_in_gives_a_guest_user_nothing(
        lab: Lab, iso: str, tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing (scripts/bootstrap.sh installs it)")
    src, exe = tmp_path / "suid.c", tmp_path / "suid"
    src.write_text(SUID_SOURCE)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(exe), str(src)], check=True)
    os.chmod(exe, 0o4755)  # noqa: S103 (setuid host root, in the test's 0700 tmp dir)
    fd = os.open(exe, os.O_RDONLY)

    def run_it(uid: int = 0) -> str:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                if uid:
                    os.setresuid(uid, uid, uid)
                os.dup2(w, 1)
                os.execve(fd, ["suid"], {})  # fexecve: no path to walk
            finally:
                os._exit(127)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        os.waitpid(pid, 0)
        return out.strip()

    try:
        # Positive twin: on the host it does make a user euid 0.
        assert run_it(1000) == "euid=0"
        # In the guest its owner, host root, is nobody: the bit is ignored.
        assert as_guest_root(lab.init_pid(iso), run_it, uid=1000) == "euid=1000"
    finally:
        os.close(fd)


def test_a_host_root_file_in_the_guest_tree_is_nobodys_and_closed_to_guest_root(
        lab: Lab, iso: str) -> None:
    planted = lab.root(iso) / "root/host-owned"
    planted.write_text("only host root reads this\n")
    os.chown(planted, 0, 0)
    os.chmod(planted, 0o600)
    try:
        code, out = lab.run(iso, "ls -ln /root/host-owned; cat /root/host-owned; echo rc=$?; "
                                 "chown 0:0 /root/host-owned; echo chown=$?")
        assert " 65534 " in out and "rc=0" not in out and "chown=0" not in out, out
        assert "only host root" not in out
        st = planted.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
        # Positive twin: the same file, given to the range's root, is readable.
        os.chown(planted, base_of(lab, iso), base_of(lab, iso))
        code, out = lab.run(iso, "cat /root/host-owned")
        assert code == 0 and "only host root" in out, out
    finally:
        planted.unlink()


def test_guest_processes_run_as_the_range_on_the_host(lab: Lab, iso: str) -> None:
    base = base_of(lab, iso)
    code, out = lab.run(iso, "sleep 30 & echo started")
    assert code == 0, out
    uids = set()
    for pid in lab.host_pids(iso):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        line = next(ln for ln in text.splitlines() if ln.startswith("Uid:"))
        uids.update(int(x) for x in line.split()[1:])
    assert uids and all(base <= u < base + idmap.RANGE for u in uids), uids
    lab.run(iso, "pkill sleep; true")
