"""Small readers of /proc used to tell a live process from a recycled pid."""

from __future__ import annotations

__all__ = ["start_time"]


def start_time(pid: int) -> int | None:
    """Start time of PID in clock ticks since boot, or None if it is gone or a zombie.

    (pid, start time) names a process for good: a pid can be reused, the pair
    cannot, so records of running guests keep both.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])
