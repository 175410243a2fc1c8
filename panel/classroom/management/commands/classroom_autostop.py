"""`manage.py classroom_autostop [--once] [--interval SECONDS]`.

Runs panel/classroom/autostop.py: every INTERVAL seconds (default 60) a pass
over every student's server of every class: those running outside their
class's hours are stopped (unless a teacher started them then), idle ones
are warned and then stopped, and the classes deleted at the end of term whose
servers are all gone are removed. It prints what a pass did (nothing when it
did nothing), a line a seat. --once: one pass, then exit (for cron or a
systemd timer). `make run` (scripts/panel.sh) runs it in the background.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections
from django.utils import timezone

from panel.classroom.autostop import run_once

DEFAULT_INTERVAL = 60.0


class Command(BaseCommand):
    help = "Stop classroom servers outside their class's hours or idle, warning first."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="one pass, then exit")
        parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                            metavar="SECONDS",
                            help=f"seconds between passes (default {DEFAULT_INTERVAL:g})")

    def handle(self, *args: Any, **opts: Any) -> None:
        interval = opts["interval"]
        if interval < 1:
            raise CommandError("--interval wants 1 second or more")
        while True:
            close_old_connections()
            started = timezone.now()
            try:
                outcomes = run_once(started)
            except Exception as e:
                if opts["once"]:
                    raise
                # One failed pass (a locked database, one odd row) must not end
                # the loop: the next one tries again.
                self.stderr.write(f"{started:%Y-%m-%d %H:%M:%S} pass failed: "
                                  f"{type(e).__name__}: {e}")
                time.sleep(interval)
                continue
            for o in outcomes:
                self.stdout.write(f"{started:%Y-%m-%d %H:%M:%S} {o}")
            if opts["verbosity"] >= 2 and not outcomes:
                self.stdout.write(f"{started:%Y-%m-%d %H:%M:%S} nothing to do")
            self.stdout.flush()
            if opts["once"]:
                return
            time.sleep(interval)
