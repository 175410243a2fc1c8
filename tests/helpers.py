"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess


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
