"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

from hostagent import guest, idmap, syscalls
from hostagent.cgroup import Cgroup
from hostagent.paths import Paths


def run(args: list[str], *, check_rc: int | None = 0, timeout: float = 60,
        **kw: object) -> subprocess.CompletedProcess[str]:
    """Run ARGS with the test's environment; assert its exit code unless CHECK_RC is None."""
    kw.setdefault("env", os.environ.copy())
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check_rc is not None:
        assert proc.returncode == check_rc, (
            f"{args!r} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def stop_all(paths: Paths, *, delete: bool = False) -> None:
    """Teardown: stop (and, if asked, delete) every guest under PATHS, whatever fails."""
    for name in paths.guest_names():
        try:
            guest.stop(paths, name, timeout=0)
        except Exception:  # teardown must go on: kill what the stop left
            st = guest.read_state(paths, name)
            if st is not None:
                cg = Cgroup(st.cgroup)
                cg.kill()
                cg.wait_empty(5)
        if delete:
            with contextlib.suppress(guest.GuestError):
                guest.delete(paths, name)


class AgentProcess:
    """`hostagent serve` as a real process on a test's roots, for the API tests.

    NETNS, a name under /run/netns, runs it (and so the guests' host side) in
    that network namespace. Teardown: stop() ends the agent, never the guests.
    """

    def __init__(self, paths: Paths, netns: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.paths = paths
        self.netns = netns
        self.extra_env = env or {}
        self.socket = paths.rundir / "agent.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = paths.rundir.parent / "agent.log"

    def start(self, *, onboot: bool = False, wait: bool = True) -> AgentProcess:
        import sys
        import time
        from pathlib import Path

        exe = str(Path(sys.executable).parent / "hostagent")
        argv = [exe, "serve"] + ([] if onboot else ["--no-onboot"])
        if self.netns:
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", *argv]
        env = {**os.environ, **self.extra_env}
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        log = open(self.log, "ab")  # noqa: SIM115 - the agent writes it for its whole life
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        if wait:
            deadline = time.monotonic() + 30
            # Until it accepts a connection: the socket file exists a moment
            # before the agent listens on it.
            while not self._answers():
                if self.proc.poll() is not None:
                    raise AssertionError(f"the agent exited: {self.log.read_text()[-2000:]}")
                assert time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        import socket

        if not self.socket.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def client(self) -> object:
        from hostagent.client import AgentClient

        return AgentClient(self.socket)

    def kill(self, sig: int = 9) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(15)

    def fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


# --- acting as an isolated guest's root (tests/agent/test_idmap.py, tests/security) ---

def as_guest_root(init_pid: int, fn: Callable[[], Any], uid: int = 0) -> Any:
    """FN's result in a child that joined the guest's user and mount namespaces and
    became its root (then UID, if not 0), keeping every descriptor the test holds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            pidfd = syscalls.pidfd_open(init_pid)
            syscalls.setns(pidfd, syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS)
            idmap.become_root()
            if uid:
                os.setresuid(uid, uid, uid)
            out = {"result": fn()}
        except BaseException as e:  # reported to the test, never raised in the fork
            out = {"error": repr(e)}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    got = json.loads(data)
    assert "error" not in got, got["error"]
    return got["result"]


def attempt(fn: Callable[[], object]) -> str:
    """'ok', or the errno name FN failed with."""
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    return "ok"
