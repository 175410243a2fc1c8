"""vtop: top over every context, with CTX and NAME columns.

    vtop [-d SECS] [--guest NAME]            live, in the terminal; q quits
    vtop --once [-d SECS] [-n N] [--guest NAME] [--json]

Columns: PID USER CTX NAME %CPU %MEM RSS COMMAND, sorted by %CPU (then RSS).
%CPU is the share of one CPU the process used between two looks, -d SECS
apart (default 2 live; 0.5 for --once, which looks twice and prints once).
%MEM is RSS over MemTotal, RSS is in KiB, as in top. --guest NAME shows only
that vserver's processes.
"""

from __future__ import annotations

import argparse
import contextlib
import curses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hostagent.cgroup import CgroupError
from hostagent.names import guest_name_arg
from hostagent.paths import Paths
from hostagent.views import (
    ContextMap,
    Proc,
    all_procs,
    clock_ticks,
    mem_total,
    print_json,
    render_table,
    stdout_closed,
    user_name,
)

HEADERS = ("PID", "USER", "CTX", "NAME", "%CPU", "%MEM", "RSS", "COMMAND")
RIGHT = (True, False, True, False, True, True, True, False)


@dataclass(frozen=True)
class Row:
    pid: int
    user: str
    context: int
    name: str
    guest: str | None
    guest_pid: int | None
    cpu: float
    mem: float
    rss_kib: int
    command: str
    uid: int = -1  # the host's uid (USER is its host name)

    def cells(self) -> tuple[str, ...]:
        return (str(self.pid), self.user, str(self.context), self.name, f"{self.cpu:.1f}",
                f"{self.mem:.1f}", str(self.rss_kib), self.command)

    def as_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "user": self.user, "context": self.context,
                "guest": self.guest, "guest_pid": self.guest_pid, "cpu": round(self.cpu, 1),
                "mem": round(self.mem, 1), "rss_kib": self.rss_kib, "command": self.command}


class Sampler:
    """Successive snapshots; %CPU of each is measured since the one before."""

    def __init__(self, paths: Paths, guest: str | None = None) -> None:
        self.paths = paths
        self.guest = guest
        self._last: dict[tuple[int, int], int] = {}  # (pid, start) -> cpu ticks
        self._last_time = 0.0
        self.ctxmap: ContextMap | None = None

    def sample(self) -> list[Row]:
        # Rebuilt every time: guests start and stop while vtop runs.
        ctxmap = self.ctxmap = ContextMap(self.paths)
        now = time.monotonic()
        elapsed = now - self._last_time if self._last_time else 0.0
        hz, total = clock_ticks(), mem_total()
        procs = [p for p in all_procs(ctxmap.hierarchy) if not p.kthread]
        seen: dict[tuple[int, int], int] = {}
        rows = []
        for p in procs:
            key = (p.pid, p.start)
            seen[key] = p.cpu_ticks
            ctx = ctxmap.of_cgroup(p.cgroup)
            if self.guest is not None and ctx.guest != self.guest:
                continue
            rows.append(Row(
                pid=p.pid, user=user_name(p.uid), context=ctx.number, name=ctx.label,
                guest=ctx.guest, guest_pid=ctxmap.inner_pid(p, ctx),
                cpu=self._cpu(p, key, elapsed, hz), mem=100.0 * p.rss / total,
                rss_kib=p.rss // 1024, command=p.command, uid=p.uid,
            ))
        self._last, self._last_time = seen, now
        rows.sort(key=lambda r: (-r.cpu, -r.rss_kib, r.pid))
        return rows

    def _cpu(self, p: Proc, key: tuple[int, int], elapsed: float, hz: int) -> float:
        if elapsed <= 0:
            return 0.0
        before = self._last.get(key, 0)  # a process born since: all its time is new
        return 100.0 * (p.cpu_ticks - before) / hz / elapsed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtop", description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--delay", type=float, help="seconds between looks")
    p.add_argument("--guest", metavar="NAME", type=guest_name_arg,
                   help="only this vserver's processes")
    p.add_argument("--once", action="store_true", help="print one snapshot, no terminal UI")
    p.add_argument("--json", action="store_true", help="with --once: print JSON")
    p.add_argument("-n", "--lines", type=int, help="with --once: at most N processes")
    return p


def _summary(rows: list[Row], sampler: Sampler) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    guests = sampler.ctxmap.contexts() if sampler.ctxmap else []
    names = ", ".join(f"{c.guest} {c.number}" for c in guests) or "none"
    return (f"vtop - {time.strftime('%H:%M:%S')}  load average: {load}  "
            f"processes: {len(rows)}  vservers: {names}")


def _once(sampler: Sampler, delay: float, lines: int | None, json_out: bool) -> int:
    sampler.sample()
    time.sleep(delay)
    rows = sampler.sample()
    shown = rows if lines is None else rows[:lines]
    if json_out:
        print_json([r.as_dict() for r in shown])
    else:
        print(_summary(rows, sampler))
        print("\n".join(render_table(HEADERS, (r.cells() for r in shown), RIGHT)))
    return 0


def _live(stdscr: curses.window, sampler: Sampler, delay: float) -> None:
    curses.curs_set(0)
    stdscr.timeout(int(delay * 1000))
    sampler.sample()
    time.sleep(min(delay, 0.5))
    while True:
        rows = sampler.sample()
        height, width = stdscr.getmaxyx()
        stdscr.erase()
        table = render_table(HEADERS, (r.cells() for r in rows[:max(0, height - 3)]), RIGHT)
        _put(stdscr, 0, _summary(rows, sampler), width)
        _put(stdscr, 1, "q quits; any other key refreshes", width)
        if table:
            _put(stdscr, 2, table[0].ljust(width), width, curses.A_REVERSE)
            for y, line in enumerate(table[1:], start=3):
                if y >= height:
                    break
                _put(stdscr, y, line, width)
        stdscr.refresh()
        key = stdscr.getch()
        if key in (ord("q"), ord("Q")):
            return


def _put(win: curses.window, y: int, text: str, width: int, attr: int = 0) -> None:
    # The bottom-right cell, or a terminal shrinking under us, raise curses.error.
    with contextlib.suppress(curses.error):
        win.addnstr(y, 0, text, max(0, width - 1), attr)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    paths = Paths.from_env()
    try:
        sampler = Sampler(paths, a.guest)
        if a.guest is not None and ContextMap(paths).guest_context(a.guest) is None:
            print(f"vtop: vserver {a.guest} is not running", file=sys.stderr)
            return 1
        if a.delay is not None and a.delay <= 0:
            print("vtop: -d must be more than 0", file=sys.stderr)
            return 2
        if a.once or a.json:
            return _once(sampler, 0.5 if a.delay is None else a.delay, a.lines, a.json)
        if not sys.stdout.isatty():
            print("vtop: not a terminal; use --once for a snapshot", file=sys.stderr)
            return 2
        curses.wrapper(_live, sampler, 2.0 if a.delay is None else a.delay)
        return 0
    except BrokenPipeError:
        return stdout_closed()
    except (OSError, CgroupError) as e:
        print(f"vtop: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
