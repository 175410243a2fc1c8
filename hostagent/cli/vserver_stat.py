"""vserver-stat: one line per running vserver, in the seed's columns.

    vserver-stat [--json]

    CTX       context number
    PROC      processes in the vserver (its cgroup.procs)
    VSZ       virtual memory of those processes (sum of VmSize)
    RSS       resident memory of those processes (sum of VmRSS)
    userTIME  user-mode CPU time of the vserver, exited processes included
    sysTIME   kernel-mode CPU time, likewise
    UPTIME    time since the vserver started
    NAME      the vserver's name
    DESCRIPTION  DESCRIPTION (or the seed's '# Description:') of NAME.conf

Sizes as the seed printed them: B, kB, MB, GB, TB, in whole units (1024).
Times too: M'm'SS.hh (minutes, seconds, hundredths) under an hour,
H'h'MM'm'SS under a day, D'd'HH'h'MM beyond.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from hostagent import conf as confmod
from hostagent.cgroup import Cgroup, CgroupError
from hostagent.paths import Paths
from hostagent.usage import GuestUsage, usage_all
from hostagent.views import print_json, running_states, stdout_closed

# The seed's "%-4d %4d %6s %6s %9s %9s %9s %-8s %s", CTX one wider: dynamic
# contexts have five digits here (49152 up).
ROW_FMT = "{:<5} {:>4} {:>6} {:>6} {:>9} {:>9} {:>9} {:<8} {}"
HEADER = ROW_FMT.format("CTX", "PROC", "VSZ", "RSS", "userTIME", "sysTIME", "UPTIME", "NAME",
                        "DESCRIPTION")


def format_mem(n: int | None) -> str:
    """The seed's convert_mem: 1023B, 12kB, 5MB ... (truncated, 1024-based)."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024:
            return f"{n}{unit}"
        n >>= 10
    return f"{n}TB"


def format_time(seconds: float | None) -> str:
    """The seed's convert_time, hundredths of a second up: 0m01.52, 1h02m03, 2d03h04.

    (The seed printed the hours of a day modulo 12 and a zero as a blank; this
    prints them as they are.)
    """
    if seconds is None:
        return "-"
    t = int(seconds * 100)
    hundredths, t = t % 100, t // 100
    ss, t = t % 60, t // 60
    mm, t = t % 60, t // 60
    hh, days = t % 24, t // 24
    if days:
        return f"{days}d{hh:02d}h{mm:02d}"
    if hh:
        return f"{hh}h{mm:02d}m{ss:02d}"
    return f"{mm}m{ss:02d}.{hundredths:02d}"


def memory_of(pids: Sequence[int]) -> tuple[int, int]:
    """(VSZ, RSS) in bytes: VmSize and VmRSS of /proc/PID/status, summed."""
    vsz = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("VmSize:"):
                        vsz += int(line.split()[1]) * 1024
                    elif line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile (a kernel thread or zombie has neither line)
    return vsz, rss


def _description(paths: Paths, name: str) -> str:
    try:
        return confmod.settings_from_file(paths.conf(name)).description or ""
    except (confmod.ConfigError, OSError):
        return ""


@dataclass(frozen=True)
class StatRow:
    context: int
    processes: int
    vsz: int  # bytes
    rss: int  # bytes
    user_seconds: float | None
    system_seconds: float | None
    uptime: float
    name: str
    description: str

    def text(self) -> str:
        return ROW_FMT.format(
            self.context, self.processes, format_mem(self.vsz), format_mem(self.rss),
            format_time(self.user_seconds), format_time(self.system_seconds),
            format_time(self.uptime), self.name, self.description).rstrip()


def rows(paths: Paths) -> list[StatRow]:
    usage: dict[str, GuestUsage] = usage_all(paths, running_states(paths))
    out = []
    for name, u in sorted(usage.items(), key=lambda kv: kv[1].context):
        vsz, rss = memory_of(Cgroup(u.cgroup).procs())
        out.append(StatRow(u.context, u.processes, vsz, rss, u.cpu_user_seconds,
                           u.cpu_system_seconds, u.uptime, name, _description(paths, name)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if args not in ([], ["--json"]):
        print("vserver-stat: unknown parameter; use --help", file=sys.stderr)
        return 1
    try:
        table = rows(Paths.from_env())
        if args == ["--json"]:
            print_json([dataclasses.asdict(r) for r in table])
        else:
            print("\n".join([HEADER, *(r.text() for r in table)]))
        return 0
    except BrokenPipeError:
        return stdout_closed()
    except (OSError, CgroupError) as e:
        print(f"vserver-stat: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
