"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess

from hostagent import guest
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
