"""`manage.py reconcile [--repair] [--watch SECONDS] [--json] [--host NAME]`.

Compares the panel's vservers with what each host's agent runs and prints
the drift (panel/guests/reconcile.py says what is compared and what
--repair sets right). With --watch it runs a pass every SECONDS until
stopped, printing a pass only when its drift differs from the last one
printed (every pass with -v 2), so its log stays readable; `make run`
runs it so, with --repair, in the background.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections
from django.utils import timezone

from panel.guests.reconcile import START_WAIT, HostReport, reconcile


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_text(reports: list[HostReport], repair: bool) -> str:
    lines = []
    for r in reports:
        head = f"host {r.host} ({r.socket}): "
        if r.reachable:
            head += f"{_plural(r.guests, 'guest')} on it, {_plural(r.vservers, 'vserver')} " \
                    "in the panel"
        else:
            head += f"no answer ({r.error}); {_plural(r.vservers, 'vserver')} in the panel"
        if r.busy:
            head += f"; operation under way on {', '.join(r.busy)} (left alone)"
        if not r.drift:
            head += ": no drift"
        lines.append(head)
        for d in r.drift:
            text = f"  {d.vserver or '(host)':<12} {d.kind:<11} {d.detail}"
            if d.repair:
                text += f"  -> {d.repair}" if repair else f"  (--repair: {d.repair})"
            lines.append(text)
    if not reports:
        lines.append("no enabled or maintenance host")
    return "\n".join(lines)


def _key(reports: list[HostReport]) -> tuple[Any, ...]:
    """What a pass found, without times or operation ids: equal passes print once."""
    return tuple((r.host, r.reachable, tuple(r.busy),
                  tuple((d.kind, d.vserver, d.panel, d.host) for d in r.drift))
                 for r in reports)


class Command(BaseCommand):
    help = "Compare the panel's vservers with what the hosts run; --repair sets right what is safe."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--repair", action="store_true",
                            help="write statuses from the agents, start vservers that should "
                                 "run, fail abandoned operations (never deletes or stops)")
        parser.add_argument("--watch", type=float, metavar="SECONDS",
                            help="run a pass every SECONDS until stopped")
        parser.add_argument("--json", action="store_true", help="print JSON (one line a pass)")
        parser.add_argument("--host", action="append", dest="hosts", metavar="NAME",
                            help="only this host (repeatable)")
        parser.add_argument("--wait", type=float, default=START_WAIT, metavar="SECONDS",
                            help="how long a pass waits for the starts it asked for "
                                 f"(default {START_WAIT:g})")

    def handle(self, *args: Any, **opts: Any) -> None:
        watch = opts["watch"]
        if watch is not None and watch < 1:
            raise CommandError("--watch wants 1 second or more")
        last: tuple[Any, ...] | None = None
        while True:
            close_old_connections()
            started = timezone.now()
            try:
                reports = reconcile(repair=opts["repair"], hosts=opts["hosts"],
                                    wait=opts["wait"])
            except Exception as e:
                if watch is None:
                    raise
                # One failed pass (a locked database, a bug on one odd row)
                # must not end the loop that keeps every status current.
                self.stderr.write(f"{started:%Y-%m-%d %H:%M:%S} pass failed: "
                                  f"{type(e).__name__}: {e}")
                time.sleep(watch)
                continue
            key = _key(reports)
            if watch is None or key != last or opts["verbosity"] >= 2:
                self._print(reports, opts, started, stamped=watch is not None)
                last = key
            if watch is None:
                return
            time.sleep(watch)

    def _print(self, reports: list[HostReport], opts: dict[str, Any], started: Any,
               stamped: bool) -> None:
        if opts["json"]:
            doc = {"time": started.isoformat(), "repair": opts["repair"],
                   "hosts": [r.to_json() for r in reports]}
            self.stdout.write(json.dumps(doc, indent=None if stamped else 2))
            return
        text = format_text(reports, opts["repair"])
        if stamped:
            text = f"--- {started:%Y-%m-%d %H:%M:%S}\n{text}"
        self.stdout.write(text)
        self.stdout.flush()
