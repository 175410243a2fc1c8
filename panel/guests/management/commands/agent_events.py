"""`manage.py agent_events [--host NAME]`: the agent event bridge, until stopped.

One event stream per enabled or maintenance host, reopened with backoff
whenever its agent goes away; each lifecycle and operation event updates the
vserver's status and the panel's operation, and is sent on to the pages
(panel/guests/bridge.py says exactly what). `make run` runs it in the
background beside the reconciler (log: var/agent-events.log).

It reaches the pages through the channel layer: across processes that needs
REDIS_URL (channels-redis); with the in-memory layer its changes are still
written, and pages show them when next loaded.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from panel.guests.bridge import RESCAN, Bridge


class Command(BaseCommand):
    help = "Follow every host's agent events into the panel (vserver status, operations)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", action="append", dest="hosts", metavar="NAME",
                            help="only this host (may be given more than once)")
        parser.add_argument("--rescan", type=float, default=RESCAN, metavar="SECONDS",
                            help=f"how often the host list is read again (default {RESCAN:g})")

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        said: list[str] = []

        def say(text: str) -> None:
            if said and said[-1] == text:  # "no host yet" every rescan says nothing new
                return
            said[:] = [text]
            self.stdout.write(f"{timezone.now():%Y-%m-%d %H:%M:%S} {text}")
            self.stdout.flush()

        def end(signum: int, _frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, end)
        signal.signal(signal.SIGINT, end)
        layer = settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1]
        say(f"agent_events: following the hosts' agents (channel layer: {layer})")
        Bridge(options["hosts"], say=say, rescan=options["rescan"]).run(stop)
        say("agent_events: stopped")
