"""The reboot manager: /dev/reboot, vreboot and vhalt, and a guest's own reboot(2).

Guests are busybox guests started in this process (so the test is their PID
1's parent, as the agent is) and stopped by the `vroots` fixture whatever
happens. The manager runs in an asyncio loop on a thread of its own, as it
would in the agent; requests it passes on are collected in `Inbox`.
reference/security.md RB1 (spoofing) and RB2 (flood) are the negative tests.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hostagent import build, caps, guest, guestbin, rebootmgr, seccomp, syscalls
from hostagent.paths import Paths

T = TypeVar("T")
BIN = Path(sys.executable).parent
SYS_BOOT = caps.CAPS["CAP_SYS_BOOT"]


# --- harness ------------------------------------------------------------------------

class Inbox:
    """What the manager passed on: (name, action) pairs, in order, from any thread."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, name: str, action: str) -> None:
        with self._cond:
            self.items.append((name, action))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10) -> list[tuple[str, str]]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.items) >= count, timeout)
            return list(self.items)


class Loop:
    """An asyncio loop on a thread, as the agent runs one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1  # without this one

        return self.run(count())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    try:
        yield lp
    finally:
        lp.close()


class Managers:
    """Makes RebootManagers in LOOP and closes every one at teardown."""

    def __init__(self, paths: Paths, lp: Loop) -> None:
        self.paths, self.lp = paths, lp
        self.made: list[rebootmgr.RebootManager] = []

    def new(self, inbox: Inbox, **kw: Any) -> rebootmgr.RebootManager:
        m = rebootmgr.RebootManager(self.paths, inbox, **kw)
        self.made.append(m)
        return m

    def watch(self, m: rebootmgr.RebootManager, *names: str) -> None:
        for name in names:
            self.lp.run(m.watch(name))

    def close(self, m: rebootmgr.RebootManager) -> None:
        self.lp.run(m.close())


@pytest.fixture
def managers(vroots: Paths, loop: Loop) -> Iterator[Managers]:
    ms = Managers(vroots, loop)
    try:
        yield ms
    finally:
        for m in ms.made:
            loop.run(m.close())


def start_busybox(paths: Paths, name: str) -> guest.RunState:
    """Build and start a busybox guest in this process; vroots stops it at teardown."""
    guest.build(paths, name, guest.BuildOptions(method="busybox"))
    return guest.start(paths, name)


def run_in(paths: Paths, name: str, script: str, user: str | None = None) -> tuple[int, str]:
    buf = bytearray()
    code = guest.exec_in(paths, name, ["/bin/sh", "-c", script], user=user, output=buf.extend)
    return code, buf.decode(errors="replace")


def client(path: str) -> socket.socket:
    """A connection to PATH, blocking as vreboot's is (a full backlog makes it wait, not
    fail), for at most 5 s."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


def send(path: str, payload: bytes) -> None:
    """Connect to PATH, write PAYLOAD, close: what vreboot does, from the host.

    Unlike vreboot it then waits for the manager to close its end, so that the
    next send() finds this request handled, not still counted as a connection.
    """
    with client(path) as s:
        if payload:
            s.sendall(payload)
        with contextlib.suppress(ConnectionResetError):
            s.recv(1)


def guest_socket(st: guest.RunState) -> str:
    """The guest's own /dev/reboot, reached from the host through its PID 1's root."""
    return f"/proc/{st.init_pid}/root/dev/reboot"


def wait_exit(pid: int, timeout: float = 15) -> os.waitid_result:
    """How our child PID ended, leaving it a zombie for guest.stop to reap."""
    deadline = time.monotonic() + timeout
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return info
        assert time.monotonic() < deadline, f"PID {pid} did not exit"
        time.sleep(0.02)


@pytest.fixture
def reach(vroots: Paths) -> Iterator[Callable[[str], str]]:
    """A path to NAME's socket short enough for sun_path (108 bytes), wherever vroots is."""
    fds: list[int] = []

    def path(name: str) -> str:
        fds.append(os.open(rebootmgr.socket_dir(vroots, name), os.O_PATH | os.O_CLOEXEC))
        return f"/proc/self/fd/{fds[-1]}/{rebootmgr.SOCKET_NAME}"

    try:
        yield path
    finally:
        for fd in fds:
            os.close(fd)


def open_fds() -> int:
    gc.collect()  # sockets earlier tests left to the collector close now, not mid-count
    return len(os.listdir("/proc/self/fd"))


