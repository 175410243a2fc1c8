"""Auto-stop: a class's servers run in its hours, and an idle one is stopped.

Two rules, decided for one seat at a time by `decide()`, a pure function of
plain values and the time (no clock of its own, so that tests move the time):

- **Hours.** Outside the class's allowed hours (Classroom.hours, read with
  models.parse_hours, in the class's time zone = settings.TIME_ZONE) a
  running student server is stopped, unless a teacher (or staff) started it
  outside the hours (Seat.teacher_started, set by panel/classroom/signals.py
  and cleared when the server is next stopped). Empty hours: any time.
- **Idle.** A server is idle while no console session is open on it and its
  CPU use over the last interval is under Classroom.idle_cpu_percent (of one
  core). Idle for idle_minutes - idle_warning_minutes, the student is warned
  (Seat.idle_warned; their page shows "your server will be stopped at HH:MM
  unless you use it", the time being `idle_stop_at(seat)`); idle for
  idle_minutes, it is stopped. Any activity (a console open, CPU at or over
  the threshold) starts the count again. idle_minutes 0: never.

A server that is busy (an operation under way, or a status other than
running) is never stopped, and a CPU figure the agent cannot give (no sample
yet, no CPU accounting) is never taken for idleness.

`run_once(now)` is one pass over every seat of every active class: one
GET /1.0/stats and one GET /1.0/consoles per host, the decision for each
seat, and the stops through actions.system_stop (audited as 'system', with
the reason). Then the classes deleted at the end of term whose servers are
all gone are removed (classroom.actions.finish_deleted_classes).
`manage.py classroom_autostop` runs a pass every minute.
"""

from __future__ import annotations

import datetime as dt
import logging
import zoneinfo
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

import httpx
from django.conf import settings
from django.utils import timezone

from hostagent import wire
from hostagent.client import AgentClient, AgentError
from panel.classroom import actions as classactions
from panel.classroom.models import Classroom, Seat, parse_hours
from panel.guests import actions as gactions
from panel.guests.choices import OperationStateChoices, VServerStatusChoices
from panel.guests.models import Operation, VServer
from panel.hosting.models import Host

__all__ = [
    "ACT_ACTIVE",
    "ACT_IDLE",
    "ACT_NOTHING",
    "ACT_STOP",
    "ACT_WARN",
    "REASON_HOURS",
    "REASON_IDLE",
    "Decision",
    "Outcome",
    "Policy",
    "SeatState",
    "class_tz",
    "cpu_percent",
    "decide",
    "idle_stop_at",
    "in_hours",
    "policy_of",
    "run_once",
]

_LOG = logging.getLogger(__name__)

Hours = list[tuple[frozenset[int], dt.time, dt.time]]

ACT_NOTHING = "nothing"  # leave it as it is
ACT_ACTIVE = "active"  # in use: last_activity now, the idle count cleared
ACT_IDLE = "idle"  # idle from now: start the count (idle_since)
ACT_WARN = "warn"  # tell the student (idle_warned)
ACT_STOP = "stop"  # stop it, for REASON

REASON_HOURS = "outside-hours"
REASON_IDLE = "idle"

AGENT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Policy:
    """A class's rules, as plain values."""

    hours: Hours  # parse_hours(Classroom.hours); empty: any time
    idle_minutes: int  # 0: no idle stop
    idle_cpu_percent: float
    idle_warning_minutes: int
    tz: dt.tzinfo


@dataclass(frozen=True)
class SeatState:
    """One seat's server as a pass sees it."""

    status: str  # VServer.status
    operation_under_way: bool
    console_open: bool
    cpu_percent: float | None  # over the last interval, of one core; None: unknown
    idle_since: dt.datetime | None
    idle_warned: dt.datetime | None
    teacher_started: bool


@dataclass(frozen=True)
class Decision:
    action: str  # one of ACT_*
    reason: str = ""  # for ACT_STOP: REASON_HOURS or REASON_IDLE
    stop_at: dt.datetime | None = None  # for ACT_WARN (and an idle stop): when it stops


def in_hours(hours: Hours, now: dt.datetime, tz: dt.tzinfo) -> bool:
    """Whether NOW falls in HOURS (empty: always), read in time zone TZ.

    A range whose end is not after its start runs past midnight: it belongs
    to the day it starts on (parse_hours)."""
    if not hours:
        return True
    local = now.astimezone(tz)
    day, t = local.weekday(), local.time().replace(tzinfo=None)
    yesterday = (day - 1) % 7
    for days, start, end in hours:
        if start < end:
            if day in days and start <= t and (t < end or end == dt.time.max):
                return True
        elif (day in days and t >= start) or (yesterday in days and t < end):
            return True
    return False


