"""Small readers of /proc used to tell a live process from a recycled pid."""

from __future__ import annotations

__all__ = ["session_id", "start_time"]


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None if PID is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return fields


def start_time(pid: int) -> int | None:
    """Start time of PID in clock ticks since boot, or None if it is gone or a zombie.

    (pid, start time) names a process for good: a pid can be reused, the pair
    cannot, so records of running guests keep both.
    """
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def session_id(pid: int) -> int | None:
    """PID's session id as our PID namespace numbers it, or None if it is gone or a zombie."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[3])
