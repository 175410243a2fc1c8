"""The seed's `vserver` command line: build options, runlevel scripts, no helper
process, and the `private` flag against every way in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostagent import caps, guest
from hostagent.conf import GuestConf, settings
from hostagent.paths import Paths

VSERVER = [sys.executable, "-m", "hostagent.cli.vserver"]
CHCONTEXT = [sys.executable, "-m", "hostagent.cli.chcontext"]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env=os.environ.copy(), stdin=subprocess.DEVNULL, check=False)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run([*VSERVER, *args])


def test_vserver_build_writes_every_option_into_name_conf(vroots: Paths) -> None:
    res = cli("web", "build", "-m", "busybox", "--hostname", "web.example",
              "--ip", "up0:198.18.1.10/24", "--ip", "up0:fd00:1::10/64",
              "--caps", "CAP_NET_RAW", "--caps", "!CAP_SYS_CHROOT", "--flags", "lock sched",
              "--nice", "5", "--ulimit", "-H -n 1024", "--onboot", "--context", "4321")
    assert res.returncode == 0, res.stderr
    s = settings(GuestConf.load(vroots.conf("web")))
    assert s.hostname == "web.example"
    assert s.iproot == ("up0:198.18.1.10/24", "up0:fd00:1::10/64")
    assert s.caps_spec == ("CAP_NET_RAW", "!CAP_SYS_CHROOT")
    assert s.caps == (caps.DEFAULT_CEILING | {caps.CAPS["CAP_NET_RAW"]}) - {
        caps.CAPS["CAP_SYS_CHROOT"]}
    assert set(s.flags) == {"lock", "sched"}
    assert (s.nice, s.onboot, s.context) == (5, True, 4321)
    assert [(lim.name, lim.soft, lim.hard) for lim in s.ulimits] == [("nofile", None, 1024)]
    assert (vroots.root("web") / "bin/busybox").exists()


def test_unsafe_caps_need_the_override_on_the_command_line(vroots: Paths) -> None:
    res = cli("adm", "build", "-m", "busybox", "--caps", "CAP_SYS_ADMIN")
    assert res.returncode == 1
    assert "CAP_SYS_ADMIN is refused" in res.stderr and "--allow-unsafe-caps" in res.stderr
    assert not vroots.conf("adm").exists() and not vroots.root("adm").exists()
    ok = cli("adm", "build", "-m", "busybox", "--caps", "CAP_SYS_ADMIN", "--allow-unsafe-caps")
    assert ok.returncode == 0, ok.stderr
    s = settings(GuestConf.load(vroots.conf("adm")))
    assert s.caps_unsafe and caps.CAPS["CAP_SYS_ADMIN"] in s.caps


@pytest.mark.parametrize(
    ("present", "level", "argv"),
    [
        ("etc/init.d/rc", 3, ["/etc/init.d/rc", "3"]),  # Debian's sysv-rc
        ("etc/rc.d/rc", 3, ["/etc/rc.d/rc", "3"]),  # Red Hat's
        ("etc/rc.d/rc", 0, ["/etc/rc.d/rc", "0"]),
        ("etc/rc.d/rc.M", 3, ["/etc/rc.d/rc.M"]),  # Slackware's multi-user script
        ("etc/rc.d/rc.M", 0, ["/etc/rc.d/rc.0"]),
        ("sbin/rc", 3, ["/sbin/rc", "default"]),  # OpenRC
        ("sbin/rc", 0, ["/sbin/rc", "shutdown"]),
    ],
)
def test_the_seed_s_runlevel_scripts_are_found(tmp_path: Path, present: str, level: int,
                                               argv: list[str]) -> None:
    (tmp_path / present).parent.mkdir(parents=True)
    (tmp_path / present).write_text("#!/bin/sh\n")
    assert guest._rc_argv(tmp_path, level) == argv


def test_without_an_rc_script_the_rcn_d_links_run_or_nothing(tmp_path: Path) -> None:
    assert guest._rc_argv(tmp_path, 3) is None
    (tmp_path / "etc/rc3.d").mkdir(parents=True)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/sh").write_text("")
    argv = guest._rc_argv(tmp_path, 3)
    assert argv is not None and argv[:2] == ["/bin/sh", "-c"]
    assert "/etc/rc3.d/S*" in argv[2] and "start" in argv[2]


def test_an_etc_rc_d_guest_starts_and_stops_through_its_own_rc(vroots: Paths,
                                                               busybox_guest: str) -> None:
    root = vroots.root("bb")
    (root / "etc/rc.d").mkdir()
    (root / "etc/init.d/rc").rename(root / "etc/rc.d/rc.real")
    (root / "etc/rc.d/rc").write_text(
        '#!/bin/sh\necho "$1" >> /etc/rc.d/levels\nexec /etc/rc.d/rc.real "$1"\n')
    (root / "etc/rc.d/rc").chmod(0o755)
    guest.start(vroots, "bb", output=bytearray().extend)
    buf = bytearray()
    code = guest.exec_in(vroots, "bb", ["/bin/sh", "-c", "/etc/init.d/httpd status"],
                         output=buf.extend)
    assert code == 0 and b"running" in buf, buf
    assert guest.stop(vroots, "bb")
    assert (root / "etc/rc.d/levels").read_text().split() == ["3", "0"]


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))


def test_a_cli_start_leaves_no_helper_process_behind(vroots: Paths, busybox_guest: str) -> None:
    before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    assert cli("bb", "start").returncode == 0
    st = guest.read_state(vroots, "bb")
    assert st is not None
    # The guest's PID 1 was handed to a reaper that was there before the
    # start: nothing the start made stays outside the guest to mind it.
    assert _ppid(st.init_pid) in before
    assert guest.stop(vroots, "bb")


def test_a_private_guest_refuses_every_way_in(vroots: Paths) -> None:
    guest.build(vroots, "priv", guest.BuildOptions(method="busybox", flags=["lock", "private"]))
    st = guest.start(vroots, "priv", output=bytearray().extend)
    for args in (["enter"], ["exec", "true"], ["suexec", "guest", "true"],
                 ["service", "httpd", "status"]):
        res = cli("priv", *args)
        assert res.returncode == 1 and "'private' flag" in res.stderr, (args, res)
    res = run([*CHCONTEXT, "--ctx", str(st.context), "true"])
    assert res.returncode == 1 and "'private' flag" in res.stderr, res
    # The host still stops it (the flag keeps the host out, not in charge).
    assert cli("priv", "stop").returncode == 0
    assert not guest.running(vroots, "priv")


NAMESPACES = ("pid", "mnt", "uts", "ipc", "cgroup", "net")


def test_a_guest_has_namespaces_of_its_own_that_exec_joins(vroots: Paths,
                                                          busybox_guest: str) -> None:
    st = guest.start(vroots, "bb", output=bytearray().extend)
    init = {ns: os.readlink(f"/proc/{st.init_pid}/ns/{ns}") for ns in NAMESPACES}
    host = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in NAMESPACES}
    assert [ns for ns in NAMESPACES if init[ns] == host[ns]] == []
    buf = bytearray()
    script = "; ".join(f"readlink /proc/self/ns/{ns}" for ns in NAMESPACES) + \
        "; cat /proc/self/cgroup"
    assert guest.exec_in(vroots, "bb", ["/bin/sh", "-c", script], output=buf.extend) == 0
    lines = buf.decode().splitlines()
    assert lines[:len(NAMESPACES)] == [init[ns] for ns in NAMESPACES]
    # Its own cgroup namespace: the guest's cgroup is its root, the host's tree unseen.
    paths_seen = {line.split(":", 2)[2] for line in lines[len(NAMESPACES):]}
    assert paths_seen == {"/"}, lines