def decide(policy: Policy, seat: SeatState, now: dt.datetime) -> Decision:
    """What to do with one seat's server at NOW (see the module's docstring)."""
    if seat.status != VServerStatusChoices.STATUS_RUNNING or seat.operation_under_way:
        return Decision(ACT_NOTHING)
    if not seat.teacher_started and not in_hours(policy.hours, now, policy.tz):
        return Decision(ACT_STOP, REASON_HOURS)
    active = seat.console_open or (seat.cpu_percent is not None
                                   and seat.cpu_percent >= policy.idle_cpu_percent)
    if active:
        return Decision(ACT_ACTIVE)
    if seat.cpu_percent is None:
        return Decision(ACT_NOTHING)  # no figure is not proof of idleness
    if policy.idle_minutes <= 0:
        return Decision(ACT_NOTHING)
    since = seat.idle_since or now
    stop_at = since + dt.timedelta(minutes=policy.idle_minutes)
    if now >= stop_at:
        return Decision(ACT_STOP, REASON_IDLE, stop_at)
    warn_at = stop_at - dt.timedelta(minutes=policy.idle_warning_minutes)
    if now >= warn_at and seat.idle_warned is None:
        return Decision(ACT_WARN, stop_at=stop_at)
    if seat.idle_since is None:
        return Decision(ACT_IDLE)
    return Decision(ACT_NOTHING)


def cpu_percent(before: tuple[float, float] | None,
                after: tuple[float, float] | None) -> float | None:
    """CPU use between two samples (CPU seconds, uptime seconds), in percent of
    one core; None when there is no pair to compare (the first sample, a
    restart in between: its uptime went back, or no CPU accounting)."""
    if before is None or after is None:
        return None
    (cpu0, up0), (cpu1, up1) = before, after
    if up1 <= up0 or cpu1 < cpu0:
        return None
    return 100.0 * (cpu1 - cpu0) / (up1 - up0)


def class_tz() -> dt.tzinfo:
    """The class's time zone: the panel's (settings.TIME_ZONE)."""
    return zoneinfo.ZoneInfo(settings.TIME_ZONE)


def policy_of(classroom: Classroom) -> Policy:
    """CLASSROOM's rules. Hours that no longer parse (written past clean())
    count as any time: a broken schedule never stops a server; logged."""
    try:
        hours = parse_hours(classroom.hours)
    except ValueError as e:
        _LOG.warning("class %s: its hours do not parse (%s): any time, then", classroom, e)
        hours = []
    return Policy(hours=hours, idle_minutes=classroom.idle_minutes,
                  idle_cpu_percent=float(classroom.idle_cpu_percent or Decimal(0)),
                  idle_warning_minutes=classroom.idle_warning_minutes, tz=class_tz())


def idle_stop_at(seat: Seat) -> dt.datetime | None:
    """When SEAT's server will be stopped for idleness, once its student has
    been warned (None otherwise): the time of the page's warning banner."""
    minutes = seat.classroom.idle_minutes
    if seat.idle_warned is None or seat.idle_since is None or minutes <= 0:
        return None
    return seat.idle_since + dt.timedelta(minutes=minutes)


# --- the runner ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What a pass did to one seat (what it did nothing to is left out)."""

    vserver: str
    action: str
    reason: str = ""
    detail: str = ""

    def __str__(self) -> str:
        return " ".join(x for x in (self.vserver, self.action, self.reason, self.detail) if x)


@dataclass
class _HostView:
    reachable: bool
    usage: dict[str, wire.Usage]
    consoles: set[str]  # guests with a console session


def _look(host: Host) -> _HostView:
    """One call for every guest's usage, one for the console sessions."""
    try:
        with AgentClient(host.agent_socket, timeout=AGENT_TIMEOUT) as c:
            usage = {u.name: u for u in c.stats()}
            consoles = {s.guest for s in c.consoles()}
    except (AgentError, OSError, httpx.HTTPError, ValueError) as e:
        _LOG.warning("host %s: its agent does not answer (%s): its seats are left alone",
                     host, e)
        return _HostView(False, {}, set())
    return _HostView(True, usage, consoles)


_UNDER_WAY = (OperationStateChoices.STATE_PENDING, OperationStateChoices.STATE_RUNNING)
_REASON_TEXT = {REASON_HOURS: "outside the class's hours", REASON_IDLE: "idle"}


