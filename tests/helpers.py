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
