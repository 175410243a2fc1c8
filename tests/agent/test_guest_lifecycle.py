"""A busybox guest from build to delete, on the real kernel, as root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostagent import caps, guest
from hostagent.cgroup import Cgroup, cgroup_base
from hostagent.names import InvalidName
from hostagent.paths import Paths
from tests.conftest import mounts_mentioning

VSERVER = [sys.executable, "-m", "hostagent.cli.vserver"]


def run_in(paths: Paths, name: str, script: str, user: str | None = None) -> tuple[int, str]:
    buf = bytearray()
    code = guest.exec_in(paths, name, ["/bin/sh", "-c", script], user=user, output=buf.extend)
    return code, buf.decode(errors="replace")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VSERVER, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy(), check=False)


def assert_nothing_left(paths: Paths, name: str, cgroup: str | None = None) -> None:
    cg = Cgroup(cgroup or f"{cgroup_base()}/{name}")
    assert not cg.exists(), f"cgroup {cg.path} survived"
    assert not paths.state(name).exists()
    assert mounts_mentioning(paths.root(name)) == []
    assert not guest.running(paths, name)


@pytest.fixture
def started(vroots: Paths, busybox_guest: str) -> guest.RunState:
    return guest.start(vroots, busybox_guest)


def test_busybox_guest_starts_in_its_own_context(vroots: Paths, started: guest.RunState) -> None:
    assert guest.running(vroots, "bb")
    code, out = run_in(vroots, "bb", "ps -o pid,comm")
    assert code == 0
    lines = out.split("\n")[1:]
    pids = sorted(int(line.split()[0]) for line in lines if line.strip())
    assert pids[0] == 1
    # init, the two services of runlevel 3, the shell and ps: nothing of the host.
    assert len(pids) <= 6, out
    assert str(os.getpid()) not in out.split()


def test_runlevel_services_start_and_stop_with_the_guest(vroots: Paths,
                                                         started: guest.RunState) -> None:
    code, out = run_in(vroots, "bb", "/etc/init.d/syslogd status; /etc/init.d/httpd status")
    assert code == 0, out
    assert out.count("is running") == 2
    assert guest.stop(vroots, "bb")
    assert_nothing_left(vroots, "bb", started.cgroup)


def test_capability_bounding_set_is_the_ceiling(vroots: Paths, started: guest.RunState) -> None:
    code, out = run_in(vroots, "bb", "grep -E '^(CapBnd|CapEff|CapAmb|Seccomp):' /proc/self/status")
    assert code == 0
    fields = dict(line.split(":\t") for line in out.strip().splitlines())
    # Plus CAP_SYS_BOOT: in the guest's PID namespace reboot(2) ends only the
    # guest (hostagent/rebootmgr.py sys_boot_allowed).
    ceiling = caps.to_mask(caps.DEFAULT_CEILING | {caps.CAPS["CAP_SYS_BOOT"]})
    assert int(fields["CapBnd"], 16) == ceiling
    assert int(fields["CapEff"], 16) == ceiling
    assert int(fields["CapAmb"], 16) == 0
    assert fields["Seccomp"].strip() == "2"


def test_hostname_nice_and_domainname_are_as_configured(vroots: Paths) -> None:
    guest.build(vroots, "web", guest.BuildOptions(method="busybox", hostname="web.example",
                                                   nice=5))
    conf = vroots.conf("web")
    conf.write_text(conf.read_text().replace('S_DOMAINNAME=""', 'S_DOMAINNAME="none"'))
    guest.start(vroots, "web")
    code, out = run_in(vroots, "web", "hostname; cat /proc/sys/kernel/domainname; "
                       "cut -d' ' -f19 /proc/self/stat")
    assert code == 0
    # "none" clears the NIS domain name (the kernel's own default reads "(none)").
    assert out.splitlines() == ["web.example", "", "5"]
    assert os.uname().nodename != "web.example"


def test_ulimit_u_holds_inside_the_guest(vroots: Paths) -> None:
    guest.build(vroots, "lim", guest.BuildOptions(method="busybox", ulimit="-H -u 3"))
    guest.start(vroots, "lim")
    # RLIMIT_NPROC counts a uid's processes host-wide, so use a uid nobody
    # else on this host has: the shell plus two children fit, a third does not.
    _code, out = run_in(vroots, "lim",
                       "ulimit -u; for i in 1 2 3 4; do sleep 3 & done; wait; echo done",
                       user="23456")
    first = out.splitlines()[0]
    assert first == "3"
    assert "can't fork" in out or "Resource temporarily unavailable" in out, out


def test_stop_leaves_no_process_mount_or_cgroup(vroots: Paths, started: guest.RunState) -> None:
    run_in(vroots, "bb", "sleep 1000 & sleep 1000 & (trap '' TERM; sleep 1000) &")
    procs = Cgroup(started.cgroup).procs()
    assert len(procs) >= 5
    assert guest.stop(vroots, "bb", timeout=1)
    for pid in procs:
        # Gone, or a zombie waiting for the host's init to collect it.
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state == "Z", f"guest process {pid} still alive in state {state}"
    assert_nothing_left(vroots, "bb", started.cgroup)
    assert guest.stop(vroots, "bb") is False


@pytest.mark.parametrize(
    "step", ["mounts", "pivot_root", "names", "limits", "fds", "ceiling", "exec", "runlevel"]
)
def test_injected_failure_during_start_leaves_nothing(vroots: Paths, busybox_guest: str,
                                                      step: str) -> None:
    with pytest.raises(guest.GuestError, match=step):
        guest.start(vroots, "bb", fail_at=step)
    assert_nothing_left(vroots, "bb")
    # And the guest still starts cleanly afterwards.
    guest.start(vroots, "bb")
    assert guest.running(vroots, "bb")


def test_malformed_conf_is_refused_naming_the_line(vroots: Paths, busybox_guest: str) -> None:
    conf = vroots.conf("bb")
    lines = conf.read_text().splitlines()
    lines.insert(3, 'S_NICE="$(reboot)"')
    conf.write_text("\n".join(lines) + "\n")
    with pytest.raises(guest.GuestError) as exc:
        guest.start(vroots, "bb")
    assert f"{conf}:4" in str(exc.value)
    assert "S_NICE" in str(exc.value)
    assert_nothing_left(vroots, "bb")


def test_invalid_value_is_refused_naming_the_key(vroots: Paths, busybox_guest: str) -> None:
    conf = vroots.conf("bb")
    conf.write_text(conf.read_text().replace('S_FLAGS="lock"', 'S_FLAGS="lock sudo"'))
    with pytest.raises(guest.GuestError, match=r"S_FLAGS"):
        guest.start(vroots, "bb")


@pytest.mark.parametrize("bad", ["../x", "-rf", "A", "a" * 40, "", "a/b", "a b", "x\n"])
def test_bad_names_are_refused(vroots: Paths, bad: str) -> None:
    with pytest.raises(InvalidName):
        guest.build(vroots, bad, guest.BuildOptions(method="busybox"))
    with pytest.raises(InvalidName):
        guest.start(vroots, bad)
    res = cli(bad, "status")
    assert res.returncode == 2
    assert "invalid guest name" in res.stderr
    assert list(vroots.rootdir.iterdir()) == []


def test_start_twice_is_refused(vroots: Paths, started: guest.RunState) -> None:
    with pytest.raises(guest.GuestError, match="already running"):
        guest.start(vroots, "bb")


def test_fixed_context_cannot_be_used_twice(vroots: Paths) -> None:
    for name in ("c1", "c2"):
        guest.build(vroots, name, guest.BuildOptions(method="busybox", context=4242))
    assert guest.start(vroots, "c1").context == 4242
    with pytest.raises(guest.GuestError, match="context 4242"):
        guest.start(vroots, "c2")


def test_exec_suexec_and_service_behave_as_in_the_seed(vroots: Paths,
                                                       started: guest.RunState) -> None:
    assert guest.exec_in(vroots, "bb", ["/bin/sh", "-c", "exit 7"], output=bytearray().extend) == 7
    code, out = run_in(vroots, "bb", "id -un; echo $HOME", user="guest")
    assert (code, out.split()) == (0, ["guest", "/home/guest"])
    buf = bytearray()
    assert guest.service(vroots, "bb", "httpd", "status", output=buf.extend) == 0
    assert b"running" in buf
    with pytest.raises(guest.GuestError):
        guest.service(vroots, "bb", "../../bin/sh", "start")


def test_cli_running_status_exec_and_stop(vroots: Paths, busybox_guest: str) -> None:
    assert cli("bb", "running").returncode == 1
    assert cli("bb", "start").returncode == 0
    assert cli("bb", "running").returncode == 0
    st = cli("bb", "status")
    assert st.returncode == 0
    assert "Context: 49152" in st.stdout or "Context: 4" in st.stdout
    assert "Number of processes:" in st.stdout and "Uptime:" in st.stdout
    ex = cli("bb", "exec", "sh", "-c", "echo hi; exit 3")
    assert (ex.returncode, ex.stdout) == (3, "hi\n")
    assert cli("bb", "stop").returncode == 0
    assert cli("bb", "running").returncode == 1


def test_fakeinit_guest_runs_its_own_init_as_pid_1(vroots: Paths) -> None:
    guest.build(vroots, "fi", guest.BuildOptions(method="busybox", flags=["fakeinit", "lock"]))
    st = guest.start(vroots, "fi")
    code, out = run_in(vroots, "fi", "readlink /proc/1/exe; sleep 1; ps")
    assert code == 0
    # /sbin/init is busybox's; without fakeinit PID 1 is the memfd copy of catatonit.
    assert out.splitlines()[0] == "/bin/busybox"
    assert guest.stop(vroots, "fi", timeout=3)
    assert_nothing_left(vroots, "fi", st.cgroup)


def test_delete_removes_all_the_build_made(vroots: Paths, busybox_guest: str) -> None:
    guest.start(vroots, "bb")
    with pytest.raises(guest.GuestError, match="running"):
        guest.delete(vroots, "bb")
    guest.stop(vroots, "bb")
    guest.delete(vroots, "bb")
    assert not vroots.conf("bb").exists()
    assert not vroots.root("bb").exists()
    assert vroots.guest_names() == []


def test_build_refuses_an_existing_guest_and_bad_options(vroots: Paths,
                                                        busybox_guest: str) -> None:
    with pytest.raises(guest.GuestError, match="already exists"):
        guest.build(vroots, "bb", guest.BuildOptions(method="busybox"))
    with pytest.raises(guest.GuestError, match="SYS_ADMIN"):
        guest.build(vroots, "adm", guest.BuildOptions(method="busybox", caps=["CAP_SYS_ADMIN"]))
    with pytest.raises(guest.GuestError, match="method"):
        guest.build(vroots, "zz", guest.BuildOptions(method="floppy"))
    assert sorted(p.name for p in vroots.rootdir.iterdir()) == ["bb"]
    assert vroots.guest_names() == ["bb"]


def test_guest_root_directory_is_a_barrier(vroots: Paths) -> None:
    assert (vroots.rootdir.stat().st_mode & 0o777) == 0


def test_a_guest_survives_the_process_that_started_it(vroots: Paths, busybox_guest: str) -> None:
    # The CLI starts the guest and exits: no helper per guest stays behind,
    # and another process finds, enters and stops it from NAME.ctx alone.
    assert cli("bb", "start").returncode == 0
    st = guest.read_state(vroots, "bb")
    assert st is not None
    with open(f"/proc/{st.init_pid}/status") as f:
        ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
    assert ppid != os.getpid()
    code, out = run_in(vroots, "bb", "echo alive")
    assert (code, out) == (0, "alive\n")
    assert guest.stop(vroots, "bb")


def test_status_names_flags_that_are_not_enforced_yet(vroots: Paths) -> None:
    guest.build(vroots, "fl", guest.BuildOptions(method="busybox", flags=["lock", "ulimit"]))
    guest.start(vroots, "fl")
    st = guest.status(vroots, "fl")
    assert st.unenforced == ("ulimit",)
    assert "not enforced" in st.text() and "ulimit" in st.text()


def test_enter_gives_a_terminal_of_the_guests_own(vroots: Paths, started: guest.RunState) -> None:
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [*VSERVER, "bb", "enter"], os.environ.copy())
    out = b""
    try:
        deadline = time.monotonic() + 30
        sent = False
        while time.monotonic() < deadline:
            if not sent and b"# " in out:  # the guest shell's prompt
                os.write(fd, b"tty; hostname; exit 5\n")
                sent = True
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
    finally:
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            time.sleep(1)
            done, status = os.waitpid(pid, os.WNOHANG)
        if not done:  # never hang the suite on a shell waiting for input
            os.kill(pid, 9)
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 5, text
    # A pts of the guest's private devpts instance, never the caller's terminal.
    assert "/dev/pts/0" in text
    assert "\nbb\r\n" in text or "\nbb\n" in text


def test_guests_started_at_once_get_different_contexts(vroots: Paths) -> None:
    names = [f"par{i}" for i in range(4)]
    for name in names:
        guest.build(vroots, name, guest.BuildOptions(method="busybox"))
    procs = [subprocess.Popen([*VSERVER, name, "start"], env=os.environ.copy(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name in names]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    contexts = {guest.status(vroots, name).context for name in names}
    assert len(contexts) == len(names)
    assert list((vroots.rundir / "contexts").glob("[0-9]*")) == []


def test_exec_copies_stdin_and_output_in_both_directions(vroots: Paths,
                                                        started: guest.RunState) -> None:
    data = os.urandom(300_000).hex()  # more than a pipe holds, both ways
    res = subprocess.run([*VSERVER, "bb", "exec", "sh", "-c", "sleep 0.2; cat; echo err >&2"],
                         input=data, capture_output=True, text=True, timeout=60,
                         env=os.environ.copy(), check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data
    assert res.stderr == "err\n"
