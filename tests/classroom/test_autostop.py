"""Auto-stop (issue 9, point 5): a class's hours and the idle stop, on a clock
the tests move.

decide() and in_hours() are pure: tables of cases. The runner (run_once) is
tested in the database with a pretend host (its GET /1.0/stats and
GET /1.0/consoles replaced by what the test says), and once against a real
agent: a real idle student server is warned and then stopped, while one with
a console open is left running.
"""

from __future__ import annotations

import datetime as dt
import time
import zoneinfo
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from django.utils import timezone

from hostagent import wire
from hostagent.client import AgentClient
from panel.classroom import autostop
from panel.classroom.autostop import (
    ACT_ACTIVE,
    ACT_IDLE,
    ACT_NOTHING,
    ACT_STOP,
    ACT_WARN,
    REASON_HOURS,
    REASON_IDLE,
    Decision,
    Policy,
    SeatState,
    decide,
    in_hours,
)
from panel.classroom.models import DAYS, Classroom, Seat, parse_hours
from panel.guests import actions as gactions
from panel.guests import reconcile
from panel.guests.actions import Actor
from panel.guests.choices import (
    DesiredStateChoices,
    OperationKindChoices,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, VServer
from panel.hosting.models import AuditLog, Customer
from tests.agent.conftest import Lan
from tests.classroom import realclass
from tests.classroom.conftest import School, add_students
from tests.classroom.realclass import RealClass, on_host

lan = realclass.lan
agent = realclass.agent
real_class = realclass.real_class

UTC = dt.UTC
RUNNING = VServerStatusChoices.STATUS_RUNNING
STOPPED = VServerStatusChoices.STATUS_STOPPED


def at(day: str, hhmm: str, tz: dt.tzinfo = UTC) -> dt.datetime:
    """A time in the week of Monday 2030-01-07: at("sat", "10:00")."""
    h, m = (int(x) for x in hhmm.split(":"))
    return dt.datetime(2030, 1, 7 + DAYS.index(day), h, m, tzinfo=tz)


# --- the schedule ---------------------------------------------------------------------------

HOURS_CASES = [
    # (hours, day, time, inside?)
    ("", "sun", "03:00", True),  # no hours: any time
    ("mon-fri 08:00-18:00", "mon", "08:00", True),
    ("mon-fri 08:00-18:00", "fri", "17:59", True),
    ("mon-fri 08:00-18:00", "fri", "18:00", False),  # the end is not in the range
    ("mon-fri 08:00-18:00", "tue", "07:59", False),
    ("mon-fri 08:00-18:00", "sat", "10:00", False),
    ("mon,wed 09:00-11:00", "wed", "10:00", True),
    ("mon,wed 09:00-11:00", "tue", "10:00", False),
    # Days round the end of the week.
    ("fri-mon 08:00-12:00", "fri", "09:00", True),
    ("fri-mon 08:00-12:00", "sun", "09:00", True),
    ("fri-mon 08:00-12:00", "mon", "09:00", True),
    ("fri-mon 08:00-12:00", "tue", "09:00", False),
    ("fri-mon 08:00-12:00", "thu", "09:00", False),
    # Overnight: the range belongs to the day it starts on.
    ("fri-sun 22:00-06:00", "fri", "23:00", True),
    ("fri-sun 22:00-06:00", "sat", "03:00", True),
    ("fri-sun 22:00-06:00", "sat", "12:00", False),
    ("fri-sun 22:00-06:00", "sun", "23:30", True),
    ("fri-sun 22:00-06:00", "mon", "05:59", True),  # Sunday night's
    ("fri-sun 22:00-06:00", "mon", "06:00", False),
    ("fri-sun 22:00-06:00", "fri", "05:00", False),  # Thursday night is not in it
    ("fri-sun 22:00-06:00", "fri", "21:59", False),
    ("sun 22:00-06:00", "mon", "01:00", True),  # over the end of the week
    ("tue 22:00-00:00", "tue", "23:59", True),
    ("tue 22:00-00:00", "wed", "00:00", False),
    # Several lines, and 24:00.
    ("mon-fri 08:00-18:00\nsat 10:00-24:00", "sat", "23:59", True),
    ("mon-fri 08:00-18:00\nsat 10:00-24:00", "sun", "00:00", False),
    ("# labs\nmon 08:00-10:00  # morning\n\nmon 14:00-16:00", "mon", "15:00", True),
    ("# labs\nmon 08:00-10:00  # morning\n\nmon 14:00-16:00", "mon", "12:00", False),
]


@pytest.mark.parametrize(("hours", "day", "hhmm", "inside"), HOURS_CASES)
def test_hours_say_when_a_server_may_run(hours: str, day: str, hhmm: str, inside: bool) -> None:
    assert in_hours(parse_hours(hours), at(day, hhmm), UTC) is inside


def test_hours_are_read_in_the_class_time_zone() -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")  # UTC+1 in January
    hours = parse_hours("mon 08:00-09:00")
    assert in_hours(hours, at("mon", "07:30"), paris)  # 08:30 in Paris
    assert not in_hours(hours, at("mon", "08:30"), paris)  # 09:30 in Paris
    assert in_hours(hours, at("mon", "08:30", paris), paris)


def test_the_class_time_zone_is_the_panels(settings: Any) -> None:
    settings.TIME_ZONE = "Europe/Paris"
    assert autostop.class_tz() == zoneinfo.ZoneInfo("Europe/Paris")


def test_overnight_ranges_and_weekend_days_parse() -> None:
    assert parse_hours("fri-sun 22:00-06:00") == [
        (frozenset({4, 5, 6}), dt.time(22), dt.time(6))]
    assert parse_hours("fri-mon 08:00-12:00")[0][0] == frozenset({4, 5, 6, 0})
    assert parse_hours("sat 10:00-24:00")[0][2] == dt.time.max


@pytest.mark.parametrize(("text", "message"), [
    ("mon 10:00-10:00", "the range is empty"),
    ("xyz 10:00-11:00", "days are mon"),
    ("mon 25:00-26:00", "line 1"),
    ("mon-fri\n08:00-18:00", "write DAYS HH:MM-HH:MM"),
    ("mon 08:00-09:00\nmon 8-9", "line 2"),
])
def test_a_bad_schedule_is_refused_naming_its_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hours(text)


# --- the decision ---------------------------------------------------------------------------

POLICY = Policy(hours=parse_hours("mon-fri 08:00-18:00"), idle_minutes=30,
                idle_cpu_percent=2.0, idle_warning_minutes=5, tz=UTC)
IDLE = SeatState(status=RUNNING, operation_under_way=False, console_open=False,
                 cpu_percent=0.1, idle_since=None, idle_warned=None, teacher_started=False)
MON10 = at("mon", "10:00")


def ago(minutes: int) -> dt.datetime:
    return MON10 - dt.timedelta(minutes=minutes)


DECIDE_CASES: list[tuple[str, dict[str, Any], dt.datetime, Decision, dict[str, Any]]] = [
    # Busy or not running: never stopped, whatever the time or the idleness.
    ("stopped", {"status": STOPPED}, at("sat", "10:00"), Decision(ACT_NOTHING), {}),
    ("starting", {"status": VServerStatusChoices.STATUS_STARTING}, at("sat", "10:00"),
     Decision(ACT_NOTHING), {}),
    ("unknown", {"status": VServerStatusChoices.STATUS_UNKNOWN}, at("sat", "10:00"),
     Decision(ACT_NOTHING), {}),
    ("op under way outside the hours", {"operation_under_way": True}, at("sat", "10:00"),
     Decision(ACT_NOTHING), {}),
    ("op under way, idle past the limit", {"operation_under_way": True,
                                           "idle_since": ago(60), "idle_warned": ago(35)},
     MON10, Decision(ACT_NOTHING), {}),
    # The schedule.
    ("outside the hours", {}, at("mon", "19:00"), Decision(ACT_STOP, REASON_HOURS), {}),
    ("at the end of the hours", {"console_open": True}, at("mon", "18:00"),
     Decision(ACT_STOP, REASON_HOURS), {}),
    ("weekend, in use", {"console_open": True, "cpu_percent": 90.0}, at("sat", "10:00"),
     Decision(ACT_STOP, REASON_HOURS), {}),
    ("at the start of the hours, in use", {"console_open": True}, at("mon", "08:00"),
     Decision(ACT_ACTIVE), {}),
    ("teacher started it outside the hours", {"teacher_started": True, "console_open": True},
     at("sat", "10:00"), Decision(ACT_ACTIVE), {}),
    ("teacher started it, idle too long: the idle stop still applies",
     {"teacher_started": True, "idle_since": at("sat", "09:00"), "idle_warned": at("sat", "09:25")},
     at("sat", "09:30"), Decision(ACT_STOP, REASON_IDLE, at("sat", "09:30")), {}),
    ("no hours: any time", {"console_open": True}, at("sun", "03:00"), Decision(ACT_ACTIVE),
     {"hours": []}),
    # Activity.
    ("console open, no CPU", {"console_open": True, "cpu_percent": 0.0}, MON10,
     Decision(ACT_ACTIVE), {}),
    ("console open after a warning", {"console_open": True, "idle_since": ago(29),
                                      "idle_warned": ago(4)}, MON10, Decision(ACT_ACTIVE), {}),
    ("CPU at the threshold", {"cpu_percent": 2.0}, MON10, Decision(ACT_ACTIVE), {}),
    ("CPU over the threshold, idle for long", {"cpu_percent": 55.0, "idle_since": ago(40)},
     MON10, Decision(ACT_ACTIVE), {}),
    ("CPU unknown: not taken for idleness", {"cpu_percent": None, "idle_since": ago(40)},
     MON10, Decision(ACT_NOTHING), {}),
    # Idleness, warning, stop.
    ("idle: the count starts", {}, MON10, Decision(ACT_IDLE), {}),
    ("idle 24 minutes", {"idle_since": ago(24)}, MON10, Decision(ACT_NOTHING), {}),
    ("idle 25 minutes: warned", {"idle_since": ago(25)}, MON10,
     Decision(ACT_WARN, stop_at=MON10 + dt.timedelta(minutes=5)), {}),
    ("warned, 29 minutes", {"idle_since": ago(29), "idle_warned": ago(4)}, MON10,
     Decision(ACT_NOTHING), {}),
    ("idle 30 minutes: stopped", {"idle_since": ago(30), "idle_warned": ago(5)}, MON10,
     Decision(ACT_STOP, REASON_IDLE, MON10), {}),
    ("idle 30 minutes, never warned (the panel was down): stopped",
     {"idle_since": ago(31)}, MON10, Decision(ACT_STOP, REASON_IDLE, ago(1)), {}),
    ("no idle stop", {"idle_since": ago(600)}, MON10, Decision(ACT_NOTHING),
     {"idle_minutes": 0}),
    ("a warning as long as the idle time: warned at once", {}, MON10,
     Decision(ACT_WARN, stop_at=MON10 + dt.timedelta(minutes=30)), {"idle_warning_minutes": 30}),
    ("no warning time: straight to the stop", {"idle_since": ago(30)}, MON10,
     Decision(ACT_STOP, REASON_IDLE, MON10), {"idle_warning_minutes": 0}),
]


@pytest.mark.parametrize(("seat", "now", "expected", "policy"),
                         [c[1:] for c in DECIDE_CASES], ids=[c[0] for c in DECIDE_CASES])
def test_decide(seat: dict[str, Any], now: dt.datetime, expected: Decision,
                policy: dict[str, Any]) -> None:
    assert decide(replace(POLICY, **policy), replace(IDLE, **seat), now) == expected


@pytest.mark.parametrize(("before", "after", "percent"), [
    (None, (10.0, 100.0), None),  # the first sample
    ((10.0, 100.0), None, None),  # stopped, or no CPU accounting
    ((10.0, 100.0), (10.5, 110.0), 5.0),
    ((10.0, 100.0), (30.0, 110.0), 200.0),  # two cores' worth
    ((10.0, 100.0), (0.2, 3.0), None),  # restarted in between: uptime went back
    ((10.0, 100.0), (10.0, 100.0), None),  # no time has passed
])
def test_cpu_percent_is_the_difference_of_two_samples(
        before: tuple[float, float] | None, after: tuple[float, float] | None,
        percent: float | None) -> None:
    assert autostop.cpu_percent(before, after) == percent


# --- the runner, on a pretend host -----------------------------------------------------------

@dataclass
class PretendHost:
    """What GET /1.0/stats and GET /1.0/consoles say; the CPU seconds of each
    guest go up by `cpu_per_pass` a pass, over `interval` seconds of uptime."""

    cpu: dict[str, float] = field(default_factory=dict)
    uptime: float = 1000.0
    interval: float = 60.0
    cpu_per_pass: float = 0.05  # 0.08 % of a core over a minute: idle
    consoles: set[str] = field(default_factory=set)
    reachable: bool = True
    looks: int = 0

    def look(self, host: Any) -> autostop._HostView:
        self.looks += 1
        self.uptime += self.interval
        usage = {}
        for name in self.cpu:
            self.cpu[name] += self.cpu_per_pass
            usage[name] = wire.Usage(
                name=name, context=1000, cgroup=f"vpanel/{name}", processes=3,
                cpu_seconds=self.cpu[name], cpu_user_seconds=None, cpu_system_seconds=None,
                memory_current=None, memory_peak=None, net_rx_bytes=None, net_tx_bytes=None,
                disk_used=None, uptime=self.uptime)
        return autostop._HostView(self.reachable, usage if self.reachable else {},
                                  self.consoles if self.reachable else set())


def class_running(school: School, monkeypatch: pytest.MonkeyPatch, *names: str,
                  **settings: Any) -> PretendHost:
    """Students NAMES in cs101 with their servers running (in the database), cs101's
    settings changed to SETTINGS, and a pretend host under them."""
    add_students(school, school.cs101, *names)
    Operation.objects.update(state=OperationStateChoices.STATE_SUCCESS)
    VServer.objects.update(status=RUNNING)
    Classroom.objects.filter(pk=school.cs101.pk).update(**{
        "idle_minutes": 30, "idle_warning_minutes": 5, **settings})
    pretend = PretendHost(cpu={f"cs101-{n}": 1.0 for n in names})
    monkeypatch.setattr(autostop, "_look", pretend.look)
    return pretend


def seat(username: str) -> Seat:
    return Seat.objects.select_related("vserver", "classroom").get(user__username=username)


def passes(start: dt.datetime, minutes: range) -> dict[int, list[tuple[str, str]]]:
    """A pass at START + each of MINUTES: what each did."""
    return {m: [(o.vserver, o.action) for o in
                autostop.run_once(start + dt.timedelta(minutes=m))] for m in minutes}


def test_an_idle_server_is_warned_then_stopped_by_the_system_with_the_reason(
        school: School, monkeypatch: pytest.MonkeyPatch) -> None:
    class_running(school, monkeypatch, "ann")
    did = passes(MON10, range(0, 31))
    # Minute 0: the first CPU sample; 1: idle from then; 26: warned; 31: stopped.
    assert {m: d for m, d in did.items() if d} == {26: [("cs101-ann", ACT_WARN)]}
    s = seat("ann")
    assert s.idle_since == MON10 + dt.timedelta(minutes=1)
    assert s.idle_warned == MON10 + dt.timedelta(minutes=26)
    assert autostop.idle_stop_at(s) == MON10 + dt.timedelta(minutes=31)
    assert s.vserver is not None and s.vserver.status == RUNNING

    assert passes(MON10, range(31, 32)) == {31: [("cs101-ann", ACT_STOP)]}
    s = seat("ann")
    assert s.vserver is not None
    assert (s.vserver.status, s.vserver.desired_state) == (
        VServerStatusChoices.STATUS_STOPPING, DesiredStateChoices.DESIRED_STOPPED)
    op = Operation.objects.get(kind=OperationKindChoices.KIND_STOP)
    assert (op.vserver_id, op.created_by) == (s.vserver.pk, None)
    row = AuditLog.objects.get(action="stop-vserver")
    assert (row.actor_name, row.target_repr, row.detail) == (
        "system", "cs101-ann", {"reason": "idle for 30 minutes"})
    assert (s.idle_since, s.idle_warned, autostop.idle_stop_at(s)) == (None, None, None)
    # Busy now (stopping): later passes leave it alone.
    assert passes(MON10, range(32, 40)) == {m: [] for m in range(32, 40)}
    assert Operation.objects.filter(kind=OperationKindChoices.KIND_STOP).count() == 1


def test_activity_starts_the_count_again_and_takes_the_warning_back(
        school: School, monkeypatch: pytest.MonkeyPatch) -> None:
    host = class_running(school, monkeypatch, "ann")
    assert passes(MON10, range(0, 27))[26] == [("cs101-ann", ACT_WARN)]
    host.consoles = {"cs101-ann"}  # the student opens a console at minute 27
    assert passes(MON10, range(27, 28))[27] == [("cs101-ann", ACT_ACTIVE)]
    s = seat("ann")
    assert (s.idle_since, s.idle_warned, s.last_activity) == (
        None, None, MON10 + dt.timedelta(minutes=27))
    host.consoles = set()  # and closes it: idle again from minute 28
    did = passes(MON10, range(28, 55))
    assert {m: d for m, d in did.items() if d} == {53: [("cs101-ann", ACT_WARN)]}
    host.cpu_per_pass = 30.0  # a compile at minute 55: half a core over the minute
    assert passes(MON10, range(55, 56))[55] == [("cs101-ann", ACT_ACTIVE)]
    host.cpu_per_pass = 0.05  # idle again from minute 56
    did = passes(MON10, range(56, 86))
    assert {m: d for m, d in did.items() if d} == {81: [("cs101-ann", ACT_WARN)]}
    assert not Operation.objects.filter(kind=OperationKindChoices.KIND_STOP).exists()
    assert passes(MON10, range(86, 87))[86] == [("cs101-ann", ACT_STOP)]


def test_a_server_with_an_operation_under_way_is_never_stopped(
        school: School, monkeypatch: pytest.MonkeyPatch) -> None:
    class_running(school, monkeypatch, "ann", hours="mon-fri 08:00-18:00")
    vs = seat("ann").vserver
    assert vs is not None
    Operation.objects.create(vserver=vs, vserver_name=vs.name, customer=vs.customer,
                             kind=OperationKindChoices.KIND_SSH_KEYS)  # pending
    did = passes(at("sat", "10:00"), range(0, 90, 5))  # outside the hours, idle for long
    assert all(d == [] for d in did.values()), did
    assert gactions.system_stop(vs, reason="test") is None  # the action checks it too
    assert not Operation.objects.filter(kind=OperationKindChoices.KIND_STOP).exists()


def test_a_host_that_does_not_answer_leaves_its_seats_alone(
        school: School, monkeypatch: pytest.MonkeyPatch) -> None:
    host = class_running(school, monkeypatch, "ann", hours="mon-fri 08:00-18:00")
    host.reachable = False
    assert passes(at("sat", "10:00"), range(0, 60, 5)) == {m: [] for m in range(0, 60, 5)}
    assert seat("ann").cpu_seconds is None
    assert not Operation.objects.filter(kind=OperationKindChoices.KIND_STOP).exists()


def test_outside_the_hours_a_students_server_is_stopped_and_one_host_call_serves_all(
        school: School, monkeypatch: pytest.MonkeyPatch) -> None:
    host = class_running(school, monkeypatch, "ann", "ben", "cat",
                         hours="mon-fri 08:00-18:00")
    assert passes(at("fri", "17:00"), range(0, 1)) == {0: []}
    did = autostop.run_once(at("fri", "18:00"))
    assert sorted((o.vserver, o.action, o.reason) for o in did) == [
        (f"cs101-{n}", ACT_STOP, REASON_HOURS) for n in ("ann", "ben", "cat")]
    assert host.looks == 2  # one look at the host a pass, for every seat on it
    assert set(AuditLog.objects.filter(action="stop-vserver")
               .values_list("detail__reason", flat=True)) == {"outside the class's hours"}


def test_a_deactivated_class_is_not_visited(school: School,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    host = class_running(school, monkeypatch, "ann", hours="mon-fri 08:00-18:00")
    Customer.objects.filter(pk=school.cs101.customer_id).update(is_active=False)
    assert autostop.run_once(at("sat", "10:00")) == []
    assert host.looks == 0


# --- teachers' own starts ----------------------------------------------------------------------

def hours_without_today() -> str:
    """A schedule that leaves out the real today (an action's Operation is
    stamped with the real time): only the day after tomorrow."""
    today = timezone.localtime(timezone.now(), autostop.class_tz()).weekday()
    return f"{DAYS[(today + 2) % 7]} 00:00-24:00"


def stopped_seat(school: School, monkeypatch: pytest.MonkeyPatch, hours: str) -> VServer:
    class_running(school, monkeypatch, "ann", hours=hours)
    VServer.objects.update(status=STOPPED)
    vs = seat("ann").vserver
    assert vs is not None
    return vs


def started_as_the_agent_would() -> None:
    """What the start's operation leaves behind once the agent has run it."""
    Operation.objects.update(state=OperationStateChoices.STATE_SUCCESS)
    VServer.objects.update(status=RUNNING)


@pytest.mark.parametrize("who", ["teacher", "staff"])
def test_a_teachers_start_outside_the_hours_is_left_running_until_it_is_stopped(
        school: School, monkeypatch: pytest.MonkeyPatch, who: str) -> None:
    vs = stopped_seat(school, monkeypatch, hours_without_today())
    gactions.start_vserver(vs, actor=school.actor(who))
    assert seat("ann").teacher_started
    started_as_the_agent_would()
    now = timezone.now()
    assert [o.action for o in autostop.run_once(now)] == []
    # The idle stop still applies to it.
    Seat.objects.update(idle_since=now - dt.timedelta(minutes=40),
                        idle_warned=now - dt.timedelta(minutes=15))
    assert [(o.action, o.reason) for o in autostop.run_once(now)] == [(ACT_STOP, REASON_IDLE)]
    assert not seat("ann").teacher_started  # used up by the stop


def test_a_students_own_start_outside_the_hours_is_stopped(
        school: School, monkeypatch: pytest.MonkeyPatch) -> None:
    vs = stopped_seat(school, monkeypatch, hours_without_today())
    gactions.start_vserver(vs, actor=Actor(seat("ann").user))
    assert not seat("ann").teacher_started
    started_as_the_agent_would()
    assert [(o.action, o.reason) for o in autostop.run_once(timezone.now())] == [
        (ACT_STOP, REASON_HOURS)]


def test_a_teachers_start_inside_the_hours_counts_as_any_other(
        school: School, monkeypatch: pytest.MonkeyPatch) -> None:
    vs = stopped_seat(school, monkeypatch, "mon-sun 00:00-24:00")
    gactions.start_vserver(vs, actor=school.actor("teacher"))
    assert not seat("ann").teacher_started


def test_any_stop_uses_a_teachers_start_up(school: School,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    vs = stopped_seat(school, monkeypatch, hours_without_today())
    gactions.start_vserver(vs, actor=school.actor("teacher"))
    started_as_the_agent_would()
    gactions.stop_vserver(vs, actor=Actor(seat("ann").user))
    assert not seat("ann").teacher_started
    # And a server found stopped (halted from inside, say) loses it too.
    Seat.objects.update(teacher_started=True)
    VServer.objects.update(status=STOPPED)
    autostop.run_once(timezone.now())
    assert not seat("ann").teacher_started


def test_a_students_restart_starts_the_idle_count_again(
        school: School, monkeypatch: pytest.MonkeyPatch) -> None:
    class_running(school, monkeypatch, "ann")
    Seat.objects.update(idle_since=MON10, idle_warned=MON10 + dt.timedelta(minutes=25))
    vs = seat("ann").vserver
    assert vs is not None
    op = gactions.restart_vserver(vs, actor=Actor(seat("ann").user))
    s = seat("ann")
    assert (s.idle_since, s.idle_warned, s.last_activity) == (None, None, op.created)
    assert not s.teacher_started


# --- against a real agent ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_idle_server_is_warned_then_stopped_and_one_with_a_console_is_not(
        real_class: RealClass, lan: Lan) -> None:
    rc = real_class
    with AgentClient(rc.agent.socket) as c:
        console = c.console_open("os1-ben")
    try:
        t0 = timezone.now()
        # The first pass takes a CPU sample; the next ones compare with it (over
        # the agent's own clock: the guests' uptime). Until ann has settled down
        # after her boot, she may not look idle yet.
        deadline = time.monotonic() + 60
        while seat("ann").idle_since is None:
            assert time.monotonic() < deadline, "ann's server never looked idle"
            assert autostop.run_once(t0) == []
            time.sleep(1)
        assert seat("ann").idle_since == t0
        assert seat("ben").idle_since is None  # a console is open on it

        time.sleep(1)
        did = autostop.run_once(t0 + dt.timedelta(minutes=26))
        assert [(o.vserver, o.action) for o in did] == [("os1-ann", ACT_WARN)], did
        ann = seat("ann")
        assert ann.idle_warned == t0 + dt.timedelta(minutes=26)
        assert autostop.idle_stop_at(ann) == t0 + dt.timedelta(minutes=30)
        assert on_host(rc.agent, "os1-ann").state == wire.STATE_RUNNING  # type: ignore[union-attr]
        assert seat("ben").last_activity == t0 + dt.timedelta(minutes=26)

        time.sleep(1)
        did = autostop.run_once(t0 + dt.timedelta(minutes=31))
        assert [(o.vserver, o.action, o.reason) for o in did] == [
            ("os1-ann", ACT_STOP, REASON_IDLE)], did
        # Stopped on the host (the operation ran inline), and the panel says so.
        assert on_host(rc.agent, "os1-ann").state == wire.STATE_STOPPED  # type: ignore[union-attr]
        ann = seat("ann")
        assert ann.vserver is not None
        assert (ann.vserver.status, ann.vserver.desired_state) == (
            STOPPED, DesiredStateChoices.DESIRED_STOPPED)
        op = Operation.objects.get(kind=OperationKindChoices.KIND_STOP)
        assert (op.vserver_name, op.state, op.created_by) == (
            "os1-ann", OperationStateChoices.STATE_SUCCESS, None)
        assert AuditLog.objects.filter(action="stop-vserver", actor_name="system",
                                       target_repr="os1-ann").exists()
        assert on_host(rc.agent, "os1-ben").state == wire.STATE_RUNNING  # type: ignore[union-attr]

        # The reconciler does not start it again: it is meant to be stopped now.
        reconcile.reconcile(repair=True, wait=30)
        assert on_host(rc.agent, "os1-ann").state == wire.STATE_STOPPED  # type: ignore[union-attr]
    finally:
        with AgentClient(rc.agent.socket) as c:
            c.console_close(console.id)
