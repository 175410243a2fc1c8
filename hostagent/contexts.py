"""Context numbers: handed out under one lock, so no two live contexts share one.

The seed's kernel handed out context numbers; here the run directory does.
A number is taken by a reservation file naming a process and its start
time, so it frees itself when that process ends, even if it was killed. A
guest holds its reservation only while it starts: from then on its NAME.ctx
record says which number it has. A chcontext context holds its reservation,
naming its PID 1, for as long as it lives.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hostagent import procfs

__all__ = ["DYNAMIC_CONTEXTS", "ContextInUse", "ContextRegistry", "ContextsExhausted"]

# The seed's static contexts are 2..49151 (S_CONTEXT); dynamic ones come after.
DYNAMIC_CONTEXTS = range(49152, 65536)


class ContextInUse(RuntimeError):
    pass


class ContextsExhausted(RuntimeError):
    pass


class ContextRegistry:
    def __init__(self, rundir: Path) -> None:
        self.dir = rundir / "contexts"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _reserved(self) -> set[int]:
        """Numbers whose reservation still names a live process; stale ones are removed."""
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
        return used

    def allocate(self, wanted: int | None = None,
                 in_use: Iterable[int] | Callable[[], Iterable[int]] = ()) -> int:
        """Reserve WANTED, or the lowest free dynamic number, for the calling process.

        IN_USE adds numbers held elsewhere (running guests' NAME.ctx records);
        pass a function to have them read under the registry's lock, so that a
        guest that finished starting meanwhile (and dropped its reservation
        for its record) is counted.
        """
        with self._lock():
            used = self._reserved() | set(in_use() if callable(in_use) else in_use)
            if wanted is not None:
                if wanted in used:
                    raise ContextInUse(f"context {wanted} is already in use")
                n = wanted
            else:
                n = next((c for c in DYNAMIC_CONTEXTS if c not in used), 0)
                if not n:
                    raise ContextsExhausted("no free context number left")
            self._write(n, os.getpid())
            return n

    def _write(self, n: int, pid: int) -> None:
        tmp = self.dir / f".{n}.new"
        tmp.write_text(f"{pid} {procfs.start_time(pid)}\n")
        os.replace(tmp, self.dir / str(n))

    def record(self, n: int, init_pid: int) -> None:
        """Hand reservation N over to the context's PID 1 (it lives as long as that)."""
        self._write(n, init_pid)

    def release(self, n: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / str(n)).unlink()