def settle(check: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- vreboot and vhalt inside a guest ---------------------------------------------------

def test_vreboot_in_a_busybox_guest_asks_for_restart_and_vhalt_for_halt(
        vroots: Paths, managers: Managers) -> None:
    st = start_busybox(vroots, "a")
    root = vroots.root("a")
    assert not any((root / p).exists() for p in ("usr/bin/python3", "usr/bin/python"))
    assert os.readlink(root / "sbin/vhalt") == "vreboot"
    inbox = Inbox()
    managers.watch(managers.new(inbox), "a")

    code, out = run_in(vroots, "a", "/sbin/vreboot")
    assert code == 0, out
    assert inbox.wait_for(1) == [("a", "restart")]
    code, out = run_in(vroots, "a", "vhalt")
    assert code == 0, out
    assert inbox.wait_for(2) == [("a", "restart"), ("a", "halt")]
    time.sleep(0.2)
    assert len(inbox.items) == 2
    # The manager only reports; restarting is the agent's business.
    now = guest.read_state(vroots, "a")
    assert guest.running(vroots, "a") and now is not None and now.init_pid == st.init_pid


def test_guest_dev_reboot_is_a_read_only_bind_of_the_host_directory(
        vroots: Paths, managers: Managers) -> None:
    start_busybox(vroots, "a")
    managers.watch(managers.new(Inbox()), "a")
    host_sock = rebootmgr.socket_path(vroots, "a")
    before = os.stat(host_sock)
    code, out = run_in(vroots, "a", """
        readlink /dev/reboot
        stat -c '%F %a %u' /dev/.rebootmgr/reboot
        touch /dev/.rebootmgr/planted 2>/dev/null && echo PLANTED
        rm -f /dev/.rebootmgr/reboot 2>/dev/null; [ -S /dev/.rebootmgr/reboot ] || echo REMOVED
        umount /dev/.rebootmgr 2>/dev/null && echo UNMOUNTED
        grep ' /dev/.rebootmgr ' /proc/self/mountinfo
    """)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == ".rebootmgr/reboot"
    assert lines[1] == "socket 600 0"
    assert "PLANTED" not in out and "REMOVED" not in out and "UNMOUNTED" not in out, out
    opts = lines[2].split()[5].split(",")
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(opts), lines[2]
    after = os.stat(host_sock)
    assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
    assert os.listdir(host_sock.parent) == ["reboot"]


def test_guest_users_other_than_root_cannot_use_vreboot(
        vroots: Paths, managers: Managers) -> None:
    start_busybox(vroots, "a")
    inbox = Inbox()
    managers.watch(managers.new(inbox), "a")
    code, out = run_in(vroots, "a", "/sbin/vreboot", user="guest")
    assert code == 1
    assert "Permission denied" in out and "only root" in out, out
    time.sleep(0.3)
    assert inbox.items == []


def test_vreboot_without_an_agent_says_nobody_listens(
        vroots: Paths, reach: Callable[[str], str]) -> None:
    start_busybox(vroots, "a")
    # The CLI's start makes the directory; nobody has bound a socket in it.
    code, out = run_in(vroots, "a", "/sbin/vreboot; echo rc=$?")
    assert "rc=1" in out, out
    assert "does not exist" in out
    # A socket left by an agent that is gone: the kernel refuses the connection.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(reach("a"))
    sock.close()
    code, out = run_in(vroots, "a", "/sbin/vhalt; echo rc=$?")
    assert "rc=1" in out, out
    assert "nobody is listening on /dev/reboot" in out
    assert "agent is not running" in out
    assert code == 0


# --- identity comes from the socket (RB1) -----------------------------------------------

def test_a_guest_socket_yields_only_that_guests_requests_whatever_the_payload(
        vroots: Paths, managers: Managers) -> None:
    a = start_busybox(vroots, "a")
    start_busybox(vroots, "b")
    inbox = Inbox()
    managers.watch(managers.new(inbox, per_minute=100), "a", "b")

    for payload in (b"reboot b\n", b"../b", b"../b/reboot\n",
                    b'{"guest": "b", "action": "reboot"}\n', b"halt b\n", b"reboot\nb\n",
                    b"b\n", b"reboot", b"REBOOT\n", b"reboot\n\0", b"reboot\r\n", b" halt\n",
                    b""):
        send(guest_socket(a), payload)
    time.sleep(1.5)
    assert inbox.items == []

    send(guest_socket(a), b"reboot\n")
    assert inbox.wait_for(1) == [("a", "restart")]
    code, out = run_in(vroots, "b", "/sbin/vhalt")
    assert code == 0, out
    assert inbox.wait_for(2) == [("a", "restart"), ("b", "halt")]
    time.sleep(0.3)
    assert len(inbox.items) == 2


# --- flood (RB2) -------------------------------------------------------------------------

def _flood_client(path: str, i: int) -> str:
    """One hostile connection of a few kinds; returns what happened, for the tally."""
    kind = i % 6
    try:
        with client(path) as s:
            if kind == 0:
                s.send(b"reboot\n")
            elif kind == 1:
                s.send(os.urandom(64))
            elif kind == 2:  # 1 MiB of garbage, as much as the socket takes
                s.setblocking(False)
                with contextlib.suppress(OSError):
                    s.send(b"x" * (1 << 20))
            elif kind == 3:
                s.send(b"reb")  # half a line, then gone
            elif kind == 4:  # a descriptor passed along
                r, w = os.pipe()
                try:
                    s.sendmsg([b"reboot\n"],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
                finally:
                    os.close(r)
                    os.close(w)
            # kind 5: connect and say nothing
        return "ok"
    except OSError as e:
        return type(e).__name__


def test_ten_thousand_connections_leave_the_manager_answering_with_fds_flat(
        vroots: Paths, managers: Managers, loop: Loop, reach: Callable[[str], str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hostagent.rebootmgr")
    now = [1000.0]
    inbox = Inbox()
    m = managers.new(inbox, per_minute=6, clock=lambda: now[0], read_timeout=0.5)
    managers.watch(m, "a", "b")
    path = reach("a")
    fds_before, tasks_before = open_fds(), loop.tasks()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        flood = pool.map(lambda i: _flood_client(path, i), range(10_000))
        # Another guest is served while A floods.
        send(reach("b"), b"reboot\n")
        assert settle(lambda: ("b", "restart") in inbox.items, 5)
        results = list(flood)
    took = time.monotonic() - started
    assert took < 120, f"the flood took {took:.0f} s"
    tally = {r: results.count(r) for r in set(results)}
    # Refused ones were closed under the client's feet; none waited 5 s to connect.
    assert set(tally) <= {"ok", "BrokenPipeError", "ConnectionResetError"}, tally
    assert tally.get("ok", 0) > 1000, tally

    # At most per_minute requests got through, however many valid ones came (how many
    # depends on how many were read rather than closed at once for concurrency) ...
    time.sleep(1)
    assert len([item for item in inbox.items if item[0] == "a"]) <= 6
    # ... and, one at a time, the window fills up to exactly per_minute and no more.
    for _ in range(8):
        send(path, b"reboot\n")
    time.sleep(1)
    assert [item for item in inbox.items if item[0] == "a"] == [("a", "restart")] * 6
    # Every connection is closed again, no task is left, state is bounded.
    # No more than before, and reach("b")'s: fewer is fine (the process may close one of
    # its own, say a socket an earlier test left to the garbage collector).
    assert settle(lambda: open_fds() <= fds_before + 1), (open_fds(), fds_before)
    assert settle(lambda: loop.tasks() == tasks_before), (loop.tasks(), tasks_before)
    # A few lines per window, not one per connection.
    lines = [r for r in caplog.records if r.name == "hostagent.rebootmgr"]
    assert 1 <= len(lines) <= 10, [r.getMessage() for r in lines]
    assert any("more than 6 requests" in r.getMessage() for r in lines), [
        r.getMessage() for r in lines]

    # After the window the guest is heard again.
    now[0] += 61
    send(path, b"halt\n")
    assert inbox.wait_for(8)[-1] == ("a", "halt")
    assert len(inbox.items) == 8


def test_idle_connections_beyond_the_limit_are_closed_at_once(
        vroots: Paths, managers: Managers, reach: Callable[[str], str]) -> None:
    inbox = Inbox()
    managers.watch(managers.new(inbox, max_connections=4, read_timeout=1.0), "a")
    path = reach("a")
    idle = []
    try:
        for _ in range(4):
            idle.append(client(path))
        time.sleep(0.2)
        with client(path) as extra:
            t0 = time.monotonic()
            assert extra.recv(1) == b""  # closed by the manager, not by the timeout
            assert time.monotonic() - t0 < 0.5
        # The idle ones are dropped after the read timeout; then a request passes.
        for s in idle:
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    send(path, b"reboot\n")
    assert inbox.wait_for(1) == [("a", "restart")]


# --- agent restart ------------------------------------------------------------------------

def test_a_new_manager_serves_a_guest_started_before_it(
        vroots: Paths, managers: Managers) -> None:
    start_busybox(vroots, "a")
    first, second = Inbox(), Inbox()
    m1 = managers.new(first)
    managers.watch(m1, "a")
    assert run_in(vroots, "a", "/sbin/vreboot")[0] == 0
    assert first.wait_for(1) == [("a", "restart")]

    # An agent that died without cleaning up: its socket file stays behind.
    m2 = managers.new(second)
    managers.watch(m2, "a")
    assert m2.watching() == {"a"}
    code, out = run_in(vroots, "a", "/sbin/vhalt")
    assert code == 0, out
    assert second.wait_for(1) == [("a", "halt")]
    # The old manager going away later does not take the new socket with it.
    managers.close(m1)
    assert rebootmgr.socket_path(vroots, "a").exists()
    assert run_in(vroots, "a", "/sbin/vreboot")[0] == 0
    assert second.wait_for(2) == [("a", "halt"), ("a", "restart")]
    assert first.items == [("a", "restart")]

    # Watching again is idempotent: one socket, still served.
    managers.watch(m2, "a")
    assert run_in(vroots, "a", "/sbin/vreboot")[0] == 0
    assert len(second.wait_for(3)) == 3
    managers.close(m2)
    assert not rebootmgr.socket_path(vroots, "a").exists()
    assert m2.watching() == set()


def test_concurrent_watches_of_one_guest_leave_one_listener(
        vroots: Paths, managers: Managers, loop: Loop, reach: Callable[[str], str]) -> None:
    inbox = Inbox()
    m = managers.new(inbox)
    fds, tasks = open_fds(), loop.tasks()
    managers.watch(m, "a")  # each watch below must first take this one down

    async def many() -> None:
        await asyncio.gather(*(m.watch("a") for _ in range(5)))

    loop.run(many())
    assert m.watching() == {"a"}
    assert open_fds() == fds + 1 and loop.tasks() == tasks + 1
    send(reach("a"), b"reboot\n")
    assert inbox.wait_for(1) == [("a", "restart")]
    managers.close(m)
    assert open_fds() == fds + 1 and loop.tasks() == tasks  # + reach()'s descriptor


# --- the guest's own reboot(2) ----------------------------------------------------------

@pytest.mark.parametrize(("command", "signo", "kind"), [
    ("reboot -f", signal.SIGHUP, "restart"),
    ("halt -f", signal.SIGINT, "halt"),
    ("poweroff -f", signal.SIGINT, "halt"),
])
def test_guest_reboot_syscall_ends_pid1_with_the_signal_that_says_why(
        vroots: Paths, command: str, signo: int, kind: str) -> None:
    st = start_busybox(vroots, "a")
    run_in(vroots, "a", command)  # it dies with its namespace; its own status is moot
    info = wait_exit(st.init_pid)
    assert info.si_code == os.CLD_KILLED and info.si_status == signo, info
    assert rebootmgr.classify_exit(info) == kind
    # The host is still up, and stop cleans up after a guest that ended itself.
    guest.stop(vroots, "a", timeout=0)
    assert not guest.running(vroots, "a")
    assert not rebootmgr.socket_dir(vroots, "a").exists()


def test_busybox_reboot_without_f_ends_the_small_init_with_status_0(vroots: Paths) -> None:
    st = start_busybox(vroots, "a")
    # halt and poweroff without -f send SIGUSR1 and SIGUSR2, which catatonit ignores.
    run_in(vroots, "a", "halt; poweroff")
    time.sleep(0.5)
    assert os.waitid(os.P_PID, st.init_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    assert guest.running(vroots, "a")
    # reboot without -f sends SIGTERM, on which catatonit -P exits with 0.
    run_in(vroots, "a", "reboot")
    info = wait_exit(st.init_pid)
    assert (info.si_code, info.si_status) == (os.CLD_EXITED, 0), info
    assert rebootmgr.classify_exit(info) == "restart"
    assert rebootmgr.classify_exit(info, fakeinit=True) == "exit"


def test_classify_exit_reads_waitid_results_and_wait_statuses() -> None:
    def waitid(code: int, status: int) -> os.waitid_result:
        return os.waitid_result((123, 0, signal.SIGCHLD, status, code))

    assert rebootmgr.classify_exit(waitid(os.CLD_KILLED, signal.SIGHUP)) == "restart"
    assert rebootmgr.classify_exit(waitid(os.CLD_KILLED, signal.SIGINT)) == "halt"
    assert rebootmgr.classify_exit(waitid(os.CLD_DUMPED, signal.SIGHUP)) == "restart"
    assert rebootmgr.classify_exit(waitid(os.CLD_KILLED, signal.SIGKILL)) == "exit"
    assert rebootmgr.classify_exit(waitid(os.CLD_DUMPED, signal.SIGSEGV)) == "exit"
    assert rebootmgr.classify_exit(waitid(os.CLD_EXITED, 1)) == "exit"
    assert rebootmgr.classify_exit(waitid(os.CLD_EXITED, 0)) == "restart"
    assert rebootmgr.classify_exit(waitid(os.CLD_EXITED, 0), fakeinit=True) == "exit"
    # waitpid statuses: the signal number, or the exit code shifted by 8.
    assert rebootmgr.classify_exit(signal.SIGHUP) == "restart"
    assert rebootmgr.classify_exit(signal.SIGINT) == "halt"
    assert rebootmgr.classify_exit(signal.SIGKILL) == "exit"
    assert rebootmgr.classify_exit(0) == "restart"
    assert rebootmgr.classify_exit(3 << 8) == "exit"


# --- CAP_SYS_BOOT -------------------------------------------------------------------------

def test_sys_boot_only_with_a_pid_namespace_and_kexec_refused() -> None:
    pol = seccomp.SeccompPolicy()
    pidns = syscalls.CLONE_NEWPID | syscalls.CLONE_NEWNS
    assert rebootmgr.sys_boot_allowed(pidns, pol)
    assert rebootmgr.sys_boot_allowed(pidns, pol.with_lock())
    assert not rebootmgr.sys_boot_allowed(syscalls.CLONE_NEWNS, pol)
    assert not rebootmgr.sys_boot_allowed(pidns, None)
    for keep in ("kexec_load", "kexec_file_load"):
        assert not rebootmgr.sys_boot_allowed(
            pidns, seccomp.SeccompPolicy(deny=tuple(c for c in pol.deny if c != keep)))


def test_guest_ceiling_carries_sys_boot_unless_s_caps_drops_it(vroots: Paths) -> None:
    guest.build(vroots, "a", guest.BuildOptions(method="busybox"))
    s = guest._load_settings(vroots, "a")
    spec = guest.spec_for(vroots, "a", s, None)
    assert spec.namespaces & syscalls.CLONE_NEWPID
    assert spec.caps == s.caps | {SYS_BOOT}
    assert spec.reboot_dir == rebootmgr.socket_dir(vroots, "a")
    guest.build(vroots, "b", guest.BuildOptions(method="busybox", caps=["!CAP_SYS_BOOT"]))
    s = guest._load_settings(vroots, "b")
    assert SYS_BOOT not in guest.spec_for(vroots, "b", s, None).caps

    guest.start(vroots, "a")
    code, out = run_in(vroots, "a", "grep CapBnd /proc/self/status")
    assert code == 0, out
    assert int(out.split()[1], 16) == caps.to_mask(caps.DEFAULT_CEILING | {SYS_BOOT})


def _capbnd(out: str) -> int:
    m = re.search(r"^CapBnd:\s*([0-9a-f]+)$", out, re.M)
    assert m, out
    return int(m.group(1), 16)


def test_chcontext_and_reducecap_secure_do_not_carry_sys_boot(vroots: Paths) -> None:
    status = ["sh", "-c", "grep CapBnd /proc/self/status"]
    for argv in ([str(BIN / "chcontext"), "--silent", "--secure", *status],
                 [str(BIN / "reducecap"), "--secure", *status]):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        assert not _capbnd(res.stdout) >> SYS_BOOT & 1, argv


# --- the host directory -------------------------------------------------------------------

def test_prepare_makes_root_owned_directories_and_repairs_a_symlink(
        vroots: Paths, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base = vroots.rundir / "reboot"
    base.mkdir(mode=0o777)
    os.symlink(elsewhere, base / "a")
    d = rebootmgr.prepare(vroots, "a")
    assert d == base / "a"
    for p, mode in ((base, 0o711), (d, 0o755)):
        st = os.lstat(p)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == mode, p
        assert (st.st_uid, st.st_gid) == (0, 0)
    assert elsewhere.is_dir() and list(elsewhere.iterdir()) == []
    (d / "reboot").write_text("stale")
    rebootmgr.remove(vroots, "a")
    assert not os.path.lexists(d) and base.is_dir()
    rebootmgr.remove(vroots, "a")  # a missing one is fine
    os.symlink(elsewhere, d)
    rebootmgr.remove(vroots, "a")
    assert not os.path.lexists(d) and elsewhere.is_dir()


def test_socket_is_0600_and_stop_removes_its_directory(
        vroots: Paths, managers: Managers) -> None:
    start_busybox(vroots, "a")
    managers.watch(managers.new(Inbox()), "a")
    st = os.lstat(rebootmgr.socket_path(vroots, "a"))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0
    assert guest.stop(vroots, "a", timeout=0)
    assert not rebootmgr.socket_dir(vroots, "a").exists()


# --- the build puts vreboot and vhalt in ---------------------------------------------------

def test_every_build_installs_a_static_vreboot_and_vhalt(tmp_path: Path,
                                                         root_required: None) -> None:
    root = tmp_path / "bb"
    build.build_root(root, "busybox", log=lambda _m: None)
    vreboot = root / "sbin/vreboot"
    st = os.lstat(vreboot)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0
    assert build.is_static_elf(vreboot)
    assert os.readlink(root / "sbin/vhalt") == "vreboot"
    res = subprocess.run(["chroot", str(root), "/sbin/vhalt", "--help"], capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 0 and "stop this vserver" in res.stdout, res


def test_rootfs_with_sbin_symlinked_gets_vreboot_inside_the_tree(
        tmp_path: Path, root_required: None) -> None:
    src = tmp_path / "src"
    (src / "usr/sbin").mkdir(parents=True)
    (src / "etc").mkdir()
    # Absolute, as in many tarballs: it must mean the tree's /usr/sbin, not the host's.
    os.symlink("/usr/sbin", src / "sbin")
    root = tmp_path / "guests" / "r"
    root.parent.mkdir()
    lines: list[str] = []
    build.build_root(root, "rootfs", str(src), log=lines.append)
    assert os.readlink(root / "sbin") == "/usr/sbin"
    assert (root / "usr/sbin/vreboot").is_file()
    assert os.readlink(root / "usr/sbin/vhalt") == "vreboot"
    assert not os.path.lexists("/usr/sbin/vhalt") or os.readlink("/usr/sbin/vhalt") != "vreboot"
    assert any("installed /usr/sbin/vreboot" in line for line in lines)

    # A link that climbs out of the tree is read inside it all the same.
    src2 = tmp_path / "src2"
    (src2 / "etc").mkdir(parents=True)
    os.symlink("../../../../../../../../nowhere/sbin", src2 / "sbin")
    root2 = tmp_path / "guests" / "r2"
    lines.clear()
    build.build_root(root2, "rootfs", str(src2), log=lines.append)
    assert not os.path.exists("/nowhere")
    assert any("not installed" in line for line in lines), lines


def test_build_goes_on_without_a_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          root_required: None) -> None:
    monkeypatch.setenv("VPANEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(guestbin.GuestBinError, match="gcc libc6-dev"):
        guestbin.vreboot_binary()
    lines: list[str] = []
    build.build_root(tmp_path / "bb", "busybox", log=lines.append)
    assert not os.path.lexists(tmp_path / "bb/sbin/vreboot")
    assert any("not installed" in line and "gcc" in line for line in lines), lines


def test_vreboot_binary_is_compiled_once_into_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPANEL_CACHE_DIR", str(tmp_path / "cache"))
    first = guestbin.vreboot_binary()
    assert first.parent == tmp_path / "cache/guestbin"
    mtime = first.stat().st_mtime_ns
    assert guestbin.vreboot_binary() == first
    assert first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left
    # A cache that others may write into is refused, not trusted.
    os.chmod(first.parent, 0o777)  # noqa: S103 (the hostile setting under test)
    with pytest.raises(guestbin.GuestBinError, match="writable by others"):
        guestbin.vreboot_binary()
