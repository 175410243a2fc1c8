"""CPU, memory and last activity for the teacher's grid: one sampler per watched class.

A grid (templates/classroom/class_detail.html, over ws/classes/SLUG/: see
panel/classroom/consumers.py) asks for its class's usage while it is visible
(`{"type": "watch-usage"}`). However many grids watch one class, this process
runs ONE task for it, which every INTERVAL seconds:

  - reads the class's seats (server, host, group, Seat.last_activity) and who
    may see which seat: the class's teachers (and owners, admins: their
    teacher, as actions.class_role says) every seat, a TA the seats of their
    groups (views.seats_visible);
  - asks each host that holds one of the class's servers `GET /1.0/stats`,
    once: every running guest's CPU time, memory and uptime in one answer,
    however many students the host has;
  - sends one message with every seat's row to the group `classroom-ID`, which
    the watching consumers joined; each consumer forwards to its page only
    the rows its user may see, by that message's own list of teachers and
    TAs' groups (read with the rows, so scoping is as fresh as the figures).

The first watcher starts the task, the last one to leave ends it: nothing is
asked of the agent, nor of the database, while nobody watches.

CPU % is of one core, over the last interval: the difference of the guest's
CPU seconds between two samples over the difference of its uptime
(autostop.cpu_percent; a restart in between gives no figure). The first
sample of a server is compared with the auto-stop's last one (Seat.cpu_seconds,
cpu_uptime), so a grid shows a figure at once where that pass has run.

As with panel/guests/processes.py, the counts live in this process: with
several panel processes each samples the classes its own pages watch, and its
messages carry its `source`, so that a consumer takes only its own process's
(with channels-redis the group spans processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.utils import timezone

from hostagent import wire
from hostagent.client import AgentError
from panel.classroom.autostop import cpu_percent
from panel.classroom.models import Classroom, Seat, TeachingAssistant
from panel.guests.processes import tls
from panel.guests.watching import SharedTasks
from panel.hosting.choices import RoleChoices
from panel.hosting.models import Membership

__all__ = ["INTERVAL", "SAMPLER", "ClassSampler", "activity_text", "group"]

_LOG = logging.getLogger(__name__)

INTERVAL = 3.0  # seconds between two samples of a watched class
ASK_TIMEOUT = 5.0  # seconds for one host's GET /1.0/stats
MIB = 1024 * 1024

# The roles that see a whole class (actions.class_role makes owners and admins its teacher).
WHOLE_CLASS_ROLES = (RoleChoices.ROLE_TEACHER, RoleChoices.ROLE_OWNER, RoleChoices.ROLE_ADMIN)


def group(classroom_id: int) -> str:
    return f"classroom-{classroom_id}"


def activity_text(when: dt.datetime | None, now: dt.datetime) -> str:
    """Seat.last_activity as the grid shows it: "N min ago" (hours, then days, once long)."""
    if when is None:
        return "—"
    minutes = max(0, int((now - when).total_seconds() // 60))
    if minutes < 120:
        return f"{minutes} min ago"
    if minutes < 48 * 60:
        return f"{minutes // 60} h ago"
    return f"{minutes // (24 * 60)} d ago"


@dataclass(frozen=True)
class _SeatView:
    seat: int
    group: int | None
    vserver: int | None
    name: str | None  # the server's name on its host
    socket: str | None  # its host's agent
    memory_mb: int | None
    activity: str
    autostop_sample: tuple[float, float] | None  # the auto-stop's last (cpu s, uptime)


@dataclass(frozen=True)
class _ClassView:
    seats: list[_SeatView]
    teachers: list[int]  # users who see every seat (staff aside: the consumer knows its own)
    assistants: dict[str, list[int]]  # a TA's user id (as a string) -> their groups' ids


def _read_class(classroom_id: int) -> _ClassView | None:
    """The class as a tick needs it (None: gone). Three queries, however many seats."""
    classroom = Classroom.objects.filter(pk=classroom_id).first()
    if classroom is None:
        return None
    now = timezone.now()
    seats = []
    for s in (Seat.objects.filter(classroom_id=classroom_id)
              .select_related("vserver__host").order_by("pk")):
        vs = s.vserver
        sample = (s.cpu_seconds, s.cpu_uptime) if s.cpu_seconds is not None \
            and s.cpu_uptime is not None else None
        seats.append(_SeatView(
            seat=s.pk, group=s.group_id, vserver=vs.pk if vs else None,
            name=vs.name if vs else None, socket=vs.host.agent_socket if vs else None,
            memory_mb=vs.memory_mb if vs else None,
            activity=activity_text(s.last_activity, now), autostop_sample=sample))
    teachers = list(Membership.objects.filter(customer_id=classroom.customer_id,
                                              role__in=WHOLE_CLASS_ROLES)
                    .values_list("user_id", flat=True))
    assistants: dict[str, list[int]] = {}
    for user_id, group_id in (TeachingAssistant.objects.filter(group__classroom_id=classroom_id)
                              .values_list("membership__user_id", "group_id")):
        assistants.setdefault(str(user_id), []).append(group_id)
    return _ClassView(seats, teachers, assistants)


def _transport(socket: str) -> httpx.AsyncBaseTransport:
    return httpx.AsyncHTTPTransport(uds=socket, verify=tls())


class ClassSampler(SharedTasks):
    """Reference-counted sampling tasks, one per watched class."""

    def __init__(self, interval: float = INTERVAL,
                 transport: Callable[[str], httpx.AsyncBaseTransport] = _transport) -> None:
        super().__init__()
        self.interval = interval
        self.transport = transport  # an agent's socket -> how to reach it (tests pretend)
        self.token = uuid.uuid4().hex  # this process's name on its messages
        self.asked = 0  # GET /1.0/stats asked since this process started (tests, bench)
        self.ticks = 0  # samples taken (every host asked once each)

    # --- what the consumers call (in the event loop) ---

    async def watch(self, classroom_id: int) -> dict[str, Any] | None:
        """One more page watches CLASSROOM_ID; the last message sent of it (None before
        the first), to show at once."""
        return await self._watch(classroom_id, lambda: self._run(classroom_id),
                                 f"classroom-{classroom_id}")

    def reset(self) -> None:
        super().reset()
        self.asked = self.ticks = 0

    # --- the task ---

    async def _run(self, classroom_id: int) -> None:
        clients: dict[str, httpx.AsyncClient] = {}  # one kept-alive connection per host
        last: dict[int, tuple[float, float]] = {}  # vserver -> its last (cpu s, uptime)
        try:
            while self.watched(classroom_id):
                try:
                    message = await self._tick(classroom_id, clients, last)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a database hiccup: the next tick tries again
                    _LOG.exception("sampling class %s", classroom_id)
                    message = None
                if message is not None:
                    self._last[classroom_id] = message
                    layer = get_channel_layer()
                    if layer is not None:
                        await layer.group_send(group(classroom_id), message)
                await asyncio.sleep(self.interval)
        finally:
            for client in clients.values():
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _stats(self, clients: dict[str, httpx.AsyncClient],
                     socket: str) -> dict[str, wire.Usage] | str:
        """Every running guest of the host at SOCKET, by name; or why it could not say."""
        client = clients.get(socket)
        if client is None:
            client = clients[socket] = httpx.AsyncClient(
                transport=self.transport(socket), base_url="http://agent",
                timeout=ASK_TIMEOUT)
        self.asked += 1
        try:
            resp = await client.get(f"/{wire.API_VERSION}/stats")
            if resp.status_code >= 400:
                raise AgentError(resp.status_code, resp.text[:200])
            rows = resp.json()
            if not isinstance(rows, list):
                raise ValueError("not a list")
            return {u.name: u for u in (wire.Usage.from_json(r, f"{i}")
                                        for i, r in enumerate(rows))}
        except (AgentError, OSError, ValueError, httpx.HTTPError) as e:
            _LOG.info("stats of the host at %s: %s", socket, e or type(e).__name__)
            with contextlib.suppress(Exception):  # a fresh connection next time
                await clients.pop(socket).aclose()
            return "the host's agent does not answer"

    async def _tick(self, classroom_id: int, clients: dict[str, httpx.AsyncClient],
                    last: dict[int, tuple[float, float]]) -> dict[str, Any] | None:
        view = await database_sync_to_async(_read_class)(classroom_id)
        if view is None:
            return None
        sockets = sorted({s.socket for s in view.seats if s.socket})
        answers = dict(zip(sockets, await asyncio.gather(
            *(self._stats(clients, socket) for socket in sockets)), strict=True))
        self.ticks += 1
        rows = []
        for s in view.seats:
            row: dict[str, Any] = {"seat": s.seat, "group": s.group, "vserver": s.vserver,
                                   "running": None, "cpu": None, "memory": None,
                                   "memory_mb": s.memory_mb, "activity": s.activity,
                                   "error": None}
            answer = answers.get(s.socket) if s.socket else None
            if isinstance(answer, str):
                row["error"] = answer
            elif answer is not None and s.vserver is not None and s.name is not None:
                usage = answer.get(s.name)
                row["running"] = usage is not None
                if usage is None:
                    last.pop(s.vserver, None)
                else:
                    sample = (usage.cpu_seconds, usage.uptime) \
                        if usage.cpu_seconds is not None else None
                    pct = cpu_percent(last.get(s.vserver) or s.autostop_sample, sample)
                    if sample is not None:
                        last[s.vserver] = sample
                    row["cpu"] = None if pct is None else round(pct, 1)
                    row["memory"] = usage.memory_current
            rows.append(row)
        return {"type": "classroom.usage", "classroom": classroom_id, "source": self.token,
                "eid": uuid.uuid4().hex, "teachers": view.teachers,
                "assistants": view.assistants, "rows": rows, "ts": time.time()}


# The one sampler of this process (Daphne's): consumers share it.
SAMPLER = ClassSampler()
