"""Context numbers for contexts made by chcontext (guests record theirs in NAME.ctx).

The seed's kernel handed out context numbers; here the agent's run directory
does, under a lock, so a number is never given to two live contexts. A record
names its PID 1 and that process's start time, so the number frees itself
when the context ends, even if whoever made it was killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from hostagent import guest, procfs
from hostagent.paths import Paths

__all__ = ["ContextRegistry", "find_guest_by_context"]


class ContextRegistry:
    def __init__(self, rundir: Path, paths: Paths | None = None) -> None:
        self.dir = rundir / "contexts"
        self.paths = paths

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _live(self) -> set[int]:
        used = set()
        for p in self.dir.glob("[0-9]*"):
            try:
                pid, start = (int(x) for x in p.read_text().split())
            except (OSError, ValueError):
                pid, start = 0, -1
            if pid and procfs.start_time(pid) == start:
                used.add(int(p.name))
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        if self.paths is not None:
            for name in self.paths.guest_names():
                st = guest.read_state(self.paths, name)
                if st is not None:
                    used.add(st.context)
        return used

    def allocate(self, wanted: int | None = None) -> int:
        """Reserve a number (WANTED if free); record() must follow once PID 1 exists."""
        with self._lock():
            used = self._live()
            if wanted is not None:
                if wanted in used:
                    raise guest.GuestError(f"context {wanted} is in use")
                n = wanted
            else:
                n = next((c for c in guest.DYNAMIC_CONTEXTS if c not in used), 0)
                if not n:
                    raise guest.GuestError("no free context number")
            # Hold it with our own pid until record() names the context's PID 1.
            (self.dir / str(n)).write_text(f"{os.getpid()} {procfs.start_time(os.getpid())}\n")
            return n

    def record(self, n: int, init_pid: int) -> None:
        (self.dir / str(n)).write_text(f"{init_pid} {procfs.start_time(init_pid)}\n")

    def release(self, n: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / str(n)).unlink()


def find_guest_by_context(paths: Paths, ctx: int) -> str | None:
    """The running guest whose context number is CTX, if any."""
    for name in paths.guest_names():
        st = guest.read_state(paths, name)
        if st is not None and st.context == ctx and guest.running(paths, name):
            return name
    return None