def run_once(now: dt.datetime | None = None) -> list[Outcome]:
    """One pass over every seat with a server in every active class (module docstring)."""
    now = now or timezone.now()
    seats = list(Seat.objects.filter(vserver__isnull=False, classroom__customer__is_active=True)
                 .select_related("classroom", "vserver__host"))
    by_host: dict[int, list[tuple[Seat, VServer]]] = defaultdict(list)
    for seat in seats:
        if seat.vserver is not None:
            by_host[seat.vserver.host_id].append((seat, seat.vserver))
    busy = set(Operation.objects.filter(vserver__in=[s.vserver_id for s in seats],
                                        state__in=_UNDER_WAY)
               .values_list("vserver_id", flat=True))
    policies = {c.pk: policy_of(c) for c in {s.classroom for s in seats}}
    out: list[Outcome] = []
    for host_seats in by_host.values():
        view = _look(host_seats[0][1].host)
        if not view.reachable:
            continue
        for seat, vs in host_seats:
            o = _pass_seat(seat, vs, policies[seat.classroom_id], view, vs.pk in busy, now)
            if o is not None:
                out.append(o)
    for slug in classactions.finish_deleted_classes(now):
        out.append(Outcome(slug, "class-removed"))
    return out


def _pass_seat(seat: Seat, vs: VServer, policy: Policy, view: _HostView, under_way: bool,
               now: dt.datetime) -> Outcome | None:
    usage = view.usage.get(vs.name)
    sample = (usage.cpu_seconds, usage.uptime) if usage is not None \
        and usage.cpu_seconds is not None else None
    before = (seat.cpu_seconds, seat.cpu_uptime) if seat.cpu_seconds is not None \
        and seat.cpu_uptime is not None else None
    pct = cpu_percent(before, sample)
    row = Seat.objects.filter(pk=seat.pk)
    if vs.status != VServerStatusChoices.STATUS_RUNNING:
        if not vs.busy:
            _forget(seat, vs.status)
        return None
    state = SeatState(status=vs.status, operation_under_way=under_way,
                      console_open=vs.name in view.consoles, cpu_percent=pct,
                      idle_since=seat.idle_since, idle_warned=seat.idle_warned,
                      teacher_started=seat.teacher_started)
    d = decide(policy, state, now)
    fields: dict[str, object] = {"cpu_seconds": sample[0] if sample else None,
                                 "cpu_uptime": sample[1] if sample else None}
    outcome = None
    if d.action == ACT_ACTIVE:
        fields.update(last_activity=now, idle_since=None, idle_warned=None)
        if seat.idle_since is not None:
            outcome = Outcome(vs.name, ACT_ACTIVE, detail="in use again")
    elif d.action == ACT_IDLE:
        fields.update(idle_since=now)
    elif d.action == ACT_WARN:
        fields.update(idle_since=seat.idle_since or now, idle_warned=now)
        at = (d.stop_at or now).astimezone(policy.tz)
        outcome = Outcome(vs.name, ACT_WARN, detail=f"stops at {at:%H:%M} unless used")
    elif d.action == ACT_STOP:
        text = _REASON_TEXT[d.reason]
        if d.reason == REASON_IDLE:
            text += f" for {policy.idle_minutes} minutes"
        op = gactions.system_stop(vs, reason=text)
        if op is None:  # it became busy since this pass read it: next time
            row.update(**fields)
            return None
        fields.update(idle_since=None, idle_warned=None, teacher_started=False,
                      cpu_seconds=None, cpu_uptime=None)
        outcome = Outcome(vs.name, ACT_STOP, d.reason, text)
    row.update(**fields)
    if d.action == ACT_WARN:
        _tell_page(vs.pk)
    return outcome


def _forget(seat: Seat, status: str) -> None:
    """A server not running, with nothing under way: no idle count, no CPU
    sample, and once stopped no teacher's start (it is used up). Only while
    it is still so: a start may have come since this pass read it."""
    clear: dict[str, object] = {"idle_since": None, "idle_warned": None,
                                "cpu_seconds": None, "cpu_uptime": None}
    if status == VServerStatusChoices.STATUS_STOPPED:
        clear["teacher_started"] = False
    if any(getattr(seat, k) not in (None, False) for k in clear):
        Seat.objects.filter(pk=seat.pk, vserver__status=status).update(**clear)


def _tell_page(vs_id: int) -> None:
    """The student's page shows the warning (the vserver's event makes it look again)."""
    from panel.guests import events

    events.vserver_changed(vs_id)
